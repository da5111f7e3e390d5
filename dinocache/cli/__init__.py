"""The `dinocache` command line: one subcommand per stage, plus tools to look at what they made.

Entry points live here, apart from the library: each module of this package declares its commands'
options and help and imports the library (and with it torch) only when a command runs, so
`dinocache --help` and every `dinocache CMD --help` answer at once. Every user error surfaces as one
line on stderr and a non-zero exit code; tracebacks are for bugs.
"""

from __future__ import annotations

import importlib
import sys

import click

from dinocache import __version__
from dinocache.errors import DinocacheError, os_error_line

__all__ = ["main"]

#: Command name -> ``module:attribute`` in this package; a module is imported when its command is used
#: (listing them for `dinocache --help` imports these modules, none of which imports torch).
COMMANDS = {
    "extract": "dinocache.cli.extract:extract",
    "inspect": "dinocache.cli.extract:inspect",
    "backbones": "dinocache.cli.extract:backbones",
    "make-sample": "dinocache.cli.extract:make_sample",
    "train": "dinocache.cli.train:train",
    "finetune": "dinocache.cli.finetune:finetune",
    "export": "dinocache.cli.export:export",
    "bench-policy": "dinocache.cli.export:bench_policy",
    "demo": "dinocache.cli.demo:demo",
    "sim": "dinocache.cli.sim:sim",
}


class _LazyGroup(click.Group):
    """Commands loaded on use; a :class:`DinocacheError` from any of them, or a usage error (an option out
    of its range), becomes one line and exit code 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DinocacheError as err:
            click.echo(f"dinocache: error: {err}", err=True)
            sys.exit(2)
        except OSError as err:  # a full disk, a read-only folder, a lost mount: the user's to fix, in one line
            click.echo(f"dinocache: error: {os_error_line(err)}", err=True)
            sys.exit(2)
        except click.UsageError as err:  # an option out of its range, a missing one: one line too
            where = err.ctx.command_path if err.ctx is not None else "dinocache"
            click.echo(f"dinocache: error: {where}: {err.format_message()} (see {where} --help)", err=True)
            sys.exit(2)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dinocache")
def main() -> None:
    """Cache frozen DINO features once; train ACT heads on them; export one fused live policy.

    \b
    Stages:
      dinocache extract DATASET --backbone dinov2_vits14_reg --out features.zarr
      dinocache train features.zarr --out runs/act1
      dinocache export runs/act1 --out policy.pt2
    """
