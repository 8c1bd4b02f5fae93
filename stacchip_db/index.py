"""One STAC item -> its chip rows (grid position, footprint, cloud and nodata fractions).

Pure: no database, no network beyond reading the quality band. The `db` layer adds collection,
item id, chip size and datetime and writes the rows; keeping this step free of SQL lets tests,
benchmarks and the processors use it alone.
"""

from __future__ import annotations

import warnings
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from stacchip_db.chip_schema import FOOTPRINT_METADATA, chip_field
from stacchip_db.errors import StacchipError
from stacchip_db.grid import CHIP_SIZE, MAX_CHIPS, chip_grid, item_view
from stacchip_db.quality import NoQualityBandWarning, QualityRule, chip_fractions, choose_rule

CHIP_SCHEMA = pa.schema(
    [
        chip_field("chip_index_x", nullable=False),
        chip_field("chip_index_y", nullable=False),
        chip_field("cloud_fraction", nullable=False),
        chip_field("nodata_fraction", nullable=False),
        chip_field("geometry", nullable=False).with_metadata(FOOTPRINT_METADATA),
    ]
)
"""Columns of `index_item`'s table (types from `chip_schema`; the `db` layer adds the key and
the datetime): fractions are 0..1, geometry is a WKB Polygon in EPSG:4326."""

MAX_NODATA = 0.5
"""Default: chips with more than half their pixels without data are not indexed."""


def index_item(
    item: Any,
    *,
    quality: str | QualityRule = "auto",
    chip_size: int = CHIP_SIZE,
    max_nodata: float = MAX_NODATA,
    shape: tuple[int, int] | None = None,
    quality_asset: str | None = None,
    max_chips: int | None = MAX_CHIPS,
) -> pa.Table:
    """The chips of a STAC item (pystac Item or dict) as a `CHIP_SCHEMA` table.

    Chips with `nodata_fraction > max_nodata` are dropped (as in the original stacchip);
    rows are ordered by `chip_index_y`, then `chip_index_x`. `quality` is a rule name
    (`auto`, `s2`, `landsat`, `modis`, `none`, or one registered with
    `stacchip_db.quality.register_rule`) or a `QualityRule`; `quality_asset` names the key of
    the quality band when the catalog's layout is not known. The part of a chip outside the
    item's geometry counts as nodata. Which rule and asset were used is in the table's schema
    metadata (`quality_used`); `auto` finding no quality band warns (`NoQualityBandWarning`).
    An item whose grid has more than `max_chips` chips is refused (`grid.TooManyChipsError`)
    before anything is read.
    """
    if not 0.0 <= max_nodata <= 1.0:
        raise StacchipError(f"max_nodata {max_nodata!r} is not a fraction between 0 and 1")
    grid = chip_grid(item, chip_size=chip_size, shape=shape, max_chips=max_chips)
    choice = choose_rule(quality, item, quality_asset=quality_asset)
    if choice.warning:
        warnings.warn(choice.warning, NoQualityBandWarning, stacklevel=2)
    cloud, nodata = (a.ravel() for a in chip_fractions(grid, item, choice))
    keep = np.flatnonzero(nodata <= np.float32(max_nodata))
    xs, ys = grid.indices()
    footprints = grid.footprints_wkb(keep)  # only for kept chips: the largest column
    return pa.Table.from_arrays(
        [
            _fixed_width(xs[keep], pa.int32(), np.int32),
            _fixed_width(ys[keep], pa.int32(), np.int32),
            _fixed_width(cloud[keep], pa.float32(), np.float32),
            _fixed_width(nodata[keep], pa.float32(), np.float32),
            _binary(footprints),
        ],
        schema=CHIP_SCHEMA.with_metadata(
            {
                QUALITY_KEY: choice.rule.name,
                QUALITY_ASSET_KEY: choice.rule.asset or "",
                PROFILE_KEY: choice.profile or "",
                QUALITY_FOUND_KEY: "true" if choice.found else "false",
            }
        ),
    )


QUALITY_KEY, QUALITY_ASSET_KEY, PROFILE_KEY, QUALITY_FOUND_KEY = (
    b"stacchip:quality",
    b"stacchip:quality_asset",
    b"stacchip:profile",
    b"stacchip:quality_found",
)
"""Schema metadata of `index_item`'s table: the rule, its asset, the item's profile."""


def quality_used(chips: pa.Table) -> dict[str, Any]:
    """`{"rule", "asset", "profile", "found"}` an `index_item` table was computed with.

    `asset` and `profile` are None when there was none; `found` is False when `auto` found no
    quality band.
    """
    meta = chips.schema.metadata or {}
    return {
        "rule": meta.get(QUALITY_KEY, b"").decode() or None,
        "asset": meta.get(QUALITY_ASSET_KEY, b"").decode() or None,
        "profile": meta.get(PROFILE_KEY, b"").decode() or None,
        "found": meta.get(QUALITY_FOUND_KEY, b"true") == b"true",
    }


# Arrow arrays are built from buffers: `pa.array(ndarray)` imports pandas on first use (a
# quarter of a second), and these columns need no conversion at all.


def _fixed_width(values: np.ndarray, arrow_type: pa.DataType, dtype: type) -> pa.Array:
    data = np.ascontiguousarray(values, dtype=dtype)
    return pa.Array.from_buffers(arrow_type, len(data), [None, pa.py_buffer(data)])


def _binary(values: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    data = b"".join(values)
    return pa.Array.from_buffers(
        pa.binary(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


def item_datetime(item: Any) -> datetime:
    """The instant a chip is dated by: the item's `datetime`, else its `start_datetime`.

    STAC allows `datetime: null` for composites (MODIS), which then carry a range.
    """
    view = item_view(item)
    value = view.properties.get("datetime") or view.properties.get("start_datetime")
    if value is None:
        raise StacchipError(
            f"item {view.id}: neither datetime nor start_datetime is set; add one to the item"
        )
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as e:
        raise StacchipError(f"item {view.id}: datetime {value!r} is not ISO 8601") from e
