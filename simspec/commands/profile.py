"""``simspec profile``: show, diff and build profiles."""

from __future__ import annotations

import click

from simspec.cli import LazyGroup

SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "show": ("simspec.commands.profile_show", "show", "Print a profile's meta, stages, fit errors and classes."),
    "diff": ("simspec.commands.profile_show", "diff", "Compare two profiles stage by stage."),
    "analytic": ("simspec.commands.profile_analytic", "analytic",
                 "Build a roofline (analytic) profile from a GPU datasheet and a model config."),
}


@click.group("profile", cls=LazyGroup, lazy_commands=SUBCOMMANDS)
def profile() -> None:
    """Work with profile files (bundled names or paths)."""
