"""Writing STAC items and their chips: pgstac upsert + `stacchip.chips` replacement.

Contract (docs/architecture.md, "Database contract", "How items are written"): an item and its
chip rows are written in ONE transaction; the item goes into pgstac through pgstac's own
`upsert_items`/`create_items` (never by hand into its tables), the chip rows of
`(collection, item_id, chip_size)` are replaced by a binary COPY into a
`TEMP TABLE … ON COMMIT DROP` and one `INSERT … SELECT`.
Re-storing an item gives the same rows, never duplicates.

The public API, used by the `index` command and by the processors:

- `store_item(conn, item, chips, *, chip_size)`: one item and its `index_item` table;
- `store_items(conn, pairs, *, chip_size)`: many `(item, chips)` pairs in one transaction (the
  bulk path: one COPY for all their chips);
- `ItemWriter`: a context manager that batches `(item, chips)` pairs into `store_items` calls,
  optionally on a background thread (so indexing the next items overlaps with the database
  writing the previous ones), and isolates the items a failed batch contained.

Concurrency, the way pgstac's own loader does it:

1. a short first transaction makes sure every collection and pgstac partition the items need
   exists (`pgstac.check_partition`, the function pgstac's trigger calls), serialised per
   collection by an advisory lock, so that the partition DDL (ACCESS EXCLUSIVE locks) never
   runs inside the long transaction that writes the rows;
2. the write transaction first takes one advisory lock per item, in sorted key order: writers of
   different items never wait for each other, two writers of the same item run one after the
   other (the second one's rows win, consistently), and sorted order rules out deadlocks.
   A transaction that waits for an item lock holds no table lock yet.

Functions here commit their own transactions: pass a connection that is not inside one
(autocommit, or idle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import pq

from stacchip_db.db.connection import translate_errors
from stacchip_db.db.locks import (
    BULK_APPLICATION,
    CHIPS_TABLE,
    READ_LOCK_TIMEOUT_S,
    holder_of,
    set_lock_timeout,
)
from stacchip_db.errors import DatabaseError, DatabaseUnavailable, StacchipError
from stacchip_db.index import item_datetime
from stacchip_db.paths import UnsafeName, check_name

log = logging.getLogger(__name__)

CHIP_COLUMNS = ("chip_index_x", "chip_index_y", "cloud_fraction", "nodata_fraction", "geometry")
"""Columns read from a chips table (`stacchip_db.index.CHIP_SCHEMA`)."""

BATCH_CHIPS = 50_000
"""Default number of chips `ItemWriter` collects before writing a batch."""
BATCH_ITEMS = 500
"""Default number of items `ItemWriter` collects before writing a batch."""

# First key of the two-int advisory locks that serialise pgstac partition checks per
# collection. The one-bigint lock space (item locks, `db init`) is a different lock tag.
_PARTITION_LOCK_CLASS = 0x57AC
_LICENSE = "other"


class StoreError(StacchipError):
    """An item cannot be stored as it is."""


class ItemError(StoreError):
    """The item is not a STAC item stacchip-db can store (no id, collection, datetime…)."""


class CollectionMissing(StoreError):
    """Strict mode: the item's collection does not exist in pgstac."""


class ItemExists(StoreError):
    """`OnConflict.insert`: the item is already stored."""


class OnConflict(StrEnum):
    """What to do with an item that is already stored (as pgstac's loader methods)."""

    upsert = "upsert"
    """Replace the item in pgstac and all its chip rows at this chip size (default)."""
    ignore = "ignore"
    """Leave an item that is in pgstac with chips at this chip size as it is."""
    insert = "insert"
    """Fail (`ItemExists`) when the item is already in pgstac."""


@dataclass
class StoreResult:
    """What a store call wrote."""

    items: int = 0
    """Items upserted (or inserted) into pgstac, with their chips."""
    chips: int = 0
    """Chip rows written."""
    skipped: list[str] = field(default_factory=list)
    """Ids of items left as they were (`OnConflict.ignore`)."""
    collections_created: list[str] = field(default_factory=list)
    """Collections created as minimal STAC collections for these items."""
    duplicates: int = 0
    """Items given more than once (`bulk_load`: the last one of each was stored)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per step (`bulk_load`: upsert, delete, copy, rebuild, commit)."""

    def add(self, other: StoreResult) -> None:
        self.items += other.items
        self.chips += other.chips
        self.skipped.extend(other.skipped)
        self.collections_created.extend(other.collections_created)
        self.duplicates += other.duplicates
        for step, seconds in other.timings.items():
            self.timings[step] = self.timings.get(step, 0.0) + seconds


# -- items ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    """An item checked for what storing needs, with the values the SQL takes."""

    item: Mapping[str, Any]
    collection: str
    item_id: str
    datetime: datetime
    chips: pa.Table


def _item_id(item: Any) -> str:
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
            f"item {item_id}: no collection; set `collection` in the item or pass --collection"
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


def _prepare(item: Mapping[str, Any], chips: pa.Table) -> _Prepared:
    collection, item_id, when = check_item(item)
    missing = [name for name in CHIP_COLUMNS if name not in chips.column_names]
    if missing:
        raise ItemError(
            f"item {item_id}: the chips table has no column {', '.join(missing)}; pass the "
            "table `stacchip_db.index.index_item` returns"
        )
    return _Prepared(item, collection, item_id, when, chips.select(list(CHIP_COLUMNS)))


def item_lock_key(collection: str, item_id: str) -> int:
    """The advisory-lock key (signed bigint) of an item: writers of one item take turns."""
    digest = hashlib.blake2b(f"{collection}\0{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


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


# -- chips as a binary COPY stream ------------------------------------------------------------

_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)
_PREFIX_FIELDS = [
    ("nfields", ">i2"),
    ("n0", ">i4"), ("item_no", ">i4"),
    ("n1", ">i4"), ("chip_index_x", ">i4"),
    ("n2", ">i4"), ("chip_index_y", ">i4"),
    ("n3", ">i4"), ("cloud_fraction", ">f4"),
    ("n4", ">i4"), ("nodata_fraction", ">f4"),
    ("n5", ">i4"),
]  # then the geometry's WKB bytes
_ITEMS = "unnest(%s::text[], %s::text[], %s::timestamptz[]) WITH ORDINALITY"
"""The items of one write, numbered from 1 (chip rows refer to them by `item_no` = n - 1)."""

_INCOMING = """
CREATE TEMP TABLE stacchip_chips_in (
    item_no int NOT NULL,
    chip_index_x int NOT NULL,
    chip_index_y int NOT NULL,
    cloud_fraction real NOT NULL,
    nodata_fraction real NOT NULL,
    geometry bytea NOT NULL
) ON COMMIT DROP
"""


def _column(table: pa.Table, name: str, arrow_type: pa.DataType) -> np.ndarray:
    """A fixed-width column as numpy, read from its buffer (`to_numpy` would import pandas)."""
    array = table.column(name).combine_chunks()
    if array.null_count:
        raise ItemError(f"chips column {name} has nulls; pass the table index_item returns")
    if array.type != arrow_type:
        array = array.cast(arrow_type)
    dtype = np.dtype(arrow_type.to_pandas_dtype())
    return np.frombuffer(
        array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize
    )


@dataclass
class _ChipArrays:
    """The chips of several index tables as flat numpy arrays (no per-chip Python objects)."""

    total: int
    offsets: np.ndarray  # int64, total + 1: row i's WKB is data[offsets[i]:offsets[i + 1]]
    data: np.ndarray  # uint8: all WKB bytes
    columns: dict[str, np.ndarray]  # chip_index_x/y (int32), cloud/nodata_fraction (float32)

    @property
    def wkb_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _chip_arrays(tables: Sequence[pa.Table]) -> _ChipArrays:
    """Concatenate `tables` and read their columns straight from the Arrow buffers."""
    total = sum(t.num_rows for t in tables)
    table = pa.concat_tables(tables, promote_options="default")  # nullability may differ
    geometry = table.column("geometry").combine_chunks()
    if not pa.types.is_binary(geometry.type):
        geometry = geometry.cast(pa.binary())
    if geometry.null_count:
        raise ItemError("chips column geometry has nulls; pass the table index_item returns")
    _, offsets_buf, data_buf = geometry.buffers()
    offsets = np.frombuffer(
        offsets_buf, dtype=np.int32, count=total + 1, offset=geometry.offset * 4
    ).astype(np.int64)
    return _ChipArrays(
        total=total,
        offsets=offsets,
        data=np.frombuffer(data_buf or b"", dtype=np.uint8),
        columns={
            "chip_index_x": _column(table, "chip_index_x", pa.int32()),
            "chip_index_y": _column(table, "chip_index_y", pa.int32()),
            "cloud_fraction": _column(table, "cloud_fraction", pa.float32()),
            "nodata_fraction": _column(table, "nodata_fraction", pa.float32()),
        },
    )


def chips_copy_data(tables: Sequence[pa.Table]) -> tuple[bytes, int]:
    """Binary COPY data (`stacchip_chips_in`'s columns) for the chips of `tables`, and its rows.

    Rows of `tables[i]` get `item_no = i`. Built with numpy record arrays, no per-chip Python:
    rows whose footprints have the same WKB length (every 4-corner polygon: 93 bytes) are one
    record array with the WKB as a fixed-size field.
    """
    counts = np.array([t.num_rows for t in tables], dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return _COPY_HEADER + _COPY_TRAILER, 0
    chips = _chip_arrays(tables)
    offsets, data, lengths = chips.offsets, chips.data, chips.wkb_lengths
    columns = {
        "item_no": np.repeat(np.arange(len(tables), dtype=np.int32), counts),
        **chips.columns,
    }
    parts = [_COPY_HEADER]
    for length in np.unique(lengths):
        rows = np.flatnonzero(lengths == length)
        size = int(length)
        record = np.empty(len(rows), dtype=[*_PREFIX_FIELDS, ("wkb", np.uint8, (size,))])
        record["nfields"] = 6
        for name in ("n0", "n1", "n2", "n3", "n4"):
            record[name] = 4  # every fixed-width field is 4 bytes
        record["n5"] = size
        for name, values in columns.items():
            record[name] = values[rows]
        if len(rows) == total and offsets[0] == 0:
            record["wkb"] = data[: total * size].reshape(total, size)
        else:
            record["wkb"] = data[offsets[rows][:, None] + np.arange(size)]
        parts.append(record.tobytes())
    parts.append(_COPY_TRAILER)
    return b"".join(parts), total


# -- the two transactions ---------------------------------------------------------------------

_PARTITIONS = """
WITH t AS (
    SELECT i->>'collection' AS collection,
           pgstac.stac_daterange(i->'properties') AS dtr,
           c.partition_trunc
    FROM jsonb_array_elements(%s::jsonb) i
    JOIN pgstac.collections c ON c.id = i->>'collection'
), p AS (
    SELECT collection,
           COALESCE(date_trunc(partition_trunc::text, lower(dtr)), '-infinity') AS d,
           tstzrange(min(lower(dtr)), max(lower(dtr)), '[]') AS dtrange,
           tstzrange(min(upper(dtr)), max(upper(dtr)), '[]') AS edtrange
    FROM t GROUP BY 1, 2
)
SELECT pgstac.check_partition(collection, dtrange, edtrange) FROM p ORDER BY collection, d
"""
# The same grouping as pgstac's items_staging_triggerfunc, which calls check_partition again
# inside the write transaction and then finds nothing left to do.


def _ensure_collections_and_partitions(
    conn: psycopg.Connection, prepared: Sequence[_Prepared], *, strict: bool
) -> list[str]:
    """First transaction: collections (created when missing) and partitions; returns created."""
    created: list[str] = []
    first_item: dict[str, _Prepared] = {}
    for p in prepared:
        first_item.setdefault(p.collection, p)
    with conn.transaction():
        conn.execute("SET LOCAL TIME ZONE 'UTC'")  # pgstac buckets partitions in UTC
        for collection in sorted(first_item):
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                (_PARTITION_LOCK_CLASS, collection),
            )
        existing = {
            row[0]
            for row in conn.execute(
                "SELECT id FROM pgstac.collections WHERE id = ANY(%s)", (sorted(first_item),)
            )
        }
        for collection in sorted(set(first_item) - existing):
            example = first_item[collection]
            if strict:
                raise CollectionMissing(
                    f"item {example.item_id}: collection {collection!r} does not exist in "
                    "pgstac; create it first (e.g. `pypgstac load collections FILE`) or drop "
                    "--strict to create a minimal one"
                )
            document = minimal_collection(collection, example.item)
            conn.execute("SELECT pgstac.create_collection(%s::jsonb)", (json.dumps(document),))
            created.append(collection)
            log.info("created collection %s (minimal STAC collection)", collection)
        dates = [
            {
                "collection": p.collection,
                "properties": {
                    key: p.item["properties"].get(key)
                    for key in ("datetime", "start_datetime", "end_datetime")
                    if p.item["properties"].get(key) is not None
                },
            }
            for p in prepared
        ]
        conn.execute(_PARTITIONS, (json.dumps(dates),))
    return created


def _write(
    conn: psycopg.Connection,
    prepared: Sequence[_Prepared],
    *,
    chip_size: int,
    on_conflict: OnConflict,
) -> StoreResult:
    """Second transaction: item locks, pgstac upsert, chip rows replaced."""
    result = StoreResult()
    with conn.transaction():
        keys = sorted({item_lock_key(p.collection, p.item_id) for p in prepared})
        conn.execute(
            "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) WITH ORDINALITY u(k, n) "
            "ORDER BY n",
            (keys,),
        )
        prepared = _upsert_items(conn, prepared, chip_size, on_conflict, result)
        if not prepared:
            return result
        collections = [p.collection for p in prepared]
        item_ids = [p.item_id for p in prepared]
        items = (collections, item_ids, [p.datetime for p in prepared])
        data, rows = chips_copy_data([p.chips for p in prepared])
        conn.execute(_INCOMING)
        with conn.cursor().copy("COPY stacchip_chips_in FROM STDIN WITH (FORMAT binary)") as copy:
            copy.write(data)
        # Replace the items' rows, but leave a row that is already stored exactly as it comes
        # (re-runs of a job, re-indexing unchanged scenes): deleting and re-inserting it would
        # touch every index of stacchip.chips and leave a dead tuple behind, for nothing.
        conn.execute(
            f"""
            DELETE FROM stacchip.chips s
            USING {_ITEMS} AS i(collection, item_id, datetime, n)
            WHERE s.collection = i.collection AND s.item_id = i.item_id AND s.chip_size = %s
              AND NOT EXISTS (
                SELECT 1 FROM stacchip_chips_in c
                WHERE c.item_no = i.n - 1 AND c.chip_index_x = s.chip_index_x
                  AND c.chip_index_y = s.chip_index_y AND s.datetime = i.datetime
                  AND c.cloud_fraction = s.cloud_fraction
                  AND c.nodata_fraction = s.nodata_fraction
                  AND c.geometry = ST_AsBinary(s.geometry, 'NDR'))
            """,
            (*items, chip_size),
        )
        conn.execute(
            f"""
            INSERT INTO stacchip.chips (collection, item_id, chip_size, chip_index_x,
                chip_index_y, datetime, cloud_fraction, nodata_fraction, geometry)
            SELECT i.collection, i.item_id, %s, c.chip_index_x, c.chip_index_y, i.datetime,
                   c.cloud_fraction, c.nodata_fraction, ST_GeomFromWKB(c.geometry, 4326)
            FROM stacchip_chips_in c
            JOIN {_ITEMS} AS i(collection, item_id, datetime, n) ON c.item_no = i.n - 1
            ON CONFLICT ON CONSTRAINT chips_pkey DO NOTHING
            """,
            (chip_size, *items),
        )
        stored = conn.execute(
            f"SELECT count(*) FROM stacchip.chips s JOIN {_ITEMS} AS i(collection, item_id, "
            "datetime, n) ON s.collection = i.collection AND s.item_id = i.item_id "
            "WHERE s.chip_size = %s",
            (*items, chip_size),
        ).fetchone()[0]
        if stored != rows:  # only a wrong item_no (a bug) or a duplicate chip key gets here
            raise DatabaseError(f"stored {stored} of {rows} chips; nothing was committed")
        result.items = len(prepared)
        result.chips = rows
    return result


def _upsert_items(
    conn: psycopg.Connection,
    prepared: Sequence[_Prepared],
    chip_size: int,
    on_conflict: OnConflict,
    result: StoreResult,
    *,
    batch_items: int | None = None,
) -> Sequence[_Prepared]:
    """Items into pgstac (its `upsert_items`/`create_items`); returns those not skipped.

    Call with the items' advisory locks held. `OnConflict.ignore` skips (into
    `result.skipped`) the items already stored with chips at `chip_size`.
    """
    if on_conflict is OnConflict.ignore:
        stored = _already_stored(conn, prepared, chip_size)
        result.skipped.extend(p.item_id for p in prepared if (p.collection, p.item_id) in stored)
        prepared = [p for p in prepared if (p.collection, p.item_id) not in stored]
    function = "create_items" if on_conflict is OnConflict.insert else "upsert_items"
    step = batch_items or max(len(prepared), 1)
    for start in range(0, len(prepared), step):
        items_json = json.dumps(
            [p.item for p in prepared[start : start + step]], separators=(",", ":")
        )
        conn.execute(f"SELECT pgstac.{function}(%s::jsonb)", (items_json,))
    return prepared


def _already_stored(
    conn: psycopg.Connection, prepared: Sequence[_Prepared], chip_size: int
) -> set[tuple[str, str]]:
    rows = conn.execute(
        """
        SELECT i.collection, i.item_id
        FROM unnest(%s::text[], %s::text[]) AS i(collection, item_id)
        WHERE EXISTS (SELECT 1 FROM pgstac.items p
                      WHERE p.collection = i.collection AND p.id = i.item_id)
          AND EXISTS (SELECT 1 FROM stacchip.chips c
                      WHERE c.collection = i.collection AND c.item_id = i.item_id
                        AND c.chip_size = %s)
        """,
        ([p.collection for p in prepared], [p.item_id for p in prepared], chip_size),
    ).fetchall()
    return {(c, i) for c, i in rows}


def _check_idle(conn: psycopg.Connection) -> None:
    if conn.closed or conn.broken:  # not the caller's mistake: the server or network went
        raise DatabaseUnavailable(
            "lost the database connection (the server closed it or the network failed); "
            "check the server, then run again"
        )
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise ValueError(
            "store_items commits its own transactions: pass a connection that is not inside "
            "one (autocommit, or commit first)"
        )


@contextmanager
def _storing(what: str, on_conflict: OnConflict) -> Iterator[None]:
    """Database errors as one line naming `what`; with `OnConflict.insert`, a key that is
    already taken becomes `ItemExists`."""
    try:
        with translate_errors(what):
            yield
    except DatabaseError as e:
        if isinstance(e.__cause__, psycopg.errors.UniqueViolation) and (
            on_conflict is OnConflict.insert
        ):
            raise ItemExists(
                f"{what}: an item is already stored; use on_conflict upsert (replace) or "
                "ignore (keep)"
            ) from e
        raise


def store_items(
    conn: psycopg.Connection,
    pairs: Iterable[tuple[Mapping[str, Any], pa.Table]],
    *,
    chip_size: int,
    strict: bool = False,
    on_conflict: OnConflict | str = OnConflict.upsert,
) -> StoreResult:
    """Store many items and their chips; all of them or (on any error) none.

    `pairs` are `(item dict, chips table)`, the table as `index_item` returns it (computed
    with the same `chip_size`). Each item needs `id`, `collection`, a geometry and a datetime;
    a missing collection is created as a minimal STAC collection unless `strict` (then
    `CollectionMissing`). Each item's chip rows at `chip_size` are replaced, each chip row is
    dated `index.item_datetime(item)`. An item may appear once per call.
    Raises `ItemError` for a bad item (before touching the database), `ItemExists`
    (`on_conflict="insert"`), or `DatabaseError`.
    """
    on_conflict = OnConflict(on_conflict)
    prepared = [_prepare(item, chips) for item, chips in pairs]
    if not prepared:
        return StoreResult()
    seen: set[tuple[str, str]] = set()
    for p in prepared:
        if (p.collection, p.item_id) in seen:
            raise ItemError(
                f"item {p.item_id} appears twice in one batch of collection {p.collection}; "
                "pass each item once"
            )
        seen.add((p.collection, p.item_id))
    _check_idle(conn)
    what = (
        f"storing item {prepared[0].item_id}"
        if len(prepared) == 1
        else f"storing {len(prepared)} items ({prepared[0].item_id} …)"
    )
    with _storing(what, on_conflict):
        created = _ensure_collections_and_partitions(conn, prepared, strict=strict)
        result = _write(conn, prepared, chip_size=chip_size, on_conflict=on_conflict)
    result.collections_created = created
    return result


def store_item(
    conn: psycopg.Connection,
    item: Mapping[str, Any],
    chips: pa.Table,
    *,
    chip_size: int,
    strict: bool = False,
    on_conflict: OnConflict | str = OnConflict.upsert,
) -> StoreResult:
    """Store one item into pgstac and replace its chip rows, in one transaction.

    See `store_items`; this is the same for a single `(item, chips)` pair.
    """
    return store_items(
        conn, [(item, chips)], chip_size=chip_size, strict=strict, on_conflict=on_conflict
    )


# -- batching many items ----------------------------------------------------------------------


@dataclass(frozen=True)
class ItemFailure:
    """An item that could not be stored, with the one-line reason."""

    item_id: str
    message: str


def _failure(item: Any, error: Exception) -> ItemFailure:
    """The one-line failure of `item`; an error that is not ours keeps its type's name."""
    if isinstance(error, StacchipError):
        return ItemFailure(_item_id(item), str(error))
    log.debug("storing item %s failed", _item_id(item), exc_info=error)
    return ItemFailure(_item_id(item), f"{type(error).__name__}: {error}")


class ItemWriter:
    """Store a stream of `(item, chips)` pairs in batches; one item's failure spares the rest.

        with ItemWriter(conn, chip_size=256) as writer:
            for item in items:
                writer.add(item, index_item(item))
        writer.result, writer.failures

    A batch is written (one `store_items` call) when it holds `batch_chips` chips or
    `batch_items` items, and at exit. When a batch fails, its items are stored one by one, so
    the bad ones are named in `failures` and the others stored. With `background=True` batches
    are written by a thread while the caller goes on indexing (the database works in its own
    process, so the two overlap even under the GIL); at most two batches wait in memory.
    `extra_connections` (background only; the caller opens and closes them) add one writer
    thread each, so several database backends insert at once.
    An item added twice is written by the later batch when there is one writer; with several,
    either version may end up stored (each consistently, never a mix).
    """

    def __init__(
        self,
        conn: psycopg.Connection,
        *,
        chip_size: int,
        strict: bool = False,
        on_conflict: OnConflict | str = OnConflict.upsert,
        batch_chips: int = BATCH_CHIPS,
        batch_items: int = BATCH_ITEMS,
        background: bool = False,
        extra_connections: Sequence[psycopg.Connection] = (),
    ) -> None:
        if extra_connections and not background:
            raise ValueError("extra_connections need background=True (one thread each)")
        self.conn = conn
        self.chip_size = chip_size
        self.strict = strict
        self.on_conflict = OnConflict(on_conflict)
        self.batch_chips = batch_chips
        self.batch_items = batch_items
        self.result = StoreResult()
        self.failures: list[ItemFailure] = []
        self._batch: list[tuple[Mapping[str, Any], pa.Table]] = []
        self._batch_keys: set[tuple[str, str]] = set()
        self._batch_rows = 0
        self._lock = threading.Lock()  # result and failures, shared by the writer threads
        self._queue: queue.Queue[list[tuple[Mapping[str, Any], pa.Table]] | None] | None = None
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None
        if background:
            connections = [conn, *extra_connections]
            self._queue = queue.Queue(maxsize=len(connections) + 1)
            for n, writer_conn in enumerate(connections):
                thread = threading.Thread(
                    target=self._drain,
                    args=(self._queue, writer_conn),
                    name=f"stacchip-store-{n}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)

    def __enter__(self) -> ItemWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()

    def add(self, item: Mapping[str, Any], chips: pa.Table) -> bool:
        """Queue one item (False and a failure when it cannot be stored); writes full batches."""
        try:
            key = check_item(item)[:2]
        except ItemError as e:  # caught before it can spoil a whole batch
            with self._lock:
                self.failures.append(ItemFailure(_item_id(item), str(e)))
            return False
        if key in self._batch_keys:  # one item once per transaction
            self.flush()
        self._batch.append((item, chips))
        self._batch_keys.add(key)
        self._batch_rows += chips.num_rows
        if self._batch_rows >= self.batch_chips or len(self._batch) >= self.batch_items:
            self.flush()
        return True

    def flush(self) -> None:
        """Write (or hand to a writer thread) what has been added so far."""
        if not self._batch:
            return
        batch, self._batch, self._batch_keys, self._batch_rows = self._batch, [], set(), 0
        if self._queue is None:
            self._write(batch, self.conn)
            return
        self._raise_thread_error()
        self._queue.put(batch)

    def close(self) -> None:
        """Write the last batch and wait for the threads; re-raises a thread's crash."""
        try:
            self.flush()
        finally:
            if self._queue is not None:
                for _ in self._threads:
                    self._queue.put(None)
                for thread in self._threads:
                    thread.join()
                self._threads = []
        self._raise_thread_error()

    def _raise_thread_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _drain(
        self,
        batches: queue.Queue[list[tuple[Mapping[str, Any], pa.Table]] | None],
        conn: psycopg.Connection,
    ) -> None:
        while (batch := batches.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the producer never blocks on a dead thread
            try:
                self._write(batch, conn)
            except BaseException as e:  # handed to the caller by flush/close
                self._error = e

    def _write(
        self, batch: list[tuple[Mapping[str, Any], pa.Table]], conn: psycopg.Connection
    ) -> None:
        kwargs = {
            "chip_size": self.chip_size, "strict": self.strict, "on_conflict": self.on_conflict
        }
        # Any exception of a batch (not only ours: a malformed item can raise anything) is
        # isolated to its items, except a lost connection, which every item would meet again.
        try:
            self._done(store_items(conn, batch, **kwargs))
            return
        except Exception as e:
            if conn.closed or conn.broken:
                raise
            if len(batch) == 1:
                self._done(failure=_failure(batch[0][0], e))
                return
            log.debug("batch of %d items failed (%s); storing them one by one", len(batch), e)
        for item, chips in batch:
            try:
                self._done(store_items(conn, [(item, chips)], **kwargs))
            except Exception as e:
                if conn.closed or conn.broken:
                    raise
                self._done(failure=_failure(item, e))

    def _done(self, result: StoreResult | None = None, failure: ItemFailure | None = None) -> None:
        with self._lock:
            if result is not None:
                self.result.add(result)
            if failure is not None:
                self.failures.append(failure)


# -- bulk load --------------------------------------------------------------------------------

BULK_MAINTENANCE_WORK_MEM = "1GB"
"""`maintenance_work_mem` of the bulk load's transaction (index builds sort in memory)."""
BULK_LOCK_ATTEMPT_S = 1.0
"""How long one attempt of the bulk load to lock stacchip.chips waits (see `_lock_exclusively`)."""
BULK_LOCK_PAUSE_S = 0.2
"""The pause between two such attempts, in which the sessions queued behind it go on."""

_BULK_COLUMNS = (
    "collection", "item_id", "chip_size", "chip_index_x", "chip_index_y", "datetime",
    "cloud_fraction", "nodata_fraction", "geometry",
)  # fmt: skip
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # binary timestamptz: microseconds since then
_MICROSECOND = timedelta(microseconds=1)
_BULK_ROW_FIELDS = [
    ("n_x", ">i4"), ("chip_index_x", ">i4"),
    ("n_y", ">i4"), ("chip_index_y", ">i4"),
    ("n_datetime", ">i4"), ("datetime", ">i8"),
    ("n_cloud", ">i4"), ("cloud_fraction", ">f4"),
    ("n_nodata", ">i4"), ("nodata_fraction", ">f4"),
    ("n_geometry", ">i4"),
]  # fmt: skip  # after the per-item head (field count, collection, item id, chip size)


@dataclass(frozen=True)
class TableDefinitions:
    """What `bulk_load` drops from a table and recreates: read from the catalog, so it stays
    right whatever indexes later migrations add.

    `constraints` are `(name, pg_get_constraintdef)` of the constraints that own an index
    (primary key, unique, exclusion); `indexes` are the other indexes' `pg_get_indexdef`
    (`pg_indexes.indexdef`); `after` re-applies what dropping loses besides the definitions
    (CLUSTER ON, REPLICA IDENTITY USING INDEX, comments).
    """

    table: str
    constraints: list[tuple[str, str]]
    indexes: list[tuple[str, str]]
    after: list[str]

    def drop_statements(self) -> list[str]:
        schema = self.table.split(".")[0]
        return [
            *(f"ALTER TABLE {self.table} DROP CONSTRAINT {_ident(name)}"
              for name, _ in self.constraints),
            *(f"DROP INDEX {schema}.{_ident(name)}" for name, _ in self.indexes),
        ]

    def create_statements(self) -> list[str]:
        return [
            *(f"ALTER TABLE {self.table} ADD CONSTRAINT {_ident(name)} {definition}"
              for name, definition in self.constraints),
            *(definition for _, definition in self.indexes),
            *self.after,
        ]


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def table_definitions(conn: psycopg.Connection, table: str = CHIPS_TABLE) -> TableDefinitions:
    """The index and key definitions of `table` (schema-qualified), from the catalog."""
    schema = table.split(".")[0]
    referenced = conn.execute(
        "SELECT conname, conrelid::regclass::text FROM pg_constraint "
        "WHERE confrelid = %s::regclass AND contype = 'f'",
        (table,),
    ).fetchall()
    if referenced:
        name, other = referenced[0]
        raise StoreError(
            f"{table} is referenced by foreign key {name} of {other}; the bulk load cannot drop "
            "its key: index without --bulk"
        )
    constraints = conn.execute(
        """
        SELECT c.conname, pg_get_constraintdef(c.oid), i.relname,
               obj_description(c.oid, 'pg_constraint')
        FROM pg_constraint c JOIN pg_class i ON i.oid = c.conindid
        WHERE c.conrelid = %s::regclass AND c.contype IN ('p', 'u', 'x')
        ORDER BY c.conname
        """,
        (table,),
    ).fetchall()
    indexes = conn.execute(
        """
        SELECT i.relname, pg_get_indexdef(i.oid), x.indisclustered, x.indisreplident,
               obj_description(i.oid, 'pg_class'),
               EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.oid
                       AND c.conrelid = x.indrelid AND c.contype IN ('p', 'u', 'x'))
        FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
        WHERE x.indrelid = %s::regclass
        ORDER BY i.relname
        """,
        (table,),
    ).fetchall()
    after: list[str] = []
    for conname, _, index_name, comment in constraints:
        if index_name != conname:  # ADD CONSTRAINT names its index after the constraint
            after.append(
                f"ALTER INDEX {schema}.{_ident(conname)} RENAME TO {_ident(index_name)}"
            )
        if comment is not None:
            after.append(
                f"COMMENT ON CONSTRAINT {_ident(conname)} ON {table} IS {_literal(comment)}"
            )
    for name, _, clustered, replident, comment, _ in indexes:
        if clustered:
            after.append(f"ALTER TABLE {table} CLUSTER ON {_ident(name)}")
        if replident:
            after.append(f"ALTER TABLE {table} REPLICA IDENTITY USING INDEX {_ident(name)}")
        if comment is not None:
            after.append(f"COMMENT ON INDEX {schema}.{_ident(name)} IS {_literal(comment)}")
    return TableDefinitions(
        table=table,
        constraints=[(name, definition) for name, definition, _, _ in constraints],
        indexes=[(row[0], row[1]) for row in indexes if not row[5]],
        after=after,
    )


def _bulk_head(p: _Prepared, chip_size: int) -> bytes:
    """The first fields of every COPY row of an item: field count, collection, id, chip size."""
    collection, item_id = p.collection.encode(), p.item_id.encode()
    return b"".join(
        [
            len(_BULK_COLUMNS).to_bytes(2, "big"),
            len(collection).to_bytes(4, "big"), collection,
            len(item_id).to_bytes(4, "big"), item_id,
            (4).to_bytes(4, "big"), chip_size.to_bytes(4, "big", signed=True),
        ]
    )  # fmt: skip


def bulk_copy_data(prepared: Sequence[_Prepared], chip_size: int) -> tuple[bytes, int]:
    """Binary COPY data in `stacchip.chips`' own columns (`_BULK_COLUMNS`), and its rows.

    Numpy record arrays, no per-chip Python: one record array per (head length, WKB length),
    the geometry as the table's WKB (the column's typmod gives it SRID 4326).
    """
    parts, total = _bulk_copy_parts(prepared, chip_size)
    return b"".join(parts), total


def _bulk_copy_parts(prepared: Sequence[_Prepared], chip_size: int) -> tuple[list[bytes], int]:
    """The COPY data as parts; rows in primary-key order (items by collection and id, then
    chip x, then y): the key's index build then sorts presorted input (0.6 -> 0.25 s for the
    200 NAIP items). One record array per run of items whose head and WKB sizes agree."""
    # Items in key order (UTF-8 byte order: the server's order under C and C.UTF-8 collations;
    # under others the sort just does its usual work).
    prepared = sorted(prepared, key=lambda p: (p.collection.encode(), p.item_id.encode()))
    counts = np.array([p.chips.num_rows for p in prepared], dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return [_COPY_HEADER, _COPY_TRAILER], 0
    chips = _chip_arrays([p.chips for p in prepared])
    offsets, data, wkb_lengths = chips.offsets, chips.data, chips.wkb_lengths
    heads = [_bulk_head(p, chip_size) for p in prepared]
    head_lengths = np.array([len(h) for h in heads], dtype=np.int64)
    item_of_row = np.repeat(np.arange(len(prepared)), counts)
    micros = np.array([(p.datetime - _PG_EPOCH) // _MICROSECOND for p in prepared], np.int64)
    columns = chips.columns
    order = np.lexsort((columns["chip_index_y"], columns["chip_index_x"], item_of_row))
    common = int(wkb_lengths[0])
    wkb = None  # every WKB of one size (4-corner polygons): rows of a 2D view
    if (wkb_lengths == common).all():
        wkb = data[offsets[0] : offsets[0] + total * common].reshape(total, common)
    # Runs of consecutive items with the same head size; a run's rows are a slice of `order`.
    first_rows = np.concatenate([[0], np.cumsum(counts)])
    starts = np.flatnonzero(np.diff(head_lengths, prepend=-1))
    parts = [_COPY_HEADER]
    for a, b in zip(starts, [*starts[1:], len(prepared)], strict=True):
        run = order[first_rows[a] : first_rows[b]]
        head_array = np.frombuffer(b"".join(heads[a:b]), f"V{head_lengths[a]}")
        for size in np.unique(wkb_lengths[run]) if wkb is None else [common]:
            rows = run if wkb is not None else run[wkb_lengths[run] == size]
            record = np.empty(
                len(rows),
                dtype=[
                    ("head", f"V{head_lengths[a]}"), *_BULK_ROW_FIELDS,
                    ("wkb", np.uint8, (int(size),)),
                ],
            )  # fmt: skip
            items = item_of_row[rows]
            record["head"] = head_array[items - a]
            record["n_x"] = record["n_y"] = record["n_cloud"] = record["n_nodata"] = 4
            record["n_datetime"] = 8
            record["n_geometry"] = size
            record["datetime"] = micros[items]
            for name, values in columns.items():
                record[name] = values[rows]
            if wkb is not None:
                record["wkb"] = wkb[rows]
            else:
                record["wkb"] = data[offsets[rows][:, None] + np.arange(size)]
            parts.append(record.tobytes())
    parts.append(_COPY_TRAILER)
    return parts, total



def _dedupe(prepared: Sequence[_Prepared]) -> tuple[list[_Prepared], int]:
    """One entry per item, the last given (in the order of those last entries); duplicates."""
    last: dict[tuple[str, str], _Prepared] = {}
    for p in prepared:
        last.pop((p.collection, p.item_id), None)
        last[(p.collection, p.item_id)] = p
    return list(last.values()), len(prepared) - len(last)


def bulk_load(
    conn: psycopg.Connection,
    pairs: Iterable[tuple[Mapping[str, Any], pa.Table]],
    *,
    chip_size: int,
    strict: bool = False,
    on_conflict: OnConflict | str = OnConflict.upsert,
    batch_items: int = BATCH_ITEMS,
    maintenance_work_mem: str = BULK_MAINTENANCE_WORK_MEM,
) -> StoreResult:
    """Store many items and their chips by rebuilding `stacchip.chips`' indexes once.

    For large loads (an empty table, or many items at once): maintaining the indexes row by row
    costs several times more than building them after the rows are in. In ONE transaction:

    1. the items' advisory locks (as `store_items`), pgstac `upsert_items` in batches;
    2. `LOCK TABLE stacchip.chips IN ACCESS EXCLUSIVE MODE`, asked for in short attempts so
       that the request never holds up other sessions while it waits (`_lock_exclusively`);
       until the commit, normal writers of stacchip.chips wait (then go on as usual) and
       readers give up after `locks.READ_LOCK_TIMEOUT_S`, naming the bulk load (its
       transaction's `application_name` is `locks.BULK_APPLICATION`);
    3. the existing chip rows of the items at `chip_size` are deleted (one DELETE through a
       temp table of keys, while the indexes still exist);
    4. the table's indexes and its key/unique/exclusion constraints are read from the catalog
       (`TableDefinitions`) and dropped; all chip rows go in by one binary COPY; the indexes
       and constraints are recreated from their definitions (`maintenance_work_mem` raised
       for the transaction), then commit.

    All or nothing: any error rolls everything back (nothing is stored). Items given more than
    once: the last one wins (`result.duplicates`). Bad items raise `ItemError` before the
    database is touched, as `store_items`. All chips are held in memory (about 300 bytes a
    chip: tables and COPY data) until the COPY. `result.timings` has the seconds of each step.
    """
    on_conflict = OnConflict(on_conflict)
    prepared, duplicates = _dedupe([_prepare(item, chips) for item, chips in pairs])
    result = StoreResult(duplicates=duplicates)
    if not prepared:
        return result
    _check_idle(conn)
    what = f"bulk loading {len(prepared)} items ({prepared[0].item_id} …)"
    timings = result.timings
    with _storing(what, on_conflict):
        clock = time.perf_counter()
        result.collections_created = _ensure_collections_and_partitions(
            conn, prepared, strict=strict
        )
        timings["partitions"] = time.perf_counter() - clock
        with conn.transaction():
            clock = time.perf_counter()
            conn.execute(  # raised for this transaction only, never lowered
                "SELECT set_config('maintenance_work_mem', %s, true) WHERE pg_size_bytes("
                "current_setting('maintenance_work_mem')) < pg_size_bytes(%s)",
                (maintenance_work_mem, maintenance_work_mem),
            )
            keys = sorted({item_lock_key(p.collection, p.item_id) for p in prepared})
            conn.execute(
                "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) "
                "WITH ORDINALITY u(k, n) ORDER BY n",
                (keys,),
            )
            prepared = _upsert_items(
                conn, prepared, chip_size, on_conflict, result, batch_items=batch_items
            )
            timings["upsert"] = time.perf_counter() - clock
            if not prepared:
                return result
            parts, rows = _bulk_copy_parts(prepared, chip_size)
            clock = time.perf_counter()
            # for this transaction only: readers that give up waiting name the bulk load
            conn.execute("SELECT set_config('application_name', %s, true)", (BULK_APPLICATION,))
            _lock_exclusively(conn, CHIPS_TABLE)
            timings["lock"] = time.perf_counter() - clock
            clock = time.perf_counter()
            _delete_items(conn, prepared, chip_size)
            timings["delete"] = time.perf_counter() - clock
            clock = time.perf_counter()
            definitions = table_definitions(conn)
            for statement in definitions.drop_statements():
                conn.execute(statement)
            columns = ", ".join(_BULK_COLUMNS)
            with conn.cursor().copy(
                f"COPY {CHIPS_TABLE} ({columns}) FROM STDIN WITH (FORMAT binary)"
            ) as copy:
                for part in parts:
                    copy.write(part)
            del parts
            timings["copy"] = time.perf_counter() - clock
            clock = time.perf_counter()
            for statement in definitions.create_statements():
                step = time.perf_counter()
                conn.execute(statement)
                log.debug("%.3f s: %s", time.perf_counter() - step, statement)
            timings["rebuild"] = time.perf_counter() - clock
            clock = time.perf_counter()
        timings["commit"] = time.perf_counter() - clock
    result.items = len(prepared)
    result.chips = rows
    return result


def _lock_exclusively(conn: psycopg.Connection, table: str) -> None:
    """`LOCK TABLE … IN ACCESS EXCLUSIVE MODE`, asked for in short attempts.

    While a lock request waits (for a long read to end, say), every later reader and writer
    of the table queues behind it, even though nobody holds the table yet. So each attempt
    gives up after `BULK_LOCK_ATTEMPT_S` (a savepoint: the rest of the transaction stays),
    steps aside for a moment to let the queue through, and asks again, until it is granted.
    """
    previous = conn.execute("SELECT current_setting('lock_timeout')").fetchone()[0]
    attempts = 0
    while True:
        try:
            with conn.transaction():
                set_lock_timeout(conn, BULK_LOCK_ATTEMPT_S)
                conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            break
        except psycopg.errors.LockNotAvailable:
            attempts += 1
            if attempts == 1:
                log.info("bulk load: waiting for %s to end (it uses %s)",
                         holder_of(conn, table) or "another session", table)
            time.sleep(BULK_LOCK_PAUSE_S)
    conn.execute("SELECT set_config('lock_timeout', %s, true)", (previous,))


def _delete_items(conn: psycopg.Connection, prepared: Sequence[_Prepared], chip_size: int) -> None:
    """Delete the chip rows of `prepared` at `chip_size`: one DELETE joined to a temp table."""
    conn.execute(
        "CREATE TEMP TABLE stacchip_bulk_keys (collection text, item_id text) ON COMMIT DROP"
    )
    with conn.cursor().copy("COPY stacchip_bulk_keys (collection, item_id) FROM STDIN") as copy:
        for p in prepared:
            copy.write_row((p.collection, p.item_id))
    conn.execute(
        f"DELETE FROM {CHIPS_TABLE} c USING stacchip_bulk_keys k "
        "WHERE c.collection = k.collection AND c.item_id = k.item_id AND c.chip_size = %s",
        (chip_size,),
    )


def chips_table_is_empty(conn: psycopg.Connection) -> bool:
    """Whether `stacchip.chips` has no rows (one index-free probe; commits nothing).

    False also when another session holds the table exclusively for longer than
    `READ_LOCK_TIMEOUT_S` (a bulk load filling it): it is not empty for long, and the
    normal path the caller then takes waits for that load and goes on after it.
    """
    try:
        with conn.transaction():
            set_lock_timeout(conn, READ_LOCK_TIMEOUT_S)
            return conn.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {CHIPS_TABLE})").fetchone()[0]
    except psycopg.errors.LockNotAvailable:
        log.info("%s is locked by %s: taken as not empty (the normal path waits for it)",
                 CHIPS_TABLE, holder_of(conn) or "another session")
        return False
