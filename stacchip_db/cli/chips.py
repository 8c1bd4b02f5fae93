"""`stacchip-db chips` and `stacchip-db sample`: list the chips a selection picks, in any format.

Both run one call of the SQL selection functions (`stacchip_db.selection`); `--sql` prints that
call with its values inlined instead, to paste into psql or QGIS.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import click
import pyarrow as pa
import shapely

from stacchip_db.cli.options import with_database
from stacchip_db.cli.selection_options import filter_options, sample_options, warn_empty
from stacchip_db.db import Database, translate_errors
from stacchip_db.selection import (
    ChipFilter,
    Sampling,
    SelectionQuery,
    build_selection,
    fetch_chips,
)

log = logging.getLogger(__name__)

FORMATS = ("table", "csv", "geojson", "parquet")
# Columns the table format shows (the footprint is left to the file formats).
TABLE_COLUMNS = ("chip_id", "collection", "chip_size", "datetime", "cloud_fraction",
                 "nodata_fraction")


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
        conn.execute("SET TRANSACTION READ ONLY")
        table = fetch_chips(conn, selection)
        if table.num_rows == 0:
            warn_empty(conn, selection)
    if output_format == "parquet":
        _to_geodataframe(table).to_parquet(output, index=False)
    else:
        writer = {"table": _write_table, "csv": _write_csv, "geojson": _write_geojson}
        if output is None:
            writer[output_format](table, sys.stdout)
        else:
            with output.open("w", newline="", encoding="utf-8") as stream:
                writer[output_format](table, stream)
    where = f" to {output}" if output else ""
    log.info("%d chips%s", table.num_rows, where)


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
    """
    selection = build_selection(chip_filter, sampling, limit=limit)
    _run(db, selection, output_format, output, print_sql)


# -- writers ----------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _write_table(table: pa.Table, stream: TextIO) -> None:
    rows = [[_text(v) for v in row] for row in zip(
        *(table.column(name).to_pylist() for name in TABLE_COLUMNS), strict=True
    )] if table.num_rows else []
    widths = [max([len(name), *(len(row[i]) for row in rows)])
              for i, name in enumerate(TABLE_COLUMNS)]
    stream.write("  ".join(n.ljust(w) for n, w in zip(TABLE_COLUMNS, widths, strict=True)).rstrip())
    stream.write("\n")
    for row in rows:
        stream.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        stream.write("\n")


def _write_csv(table: pa.Table, stream: TextIO) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(table.column_names)
    wkt = shapely.to_wkt(shapely.from_wkb(table.column("geometry").to_pylist()),
                         rounding_precision=-1)
    columns = [table.column(name).to_pylist() for name in table.column_names[:-1]]
    for *values, geometry in zip(*columns, wkt, strict=True):
        writer.writerow([v.isoformat() if hasattr(v, "isoformat") else v for v in values]
                        + [geometry])


def _write_geojson(table: pa.Table, stream: TextIO) -> None:
    geometries = shapely.from_wkb(table.column("geometry").to_pylist())
    names = table.column_names[:-1]
    columns = [table.column(name).to_pylist() for name in names]
    features = [
        {
            "type": "Feature",
            "id": values[0],
            "properties": {
                name: value.isoformat() if hasattr(value, "isoformat") else value
                for name, value in zip(names, values, strict=True)
            },
            "geometry": json.loads(shapely.to_geojson(geometry)),
        }
        for *values, geometry in zip(*columns, geometries, strict=True)
    ]
    json.dump({"type": "FeatureCollection", "features": features}, stream)
    stream.write("\n")


def _to_geodataframe(table: pa.Table) -> Any:
    import geopandas  # only for parquet: it costs a second of import time

    frame = table.drop_columns(["geometry"]).to_pandas()
    geometry = geopandas.GeoSeries.from_wkb(table.column("geometry").to_pylist(), crs=4326)
    return geopandas.GeoDataFrame(frame, geometry=geometry)
