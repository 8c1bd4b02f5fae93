"""STAC items from files, folders and URLs indexed into the database: `index_items`.

The pipeline behind `stacchip-db index`, callable from Python as `stacchip_db.index_items`.
Items are read by `item_sources`, their chips computed by `index.index_item` and stored with
the items by `db.store`: normally by an `ItemWriter`, which batches many items per transaction
and writes on background threads while the next items are indexed; in bulk (automatic when
stacchip.chips or the first item's collection is empty) every item is indexed first and then
loaded by `db.bulk.bulk_load` in one transaction that builds each collection's partition apart
and attaches it. A bad item is reported in the summary (one line, with its id) and skipped;
the others are stored.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

from stacchip_db.db.bulk import bulk_load, chips_table_is_empty
from stacchip_db.db.connection import Database
from stacchip_db.db.items import check_item
from stacchip_db.db.store import OnConflict, StoreResult
from stacchip_db.db.writer import ItemFailure, ItemWriter
from stacchip_db.errors import ConfigError, StacchipError, item_failure_line
from stacchip_db.grid import CHIP_SIZE, MAX_CHIPS, item_georeference
from stacchip_db.index import MAX_NODATA, index_item, quality_used
from stacchip_db.item_sources import SourceItem, count_items, expand_sources, read_items
from stacchip_db.quality import NoQualityBandWarning, QualityRule
from stacchip_db.text import plural

log = logging.getLogger(__name__)

MAX_WRITERS = 16
"""Most database connections `index_items` writes batches on at once."""


@dataclass(frozen=True)
class IndexPlan:
    """What `index_items` is about to do, handed to `on_plan` before the first item is read."""

    items: int
    """Items expected: lines of local ndjson files, 1 per other source (an estimate)."""
    bulk: bool
    """Whether the items are bulk loaded (`db.bulk.bulk_load`: each collection's partition
    built apart and attached; writers of those collections wait until the load commits)."""
    automatic: bool
    """True when `bulk` was chosen here (`bulk=None`)."""
    why: str = ""
    """With `automatic` and `bulk`: why (`stacchip.chips is empty`, or the first item's
    collection has no chips yet)."""


@dataclass
class IndexSummary(StoreResult):
    """What `index_items` did: what was stored (`StoreResult`'s counts) and what was not.

    `timings` has the seconds of each bulk load step (with `index`); `skipped` the ids of
    items left as they were (`on_conflict="ignore"`).
    """

    dropped_nodata: int = 0
    """Chips of stored items not stored because their nodata fraction was above `max_nodata`."""
    bulk: bool = False
    failed: list[ItemFailure] = field(default_factory=list)
    """One line per item not stored, in order. `item_id` is the item's id, or where the input
    was when it could not be read as an item (`{file} line N`), or `bulk load` when the load
    failed (nothing was stored)."""
    seconds: float = 0.0
    quality: Counter[tuple[str, str, str | None, str | None]] = field(default_factory=Counter)
    """Items indexed per (collection, rule, asset, profile)."""
    warnings: list[str] = field(default_factory=list)
    """Each distinct warning of `index_item` once (auto found no quality band)."""
    layers: list[str] = field(default_factory=list)
    """One line per raster layer whose class fractions the stored chips got (`layers`)."""

    def quality_rows(self) -> list[dict[str, Any]]:
        """Per collection, each rule used: its asset, the recognised profile, how many items."""
        return [
            {"collection": c, "rule": r, "asset": a, "profile": p, "items": n}
            for (c, r, a, p), n in sorted(self.quality.items())
        ]

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready values (`stacchip-db index --json`)."""
        return {
            "items": self.items,
            "chips": self.chips,
            "dropped_nodata": self.dropped_nodata,
            "skipped": len(self.skipped),
            "failed": len(self.failed),
            "errors": [{"item": f.item_id, "error": f.message} for f in self.failed],
            "collections_created": self.collections_created,
            "duplicates": self.duplicates,
            "bulk": self.bulk,
            "seconds": round(self.seconds, 3),
            "chips_per_second": round(self.chips / self.seconds) if self.seconds else None,
            "timings": {step: round(seconds, 3) for step, seconds in self.timings.items()},
            "quality": self.quality_rows(),
            "warnings": self.warnings,
            "layers": self.layers,
        }

    def describe(self) -> str:
        """A line of counts and speed, then one line per collection and quality rule."""
        rate = f", {self.chips / self.seconds:,.0f} chips/s" if self.seconds else ""
        parts = [
            f"indexed {plural(self.items, 'item')}: {self.chips:,} chips stored",
            f"{self.dropped_nodata:,} dropped for nodata",
        ]
        if self.skipped:
            parts.append(f"{plural(len(self.skipped), 'item')} already stored")
        if self.duplicates:
            parts.append(f"{plural(self.duplicates, 'duplicate item')} (the last of each stored)")
        if self.failed:
            parts.append(f"{plural(len(self.failed), 'item')} failed")
        lines = [", ".join(parts) + f" in {self.seconds:.2f} s{rate}"]
        for row in self.quality_rows():
            asset = f" on asset {row['asset']}" if row["asset"] else ""
            profile = f" ({row['profile']})" if row["profile"] else ""
            lines.append(
                f"  {row['collection']}: quality {row['rule']}{asset}{profile}, "
                f"{plural(row['items'], 'item')}"
            )
        lines += [f"  {line}" for line in self.layers]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Options:
    """The per-item settings of one `index_items` call."""

    collection: str | None
    index: dict[str, Any]
    """Keyword arguments of `index_item`."""
    strict: bool
    on_conflict: OnConflict

    @property
    def chip_size(self) -> int:
        return self.index["chip_size"]


def index_items(
    sources: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    database: Database | str,
    *,
    collection: str | None = None,
    quality: str | QualityRule = "auto",
    quality_asset: str | None = None,
    chip_size: int = CHIP_SIZE,
    max_nodata: float = MAX_NODATA,
    max_chips: int | None = MAX_CHIPS,
    strict: bool = False,
    on_conflict: OnConflict | str = OnConflict.upsert,
    writers: int = 1,
    bulk: bool | None = None,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[IndexPlan], None] | None = None,
) -> IndexSummary:
    """Index the STAC items of `sources` and store items and chips in `database`.

    `sources`: paths of STAC item JSON files, FeatureCollections, ndjson files, folders of
    them (`item_sources.expand_sources`) and http(s)/`s3://` URLs, or one alone. `database`: a
    `Database` or a libpq URL, initialised (`stacchip-db db init`). Each item gets
    `collection` when it has none, its chips from `index.index_item` (`quality`,
    `quality_asset`, `chip_size`, `max_nodata`, `max_chips`; None: no bound), and is upserted
    into pgstac with its chip rows at `chip_size` replaced; `strict` and `on_conflict` are
    `db.store`'s.

    `bulk`: True loads all items in one transaction that builds each collection's partition
    of stacchip.chips apart and attaches it (`db.bulk.bulk_load`, all or nothing; other
    collections are neither rebuilt nor locked); False stores batches
    of items on `writers` connections; None (default) is bulk where that is safe and fast: when
    stacchip.chips is empty, or the first item's collection has no chips yet (its partition is
    missing or empty, so building it apart rebuilds nothing; items of other collections in the
    same run go into the same load).

    A source, line or item that cannot be read, indexed or stored is one line in
    `summary.failed` and the others are stored. `on_plan` is called once before the first item
    is indexed (with `bulk=None` and chips already stored, after the first item is read, to
    learn its collection); `progress(1)` after each item read (or failed to read).

    Raises `item_sources.SourceError` for a source that does not exist (nothing is read),
    `ConfigError` for an invalid parameter, `DatabaseError` when the database fails.
    """
    started = time.perf_counter()
    _check(chip_size=chip_size, max_nodata=max_nodata, writers=writers)
    options = _Options(
        collection=collection,
        index={
            "quality": quality,
            "quality_asset": quality_asset,
            "chip_size": chip_size,
            "max_nodata": max_nodata,
            "max_chips": max_chips,
        },
        strict=strict,
        on_conflict=_on_conflict(on_conflict),
    )
    if isinstance(sources, str | os.PathLike):  # one source, not the characters of its name
        sources = [sources]
    paths = expand_sources(sources)
    db = database if isinstance(database, Database) else Database(database)
    summary = IndexSummary()
    with contextlib.ExitStack() as stack:
        conn = stack.enter_context(db.connect())
        sourced = read_items(paths)
        why = "stacchip.chips is empty"
        if bulk is None:
            summary.bulk = chips_table_is_empty(conn)
            if not summary.bulk:
                first, sourced = _first_item(sourced)
                collection = first and (first.get("collection") or options.collection)
                if isinstance(collection, str) and collection:
                    summary.bulk = chips_table_is_empty(conn, [collection])
                    why = f"collection {collection!r} has no chips yet"
            if summary.bulk:
                log.debug("%s: bulk load", why)
        else:
            summary.bulk = bulk
        if not (summary.bulk and bulk is None):
            why = ""
        if on_plan is not None:
            on_plan(IndexPlan(count_items(paths), summary.bulk, bulk is None, why))
        read: list[tuple[str, str]] = []
        items = _recorded(_indexed(sourced, options, progress, summary), read)
        if summary.bulk:
            _bulk(conn, items, options, summary)
        else:
            extra = [stack.enter_context(db.connect()) for _ in range(writers - 1)]
            _batched(conn, extra, items, options, summary)
        _fill_layers(conn, read, summary)
    summary.seconds = time.perf_counter() - started
    return summary


def _check(*, chip_size: int, max_nodata: float, writers: int) -> None:
    """Parameters every item would fail with, checked once before anything is read."""
    if isinstance(chip_size, bool) or not isinstance(chip_size, int) or chip_size < 1:
        raise ConfigError(f"`chip_size` {chip_size!r} is not a positive number of pixels")
    if not 0.0 <= max_nodata <= 1.0:
        raise ConfigError(f"`max_nodata` {max_nodata!r} is not a fraction between 0 and 1")
    if isinstance(writers, bool) or not isinstance(writers, int) or not 1 <= writers <= MAX_WRITERS:
        raise ConfigError(f"`writers` {writers!r} is not a number of connections 1-{MAX_WRITERS}")


def _on_conflict(value: OnConflict | str) -> OnConflict:
    try:
        return OnConflict(value)
    except ValueError:
        choices = ", ".join(member.value for member in OnConflict)
        raise ConfigError(f"`on_conflict` {value!r} is not one of {choices}") from None


def _first_item(
    sourced: Iterator[SourceItem],
) -> tuple[dict[str, Any] | None, Iterator[SourceItem]]:
    """The first item that could be read, and all of `sourced` again (nothing read twice)."""
    seen: list[SourceItem] = []
    for source in sourced:
        seen.append(source)
        if source.item is not None:
            return source.item, itertools.chain(seen, sourced)
    return None, iter(seen)


def _indexed(
    sourced: Iterable[SourceItem],
    options: _Options,
    progress: Callable[[int], None] | None,
    summary: IndexSummary,
) -> Iterator[tuple[dict[str, Any], Any, int]]:
    """`(item, chips, chips dropped for nodata)` of each item that indexes; failures go to
    `summary.failed`.

    The quality rule each item used is counted in `summary.quality`; `index_item`'s warnings
    (auto found no quality band) are collected once each, one per collection.
    """
    chip_size = options.chip_size
    for source in sourced:
        if progress is not None:
            progress(1)
        if source.item is None:
            summary.failed.append(ItemFailure(source.where, source.error or source.where))
            continue
        item = source.item
        if options.collection and not item.get("collection"):
            item["collection"] = options.collection
        try:
            check_item(item)  # id, collection, datetime, safe names: named errors early
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", NoQualityBandWarning)
                chips = index_item(item, **options.index)
            (height, width), _, _ = item_georeference(item)
        except Exception as e:  # one bad item, whatever it raises, is reported and skipped
            name = str(item.get("id") or source.where)
            summary.failed.append(ItemFailure(name, item_failure_line(e, name)))
            continue
        for warning in caught:
            text = str(warning.message)
            if text not in summary.warnings:
                summary.warnings.append(text)
        used = quality_used(chips)
        key = (str(item["collection"]), used["rule"], used["asset"], used["profile"])
        summary.quality[key] += 1
        grid_size = (height // chip_size) * (width // chip_size)
        yield item, chips, grid_size - chips.num_rows


def _recorded(
    items: Iterator[tuple[dict[str, Any], Any, int]], keys: list[tuple[str, str]]
) -> Iterator[tuple[dict[str, Any], Any, int]]:
    """`items`, each one's `(collection, id)` appended to `keys` as it goes by."""
    for entry in items:
        keys.append((str(entry[0]["collection"]), str(entry[0]["id"])))
        yield entry


def _fill_layers(
    conn: psycopg.Connection, keys: list[tuple[str, str]], summary: IndexSummary
) -> None:
    """The class fractions of the stored chips, for every raster layer (a step after storing:
    the store protocol does not know layers). A failure is a warning, not the items'."""
    from stacchip_db.layers import fill_fractions

    try:
        summary.layers += [s.describe() for s in fill_fractions(conn, items=keys)]
        conn.commit()
    except StacchipError as exc:
        conn.rollback()
        summary.warnings.append(
            f"class fractions not computed: {exc}; run stacchip-db layer refresh NAME"
        )


def _batched(
    conn: psycopg.Connection,
    extra: list[psycopg.Connection],
    items: Iterator[tuple[dict[str, Any], Any, int]],
    options: _Options,
    summary: IndexSummary,
) -> None:
    """The normal path: batches of items stored by `ItemWriter` while the next are indexed."""
    with ItemWriter(
        conn, chip_size=options.chip_size, strict=options.strict,
        on_conflict=options.on_conflict, background=True, extra_connections=extra,
    ) as writer:  # fmt: skip
        for item, chips, dropped in items:
            if writer.add(item, chips):
                summary.dropped_nodata += dropped
    summary.failed += writer.failures
    summary.add(writer.result)


def _bulk(
    conn: psycopg.Connection,
    items: Iterator[tuple[dict[str, Any], Any, int]],
    options: _Options,
    summary: IndexSummary,
) -> None:
    """The bulk path: index every item, then one `bulk_load` (all or nothing)."""
    clock = time.perf_counter()
    pairs: list[tuple[dict[str, Any], Any]] = []
    dropped: dict[tuple[str, str], int] = {}  # per item: a duplicate counts once (the last)
    for item, chips, n in items:
        pairs.append((item, chips))
        dropped[check_item(item)[:2]] = n
    summary.timings["index"] = time.perf_counter() - clock
    try:
        result = bulk_load(
            conn, pairs, chip_size=options.chip_size, strict=options.strict,
            on_conflict=options.on_conflict,
        )  # fmt: skip
    except StacchipError as e:  # the load is one transaction: nothing was stored
        summary.failed.append(
            ItemFailure(
                "bulk load",
                f"bulk load of {len(pairs)} items failed, nothing stored: "
                f"{' '.join(str(e).split())}",
            )
        )
        return
    summary.add(result)
    skipped = set(result.skipped)
    summary.dropped_nodata = sum(n for (_, item_id), n in dropped.items() if item_id not in skipped)
