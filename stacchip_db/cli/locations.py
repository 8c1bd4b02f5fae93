"""`stacchip-db locations`: how many places the chips passing the filters cover, and how many
dates each place has (the time series a `prechip --time-series T` could make)."""

from __future__ import annotations

import json

import click

from stacchip_db.cli.options import with_database
from stacchip_db.cli.selection_options import filter_options
from stacchip_db.db import Database, translate_errors
from stacchip_db.selection import ChipFilter


@click.command()
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@with_database
def locations(chip_filter: ChipFilter, as_json: bool, db: Database) -> None:
    """Summarise the locations of the chips matching the filters: places (same CRS, pixel
    size, chip size and chip corner, whatever the date or item), chips, dates per place."""
    from stacchip_db.locations import summarise_locations

    with db.connect() as conn, translate_errors("summarising locations"):
        conn.read_only = True
        summary = summarise_locations(conn, chip_filter)
    if as_json:
        click.echo(json.dumps(summary.as_dict()))
        return
    for line in summary.describe():
        click.echo(line)
