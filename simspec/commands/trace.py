"""``simspec trace``: trace statistics, conversion and synthesis."""

from __future__ import annotations

import click

from simspec.cli import LazyGroup

SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "stats": ("simspec.commands.trace_tools", "stats", "Count, span, rate, burstiness, length percentiles, classes."),
    "convert": ("simspec.commands.trace_tools", "convert", "Convert any supported format to the canonical CSV."),
    "synth": ("simspec.commands.trace_tools", "synth", "Generate a synthetic workload."),
}


@click.group("trace", cls=LazyGroup, lazy_commands=SUBCOMMANDS)
def trace() -> None:
    """Work with request traces in any supported format."""
