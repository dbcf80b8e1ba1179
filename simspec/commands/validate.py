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
@click.option("--engine", type=click.Choice(["simspec", "transformers-cb"]), default="simspec", show_default=True,
              help="Real server: simspec's own batch-1 runner, or transformers' continuous-batching engine "
                   "(paged KV, chunked prefill, FIFO scheduler; method none).")
@click.option("--config", "random_config", default=None, metavar="NAME|CONFIG.json",
              help="transformers-cb: serve a random-weight model built from this config instead of --model "
                   "(a bundled name such as llama-2-7b; for GPUs without weights).")
@click.option("--page-size", type=click.IntRange(min=4), default=32, show_default=True,
              help="transformers-cb: KV tokens per page (block size).")
@click.option("--num-blocks", type=click.IntRange(min=1), default=512, show_default=True,
              help="transformers-cb: KV pages in the cache.")
@click.option("--max-batch-tokens", type=click.IntRange(min=1), default=None,
              help="Most tokens fed per step. transformers-cb: the chunked-prefill budget [default: 512]; "
                   "simspec batched: must hold --max-batch whole prompts [default: exactly that].")
@click.option("--max-batch", "max_requests_per_batch", type=click.IntRange(min=1), default=None,
              help="Most requests per step. simspec: > 1 serves with the batched runners (none, draft, kangaroo, "
                   "hispec; lossless, packed varlen steps) [default: 1]; transformers-cb [default: 8].")
@click.option("--batching", type=click.Choice(["vllm", "preemptive"]), default=None,
              help="simspec batched: how batches form, as the simulator's --batching: vllm (running requests "
                   "first, newcomers admitted in the policy's order) or preemptive (the policy's top --max-batch "
                   "every step) [default: vllm].")
@click.option("--forced-acceptance", is_flag=True,
              help="simspec (draft, kangaroo, hispec): real draft and verify passes, but each request drafts and "
                   "accepts what the simulator samples for it (its seeded per-request stream; hispec: also how many "
                   "tokens each inner round appends), so both runs accept identically: validates cost composition "
                   "and scheduling independently of acceptance.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bar during the real run.")
@click.option("--engine-scheduler", type=click.Choice(["fifo"]), default="fifo", show_default=True,
              help="transformers-cb: the engine's scheduler (fifo <-> simspec fcfs).")
@click.option("--engine-cuda-graphs", is_flag=True, help="transformers-cb on CUDA: let the engine use CUDA graphs.")
@click.option("--max-requests", type=click.IntRange(min=1), default=None,
              help="Serve only the first N requests of TRACE.")
@click.option("--allow-overload", is_flag=True,
              help="transformers-cb and simspec batched: write the report even if the load average exceeded the "
                   "CPU count (marked valid: false; smoke tests only).")
@click.option("--max-other-cores", type=click.FloatRange(min=0.0), default=None,
              help="transformers-cb and simspec batched: refuse to report a CPU run during which other processes "
                   "kept more than this many cores busy on average (default: the cores the run's threads leave "
                   "free, at least 0.5; use ~0.1 for a run that backs a 5 %% figure).")
@click.option("--speed-reference", is_flag=True,
              help="simspec batched: time fixed batch-1 target forwards right before and after the real run (the "
                   "machine's speed vs the profile), record it with --fit-overhead, and also report a replay at the "
                   "run's speed relative to the fit's (a diagnostic of machine drift; on this CPU it did not track "
                   "the runs' own step times: docs/validation/README.md).")
@click.option("--force", is_flag=True, help="Replace --out if it is a simspec output directory.")
def validate(trace, model, method, adapter, policy, profile_arg, device, dtype, threads, out_dir, time_scale, seed,
             fit_overhead_to, no_heldout, force, engine, random_config, page_size, num_blocks, max_batch_tokens,
             max_requests_per_batch, engine_scheduler, engine_cuda_graphs, max_requests, allow_overload, batching,
             forced_acceptance, progress, max_other_cores, speed_reference):
    """Measure the simulator against real execution of TRACE and report its error.

    Serves TRACE with the real runners (arrivals on the wall clock, the policy's order at every
    step, EOS ignored) on one replica — batch size 1, or --max-batch B with the batched runners —
    replays it in the simulator with --profile, and reports mean/p50/p90/p99 latency and TTFT
    error, per-request latency MAPE and makespan error.
    """
    from simspec.errors import ConfigError

    if speed_reference and (engine == "transformers-cb" or ((max_requests_per_batch or 1) <= 1
                                                             and not forced_acceptance)):
        raise ConfigError("--speed-reference: only with --engine simspec and --max-batch > 1 or --forced-acceptance")
    if engine == "transformers-cb":
        from simspec.calibrate.validate_cb import EngineSettings, run_engine_validation

        if method != "none" or policy != "fcfs":
            raise ConfigError("--engine transformers-cb: serves without speculation under its FIFO scheduler: "
                              "use --method none --policy fcfs")
        if batching or forced_acceptance:
            raise ConfigError("--batching / --forced-acceptance: only with --engine simspec")
        settings = EngineSettings(scheduler=engine_scheduler, page_size_tokens=page_size, num_blocks=num_blocks,
                                  max_batch_tokens=max_batch_tokens or 512,
                                  max_requests_per_batch=max_requests_per_batch or 8,
                                  cuda_graphs=engine_cuda_graphs)
        run_engine_validation(trace, model=model, profile_arg=profile_arg, out_dir=out_dir, settings=settings,
                              device=device, dtype=dtype, threads=threads, time_scale=time_scale, seed=seed,
                              random_config=random_config, max_requests=max_requests,
                              allow_overload=allow_overload, fit_overhead_to=fit_overhead_to, echo=click.echo,
                              force=force, max_other_cores=max_other_cores)
        return
    if random_config or max_requests:
        raise ConfigError("--config / --max-requests: only with --engine transformers-cb")
    batch = max_requests_per_batch or 1
    if batch > 1 or forced_acceptance:
        from simspec.calibrate.validate_batched import BatchSettings, run_batched_validation

        settings = BatchSettings(max_batch=batch, batching=batching or "vllm", max_batched_tokens=max_batch_tokens,
                                 forced=forced_acceptance)
        run_batched_validation(trace, model=model, method=method, adapter=adapter, policy=policy,
                               profile_arg=profile_arg, device=device, out_dir=out_dir, settings=settings,
                               time_scale=time_scale, seed=seed, dtype=dtype, threads=threads,
                               fit_overhead_to=fit_overhead_to, allow_overload=allow_overload, progress=progress,
                               echo=click.echo, force=force, max_other_cores=max_other_cores,
                               speed_reference=speed_reference)
        return
    if batching or max_batch_tokens or allow_overload or max_other_cores is not None:
        raise ConfigError("--batching / --max-batch-tokens / --allow-overload / --max-other-cores: only with "
                          "--max-batch > 1, "
                          "--forced-acceptance or --engine transformers-cb")
    from simspec.calibrate.validate import run_validation

    run_validation(trace, model=model, method=method, adapter=adapter, policy=policy, profile_arg=profile_arg,
                   device=device, out_dir=out_dir, time_scale=time_scale, seed=seed, dtype=dtype, threads=threads,
                   fit_overhead_to=fit_overhead_to, heldout=not no_heldout, echo=click.echo, force=force,
                   progress=progress)
