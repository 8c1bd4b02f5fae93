"""Export the chip index as the original stacchip's GeoParquet files, one per item.

Layout and columns are those of Clay-foundation/stacchip 0.1.38 (`ChipIndexer.create_index`
and its processors), so readers written for the original keep working:

    {out_dir}/{collection}/{item_id}/index_{item_id}.parquet

| column | type | value |
| --- | --- | --- |
| `chipid` | string | `{item_id}-{x}-{y}` (`stacchip.chip_id`) |
| `date` | date32 | the chip's datetime, UTC date (the original: `item.datetime.date()`) |
| `chip_index_x`, `chip_index_y` | uint16 | grid position |
| `cloud_cover_percentage`, `nodata_percentage` | float32 | fractions 0..1 (as the original) |
| `geometry` | binary WKB, GeoParquet 1.0 metadata, EPSG:4326 | chip footprint |

Despite their names the two percentage columns hold fractions, as the original's did
(`np.sum(mask) / size`). One difference: the original wrote geometries in GeoArrow's native
polygon encoding; these files use WKB, the GeoParquet encoding every reader understands
(`geopandas.read_parquet` reads both). Rows are ordered by y, then x, as the original's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

from stacchip_db.db.connection import translate_errors
from stacchip_db.errors import StacchipError
from stacchip_db.paths import UnsafeName, check_name

log = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema(
    [
        pa.field("chipid", pa.string()),
        pa.field("date", pa.date32()),
        pa.field("chip_index_x", pa.uint16()),
        pa.field("chip_index_y", pa.uint16()),
        pa.field("cloud_cover_percentage", pa.float32()),
        pa.field("nodata_percentage", pa.float32()),
        pa.field("geometry", pa.binary()),
    ]
)
"""Columns of an exported index file (the original stacchip's, geometry as WKB). Not built
from `chip_schema`: the names, uint16 indices and dates are the original's format."""

_EPSG_4326_PROJJSON: dict | None = None


class ExportError(StacchipError):
    """The index cannot be exported as asked."""


@dataclass
class ExportResult:
    """Files and chips written; items skipped because a name cannot be a folder name."""

    files: int = 0
    chips: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    """`(collection, item id, reason)` of each item not written (`paths.check_name`)."""


def index_path(out_dir: Path, collection: str, item_id: str) -> Path:
    """`{out_dir}/{collection}/{item_id}/index_{item_id}.parquet`; `paths.UnsafeName` when a
    name is not one safe folder name (it would write outside `out_dir`)."""
    check_name(collection, "collection")
    check_name(item_id, "item id")
    return out_dir / collection / item_id / f"index_{item_id}.parquet"


def geo_metadata(bbox: list[float] | None = None) -> bytes:
    """GeoParquet 1.0 file metadata for the WKB `geometry` column (polygons) in EPSG:4326;
    `bbox` (optional in GeoParquet) when the extent is known before writing."""
    global _EPSG_4326_PROJJSON
    if _EPSG_4326_PROJJSON is None:
        import pyproj

        _EPSG_4326_PROJJSON = pyproj.CRS.from_epsg(4326).to_json_dict()
    column: dict = {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": _EPSG_4326_PROJJSON}
    if bbox is not None:
        column["bbox"] = bbox
    return json.dumps(
        {"version": "1.0.0", "primary_column": "geometry", "columns": {"geometry": column}}
    ).encode()


_ITEMS = """
SELECT collection, item_id,
       array_agg(chip_index_x ORDER BY chip_index_y, chip_index_x),
       array_agg(chip_index_y ORDER BY chip_index_y, chip_index_x),
       array_agg((datetime AT TIME ZONE 'UTC')::date ORDER BY chip_index_y, chip_index_x),
       array_agg(cloud_fraction ORDER BY chip_index_y, chip_index_x),
       array_agg(nodata_fraction ORDER BY chip_index_y, chip_index_x),
       array_agg(ST_AsBinary(geometry) ORDER BY chip_index_y, chip_index_x),
       ARRAY[ST_XMin(ST_Extent(geometry)), ST_YMin(ST_Extent(geometry)),
             ST_XMax(ST_Extent(geometry)), ST_YMax(ST_Extent(geometry))]
FROM stacchip.chips
WHERE chip_size = %(chip_size)s
  AND (%(collections)s::text[] IS NULL OR collection = ANY(%(collections)s::text[]))
GROUP BY collection, item_id
ORDER BY collection, item_id
"""


def export_index(
    conn: psycopg.Connection,
    out_dir: str | Path,
    *,
    collections: Sequence[str] | None = None,
    chip_size: int = 256,
) -> ExportResult:
    """Write one GeoParquet index file per item with chips of `chip_size`.

    `collections` limits the export (None: all). Existing files are replaced. Streams item by
    item through a server-side cursor, so memory stays at one item's chips. An item whose
    collection or id cannot be a folder name is skipped with a warning (`result.skipped`).
    """
    out = Path(out_dir)
    result = ExportResult()
    params = {"chip_size": chip_size, "collections": list(collections) if collections else None}
    with translate_errors("export-index"), conn.transaction(), conn.cursor(
        name="stacchip_export"
    ) as cursor:
        cursor.itersize = 50
        cursor.execute(_ITEMS, params)
        for collection, item_id, xs, ys, dates, clouds, nodata, wkb, bbox in cursor:
            try:
                path = index_path(out, collection, item_id)
            except UnsafeName as e:  # stored by another tool: skip it, export the others
                log.warning("item %s of collection %s not exported: %s", item_id, collection, e)
                result.skipped.append((collection, item_id, str(e)))
                continue
            table = pa.Table.from_arrays(
                [
                    pa.array([f"{item_id}-{x}-{y}" for x, y in zip(xs, ys, strict=True)]),
                    pa.array(dates, pa.date32()),
                    pa.array(xs, pa.uint16()),
                    pa.array(ys, pa.uint16()),
                    pa.array(clouds, pa.float32()),
                    pa.array(nodata, pa.float32()),
                    pa.array(wkb, pa.binary()),
                ],
                schema=INDEX_SCHEMA.with_metadata({b"geo": geo_metadata(list(bbox))}),
            )
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, path)
            except OSError as e:
                reason = e.strerror or str(e)
                raise ExportError(f"cannot write {path}: {reason}; choose another OUT_DIR") from e
            result.files += 1
            result.chips += table.num_rows
    # debug: the caller reports the result (the CLI prints it once)
    log.debug("exported %d chips of %d items to %s", result.chips, result.files, out)
    return result
