"""``simspec capacity``: the highest request rate that meets an SLO, per policy/method."""

from __future__ import annotations

from pathlib import Path

import click

from simspec.commands.replay import run_options


@click.command("capacity")
@click.option("--trace", "trace_arg", default=None, metavar="FILE|NAME",
              help="Trace file or bundled trace name [default: azure_code_2023]. Its arrival times are "
                   "rescaled to each candidate rate.")
@click.option("--format", "fmt", default=None, metavar="F", help="Trace format (default: detect).")
@click.option("--first", type=click.IntRange(min=2), default=None, metavar="N",
              help="Use the first N requests of the trace.")
@click.option("--window", default=None, metavar="START:END", help="Use requests arriving in [START, END) s.")
@click.option("--policy", default="fcfs", show_default=True, metavar="P1[,P2...]",
              help="Scheduler(s) to search, comma separated (e.g. fcfs,srpt:predictor=oracle).")
@run_options
@click.option("--attainment", type=float, default=None, metavar="FRACTION",
              help="Criterion: at least this fraction of requests meet the TTFT and TPOT thresholds "
                   "(e.g. 0.9).")
@click.option("--p99", "p99", is_flag=True,
              help="Criterion: p99 TTFT and p99 TPOT within the thresholds [the default].")
@click.option("--rate-lo", type=float, default=None, metavar="R",
              help="Lowest rate searched, req/s [default: the trace's mean rate / 10].")
@click.option("--rate-hi", type=float, default=None, metavar="R",
              help="Highest rate searched, req/s [default: the trace's mean rate x 10].")
@click.option("--tol", "tol_rps", type=float, default=None, metavar="R",
              help="Stop when the bracket is narrower than R req/s [default: (rate-hi - rate-lo) / 200].")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes searching policy/method combinations in parallel [default: one per "
                   "combination, at most the CPU cores].")
@click.option("--out", "out_path", default="capacity.json", show_default=True, type=click.Path(dir_okay=False),
              help="JSON file with every search and every simulated point.")
@click.option("--force", is_flag=True, help="Replace --out if it is a capacity file simspec wrote.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no table (the output file is still printed).")
def capacity(trace_arg, fmt, first, window, policy, spec, spec_len, profile_name, replicas, router, max_batch,
             kv_budget_tokens, max_batched_tokens, preempt, seed, slo_ttft_ms, slo_tpot_ms, allow_extrapolation,
             goodput, attainment, p99, rate_lo, rate_hi, tol_rps, workers, out_path, force, quiet):
    """Find, by bisection over the request rate, the highest rate at which the SLO holds, for each
    combination of --policy, --spec and --spec-len (each accepts a comma list).

    \b
    Example:
      simspec capacity --first 200 --policy fcfs,srpt:predictor=oracle --spec none,draft:k=4 \\
          --slo-ttft-ms 3000 --slo-tpot-ms 150 --attainment 0.9 --rate-lo 0.05 --rate-hi 4

    The SLO must hold below the capacity and fail above it; the result is within --tol below the
    boundary, for this trace shape and --seed.
    """
    import itertools

    from simspec.atomic import check_output_file, marker_doc, write_json
    from simspec.capacity import SLO, capacity_task, check_range, max_evaluations, result_from_dict, split_components
    from simspec.commands.replay import build_config
    from simspec.errors import ConfigError
    from simspec.profile import DEFAULT_PROFILE
    from simspec.sweep import (
        _sha256_file, default_workers, load_run_trace, open_executor, resolve_profile, resolve_trace,
        terminate_on_signals,
    )
    from simspec.profile import load_profile
    from simspec.traces.formats import DEFAULT_TRACE
    from simspec.traces.stats import mean_rate_rps

    if attainment is not None and p99:
        raise ConfigError("--attainment and --p99: choose one criterion")
    slo = SLO(ttft_ms=slo_ttft_ms, tpot_ms=slo_tpot_ms, attainment=attainment)
    if goodput:
        raise ConfigError("--goodput: not used by capacity (its criterion is --slo-ttft-ms/--slo-tpot-ms with "
                          "--attainment or --p99)")
    check_output_file(out_path, force=force, simspec_json=True)
    tpath = resolve_trace(trace_arg or DEFAULT_TRACE, Path.cwd())
    tsha = _sha256_file(tpath)
    transforms = {"window": window, "only_class": (), "first": first, "rate": None, "rate_scale": None,
                  "max_prompt_tokens": None, "max_output_tokens": None, "relabel_classes": None}
    trace = load_run_trace(str(tpath), fmt, tsha, transforms, seed)
    native = mean_rate_rps(trace.arrival_s)
    if native is None:
        raise ConfigError(f"--trace {tpath}: needs at least two requests with different arrival times")
    lo = rate_lo if rate_lo is not None else native / 10
    hi = rate_hi if rate_hi is not None else native * 10
    tol = tol_rps if tol_rps is not None else (hi - lo) / 200
    check_range(lo, hi, tol)
    ppath = resolve_profile(profile_name or DEFAULT_PROFILE, Path.cwd())
    prof = load_profile(ppath)

    combos = list(itertools.product(split_components(policy), split_components(spec), split_components(spec_len)))
    if not combos:
        raise ConfigError("--policy/--spec/--spec-len: nothing to search")
    tasks = []
    for pol, sp, sl in combos:
        cfg = build_config(pol, sp, sl, replicas, router, max_batch, kv_budget_tokens, preempt, seed,
                           slo_ttft_ms, slo_tpot_ms, allow_extrapolation, max_batched_tokens)
        tasks.append({"trace": str(tpath), "format": fmt, "trace_sha256": tsha, "transforms": transforms,
                      "seed": seed, "profile": str(ppath), "profile_sha256": prof.sha256,
                      "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "attainment": slo.attainment},
                      "run_config": cfg.to_dict(), "rate_lo": lo, "rate_hi": hi, "tol_rps": tol})
    click.echo(f"trace: {tpath.name} ({len(trace)} requests, {native:.3g} req/s as recorded); profile: "
               f"{prof.name}; SLO: {slo.describe()}; searching {lo:.4g}..{hi:.4g} req/s to within {tol:.3g}",
               err=True)
    n_workers = workers or min(default_workers(), len(tasks))
    results = [None] * len(tasks)
    per_task = max_evaluations(lo, hi, tol)
    pbar = None
    if not quiet:
        from tqdm import tqdm

        pbar = tqdm(total=per_task * len(tasks), unit="sim", desc="capacity", delay=1.0, leave=False)
    try:
        with terminate_on_signals():
            if n_workers == 1 or len(tasks) == 1:
                for i, t in enumerate(tasks):
                    done0 = pbar.n if pbar is not None else 0
                    results[i] = capacity_task(t, on_eval=(lambda: pbar.update(1)) if pbar is not None else None)
                    if pbar is not None:  # a search that stops at an end of the range needs fewer
                        pbar.update(per_task - (pbar.n - done0))
            else:
                with open_executor(n_workers) as ex:
                    futs = {ex.submit(capacity_task, t, str(i)): i for i, t in enumerate(tasks)}
                    try:
                        for fut in ex.as_completed(list(futs)):
                            results[futs[fut]] = fut.result()
                            if pbar is not None:
                                pbar.update(per_task)
                    except BaseException:
                        ex.cancel()
                        raise
    finally:
        if pbar is not None:
            pbar.close()
    res = [result_from_dict(r) for r in results]

    rows = [["policy", "spec", "spec-len", "capacity (req/s)", "bracket (req/s)", "p99 TTFT (ms)",
             "p99 TPOT (ms)", "attainment", "sims"]]
    for r in res:
        at = r.at_capacity
        cap = ("< " + f"{lo:.4g}") if r.capacity_rps is None else (
            (">= " if r.status == "above-range" else "") + f"{r.capacity_rps:.4g}")
        f = lambda v, d: "-" if v is None else f"{v:,.{d}f}"
        rows.append([r.policy, r.spec, r.spec_len, cap,
                     f"{r.bracket_rps[0]:.4g}..{r.bracket_rps[1]:.4g}" if r.bracket_rps else "-",
                     f(at.ttft_ms_p99 if at else None, 1), f(at.tpot_ms_p99 if at else None, 2),
                     f(at.slo_attainment if at else None, 3), str(len(r.evaluations))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for j, row in enumerate(rows if not quiet else []):
        click.echo("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            click.echo("  ".join("-" * w for w in widths))
    write_json(out_path, {
        "simspec_output": marker_doc("capacity"),
        "trace": {"path": str(tpath), "sha256": tsha, "n_requests": len(trace), "recorded_rate_rps": native,
                  "first": first, "window": window},
        "profile": {"name": prof.name, "path": str(ppath), "sha256": prof.sha256},
        "slo": {"criterion": slo.criterion, "ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms,
                "attainment": slo.attainment, "description": slo.describe()},
        "search": {"rate_lo_rps": lo, "rate_hi_rps": hi, "tol_rps": tol, "seed": seed},
        "results": [r.to_dict() for r in res],
    })
    click.echo(f"{'' if quiet else chr(10)}wrote {out_path}")
