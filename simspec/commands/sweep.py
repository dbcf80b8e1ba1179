"""``simspec sweep``: run a grid of replays in parallel (local processes or a Dask cluster)."""

from __future__ import annotations

import click


@click.command("sweep")
@click.argument("grid", metavar="GRID.yaml")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Sweep directory: runs/<id>/ per run, failed/<id>.json per failed run, sweep.parquet, "
                   "sweep.json. Rerunning into the same directory resumes; a directory that is not a "
                   "sweep is refused.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Local worker processes [default: all CPU cores].")
@click.option("--scheduler-address", default=None, metavar="tcp://HOST:PORT",
              help="Run on this Dask distributed scheduler instead of local processes (the workers need "
                   "simspec installed and the trace, profile and --out on a shared file system).")
@click.option("--retry-failed", is_flag=True, help="Rerun runs recorded as failed by an earlier attempt.")
@click.option("--dry-run", is_flag=True, help="Validate the grid and list its runs; run nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no table.")
def sweep(grid, out_dir, workers, scheduler_address, retry_failed, dry_run, quiet):
    """Run every combination of the axes in GRID.yaml and collect one row per run in
    OUT/sweep.parquet.

    \b
    GRID.yaml (option names as in `simspec replay`, or vLLM's max_num_seqs,
    max_num_batched_tokens, request_rate):
      base:                      # any replay option (trace, profile, policy, spec, spec_len,
        trace: azure_code_2023   #  replicas, max_batch, kv_budget_tokens, seed, slo_ttft_ms, ...)
        first: 200               #  and trace transforms (first, rate, rate_scale, window, ...)
      axes:                      # lists; the sweep is their cartesian product
        policy: [fcfs, srpt]
        spec: [none, "draft:k=4"]
        rate: [1.0, 2.0]         # target mean request rate (req/s)

    Each run is written atomically to OUT/runs/<id> (id: a hash of its resolved configuration).
    An interrupted sweep restarted with the same command skips the finished runs; a run that
    fails is recorded in OUT/failed/<id>.json and the others go on. See docs/sweeps.md.
    """
    from simspec.atomic import check_output_dir
    from simspec.report import display_frame, text_table
    from simspec.sweep import load_grid, run_sweep, terminate_on_signals

    if not dry_run:  # before the grid is expanded (it reads every trace): a bad --out fails at once
        check_output_dir(out_dir, "sweep", resume=True)
    g = load_grid(grid)
    if dry_run:
        click.echo(f"{grid}: {len(g.runs)} run(s) over axes {', '.join(g.axes) or '(none)'}")
        for r in g.runs:
            click.echo(f"  {r.run_id}  " + ", ".join(f"{k}={v}" for k, v in r.axes.items())
                       + (f"  ({r.offered_rate_rps:.3g} req/s)" if r.offered_rate_rps else ""))
        return
    try:
        with terminate_on_signals():
            res = run_sweep(g, out_dir, workers=workers, scheduler_address=scheduler_address, progress=not quiet,
                            retry_failed=retry_failed, echo=lambda m: click.echo(m, err=True))
    except KeyboardInterrupt:
        click.echo(f"sweep stopped; finished runs are kept in {out_dir}/runs: run the same command to resume",
                   err=True)
        raise
    if not quiet:
        click.echo(text_table(display_frame(res.table, list(g.axes) + ["status"], compact=True), max_rows=40))
        click.echo()
    msg = (f"{res.n_runs} run(s): {res.n_executed} ran on {res.executor}, {res.n_skipped} already done; "
           f"{res.n_failed} failed; {res.wall_s:.1f} s; wrote {res.out_dir / 'sweep.parquet'}")
    click.echo(msg)
    if res.n_failed:
        click.echo(f"failed runs: see {res.out_dir / 'failed'}/<id>.json (error and traceback)", err=True)
