"""`stacchip-db chips` and `stacchip-db sample`: list the chips a selection picks, in any format.

Both run one call of the SQL selection functions (`stacchip_db.selection`) and stream its rows
into the output (`stacchip_db.chip_formats`); `--sql` prints that call with its values inlined
instead, to paste into psql or QGIS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from stacchip_db.chip_formats import FORMATS, write_chips
from stacchip_db.cli.options import with_database
from stacchip_db.cli.selection_options import filter_options, sample_options, warn_empty
from stacchip_db.db import Database, translate_errors
from stacchip_db.selection import (
    ChipFilter,
    Sampling,
    SelectionQuery,
    build_selection,
    stream_chips,
)

log = logging.getLogger(__name__)


def output_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--format, --output, --limit and --sql, shared by `chips` and `sample`."""
    for decorator in reversed([
        click.option(
            "--format", "output_format", type=click.Choice(FORMATS), default="table",
            show_default=True, help="table (for reading), csv (footprint as WKT), GeoJSON, "
            "or GeoParquet (needs --output).",
        ),
        click.option(
            "-o", "--output", type=click.Path(dir_okay=False, writable=True, path_type=Path),
            help="Write to FILE instead of standard output.",
        ),
        click.option(
            "--limit", type=click.IntRange(min=0), metavar="N", help="At most N chips."
        ),
        click.option(
            "--sql", "print_sql", is_flag=True,
            help="Print the SQL (values inlined, for psql or QGIS) instead of running it.",
        ),
    ]):
        func = decorator(func)
    return func


def _run(
    db: Database,
    selection: SelectionQuery,
    output_format: str,
    output: Path | None,
    print_sql: bool,
) -> None:
    if print_sql:
        click.echo(selection.as_string() + ";")
        return
    if output_format == "parquet" and output is None:
        raise click.BadParameter("parquet is binary: give --output FILE", param_hint="--format")
    with db.connect() as conn, translate_errors("selecting chips"):
        conn.read_only = True
        # The layer sampler says in NOTICEs which quota a stratum could not fill.
        conn.add_notice_handler(
            lambda notice: click.echo(f"Warning: {notice.message_primary}", err=True)
        )
        # streamed: one batch of rows is in memory at a time, whatever the selection's size
        count = write_chips(stream_chips(conn, selection), output_format, output)
        if count == 0:
            warn_empty(conn, selection)
    where = f" to {output}" if output else ""
    log.info("%d chips%s", count, where)


@click.command()
@filter_options
@output_options
@with_database
def chips(
    chip_filter: ChipFilter,
    output_format: str,
    output: Path | None,
    limit: int | None,
    print_sql: bool,
    db: Database,
) -> None:
    """List the chips matching the filters, in chip-key order."""
    _run(db, build_selection(chip_filter, limit=limit), output_format, output, print_sql)


@click.command()
@filter_options
@sample_options(required=True)
@output_options
@with_database
def sample(
    chip_filter: ChipFilter,
    sampling: Sampling,
    output_format: str,
    output: Path | None,
    limit: int | None,
    print_sql: bool,
    db: Database,
) -> None:
    """A reproducible sample of N chips (without replacement) matching the filters.

    Same seed and same data give the same chips on any server; --stratify-by gives each
    stratum the same count, capped by what it has; --split keeps one split of the spatial blocks.
    --by-location samples N places with all their chips that pass the filters, place by place.
    """
    selection = build_selection(chip_filter, sampling, limit=limit)
    _run(db, selection, output_format, output, print_sql)
