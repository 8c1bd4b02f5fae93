"""Options and helpers shared by every command group (defined once, as rasterio's `rio`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from stacchip_db.config import Settings
from stacchip_db.db import Database, check_schema, connect, resolve_url
from stacchip_db.signing import SIGN_ENV, signing_as


@dataclass
class CliContext:
    """What the root group hands to every command."""

    settings: Settings
    verbose: int = 0
    quiet: bool = False

    def database_url(self) -> str:
        """The URL to use, starting the embedded database when no server URL is set."""
        return resolve_url(self.settings)


pass_cli = click.make_pass_decorator(CliContext)


def quiet() -> bool:
    """True under `stacchip-db -q`."""
    cli = click.get_current_context().find_object(CliContext)
    return bool(cli and cli.quiet)


def _apply_signing(ctx: click.Context, _param: click.Parameter, value: bool | None) -> None:
    # For the command's run only (its worker processes inherit it), not the caller's process.
    if value is not None:
        ctx.with_resource(signing_as(value))


sign_option = click.option(
    "--sign/--no-sign",
    default=None,
    expose_value=False,
    callback=_apply_signing,
    help="Append Planetary Computer SAS tokens to blob hrefs where pixels are read (default: "
    f"on, unless ${SIGN_ENV}=0); --no-sign if you have your own access.",
)
"""`--sign/--no-sign` of every command that reads pixels; the command sees nothing of it."""


def with_database(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give the command a `db: Database` whose schema passed the gate.

    The gate runs once per command, on its own connection, closed before the command runs.
    """

    @pass_cli
    @functools.wraps(func)
    def wrapper(cli: CliContext, *args: Any, **kwargs: Any) -> Any:
        url = cli.database_url()
        with connect(url, autocommit=True) as conn:
            check_schema(conn, url)
        return func(*args, db=Database(url, cli.settings.query_database_url), **kwargs)

    return wrapper


max_chips_option = click.option(
    "--max-chips",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Refuse an item whose grid has more than N chips, before reading it (a wrong "
    "proj:shape or a tiny --chip-size would otherwise take gigabytes). Default: 1,000,000 "
    "(stacchip_db.grid.MAX_CHIPS).",
)
"""`--max-chips` of `index` and `ingest`; None (not given) leaves the library's default."""
