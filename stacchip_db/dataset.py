"""Selected chips with their STAC items, and `ChipDataset`, the map-style reader over them.

`load_selection` is how every exporter (prechip, stats, pictures, ChipDataset) gets its chips:

- the user's SQL runs as `db.user_sql` runs user SQL: on its own least-privileged login, in a
  READ ONLY transaction that is rolled back, under a deadline the client keeps (and a short lock
  timeout: behind a bulk load it gives up within seconds, naming it), through a
  server-side cursor (`DECLARE … CURSOR FOR <query>`): PostgreSQL then accepts exactly one
  SELECT (or VALUES) and refuses `DELETE …`, `UPDATE …` and `SELECT …; DROP …` before running
  anything, and the read-only transaction refuses writes hidden in functions;
- the query must return the chip key columns (`KEY_COLUMNS`); the rest of each chip's row
  (datetime, fractions, footprint) is looked up in `stacchip.chips`;
- each distinct item is read once, from pgstac with its own `get_item`, in one statement.

The Clay cube metadata (lat/lon of the footprint centre, ISO week, hour of day as sin/cos
pairs) is computed here, vectorised, for prechip and the dataset alike.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import psycopg
import shapely
from psycopg import sql

from stacchip_db.db import connect, translate_errors
from stacchip_db.db.items import stored_items
from stacchip_db.db.locks import READ_LOCK_TIMEOUT_S, lock_waits, set_lock_timeout
from stacchip_db.db.user_sql import (
    QueryError,
    check_timeout,
    key_batches,
    login_url,
    user_query,
)
from stacchip_db.errors import DatabaseError, StacchipError
from stacchip_db.grid import chip_grid
from stacchip_db.index import item_datetime
from stacchip_db.read_engine import DATASETS
from stacchip_db.reader import (
    ChipRequest,
    is_remote,
    plan_reads,
    raise_failures,
    read_chips,
)
from stacchip_db.sensors import sensor_for

STATEMENT_TIMEOUT_S = 300.0
"""Default time limit of a user's chip query."""


class DatasetError(StacchipError):
    """A ChipDataset parameter is out of range."""


@dataclass(frozen=True, slots=True)
class ChipRow:
    """One selected chip: its key and its `stacchip.chips` row (footprint as WKB)."""

    collection: str
    item_id: str
    chip_size: int
    chip_index_x: int
    chip_index_y: int
    datetime: datetime
    cloud_fraction: float
    nodata_fraction: float
    geometry: bytes
    location: int | None = None
    """The chip's place (`stacchip.chips.location`); None in rows made by hand."""

    @property
    def chip_id(self) -> str:
        """`{item_id}-{x}-{y}`, the chip id users see (the original stacchip's `chipid`)."""
        return f"{self.item_id}-{self.chip_index_x}-{self.chip_index_y}"

    @property
    def item_key(self) -> tuple[str, str]:
        return self.collection, self.item_id


@dataclass
class ChipSelection:
    """Chips in the query's order, and their items by `(collection, item_id)`."""

    rows: list[ChipRow]
    items: dict[tuple[str, str], dict[str, Any]]

    def __len__(self) -> int:
        return len(self.rows)


def _as_sql(query: Any) -> tuple[sql.Composable, Any]:
    """`(statement, params)` for SQL text, a psycopg Composable, a ChipFilter or a built
    selection (`selection.build_selection`)."""
    from stacchip_db.selection import ChipFilter, SelectionQuery, build_selection

    if isinstance(query, str):
        if not query.strip():
            raise QueryError("`query` is empty; pass a SELECT returning the chip key columns")
        return sql.SQL(query.strip().rstrip(";")), None  # type: ignore[arg-type]
    if isinstance(query, ChipFilter):
        query = build_selection(query)
    if isinstance(query, SelectionQuery):
        return query.query, query.params
    if isinstance(query, sql.Composable):
        return query, None
    raise QueryError(f"cannot select chips with a {type(query).__name__}; pass SQL or a filter")


def load_selection(
    database_url: str,
    query: Any,
    params: Any = None,
    *,
    statement_timeout_s: float = STATEMENT_TIMEOUT_S,
    query_database_url: str | None = None,
) -> ChipSelection:
    """Run a chip query as the restricted login; return its chips (query order) and items.

    The query runs as `user_sql` says (its own least-privileged login, read-only, rolled back,
    under a client-kept deadline of `statement_timeout_s` over execute and every fetch);
    `query_database_url` replaces the login `db init` made. The chips' rows and items are then
    read on the tool's connection, in the same snapshot the query saw.

    Raises QueryError (one line) when the database refuses or fails the query, when the deadline
    passes, when it does not return the `KEY_COLUMNS`, or returns chips that are not in
    `stacchip.chips`; QueryLoginError when the restricted login is missing or not restricted.
    """
    statement, built_params = _as_sql(query)
    params = params if params is not None else built_params
    check_timeout(statement_timeout_s)
    with connect(database_url) as conn:
        login = query_database_url or login_url(conn, database_url)
        # REPEATABLE READ: the lookups below see the snapshot exported to the user's query.
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with lock_waits(conn, "reading the selected chips"), conn.transaction():
            set_lock_timeout(conn, READ_LOCK_TIMEOUT_S)
            with translate_errors("sharing a snapshot with the chip query"):
                snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
            keys = _run_user_query(
                login, statement, params, statement_timeout_s, snapshot,
                explicit_login=query_database_url is not None,
            )  # fmt: skip
            with translate_errors("reading the selected chips"):
                rows = _chip_rows(conn, keys)
                items = _items(conn, sorted({r.item_key for r in rows}))
    return ChipSelection(rows, items)


def _run_user_query(
    login: str,
    statement: sql.Composable,
    params: Any,
    timeout_s: float,
    snapshot: str,
    *,
    explicit_login: bool,
) -> list[tuple[str, str, int, int, int]]:
    """The chip keys the user's query returns, in its order."""
    with user_query(
        login, statement, params, timeout_s=timeout_s, snapshot=snapshot,
        explicit_login=explicit_login,
    ) as result:  # fmt: skip
        return [key for batch in key_batches(result) for key in batch]  # type: ignore[misc]


def _chip_rows(
    conn: psycopg.Connection, keys: list[tuple[str, str, int, int, int]]
) -> list[ChipRow]:
    """The `stacchip.chips` rows of `keys`, in the same order (one statement)."""
    if not keys:
        return []
    columns = list(zip(*keys, strict=True))
    found = conn.execute(
        "SELECT k.n, c.collection, c.item_id, c.chip_size, c.chip_index_x, c.chip_index_y, "
        "c.datetime, c.cloud_fraction, c.nodata_fraction, ST_AsBinary(c.geometry), c.location "
        "FROM unnest(%s::text[], %s::text[], %s::int[], %s::int[], %s::int[]) "
        "WITH ORDINALITY AS k (collection, item_id, chip_size, x, y, n) "
        "JOIN stacchip.chips c ON c.collection = k.collection AND c.item_id = k.item_id "
        "AND c.chip_size = k.chip_size AND c.chip_index_x = k.x AND c.chip_index_y = k.y "
        "ORDER BY k.n",
        [list(c) for c in columns],
    ).fetchall()
    if len(found) != len(keys):
        present = {row[0] for row in found}
        first = next(k for n, k in enumerate(keys, start=1) if n not in present)
        raise QueryError(
            f"`query` returned {len(keys) - len(found)} chip(s) that are not in stacchip.chips, "
            f"e.g. {first[1]}-{first[3]}-{first[4]} of {first[0]} at chip size {first[2]}; "
            "select chips from stacchip.chips"
        )
    return [
        ChipRow(r[1], r[2], r[3], r[4], r[5], r[6], float(r[7]), float(r[8]), bytes(r[9]), r[10])
        for r in found
    ]


def _items(
    conn: psycopg.Connection, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, Any]]:
    """Items by `(collection, item_id)`, each read once through `pgstac.get_item`."""
    items = stored_items(conn, keys)
    missing = [k for k in keys if k not in items]
    if missing:
        raise DatabaseError(
            f"{len(missing)} item(s) of the selected chips are not in pgstac, e.g. "
            f"{missing[0][1]} of {missing[0][0]}; re-index them (stacchip-db index)"
        )
    return items


# -- Clay metadata ------------------------------------------------------------------------------


def footprint_centres(geometries: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """`(lon, lat)` in degrees of the footprints' centroids (WKB in EPSG:4326)."""
    shapes = shapely.from_wkb(np.asarray(geometries, dtype=object))
    centres = shapely.centroid(shapes)
    return shapely.get_x(centres), shapely.get_y(centres)


def sin_cos(radians: np.ndarray) -> np.ndarray:
    """float32 `(N, 2)` of `(sin, cos)`."""
    radians = np.asarray(radians, dtype=np.float64)
    return np.stack([np.sin(radians), np.cos(radians)], axis=-1).astype(np.float32)


def item_time(item: dict[str, Any]) -> tuple[int, float]:
    """`(ISO week, hour of day in UTC)` of an item; 12:00 when its date carries no time."""
    when = item_datetime(item)
    raw = item.get("properties", {}).get("datetime") or item["properties"].get("start_datetime")
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    hour = float(when.hour) if "T" in str(raw) else 12.0
    return when.isocalendar().week, hour


def clay_norms(
    rows: Sequence[ChipRow], items: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, np.ndarray]:
    """`lat_norm`, `lon_norm`, `week_norm`, `hour_norm` of `rows`, each float32 `(N, 2)`.

    lat/lon of the footprint centre in radians; week × 2π/52; hour × 2π/24 (the item's time).
    """
    lon, lat = footprint_centres([r.geometry for r in rows])
    times = {key: item_time(items[key]) for key in {r.item_key for r in rows}}
    week = np.array([times[r.item_key][0] for r in rows], dtype=np.float64)
    hour = np.array([times[r.item_key][1] for r in rows], dtype=np.float64)
    return {
        "lat_norm": sin_cos(np.radians(lat)),
        "lon_norm": sin_cos(np.radians(lon)),
        "week_norm": sin_cos(week * 2 * math.pi / 52),
        "hour_norm": sin_cos(hour * 2 * math.pi / 24),
    }


def check_one_chip_size(collection: str, sizes: set[int]) -> None:
    """Chips of one cube share a shape: refuse a collection's selection of several chip sizes."""
    if len(sizes) > 1:
        raise DatasetError(
            f"collection {collection}: the selection mixes chip sizes {sorted(sizes)}, which "
            "cannot share a cube; select one chip size (filter on chip_size)"
        )


def bands_for(collection: str, bands: Sequence[str] | None, platform: str | None) -> list[str]:
    """The bands to read for a collection: `bands`, else its platform's band order."""
    if bands:
        return list(bands)
    return list(sensor_for(collection, platform).bands)


# -- ChipDataset --------------------------------------------------------------------------------


class ChipDataset:
    """A map-style dataset over the chips a query selects (`len`, `[i]` -> dict).

    Works with a PyTorch `DataLoader` without importing torch: `[i]` returns numpy arrays
    (the default collate turns them into tensors), and `__getitems__` (which a DataLoader calls
    with a whole batch) reads the batch at once. Picklable: it holds the selected rows and
    their items, no connection, no open file and no thread; each worker process (fork or spawn)
    opens the COGs it needs on first use and keeps them open across samples
    (`read_engine.DATASETS`, entries per reading thread).

    `query` is SQL returning the chip key columns, a `selection.ChipFilter`, or a built
    `selection.SelectionQuery` (e.g. a seeded sample); it runs as `load_selection` runs it
    (restricted login, `statement_timeout_s` deadline; `query_database_url`, else
    `STACCHIP_QUERY_DATABASE_URL`, replaces the login). `bands`/`platform` as in prechip.
    Items of `[i]`: `pixels` float32 `(C, H, W)`, `bands`, `chip_id`, `collection`, `item_id`,
    `chip_index_x`, `chip_index_y`, `chip_size`, `datetime` (ISO 8601), `lon`, `lat`
    (footprint centre, degrees), `cloud_fraction`, `nodata_fraction`, and the Clay metadata
    `lat_norm`, `lon_norm`, `week_norm`, `hour_norm` (float32 `(2,)`).
    Planetary Computer hrefs are signed when opened, in each worker (`signing`); `sign=False`
    turns that off (None: on unless `$STACCHIP_SIGN=0`).

    Reading (`reader.read_chips`, the reader prechip uses): the windows of a sample, or of a
    batch, are read concurrently on `lanes` threads (default: `REMOTE_SAMPLE_LANES` when the COGs
    are remote, where round trips dominate; `LOCAL_LANES` for local files, where decompression
    does).
    `prefetch` > 0 (samples) reads ahead: with a `ChipSampler` made for this dataset, each
    process reads the samples it will be asked for next (a DataLoader hands batches to its
    workers in turn, so a worker knows its next batches from the sampler's order) while the
    current ones are collated and sent.

    With `time_series` T, an item is a place at T dates (`time_series.plan_stacks`: places
    with fewer than T selected dates left out, `short_locations` of them; dates picked by
    `pick`), as `prechip --time-series` writes it: `pixels` float32 `(T, C, H, W)` in time
    order, `week_norm`/`hour_norm` `(T, 2)`, `lat_norm`/`lon_norm` `(2,)`, `location`, and per
    date lists `chip_ids`, `item_ids`, `datetimes`, `cloud_fractions`, `nodata_fractions`.
    """

    def __init__(
        self,
        query: Any,
        *,
        database_url: str | None = None,
        params: Any = None,
        bands: Sequence[str] | None = None,
        platform: str | None = None,
        statement_timeout_s: float = STATEMENT_TIMEOUT_S,
        query_database_url: str | None = None,
        sign: bool | None = None,
        time_series: int | None = None,
        pick: str = "least-cloudy",
        lanes: int | None = None,
        prefetch: int = 0,
    ) -> None:
        if lanes is not None and lanes < 1:
            raise DatasetError(f"`lanes` must be at least 1, not {lanes}")
        if prefetch < 0:
            raise DatasetError(f"`prefetch` must not be negative, not {prefetch}")
        self.sign = sign
        self.lanes = lanes
        self.prefetch = prefetch
        if database_url is None or query_database_url is None:
            from stacchip_db.config import Settings
            from stacchip_db.db import resolve_url

            settings = Settings.from_env()
            database_url = database_url or resolve_url(settings)
            query_database_url = query_database_url or settings.query_database_url
        selection = load_selection(
            database_url, query, params, statement_timeout_s=statement_timeout_s,
            query_database_url=query_database_url,
        )  # fmt: skip
        self.rows = selection.rows
        self.items = selection.items
        self._bands = {c: bands_for(c, bands, platform) for c in {r.collection for r in self.rows}}
        self._norms = clay_norms(self.rows, self.items) if self.rows else {}
        self._lon, self._lat = (
            footprint_centres([r.geometry for r in self.rows]) if self.rows else ([], [])
        )
        self._plans: dict[tuple[str, str, int], Any] = {}
        self._sampler: Any = None
        self._ahead: _ReadAhead | None = None
        self.stacks: list[Any] | None = None
        self.short_locations = 0
        if time_series is not None:
            from stacchip_db.time_series import plan_stacks

            self.stacks, self.short_locations = plan_stacks(self.rows, time_series, pick)

    def __len__(self) -> int:
        return len(self.rows) if self.stacks is None else len(self.stacks)

    def _position(self, index: int) -> int:
        if not -len(self.rows) <= index < len(self.rows):
            raise IndexError(f"chip {index} of a dataset of {len(self.rows)}")
        return int(index) % len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Samples `indices`, their windows all read at once (a DataLoader batch)."""
        if self.stacks is not None:
            return self._stacked(indices)
        positions = [self._position(i) for i in indices]
        if self.prefetch and self._sampler is not None:
            pixels = self._read_ahead().take(positions)
        else:
            pixels = self.read_pixels(positions)
        return [self._sample(i, p) for i, p in zip(positions, pixels, strict=True)]

    def _stacked(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Places `indices` at their T dates: every date's window of the batch read at once
        (`read_pixels`), then stacked in time order. (No read-ahead: `prefetch` follows a
        sampler over chips.)"""
        stacks = self.stacks or []
        for i in indices:
            if not -len(stacks) <= i < len(stacks):
                raise IndexError(f"location {i} of a dataset of {len(stacks)}")
        chosen = [stacks[int(i) % len(stacks)] for i in indices]
        positions = [p for stack in chosen for p in stack.positions]
        chips = iter(
            self._sample(p, px)
            for p, px in zip(positions, self.read_pixels(positions), strict=True)
        )
        items = []
        for stack in chosen:
            dates = [next(chips) for _ in stack.positions]
            first = dates[0]
            fields = ("chip_id", "item_id", "datetime", "cloud_fraction", "nodata_fraction")
            items.append(
                {
                    "pixels": np.stack([c["pixels"] for c in dates]),
                    "bands": first["bands"],
                    "location": stack.location,
                    "collection": stack.collection,
                    "chip_size": first["chip_size"],
                    "lon": first["lon"],
                    "lat": first["lat"],
                    "lat_norm": first["lat_norm"],
                    "lon_norm": first["lon_norm"],
                    "week_norm": np.stack([c["week_norm"] for c in dates]),
                    "hour_norm": np.stack([c["hour_norm"] for c in dates]),
                    **{f"{name}s": [c[name] for c in dates] for name in fields},
                }
            )
        return items

    def follow(self, sampler: Any) -> None:
        """Read ahead (`prefetch`) in the order of `sampler` (a `ChipSampler` calls this)."""
        self._sampler = sampler

    def read_pixels(self, indices: Sequence[int]) -> list[np.ndarray]:
        """float32 `(C, H, W)` pixels of chips `indices`, read together.

        Chips are grouped by item and chip size, one `reader.ChipRequest` each, and every
        window of every request goes to `reader.read_chips` in one call.
        Raises `reader.ChipReadError` naming the first chip that cannot be read.
        """
        groups: dict[tuple[str, str, int], list[int]] = {}
        for n, index in enumerate(indices):
            row = self.rows[index]
            groups.setdefault((*row.item_key, row.chip_size), []).append(n)
        requests = []
        for key, members in groups.items():
            item = self.items[key[:2]]
            bands = self._bands[key[0]]
            plan = self._plans.get(key)
            if plan is None:
                grid = chip_grid(item, chip_size=key[2], max_chips=None)  # chips are indexed
                plan = self._plans[key] = (plan_reads(item, bands), grid)
            rows = [self.rows[indices[n]] for n in members]
            chips = [(r.chip_index_x, r.chip_index_y) for r in rows]
            out = np.empty((len(chips), len(bands), key[2], key[2]), dtype=np.float32)
            requests.append(
                ChipRequest(item, chips, bands, key[2], out=out, reads=plan[0], grid=plan[1])
            )
        got = read_chips(
            requests, lanes=self._lanes(requests), sign=self.sign, cache=DATASETS, keep_open=True
        )
        pixels: list[np.ndarray] = [np.empty(0)] * len(indices)
        for request, members, result in zip(requests, groups.values(), got, strict=True):
            raise_failures(request.grid.item_id, request.chips, result)  # type: ignore[union-attr]
            for j, n in enumerate(members):
                pixels[n] = result.pixels[j]
        return pixels

    def _lanes(self, requests: list[ChipRequest]) -> int:
        if self.lanes is not None:
            return self.lanes
        remote = any(is_remote(r.href) for q in requests for r in q.reads or ())
        return REMOTE_SAMPLE_LANES if remote else LOCAL_LANES

    def _read_ahead(self) -> _ReadAhead:
        ahead = self._ahead
        if ahead is None or ahead.pid != os.getpid():
            ahead = self._ahead = _ReadAhead(self, self._sampler, self.prefetch)
        return ahead

    def _sample(self, index: int, pixels: np.ndarray) -> dict[str, Any]:
        row = self.rows[index]
        return {
            "pixels": pixels,
            "bands": self._bands[row.collection],
            "chip_id": row.chip_id,
            "collection": row.collection,
            "item_id": row.item_id,
            "chip_index_x": row.chip_index_x,
            "chip_index_y": row.chip_index_y,
            "chip_size": row.chip_size,
            "datetime": row.datetime.isoformat(),
            "lon": float(self._lon[index]),
            "lat": float(self._lat[index]),
            "cloud_fraction": row.cloud_fraction,
            "nodata_fraction": row.nodata_fraction,
            **{name: values[index] for name, values in self._norms.items()},
        }

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_plans"] = {}  # cheap to rebuild, and per process
        state["_ahead"] = None  # threads and futures stay in their process
        return state


REMOTE_SAMPLE_LANES = 16
"""Concurrent reads of a sample or batch from remote COGs. Fewer than prechip's `REMOTE_LANES`:
a DataLoader has several workers, each with read-ahead, and measured over +20 ms HTTP (bench/
bench_loader.py) 10-20 lanes per worker moved more samples than 32, whose extra threads each
open every asset again and cost CPU the workers need for decompression."""

LOCAL_LANES = 4
"""Concurrent reads of a sample or batch from local files (decompression runs without the GIL,
so a DataLoader worker uses more than one core while it has one to use)."""


def _worker() -> tuple[int, int]:
    """`(id, number of workers)` of this DataLoader worker; `(0, 1)` outside one (torch is not
    imported for this: a worker process has imported it already)."""
    data = sys.modules.get("torch.utils.data")
    info = data.get_worker_info() if data is not None else None
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _ReadAhead:
    """Read-ahead of one process: its next requests predicted from the sampler's order.

    A DataLoader gives batch b of the sampler's order to worker `b % workers`, so the k-th
    request this worker gets is batch `id + k * workers`. Each request is checked against that
    prediction; when it differs (another sampler order, a persistent worker in a new epoch) the
    request is found in the current order again, and read-ahead stops after a few misses.
    A miss costs nothing but the wasted reads: what is asked for is always what is returned.
    """

    MISSES = 3

    def __init__(self, dataset: ChipDataset, sampler: Any, prefetch: int) -> None:
        self.pid = os.getpid()
        self.dataset = dataset
        self.sampler = sampler
        self.prefetch = prefetch
        self.worker, self.workers = _worker()
        self.order: np.ndarray | None = None
        self.epoch: Any = None
        self.batch = 0
        self.request = 0
        self.misses = 0
        self.served = 0  # requests answered by a read started ahead (for tests and tuning)
        self.pending: dict[int, Future[list[np.ndarray]]] = {}
        self.pool: ThreadPoolExecutor | None = None

    def _slice(self, k: int) -> np.ndarray | None:
        assert self.order is not None
        start = (self.worker + k * self.workers) * self.batch
        return self.order[start : start + self.batch] if start < len(self.order) else None

    def _sync(self, indices: list[int]) -> bool:
        """Find `indices` in the sampler's current order; True when found (and `request` set)."""
        self.pending.clear()  # predictions of another order: dropped (running ones finish)
        self.order = np.asarray(self.sampler.indices(), dtype=np.int64)
        self.epoch = getattr(self.sampler, "epoch", None)
        self.batch = len(indices)
        stride = self.workers * self.batch
        for start in np.flatnonzero(self.order == indices[0]).tolist():
            if start % stride == self.worker * self.batch and (
                self.order[start : start + self.batch].tolist() == indices
            ):
                self.request = start // stride
                return True
        return False

    def take(self, indices: list[int]) -> list[np.ndarray]:
        if self.misses >= self.MISSES:
            return self.dataset.read_pixels(indices)
        expected = None
        if self.order is not None and getattr(self.sampler, "epoch", None) == self.epoch:
            expected = self._slice(self.request)
        if (expected is None or expected.tolist() != indices) and not self._sync(indices):
            self.misses += 1
            return self.dataset.read_pixels(indices)
        self.misses = 0
        k = self.request
        self.request += 1
        # requests to keep in flight: `prefetch` samples in batches of this size
        depth = max(1, math.ceil(self.prefetch / max(1, self.batch)))
        if self.pool is None:
            self.pool = ThreadPoolExecutor(depth, thread_name_prefix="chip-ahead")
        for j in range(k + 1, k + 1 + depth):
            ahead = self._slice(j)
            if ahead is not None and j not in self.pending:
                self.pending[j] = self.pool.submit(self.dataset.read_pixels, ahead.tolist())
        for j in [j for j in self.pending if j < k]:
            del self.pending[j]  # skipped requests (a resync): their reads are dropped
        future = self.pending.pop(k, None)
        if future is None:
            return self.dataset.read_pixels(indices)
        self.served += 1
        return future.result()
