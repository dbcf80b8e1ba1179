"""``simspec report``: comparison tables and plots from runs and sweeps."""

from __future__ import annotations

import click


@click.command("report")
@click.argument("inputs", nargs=-1, required=True, metavar="RUN_OR_SWEEP...")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for summary.csv, summary.md, report.md and the PNG plots.")
@click.option("--force", is_flag=True, help="Replace --out if it is a simspec output directory.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def report(inputs, out_dir, force, no_progress):
    """Compare runs and sweeps: print tables, write CSV/Markdown and PNG plots.

    Each input is a run directory (from `simspec replay --out`), a directory of runs (from
    `simspec compare --out`) or a sweep directory (from `simspec sweep --out`). Plots: latency and
    TTFT CDFs per policy/method; for sweeps with a rate axis, mean/p99 latency and goodput against
    the request rate; batch size and chosen k over time per replica; tokens committed per decode
    step.
    """
    from simspec.atomic import check_output_dir
    from simspec.report import write_report

    check_output_dir(out_dir, "report", force=force)
    rep = write_report(list(inputs), out_dir, force=force, progress=not no_progress)
    for line in rep.terminal:
        click.echo(line)
    pngs = sorted(n for n in rep.files if n.endswith(".png"))
    click.echo(f"wrote {out_dir}/: report.md, summary.csv, summary.md, {len(pngs)} plot(s): {', '.join(pngs)}")
