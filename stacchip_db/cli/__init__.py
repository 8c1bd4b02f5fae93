"""The `stacchip-db` command: a root group, its global options, and the one error boundary.

Known errors (`StacchipError`) print one line on stderr and exit 1; `-v` adds the traceback.
Usage errors are click's and exit 2. Each command group lives in its own module, imported only
when its command runs (or `--help` lists them all): `stacchip-db index` does not pay for
geopandas (ingest), matplotlib (pictures) or torch-side readers (prechip).
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from typing import Any

import click

from stacchip_db import __version__
from stacchip_db.config import DATABASE_URL_ENV, MaskPasswordsFilter, Settings, mask_url
from stacchip_db.errors import StacchipError

LAZY_COMMANDS = {
    "db": "stacchip_db.cli.db:db",
    "demo": "stacchip_db.cli.demo:demo",
    "chips": "stacchip_db.cli.chips:chips",
    "sample": "stacchip_db.cli.chips:sample",
    "locations": "stacchip_db.cli.locations:locations",
    "audit": "stacchip_db.cli.audit:audit",
    "index": "stacchip_db.cli.index:index",
    "export-index": "stacchip_db.cli.index:export_index",
    "prechip": "stacchip_db.cli.prechip:prechip",
    "stats": "stacchip_db.cli.stats:stats",
    "preview": "stacchip_db.cli.pictures:preview",
    "map": "stacchip_db.cli.pictures:map_",
    "ingest": "stacchip_db.cli.ingest:ingest",
    "layer": "stacchip_db.cli.layer:layer",
}
"""The root group's commands: name -> `module:attribute`, imported on first use."""

PARAMETER_FLAGS = {
    "`query`": "--query",
    "`statement_timeout_s`": "--statement-timeout",
    "`quality`": "--quality",
    "`quality_asset`": "--quality-asset",
    "`chip_size`": "--chip-size",
    "`max_chips`": "--max-chips",
    "`sources`": "PATH_OR_URL",
    "`collection`": "--collection",
    "`index`": "--index",
    "`prefix`": "--prefix",
    "`stac_api`": "--stac-api",
    "`bands`": "--bands",
    "`platform`": "--platform",
    "`shard_count`": "--shard-count",
    "`keep_partial`": "--keep-partial",
    "`cube_size`": "--cube-size",
    "`jobs`": "--jobs",
    "`bulk`": "--bulk",
    "`time_series`": "--time-series",
    "`pick`": "--pick",
    "`stratify_by`": "--stratify-by",
    "`name`": "NAME",
    "`source`": "SOURCE",
    "`columns`": "--column",
    "`classes`": "--classes",
    "`within`": "--within",
    "`min_fractions`": "--class",
    "`quotas`": "--quota",
}
"""Library messages name the Python parameter in backticks; the CLI names its flag (or
argument) instead."""


def in_cli_words(text: str) -> str:
    """A library message as the CLI says it: flags for parameters, masked URLs."""
    for parameter, flag in PARAMETER_FLAGS.items():
        text = text.replace(parameter, flag)
    return mask_url(text)


def cli_message(exc: StacchipError) -> str:
    """The one line the CLI prints for a library error."""
    return in_cli_words(str(exc))


class CliGroup(click.Group):
    """Root group whose `invoke` is the error boundary for every subcommand.

    Commands in `lazy_commands` (name -> `module:attribute`) are imported when first looked up.
    """

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            module, _, attribute = self.lazy_commands[cmd_name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        from stacchip_db.cli.options import CliContext

        try:
            return super().invoke(ctx)
        except StacchipError as exc:
            cli = ctx.find_object(CliContext)
            if cli is not None and cli.verbose:
                traceback.print_exc(file=sys.stderr)
            click.echo(f"Error: {cli_message(exc)}", err=True)
            ctx.exit(1)


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(MaskPasswordsFilter())
    logger = logging.getLogger("stacchip_db")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


@click.group(
    cls=CliGroup,
    lazy_commands=LAZY_COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--database-url",
    envvar=DATABASE_URL_ENV,
    metavar="URL",
    help=f"libpq URL of a PostgreSQL server (or ${DATABASE_URL_ENV}); "
    "without one, the embedded database under $STACCHIP_HOME is used. On shared machines "
    f"prefer ${DATABASE_URL_ENV}: command-line arguments, passwords included, show in `ps`.",
)
@click.option(
    "-v", "--verbose", count=True, help="More output; -v shows tracebacks, -vv debug logs."
)
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(__version__, prog_name="stacchip-db")
@click.pass_context
def main(ctx: click.Context, database_url: str | None, verbose: int, quiet: bool) -> None:
    """Index satellite and aerial imagery as training chips in PostGIS + pgstac."""
    from stacchip_db.cli.options import CliContext

    _configure_logging(verbose, quiet)
    ctx.obj = CliContext(Settings.from_env(database_url=database_url), verbose, quiet)
