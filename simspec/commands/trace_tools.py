"""``simspec trace stats|convert|synth``: inspect, convert and synthesise request traces.

FILE arguments accept any supported format (auto-detected, ``--format`` to override) or the name of
a bundled trace / length table (``azure_code_2023``, ``sharegpt``, ...). Repairs and transforms are
listed as ``note:`` lines on stderr.
"""

from __future__ import annotations

import json
import math

import click

from simspec.traces.transforms import format_option, load_and_transform, transform_options


def _echo_notes(trace) -> None:
    for n in trace.notes:
        click.echo(f"note: {n}", err=True)


class _Phases:
    """A progress bar over the phases of a long command (read, transform, statistics, write),
    shown on stderr only when the command takes more than a second."""

    def __init__(self, names: list[str], enabled: bool = True):
        self.names = names
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=len(names), desc=names[0], unit="phase", delay=1.0, leave=False,
                            bar_format="{desc}: {n_fmt}/{total_fmt} phases [{elapsed}]")

    def next(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if self.bar.n < len(self.names):
                self.bar.set_description(self.names[self.bar.n])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _load_with_progress(file, fmt, seed, transforms, phases: _Phases):
    from simspec.traces.formats import resolve_trace_arg

    trace = load_and_transform(resolve_trace_arg(file), fmt, seed=seed, **transforms)
    phases.next()
    return trace


@click.command("stats")
@click.argument("file")
@format_option
@transform_options
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed for arrivals given to a length-only table and for class mixtures (>= 0).")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress bar (shown only when reading takes over a second).")
def stats(file, fmt, seed, as_json, no_progress, transforms):
    """Count, span, mean rate, interarrival CV, length percentiles and classes of FILE.

    Mean rate is (n-1)/span; CV is std/mean of the interarrival gaps (ddof 0); percentiles are
    linear-interpolated (numpy). Transform options apply before the statistics are taken.
    """
    from simspec.traces.stats import format_stats, trace_stats

    phases = _Phases(["reading and transforming", "statistics"], enabled=not no_progress)
    try:
        trace = _load_with_progress(file, fmt, seed, transforms, phases)
        st = trace_stats(trace)
        phases.next()
    finally:
        phases.close()
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True, allow_nan=False))
    else:
        click.echo(format_stats(st))


@click.command("convert")
@click.argument("src", metavar="IN")
@click.argument("dst", metavar="OUT")
@format_option
@transform_options
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed for arrivals given to a length-only table and for class mixtures (>= 0).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (a regular file).")
def convert(src, dst, fmt, seed, force, transforms):
    """Convert IN (any supported format) to the canonical CSV OUT, written atomically.

    Transform options (rate, window, first N, caps, class filter/relabel) are applied on the way.
    OUT is checked (writable, not an existing file unless --force) before IN is read.
    """
    from simspec.atomic import check_output_file
    from simspec.traces.formats import resolve_trace_arg, write_canonical

    check_output_file(dst, force=force, what="OUT")
    trace = load_and_transform(resolve_trace_arg(src), fmt, seed=seed, **transforms)
    write_canonical(trace, dst)
    _echo_notes(trace)
    click.echo(f"wrote {len(trace)} requests to {dst}")


@click.command("synth")
@click.option("--arrivals", "arrivals_spec", default="poisson", show_default=True,
              metavar="poisson|gamma|replay:FILE",
              help="Arrival process: Poisson, Gamma (with --cv), or the timestamps of a trace.")
@click.option("--rate", type=float, default=None, metavar="R",
              help="Mean arrival rate, req/s (for replay: rescale the replayed times to R).")
@click.option("--cv", type=float, default=None, metavar="C", help="Interarrival coefficient of variation (gamma).")
@click.option("--n", "n", type=int, default=None, metavar="N", help="Number of requests.")
@click.option("--duration-s", type=float, default=None, metavar="D", help="Generate arrivals for D seconds.")
@click.option("--lengths", "lengths_spec", required=True,
              metavar="fixed:P,O|lognormal:PM,PCV,OM,OCV|lognormal:fit=SRC|empirical:SRC",
              help="Length distribution (SRC: a file or bundled name, e.g. sharegpt, arxiv, azure_code_2023).")
@click.option("--classes", "classes_spec", default=None, metavar="SPEC",
              help="Acceptance classes: NAME, a mixture code:0.3,chat:0.7, or map:SRC=DST,...,*=DST.")
@click.option("--slo-class", default="", help="SLO class for every request (default none).")
@click.option("--max-prompt-tokens", type=int, default=None, metavar="N", help="Clip prompt lengths to N.")
@click.option("--max-output-tokens", type=int, default=None, metavar="N", help="Clip output lengths to N.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of every random stream (>= 0).")
@click.option("--out", "out", required=True, metavar="FILE", help="Canonical CSV to write (atomically).")
@click.option("--force", is_flag=True, help="Replace --out if it exists (a regular file).")
def synth(arrivals_spec, rate, cv, n, duration_s, lengths_spec, classes_spec, slo_class,
          max_prompt_tokens, max_output_tokens, seed, out, force):
    """Generate a synthetic workload and write it as canonical CSV.

    Example: simspec trace synth --arrivals gamma --rate 4 --cv 2 --n 2000
    --lengths empirical:sharegpt --classes code:0.3,chat:0.7 --seed 1 --out w.csv
    """
    from simspec.errors import ConfigError
    from simspec.traces.formats import write_canonical
    from simspec.traces.synthetic import (ReplayedArrivals, parse_arrivals, parse_classes, parse_lengths,
                                          synthesize)
    from simspec.traces.transforms import cap_lengths, rescale_rate

    from simspec.atomic import check_output_file

    if n is None and duration_s is None and not arrivals_spec.lower().startswith(("replay:", "trace:")):
        raise ConfigError("give --n N (requests) or --duration-s D (seconds)")
    check_output_file(out, force=force)
    process = parse_arrivals(arrivals_spec, None if arrivals_spec.lower().startswith(("replay", "trace")) else rate, cv)
    replay_rate = None
    if isinstance(process, ReplayedArrivals) and rate is not None:
        if not (math.isfinite(rate) and rate > 0):
            raise ConfigError(f"--rate must be a finite number > 0, got {rate!r}")
        replay_rate = rate
    lengths = parse_lengths(lengths_spec)
    classes = parse_classes(classes_spec) if classes_spec else None
    trace = synthesize(process, lengths, n=n, duration_s=duration_s, classes=classes, slo_class=slo_class,
                       seed=seed, source=f"synthetic ({out})")
    if replay_rate is not None:
        trace = rescale_rate(trace, rate=replay_rate)
    if max_prompt_tokens is not None or max_output_tokens is not None:
        trace = cap_lengths(trace, max_prompt_tokens=max_prompt_tokens, max_output_tokens=max_output_tokens)
    write_canonical(trace, out)
    _echo_notes(trace)
    click.echo(f"wrote {len(trace)} requests to {out}")
