"""``simspec report``: comparison tables and plots from runs and sweeps."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("inputs", nargs=-1, required=True, metavar="RUN_OR_SWEEP...")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for summary.csv, summary.md, report.md and the PNG plots.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def report(inputs, out_dir, force):
    """Compare runs and sweeps: print tables, write CSV/Markdown and PNG plots.

    Each input is a run directory (from `simspec replay --out`), a directory of runs (from
    `simspec compare --out`) or a sweep directory (from `simspec sweep --out`). Plots: latency and
    TTFT CDFs per policy/method; for sweeps with a rate axis, mean/p99 latency and goodput against
    the request rate; batch size and chosen k over time per replica; tokens committed per decode
    step.
    """
    from simspec.errors import ConfigError
    from simspec.report import write_report

    if Path(out_dir).exists() and not force:
        raise ConfigError(f"--out: {out_dir} already exists (use --force to replace it)")
    rep = write_report(list(inputs), out_dir, force=force)
    for line in rep.terminal:
        click.echo(line)
    pngs = sorted(n for n in rep.files if n.endswith(".png"))
    click.echo(f"wrote {out_dir}/: report.md, summary.csv, summary.md, {len(pngs)} plot(s): {', '.join(pngs)}")
