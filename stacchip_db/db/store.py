"""The store protocol: items into pgstac and their chip rows into `stacchip.chips`.

Contract (docs/architecture.md, "Database contract", "How items are written"): an item and its
chip rows are written in ONE transaction; the item goes into pgstac through pgstac's own
`upsert_items`/`create_items` (never by hand into its tables), the chip rows of
`(collection, item_id, chip_size)` are replaced by a binary COPY (`db/copy.py`) into a
`TEMP TABLE … ON COMMIT DROP` and one `INSERT … SELECT`.
Re-storing an item gives the same rows, never duplicates.

The public API, used by the `index` command and by the processors:

- `store_item(conn, item, chips, *, chip_size)`: one item and its `index_item` table;
- `store_items(conn, pairs, *, chip_size)`: many `(item, chips)` pairs in one transaction (one
  COPY for all their chips).

Batches of items are written by `db/writer.py` (`ItemWriter`), large loads by `db/bulk.py`
(`bulk_load`, which shares this module's first transaction, item locks and pgstac upsert).

Concurrency, the way pgstac's own loader does it:

1. a short first transaction makes sure every collection and pgstac partition the items need
   exists (`pgstac.check_partition`, the function pgstac's trigger calls), and the collection's
   partition of `stacchip.chips` (`stacchip.chip_partition`, alembic 0008), serialised per
   collection by an advisory lock, so that the partition DDL (ACCESS EXCLUSIVE locks) never
   runs inside the long transaction that writes the rows;
2. the write transaction first takes the collections' advisory locks in shared mode (a bulk
   load of a collection takes its lock exclusively: `db/bulk.py` swaps the collection's
   partition, which no writer of it may then be inside), then one advisory lock per item, in
   sorted key order: writers of different items never wait for each other, two writers of the
   same item run one after the other (the second one's rows win, consistently), and sorted
   order rules out deadlocks. A transaction that waits for these locks holds no table lock yet.
   Its statements name the collections, so that they lock and read only those partitions.

Functions here commit their own transactions: pass a connection that is not inside one
(autocommit, or idle).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import psycopg
import pyarrow as pa
from psycopg import pq

from stacchip_db.db.connection import translate_errors
from stacchip_db.db.copy import copy_chip_rows
from stacchip_db.db.items import (
    ItemError,
    PreparedItem,
    StoreError,
    minimal_collection,
    prepare_item,
    with_locations,
)
from stacchip_db.errors import DatabaseError, DatabaseUnavailable

log = logging.getLogger(__name__)

BATCH_ITEMS = 500
"""Items per batch: `ItemWriter`'s default batch, `bulk_load`'s pgstac upsert calls."""

# First key of the two-int advisory locks of a collection: taken exclusively around its
# partition checks and creation (here and in `stacchip.chip_partition`, alembic 0008) and by a
# bulk load of it, shared by its writers. The one-bigint lock space (item locks, `db init`) is a
# different lock tag.
_PARTITION_LOCK_CLASS = 0x57AC


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


# -- items and their locks ---------------------------------------------------------------------


def item_lock_key(collection: str, item_id: str) -> int:
    """The advisory-lock key (signed bigint) of an item: writers of one item take turns."""
    digest = hashlib.blake2b(f"{collection}\0{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def lock_collections(
    conn: psycopg.Connection, collections: Iterable[str], *, exclusive: bool
) -> None:
    """Take the collections' advisory locks until the transaction ends, in sorted order.

    Shared: a writer of the collections' rows; exclusive: their partitions are created or
    replaced (a bulk load), so no writer of them may be inside its write transaction.
    """
    function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    conn.execute(
        f"SELECT {function}(%s, hashtext(c)) FROM unnest(%s::text[]) WITH ORDINALITY u(c, n) "
        "ORDER BY n",
        (_PARTITION_LOCK_CLASS, sorted(set(collections))),
    )


def lock_items(conn: psycopg.Connection, prepared: Sequence[PreparedItem]) -> None:
    """Take the advisory lock of every item of `prepared` until the transaction ends.

    In sorted key order, so that two writers of overlapping items cannot deadlock.
    """
    keys = sorted({item_lock_key(p.collection, p.item_id) for p in prepared})
    conn.execute(
        "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) WITH ORDINALITY u(k, n) "
        "ORDER BY n",
        (keys,),
    )


# -- chips as a binary COPY stream ------------------------------------------------------------

_ITEMS = "unnest(%s::text[], %s::text[], %s::timestamptz[]) WITH ORDINALITY"
"""The items of one write, numbered from 1 (chip rows refer to them by `item_no` = n - 1)."""

_INCOMING = """
CREATE TEMP TABLE stacchip_chips_in (
    item_no int NOT NULL,
    chip_index_x int NOT NULL,
    chip_index_y int NOT NULL,
    cloud_fraction real NOT NULL,
    nodata_fraction real NOT NULL,
    geometry bytea NOT NULL,
    location bigint
) ON COMMIT DROP
"""
_INCOMING_COLUMNS = (
    "item_no", "chip_index_x", "chip_index_y", "cloud_fraction", "nodata_fraction", "location",
    "geometry",
)  # fmt: skip
"""`stacchip_chips_in`'s columns: the COPY's row layout (`incoming_columns`)."""


def incoming_columns(tables: Sequence[pa.Table]) -> tuple[str, ...]:
    """The COPY's columns for `tables`: `location` only when they all carry it (`_write`
    always gives it: `items.with_locations`)."""
    if all("location" in t.column_names for t in tables):
        return _INCOMING_COLUMNS
    return tuple(c for c in _INCOMING_COLUMNS if c != "location")


def chips_copy_data(tables: Sequence[pa.Table]) -> tuple[bytes, int]:
    """Binary COPY data (`stacchip_chips_in`'s columns) for the chips of `tables`, and its rows.

    Rows of `tables[i]` get `item_no = i`, in the tables' order (`copy.copy_chip_rows`).
    """
    parts, total = copy_chip_rows(incoming_columns(tables), tables)
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


def ensure_collections_and_partitions(
    conn: psycopg.Connection,
    prepared: Sequence[PreparedItem],
    *,
    strict: bool,
    chip_partitions: bool = True,
) -> list[str]:
    """First transaction: collections (created when missing) and partitions; returns created.

    Its own transaction, before the one that writes the rows (`bulk_load` too): the partition
    DDL takes ACCESS EXCLUSIVE locks, which the long write transaction must not hold. With
    `chip_partitions`, each collection's partition of `stacchip.chips` is made too (a bulk
    load builds its own instead).
    """
    created: list[str] = []
    first_item: dict[str, PreparedItem] = {}
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
        if chip_partitions:
            conn.execute(
                "SELECT stacchip.chip_partition(c) FROM unnest(%s::text[]) AS c ORDER BY c",
                (sorted(first_item),),
            )
    return created


def _write(
    conn: psycopg.Connection,
    prepared: Sequence[PreparedItem],
    *,
    chip_size: int,
    on_conflict: OnConflict,
) -> StoreResult:
    """Second transaction: item locks, pgstac upsert, chip rows replaced."""
    result = StoreResult()
    with conn.transaction():
        lock_collections(conn, (p.collection for p in prepared), exclusive=False)
        lock_items(conn, prepared)
        prepared = upsert_items(conn, prepared, chip_size, on_conflict, result)
        if not prepared:
            return result
        prepared = with_locations(prepared, chip_size)
        # `s.collection = ANY(...)`, given as a value, lets the planner leave out the other
        # collections' partitions (not read, not locked).
        names = sorted({p.collection for p in prepared})
        collections = [p.collection for p in prepared]
        item_ids = [p.item_id for p in prepared]
        items = (collections, item_ids, [p.datetime for p in prepared])
        data, rows = chips_copy_data([p.chips for p in prepared])
        conn.execute(_INCOMING)
        columns = ", ".join(_INCOMING_COLUMNS)
        with conn.cursor().copy(
            f"COPY stacchip_chips_in ({columns}) FROM STDIN WITH (FORMAT binary)"
        ) as copy:
            copy.write(data)
        # Replace the items' rows, but leave a row that is already stored exactly as it comes
        # (re-runs of a job, re-indexing unchanged scenes): deleting and re-inserting it would
        # touch every index of stacchip.chips and leave a dead tuple behind, for nothing.
        conn.execute(
            f"""
            DELETE FROM stacchip.chips s
            USING {_ITEMS} AS i(collection, item_id, datetime, n)
            WHERE s.collection = ANY(%s::text[])
              AND s.collection = i.collection AND s.item_id = i.item_id AND s.chip_size = %s
              AND NOT EXISTS (
                SELECT 1 FROM stacchip_chips_in c
                WHERE c.item_no = i.n - 1 AND c.chip_index_x = s.chip_index_x
                  AND c.chip_index_y = s.chip_index_y AND s.datetime = i.datetime
                  AND c.cloud_fraction = s.cloud_fraction
                  AND c.nodata_fraction = s.nodata_fraction
                  AND c.location = s.location
                  AND c.geometry = ST_AsBinary(s.geometry, 'NDR'))
            """,
            (*items, names, chip_size),
        )
        conn.execute(
            f"""
            INSERT INTO stacchip.chips (collection, item_id, chip_size, chip_index_x,
                chip_index_y, datetime, cloud_fraction, nodata_fraction, location, geometry)
            SELECT i.collection, i.item_id, %s, c.chip_index_x, c.chip_index_y, i.datetime,
                   c.cloud_fraction, c.nodata_fraction, c.location,
                   ST_GeomFromWKB(c.geometry, 4326)
            FROM stacchip_chips_in c
            JOIN {_ITEMS} AS i(collection, item_id, datetime, n) ON c.item_no = i.n - 1
            ON CONFLICT ON CONSTRAINT chips_pkey DO NOTHING
            """,
            (chip_size, *items),
        )
        stored = conn.execute(
            f"SELECT count(*) FROM stacchip.chips s JOIN {_ITEMS} AS i(collection, item_id, "
            "datetime, n) ON s.collection = i.collection AND s.item_id = i.item_id "
            "WHERE s.collection = ANY(%s::text[]) AND s.chip_size = %s",
            (*items, names, chip_size),
        ).fetchone()[0]
        if stored != rows:  # only a wrong item_no (a bug) or a duplicate chip key gets here
            raise DatabaseError(f"stored {stored} of {rows} chips; nothing was committed")
        result.items = len(prepared)
        result.chips = rows
    return result


def upsert_items(
    conn: psycopg.Connection,
    prepared: Sequence[PreparedItem],
    chip_size: int,
    on_conflict: OnConflict,
    result: StoreResult,
    *,
    batch_items: int | None = None,
) -> Sequence[PreparedItem]:
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
    conn: psycopg.Connection, prepared: Sequence[PreparedItem], chip_size: int
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


def check_idle(conn: psycopg.Connection) -> None:
    """`conn` can run transactions of its own: open and not inside one (else an error)."""
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
def storing(what: str, on_conflict: OnConflict) -> Iterator[None]:
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
    prepared = [prepare_item(item, chips) for item, chips in pairs]
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
    check_idle(conn)
    what = (
        f"storing item {prepared[0].item_id}"
        if len(prepared) == 1
        else f"storing {len(prepared)} items ({prepared[0].item_id} …)"
    )
    with storing(what, on_conflict):
        created = ensure_collections_and_partitions(conn, prepared, strict=strict)
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
