"""``simspec validate``: serve a trace for real on the calibration device, simulate it with a
profile, and report the simulator's latency error (torch; see :mod:`simspec.calibrate.validate`)."""

from __future__ import annotations

import click


@click.command("validate")
@click.argument("trace", metavar="TRACE")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Model: the bundled name, a local Hugging Face directory, or a hub id.")
@click.option("--method", default="none", show_default=True, metavar="METHOD[:k=v,...]",
              help="none | draft:k=4,draft_layers=8 | kangaroo:exit=2,gamma=6,eta=0.6 | "
                   "hispec:draft_exit=4,inter_exit=8,nd=2,ni=4 (parameters as in replay --spec).")
@click.option("--adapter", type=str, default=None, metavar="DIR",
              help="Early-exit adapter directory for kangaroo/hispec [default: logit lens].")
@click.option("--policy", default="fcfs", show_default=True, metavar="SCHEDULER[:k=v,...]",
              help="fcfs | srpt | laps-sd (any scheduler replay accepts).")
@click.option("--profile", "profile_arg", required=True, metavar="NAME|PATH",
              help="Profile of the same model and device (a bundled name or a JSON file).")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N")
@click.option("--dtype", default=None, type=click.Choice(["bf16", "fp16", "fp32"]),
              help="Model dtype [default: the profile's meta.dtype].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads [default: the profile's meta.threads].")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Report directory: validation.json, summary.json, per_request.csv, latency_scatter.png, "
                   "report.txt, real_requests.csv, real_steps.csv, sim_requests.csv. Must not exist (or --force).")
@click.option("--time-scale", type=float, default=1.0, show_default=True,
              help="Multiply the trace's arrival times by this (both runs use the scaled trace).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the simulated run and policies (>= 0).")
@click.option("--fit-overhead", "fit_overhead_to", default=None, metavar="PATH",
              help="Also fit latency.overhead (fraction, fixed_ms) from this run's steps and write a copy "
                   "of the profile with it to PATH. Validate that profile on a different trace.")
@click.option("--no-heldout", is_flag=True, help="Skip the held-out latency-model measurements.")
@click.option("--force", is_flag=True, help="Replace --out if it is a simspec output directory.")
def validate(trace, model, method, adapter, policy, profile_arg, device, dtype, threads, out_dir, time_scale, seed,
             fit_overhead_to, no_heldout, force):
    """Measure the simulator against real execution of TRACE and report its error.

    Serves TRACE on one batch-size-1 replica with the real runner (arrivals on the wall clock,
    the policy's order at every step, EOS ignored), replays it in the simulator with --profile,
    and reports mean/p50/p90/p99 latency and TTFT error, per-request latency MAPE and makespan error.
    """
    from simspec.calibrate.validate import run_validation

    run_validation(trace, model=model, method=method, adapter=adapter, policy=policy, profile_arg=profile_arg,
                   device=device, out_dir=out_dir, time_scale=time_scale, seed=seed, dtype=dtype, threads=threads,
                   fit_overhead_to=fit_overhead_to, heldout=not no_heldout, echo=click.echo, force=force)
