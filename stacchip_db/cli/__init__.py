"""The `stacchip-db` command: a root group, its global options, and the one error boundary.

Known errors (`StacchipError`) print one line on stderr and exit 1; `-v` adds the traceback.
Usage errors are click's and exit 2. Each command group lives in its own module.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import click

from stacchip_db import __version__
from stacchip_db.cli.options import CliContext
from stacchip_db.config import DATABASE_URL_ENV, MaskPasswordsFilter, Settings, mask_url
from stacchip_db.errors import StacchipError


class CliGroup(click.Group):
    """Root group whose `invoke` is the error boundary for every subcommand."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StacchipError as exc:
            cli = ctx.find_object(CliContext)
            if cli is not None and cli.verbose:
                traceback.print_exc(file=sys.stderr)
            click.echo(f"Error: {mask_url(str(exc))}", err=True)
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


@click.group(cls=CliGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    envvar=DATABASE_URL_ENV,
    metavar="URL",
    help=f"libpq URL of a PostgreSQL server (or ${DATABASE_URL_ENV}); "
    "without one, the embedded database under $STACCHIP_HOME is used.",
)
@click.option(
    "-v", "--verbose", count=True, help="More output; -v shows tracebacks, -vv debug logs."
)
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(__version__, prog_name="stacchip-db")
@click.pass_context
def main(ctx: click.Context, database_url: str | None, verbose: int, quiet: bool) -> None:
    """Index satellite and aerial imagery as training chips in PostGIS + pgstac."""
    _configure_logging(verbose, quiet)
    ctx.obj = CliContext(Settings.from_env(database_url=database_url), verbose, quiet)


def _register() -> None:
    # Imported here so each command module can import `main`'s helpers without cycles.
    from stacchip_db.cli import db

    main.add_command(db.db)

    from stacchip_db.cli import chips

    main.add_command(chips.chips)
    main.add_command(chips.sample)

    from stacchip_db.cli import index

    main.add_command(index.index)
    main.add_command(index.export_index)

    from stacchip_db.cli import pictures, prechip, stats

    main.add_command(prechip.prechip)
    main.add_command(stats.stats)
    main.add_command(pictures.preview)
    main.add_command(pictures.map_)

    from stacchip_db.cli import ingest

    main.add_command(ingest.ingest)


_register()
