"""The ``simspec`` command line.

Subcommands live in :mod:`simspec.commands` and are imported only when invoked, so that
``simspec replay`` never imports torch and ``simspec --help`` is fast. To add a command, add one line
to :data:`COMMANDS`.
"""

from __future__ import annotations

import importlib
import sys

import click

from simspec import __version__
from simspec.errors import SimspecError

# name -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "replay": ("simspec.commands.replay", "replay", "Replay a request trace through the simulated cluster."),
    "compare": ("simspec.commands.replay", "compare", "Replay one trace under every scheduler and compare."),
    "profiles": ("simspec.commands.profiles", "profiles", "List the bundled profiles."),
    "profile": ("simspec.commands.profile", "profile", "Show, compare or build (analytic) profiles."),
    "calibrate": ("simspec.commands.calibrate", "calibrate", "Measure latencies and acceptance of real models (torch)."),
    "trace": ("simspec.commands.trace", "trace", "Inspect, convert and synthesise request traces."),
    "sweep": ("simspec.commands.sweep", "sweep", "Run a grid of replays in parallel (local processes or Dask)."),
    "capacity": ("simspec.commands.capacity", "capacity", "Find the highest request rate that meets an SLO."),
    "report": ("simspec.commands.report", "report", "Compare runs or sweeps: tables and plots."),
    "validate": ("simspec.commands.validate", "validate", "Measure the simulator against real execution (torch)."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use.

    ``lazy_commands`` maps name -> (module, attribute, one-line help).
    """

    def __init__(self, *args, lazy_commands: dict[str, tuple[str, str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands if lazy_commands is not None else {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.lazy_commands)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy_commands:
            return None
        module, attr, _ = self.lazy_commands[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, self.lazy_commands[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="simspec")
def cli() -> None:
    """simspec: simulate speculative-decoding LLM serving, calibrated on real hardware.

    Typical use: `simspec replay TRACE --policy srpt --spec draft:k=4`, or `simspec compare` to
    replay the bundled Azure trace under every scheduler.
    """


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become one line on stderr and exit status 2."""
    try:
        cli.main(args=argv, prog_name="simspec", standalone_mode=False)
    except SimspecError as exc:
        click.echo(f"simspec: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("simspec: interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("simspec: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
