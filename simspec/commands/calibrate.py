"""``simspec calibrate``: the torch half of simspec. Each subcommand is its own module, imported
(with torch) only when run."""

from __future__ import annotations

import click

from simspec.cli import LazyGroup

SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "latency": ("simspec.commands.calibrate_latency", "latency",
                "Time decoder layers, LM head, embedding, adapter and draft steps; fit and write a profile."),
    "acceptance": ("simspec.commands.calibrate_acceptance", "acceptance",
                   "Run real speculative decoding over a prompt set; write per-class acceptance."),
    "adapter": ("simspec.commands.calibrate_acceptance", "adapter",
                "Train a Kangaroo/HiSpec early-exit adapter by self-distillation."),
    "import-acceptance": ("simspec.commands.calibrate_acceptance", "import_acceptance",
                          "Import Spec-Bench-style accept_lengths logs as an acceptance section."),
}


@click.group("calibrate", cls=LazyGroup, lazy_commands=SUBCOMMANDS)
def calibrate() -> None:
    """Measure real models (torch + transformers) and write a simspec profile."""
