"""Selected chips written out as a table, CSV, GeoJSON or GeoParquet, batch by batch.

The rows come as Arrow record batches (`selection.stream_chips`, columns `CHIP_COLUMNS`,
`geometry` as WKB) and each batch is written before the next is read, so memory does not
grow with the number of chips: GeoJSON is one FeatureCollection whose features are written
as they come, GeoParquet one row group per batch. A file (`path`) is written beside its
destination and renamed over it only when complete: a failed run leaves no half file.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from stacchip_db.errors import StacchipError

FORMATS = ("table", "csv", "geojson", "parquet")

TABLE_COLUMNS = ("chip_id", "collection", "chip_size", "datetime", "cloud_fraction",
                 "nodata_fraction")
"""Columns the table format shows (the footprint is left to the file formats)."""


class OutputError(StacchipError):
    """The chips cannot be written as asked."""


def write_chips(
    batches: Iterable[pa.RecordBatch],
    output_format: str,
    path: Path | None = None,
) -> int:
    """Write the batches in `output_format` to `path` (standard output when None); the number
    of chips written. Parquet needs a `path`."""
    if output_format not in FORMATS:
        raise OutputError(f"output format {output_format!r}: choose one of {', '.join(FORMATS)}")
    if output_format == "parquet" and path is None:
        raise OutputError("parquet is binary: give an output path")
    if path is None:
        return _write_text(batches, output_format, sys.stdout)
    path = Path(path)
    if path.exists() and not path.is_file():  # /dev/null, a FIFO: nothing to rename over
        return _write_to(batches, output_format, path)
    from stacchip_db.storage import write_atomically  # boto3 is not needed for the rest

    written = 0

    def fill(tmp: Path) -> None:
        nonlocal written
        written = _write_to(batches, output_format, tmp)

    write_atomically(path, fill)
    return written


def _write_to(batches: Iterable[pa.RecordBatch], output_format: str, path: Path) -> int:
    if output_format == "parquet":
        return _write_parquet(batches, path)
    with path.open("w", newline="", encoding="utf-8") as stream:
        return _write_text(batches, output_format, stream)


def _write_text(batches: Iterable[pa.RecordBatch], output_format: str, stream: TextIO) -> int:
    writer = {"table": _write_table, "csv": _write_csv, "geojson": _write_geojson}
    return writer[output_format](batches, stream)


def _plain(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _text(value: Any) -> str:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _write_table(batches: Iterable[pa.RecordBatch], stream: TextIO) -> int:
    """Aligned columns; the widths come from the first batch (later, longer values stick out:
    aligning on every row would mean holding them all)."""
    widths: list[int] | None = None
    count = 0
    for batch in batches:
        rows = [[_text(v) for v in row] for row in zip(
            *(batch.column(name).to_pylist() for name in TABLE_COLUMNS), strict=True
        )]
        if widths is None:
            widths = _table_header(rows, stream)
        for row in rows:
            stream.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
            stream.write("\n")
        count += len(rows)
    if widths is None:
        _table_header([], stream)
    return count


def _table_header(rows: list[list[str]], stream: TextIO) -> list[int]:
    widths = [max([len(name), *(len(row[i]) for row in rows)])
              for i, name in enumerate(TABLE_COLUMNS)]
    stream.write("  ".join(n.ljust(w) for n, w in zip(TABLE_COLUMNS, widths, strict=True)).rstrip())
    stream.write("\n")
    return widths


def _write_csv(batches: Iterable[pa.RecordBatch], stream: TextIO) -> int:
    """One row per chip, the footprint as WKT in the last column."""
    writer = csv.writer(stream, lineterminator="\n")
    header = False
    count = 0
    for batch in batches:
        if not header:
            writer.writerow(batch.schema.names)
            header = True
        wkt = shapely.to_wkt(shapely.from_wkb(batch.column("geometry").to_numpy(False)),
                             rounding_precision=-1)
        columns = [batch.column(name).to_pylist() for name in batch.schema.names[:-1]]
        writer.writerows(
            [*map(_plain, values), geometry]
            for *values, geometry in zip(*columns, wkt, strict=True)
        )
        count += batch.num_rows
    if not header:
        from stacchip_db.selection import CHIP_COLUMNS

        writer.writerow(CHIP_COLUMNS)
    return count


def _write_geojson(batches: Iterable[pa.RecordBatch], stream: TextIO) -> int:
    """A FeatureCollection written feature by feature (`id` = chip id, the columns as
    properties, the footprint as the geometry)."""
    stream.write('{"type": "FeatureCollection", "features": [')
    separator = "\n"
    count = 0
    for batch in batches:
        # shapely writes the geometries' JSON (vectorised); it goes in as text, not re-parsed
        geometries = shapely.to_geojson(shapely.from_wkb(batch.column("geometry").to_numpy(False)))
        names = batch.schema.names[:-1]
        columns = [batch.column(name).to_pylist() for name in names]
        parts = []
        for *values, geometry in zip(*columns, geometries, strict=True):
            properties = {name: _plain(v) for name, v in zip(names, values, strict=True)}
            parts.append(
                f'{separator}{{"type": "Feature", "id": {json.dumps(values[0])}, '
                f'"properties": {json.dumps(properties)}, "geometry": {geometry}}}'
            )
            separator = ",\n"
        stream.write("".join(parts))
        count += batch.num_rows
    stream.write("\n]}\n")
    return count


def _write_parquet(batches: Iterable[pa.RecordBatch], path: Path) -> int:
    """GeoParquet 1.0 (WKB footprints, EPSG:4326), one row group per batch."""
    from stacchip_db.export import geo_metadata
    from stacchip_db.selection import CHIP_SCHEMA

    schema = CHIP_SCHEMA.with_metadata({b"geo": geo_metadata()})
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
            count += batch.num_rows
    return count
