"""What makes a STAC item storable: the checks every write path runs before the database.

`check_item` and `check_ids` name the item and what is wrong with it (`ItemError`);
`prepare_item` checks an `(item, chips)` pair once and keeps the values the SQL takes;
`minimal_collection` is the STAC collection made for an item whose collection is missing.
Nothing here touches the database: a bad item is refused before any transaction starts
(`store_items`, `ItemWriter.add`, `bulk_load`, the `index` command, the processors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa

from stacchip_db.errors import StacchipError
from stacchip_db.index import CHIP_SCHEMA, chip_locations, item_datetime
from stacchip_db.paths import UnsafeName, check_name

CHIP_COLUMNS = tuple(CHIP_SCHEMA.names)
"""Columns read from a chips table: those of `index_item`'s table."""
LOCATION = "location"
"""The one column a chips table may lack: `with_locations` computes it from the item."""

_LICENSE = "other"


class StoreError(StacchipError):
    """An item cannot be stored as it is."""


class ItemError(StoreError):
    """The item is not a STAC item stacchip-db can store (no id, collection, datetime…)."""


@dataclass(frozen=True)
class PreparedItem:
    """An item checked for what storing needs, with the values the SQL takes."""

    item: Mapping[str, Any]
    collection: str
    item_id: str
    datetime: datetime
    chips: pa.Table


def item_id_of(item: Any) -> str:
    """The id to name `item` by in a message, whatever `item` is."""
    return str(item.get("id") or "<no id>") if isinstance(item, Mapping) else "<not an object>"


def check_item(item: Any) -> tuple[str, str, datetime]:
    """`(collection, id, chip datetime)` of a STAC item dict, or `ItemError` naming it."""
    if not isinstance(item, Mapping):
        raise ItemError(f"item {str(item)[:60]!r} is not a JSON object; pass STAC items")
    item_id = item.get("id")
    if not isinstance(item_id, str) or not item_id:
        raise ItemError(f"item without an id (keys {sorted(item)[:8]}); give every item an id")
    collection = item.get("collection")
    if not isinstance(collection, str) or not collection:
        raise ItemError(
            f"item {item_id}: no collection; set \"collection\" in the item or pass `collection`"
        )
    check_ids(collection, item_id)
    if item.get("type") != "Feature":
        raise ItemError(f"item {item_id}: type is {item.get('type')!r}, a STAC item's is Feature")
    geometry = item.get("geometry")
    if not isinstance(geometry, Mapping) or "coordinates" not in geometry:
        raise ItemError(f"item {item_id}: no GeoJSON geometry; pgstac needs one to store it")
    try:
        when = item_datetime(item)
    except StacchipError as e:
        raise ItemError(str(e)) from e
    if when.tzinfo is None:  # STAC says RFC 3339 (with offset); read a bare time as UTC
        when = when.replace(tzinfo=UTC)
    return collection, item_id, when


def check_ids(collection: str, item_id: str) -> None:
    """`ItemError` naming the item when its collection or id is not one safe path segment:
    ids become folder names (ingest, prechip, export-index), so they are refused on the way in.
    """
    for what, name in (("collection", collection), ("item id", item_id)):
        try:
            check_name(name, what)
        except UnsafeName as e:
            raise ItemError(f"item {item_id}: {e}") from e


def prepare_item(item: Mapping[str, Any], chips: pa.Table) -> PreparedItem:
    """`item` checked (`check_item`) with its chips table cut to `CHIP_COLUMNS`."""
    collection, item_id, when = check_item(item)
    missing = [
        name for name in CHIP_COLUMNS if name not in chips.column_names and name != LOCATION
    ]
    if missing:
        raise ItemError(
            f"item {item_id}: the chips table has no column {', '.join(missing)}; pass the "
            "table `stacchip_db.index.index_item` returns"
        )
    columns = [name for name in CHIP_COLUMNS if name in chips.column_names]
    return PreparedItem(item, collection, item_id, when, chips.select(columns))


def with_locations(prepared: Sequence[PreparedItem], chip_size: int) -> list[PreparedItem]:
    """`prepared` with a `location` column in every chips table: a table made without one
    (by hand, by an older caller) gets the locations `index.chip_locations` computes, at
    `chip_size` (which `prepare_item` is not told)."""
    done = []
    for p in prepared:
        if LOCATION not in p.chips.column_names:
            xs = p.chips.column("chip_index_x").to_numpy(zero_copy_only=False)
            ys = p.chips.column("chip_index_y").to_numpy(zero_copy_only=False)
            locations = pa.array(chip_locations(p.item, chip_size, xs, ys), pa.int64())
            chips = p.chips.add_column(
                CHIP_COLUMNS.index(LOCATION), LOCATION, locations
            ).select(list(CHIP_COLUMNS))
            p = replace(p, chips=chips)
        done.append(p)
    return done


def minimal_collection(collection: str, item: Mapping[str, Any]) -> dict[str, Any]:
    """A minimal valid STAC collection for `item`: id, description, license, extent.

    The extent is the first item's bbox and datetime; pgstac's `update_collection_extents()`
    recomputes it from all items when wanted.
    """
    _, item_id, when = check_item(item)
    bbox = item.get("bbox")
    if not (
        isinstance(bbox, list | tuple)
        and len(bbox) in (4, 6)
        and all(isinstance(v, int | float) and np.isfinite(v) for v in bbox)
    ):  # no bbox (it is optional in GeoJSON) or not a usable one: the geometry's bounds
        bbox = _geometry_bbox(item_id, item["geometry"])
    stamp = when.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": collection,
        "description": f"Collection {collection}, created by stacchip-db for indexed items.",
        "license": _LICENSE,
        "extent": {
            "spatial": {"bbox": [list(bbox)[:4] if len(bbox) == 4 else list(bbox)]},
            "temporal": {"interval": [[stamp, stamp]]},
        },
        "links": [],
    }


def _geometry_bbox(item_id: str, geometry: Mapping[str, Any]) -> list[float]:
    """The bounds of a GeoJSON geometry (shapely), for an item that has no `bbox`."""
    import shapely.geometry
    from shapely.errors import ShapelyError

    try:
        bounds = list(shapely.geometry.shape(geometry).bounds)
    except (ShapelyError, TypeError, ValueError, KeyError, IndexError) as e:
        raise ItemError(f"item {item_id}: geometry is not valid GeoJSON ({e}); fix it") from e
    if not np.isfinite(bounds).all():
        raise ItemError(f"item {item_id}: geometry is empty; give the item a footprint")
    return bounds


def stored_items(
    conn: psycopg.Connection, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, Any]]:
    """The pgstac items of `keys` (`(collection, item_id)`), each read once through
    `pgstac.get_item`, in one statement; keys without an item are left out (callers say what
    a missing item means to them)."""
    if not keys:
        return {}
    rows = conn.execute(
        "SELECT t.c, t.i, pgstac.get_item(t.i, t.c) "
        "FROM unnest(%s::text[], %s::text[]) AS t (c, i)",
        ([k[0] for k in keys], [k[1] for k in keys]),
    ).fetchall()
    return {(c, i): item for c, i, item in rows if item is not None}
