"""The Arrow type of each column of a chip, defined once.

`index.CHIP_SCHEMA` (what `index_item` computes for one item) and `selection.CHIP_SCHEMA` (a
stored chip as selections return it) are built from `chip_field`, so a column has the same
type wherever it appears. A module of its own, importing only pyarrow: `selection` (and with
it `stacchip-db chips`) must not pay for `index`'s raster stack (rasterio, pyproj) to learn a
column's type.

`export.INDEX_SCHEMA` is not built from it: it is the original stacchip's file layout (its
column names, uint16 indices, dates), which must stay as it is whatever the types here.
"""

from __future__ import annotations

import pyarrow as pa

CHIP_TYPES: dict[str, pa.DataType] = {
    "chip_id": pa.string(),
    "collection": pa.string(),
    "item_id": pa.string(),
    "chip_size": pa.int32(),
    "chip_index_x": pa.int32(),
    "chip_index_y": pa.int32(),
    "datetime": pa.timestamp("us", tz="UTC"),
    "cloud_fraction": pa.float32(),
    "nodata_fraction": pa.float32(),
    "geometry": pa.binary(),
}
"""Column -> Arrow type. Fractions are 0..1; `geometry` is the footprint as WKB in EPSG:4326."""

FOOTPRINT_METADATA = {b"encoding": b"WKB", b"crs": b"EPSG:4326"}
"""Field metadata that says what the `geometry` bytes are, for files read by other tools."""


def chip_field(name: str, *, nullable: bool = True) -> pa.Field:
    """The Arrow field of chip column `name` (a key of `CHIP_TYPES`)."""
    return pa.field(name, CHIP_TYPES[name], nullable=nullable)
