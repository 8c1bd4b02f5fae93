"""`stacchip-db index` and `stacchip-db export-index`: STAC items in, chip index in and out.

`index` reads STAC items (JSON files, ndjson files, http(s)/s3 URLs), computes each item's
chips with `index.index_item` and stores items and chips with `db.writer.ItemWriter`, which
batches many items per transaction and writes on a background thread while the next items are
indexed. With `--bulk` (automatic when stacchip.chips is empty) every item is indexed first and
then loaded by `db.bulk.bulk_load` in one transaction that rebuilds the table's indexes once.
A bad item is reported (one line, with its id) and skipped; the exit code is 1 when any item
failed. Heavy modules (numpy, rasterio, pyproj, the store) are imported inside the
commands so that `stacchip-db --help` and the other commands start fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import click

from stacchip_db.cli import in_cli_words
from stacchip_db.cli.options import (
    CliContext,
    max_chips_option,
    pass_cli,
    sign_option,
    with_database,
)
from stacchip_db.db.connection import Database
from stacchip_db.errors import StacchipError
from stacchip_db.text import plural

QUALITY_RULES = ("auto", "s2", "landsat", "modis", "none")
"""`--quality` choices: the rules of `stacchip_db.quality` (kept here to import it lazily)."""
NDJSON_SUFFIXES = (".ndjson", ".jsonl", ".geojsonl", ".geojsons")
ITEM_SUFFIXES = (".json", ".geojson", *NDJSON_SUFFIXES)
"""Files `index` reads from a folder."""

log = logging.getLogger(__name__)


@dataclass
class Source:
    """One thing read from the inputs: an item dict, or why it could not be read."""

    where: str
    item: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class Summary:
    """What `index` did, as printed (and as `--json`)."""

    items: int = 0
    chips: int = 0
    dropped_nodata: int = 0
    skipped: int = 0
    duplicates: int = 0
    bulk: bool = False
    collections_created: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    quality: Counter[tuple[str, str, str | None, str | None]] = field(default_factory=Counter)
    """Items indexed per (collection, rule, asset, profile)."""
    warnings: list[str] = field(default_factory=list)

    def quality_rows(self) -> list[dict[str, Any]]:
        """Per collection, each rule used: its asset, the recognised profile, how many items."""
        return [
            {"collection": c, "rule": r, "asset": a, "profile": p, "items": n}
            for (c, r, a, p), n in sorted(self.quality.items())
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "chips": self.chips,
            "dropped_nodata": self.dropped_nodata,
            "skipped": self.skipped,
            "failed": len(self.failed),
            "errors": self.failed,
            "collections_created": self.collections_created,
            "duplicates": self.duplicates,
            "bulk": self.bulk,
            "seconds": round(self.seconds, 3),
            "chips_per_second": round(self.chips / self.seconds) if self.seconds else None,
            "timings": {step: round(seconds, 3) for step, seconds in self.timings.items()},
            "quality": self.quality_rows(),
            "warnings": self.warnings,
        }

    def line(self) -> str:
        rate = f", {self.chips / self.seconds:,.0f} chips/s" if self.seconds else ""
        parts = [
            f"indexed {plural(self.items, 'item')}: {self.chips:,} chips stored",
            f"{self.dropped_nodata:,} dropped for nodata",
        ]
        if self.skipped:
            parts.append(f"{plural(self.skipped, 'item')} already stored")
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
        return "\n".join(lines)


# -- reading items ----------------------------------------------------------------------------


def _is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https", "s3")


def _base_of(source: str) -> str:
    """What relative asset hrefs in items read from `source` are relative to."""
    return source if _is_url(source) else str(Path(source).resolve())


def _absolute_hrefs(item: dict[str, Any], base: str) -> dict[str, Any]:
    """Asset hrefs made absolute against the item's location, so stored items stay usable."""
    for asset in (item.get("assets") or {}).values():
        href = asset.get("href") if isinstance(asset, dict) else None
        if not isinstance(href, str) or urlparse(href).scheme or href.startswith("/"):
            continue
        if _is_url(base):
            asset["href"] = urljoin(base, href)
        else:
            asset["href"] = str((Path(base).parent / href).resolve())
    return item


def _items_of(document: Any, where: str, base: str) -> Iterator[Source]:
    """Items of a parsed JSON document: an item, or a FeatureCollection of items."""
    if isinstance(document, dict) and document.get("type") == "FeatureCollection":
        for n, feature in enumerate(document.get("features") or []):
            yield from _items_of(feature, f"{where} feature {n}", base)
    elif isinstance(document, dict) and document.get("type") in ("Collection", "Catalog"):
        yield Source(where, error=f"{where}: a STAC {document['type']}, not an item; index "
                     "its items (or leave it out of the folder)")
    elif isinstance(document, dict):
        yield Source(where, _absolute_hrefs(document, base))
    else:
        yield Source(where, error=f"{where}: not a STAC item (a JSON {type(document).__name__})")


def _lines(lines: Iterator[str] | Iterator[bytes], source: str, base: str) -> Iterator[Source]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            document = json.loads(line)  # bytes: UTF-8 (or -16/-32) detected by json
        except UnicodeDecodeError as e:
            yield Source(where, error=f"{where}: not UTF-8 text ({e.reason}); fix or remove it")
            continue
        except json.JSONDecodeError as e:
            yield Source(where, error=f"{where}: not JSON ({e.msg}); fix or remove the line")
            continue
        yield from _items_of(document, where, base)


def expand_sources(sources: tuple[str, ...]) -> tuple[str, ...]:
    """URLs as given, files checked, folders replaced by the item files under them (sorted).

    Raises click.BadParameter (a usage error: nothing is read) for a path that does not exist
    or a folder holding no `ITEM_SUFFIXES` file.
    """
    what = "give STAC item files (.json, .geojson), ndjson files, folders of them or URLs"
    expanded: list[str] = []
    for source in sources:
        path = Path(source)
        if _is_url(source) or (path.exists() and not path.is_dir()):
            expanded.append(source)  # a file, or a pipe (`<(…)`, a FIFO) streamed as it comes
        elif path.is_dir():
            found = sorted(
                str(p) for p in path.rglob("*")
                if p.suffix.lower() in ITEM_SUFFIXES and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )  # fmt: skip
            if not found:
                raise click.BadParameter(
                    f"folder {source} holds no {', '.join(ITEM_SUFFIXES)} files; {what}",
                    param_hint="PATH_OR_URL",
                )
            expanded += found
        else:
            raise click.BadParameter(f"{source} does not exist; {what}", param_hint="PATH_OR_URL")
    return tuple(expanded)


def read_sources(sources: tuple[str, ...]) -> Iterator[Source]:
    """Items from JSON / ndjson files and URLs, in order; unreadable ones as errors."""
    for source in sources:
        base = _base_of(source)
        ndjson = urlparse(source).path.lower().endswith(NDJSON_SUFFIXES)
        if ndjson and not _is_url(source):
            try:
                with open(source, "rb") as handle:  # decoded line by line: one bad line, one error
                    yield from _lines(handle, source, base)
            except OSError as e:
                yield Source(source, error=f"cannot read {source}: {e.strerror}")
            continue
        try:
            if _is_url(source):
                from stacchip_db.storage import read_text  # boto3/requests: only when needed

                text = read_text(source)
            else:
                text = Path(source).read_text(encoding="utf-8")
        except OSError as e:
            yield Source(source, error=f"cannot read {source}: {e.strerror}")
            continue
        except UnicodeDecodeError as e:
            yield Source(source, error=f"{source}: not UTF-8 text ({e.reason}); pass STAC JSON")
            continue
        except StacchipError as e:  # storage's one-line errors (HTTP status, missing object)
            yield Source(source, error=str(e))
            continue
        if ndjson:
            yield from _lines(iter(text.splitlines()), source, base)
            continue
        try:
            document = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # several JSON documents: ndjson without the suffix
                yield from _lines(iter(text.splitlines()), source, base)
            else:
                yield Source(source, error=f"{source}: not JSON ({e.msg} at line {e.lineno})")
            continue
        yield from _items_of(document, source, base)


def _count_items(sources: tuple[str, ...]) -> int:
    """A cheap estimate for the progress bar: lines of local ndjson files, 1 per other source."""
    total = 0
    for source in sources:
        path = Path(source)
        if not _is_url(source) and source.lower().endswith(NDJSON_SUFFIXES) and path.is_file():
            with path.open("rb") as handle:
                total += sum(1 for line in handle if line.strip())
        else:
            total += 1
    return total


def _one_line(message: str, item_id: str) -> str:
    text = " ".join(message.split())
    return text if item_id in text else f"item {item_id}: {text}"


def _item_error(error: Exception) -> str:
    """What went wrong with one item, in the CLI's words (its flags, not Python parameters)."""
    if isinstance(error, StacchipError):
        return str(error)
    log.debug("indexing an item failed", exc_info=error)  # -vv: where it came from
    return f"{type(error).__name__}: {error}"


# -- index ------------------------------------------------------------------------------------


@click.command("index")
@click.argument(
    "sources", nargs=-1, required=True, metavar="PATH_OR_URL...",
    callback=lambda _ctx, _param, value: expand_sources(value),
)
@click.option("--collection", help="Collection id for items that have none.")
@click.option(
    "--quality",
    type=click.Choice(QUALITY_RULES),
    default="auto",
    show_default=True,
    help="Cloud/nodata rule; auto picks it from the item's sensor and catalog (SCL, qa_pixel, "
    "…) and says which it used per collection.",
)
@click.option(
    "--quality-asset", metavar="KEY",
    help="Asset key of the quality band, for catalogs whose layout auto does not know.",
)
@click.option(
    "--chip-size", type=click.IntRange(min=1), default=256, show_default=True,
    help="Chip size in pixels of the item's finest grid.",
)
@click.option(
    "--max-nodata", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
    help="Chips with a larger nodata fraction are not stored.",
)
@max_chips_option
@click.option(
    "--strict", is_flag=True,
    help="Fail items whose collection does not exist instead of creating a minimal one.",
)
@click.option(
    "--on-conflict", type=click.Choice(["upsert", "ignore", "insert"]), default="upsert",
    show_default=True,
    help="Items already stored: replace them, keep them, or fail.",
)
@click.option(
    "--writers", type=click.IntRange(1, 16), default=1, show_default=True,
    help="Database connections writing batches at once (the database's inserts are the "
    "bottleneck of large runs).",
)
@click.option(
    "--bulk/--no-bulk", default=None,
    help="Bulk load: index every item first, then load all chips in ONE transaction that "
    "drops and rebuilds stacchip.chips' indexes (much faster for large loads). The table is "
    "locked exclusively (ACCESS EXCLUSIVE) for that transaction: other readers and writers of "
    "stacchip.chips wait until it commits. All or nothing. Default: bulk when stacchip.chips "
    "is empty at the start, else batched transactions (--no-bulk forces those).",
)
@sign_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@with_database
@pass_cli
@click.pass_context
def index(
    ctx: click.Context,
    cli: CliContext,
    sources: tuple[str, ...],
    collection: str | None,
    quality: str,
    quality_asset: str | None,
    chip_size: int,
    max_nodata: float,
    max_chips: int,
    strict: bool,
    on_conflict: str,
    writers: int,
    bulk: bool | None,
    as_json: bool,
    db: Database,
) -> None:
    """Index STAC items (JSON or ndjson files, folders of them, URLs) into chips in the database.

    A folder is read whole: every .json, .geojson and ndjson file under it (hidden ones left
    out). A path that does not exist is a usage error (exit 2) and nothing is indexed.

    Each item is upserted into pgstac and its chip rows replaced, many items per transaction.
    Bad items are reported with their id and skipped; the exit code is then 1.

    Into an empty stacchip.chips (or with --bulk) all items are indexed first, then loaded in
    one transaction that locks stacchip.chips exclusively and rebuilds its indexes once: bad
    items are still reported and skipped, but the load itself is all or nothing.
    """
    from stacchip_db.db.bulk import chips_table_is_empty

    started = time.perf_counter()
    summary = Summary()
    errors: list[tuple[str, str]] = []  # (item id or place, message)
    with contextlib.ExitStack() as stack:
        conn = stack.enter_context(db.connect())
        if bulk is None:
            bulk = chips_table_is_empty(conn)
            if bulk and not cli.quiet:
                click.echo(
                    "stacchip.chips is empty: bulk load (indexes rebuilt once; the table is "
                    "locked until the load commits; --no-bulk to avoid)",
                    err=True,
                )
        summary.bulk = bulk
        progress = click.progressbar(
            length=_count_items(sources),
            label="indexing items",
            file=sys.stderr,
            hidden=cli.quiet or as_json,
        )
        options = {
            "quality": quality,
            "quality_asset": quality_asset,
            "chip_size": chip_size,
            "max_nodata": max_nodata,
        }
        if max_chips is not None:
            options["max_chips"] = max_chips
        if bulk:
            _bulk(conn, sources, collection, options, strict, on_conflict, progress, summary,
                  errors)
        else:
            extra = [stack.enter_context(db.connect()) for _ in range(writers - 1)]
            _batched(conn, extra, sources, collection, options, strict, on_conflict, progress,
                     summary, errors)
    summary.failed = [{"item": where, "error": in_cli_words(message)} for where, message in errors]
    summary.warnings = [in_cli_words(message) for message in summary.warnings]
    summary.seconds = time.perf_counter() - started
    for _, message in errors:
        click.echo(f"Error: {in_cli_words(message)}", err=True)
    for message in summary.warnings:
        click.echo(f"Warning: {message}", err=True)
    if as_json:
        click.echo(json.dumps(summary.as_dict()))
    elif not cli.quiet:
        click.echo(summary.line())
    if errors:
        ctx.exit(1)


def _indexed(
    sources: tuple[str, ...],
    collection: str | None,
    options: dict[str, Any],
    bar: Any,
    errors: list[tuple[str, str]],
    summary: Summary,
) -> Iterator[tuple[dict[str, Any], Any, int]]:
    """`(item, chips, chips dropped for nodata)` of each item that indexes; errors appended.

    The quality rule each item used is counted in `summary.quality`; `index_item`'s warnings
    (auto found no quality band) are collected once each, one per collection.
    """
    from stacchip_db.db.items import check_item
    from stacchip_db.grid import item_georeference
    from stacchip_db.index import index_item, quality_used
    from stacchip_db.quality import NoQualityBandWarning

    chip_size = options["chip_size"]
    for source in read_sources(sources):
        bar.update(1)
        if source.item is None:
            errors.append((source.where, source.error or source.where))
            continue
        item = source.item
        if collection and not item.get("collection"):
            item["collection"] = collection
        try:
            check_item(item)  # id, collection, datetime, safe names: named errors early
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", NoQualityBandWarning)
                chips = index_item(item, **options)
            (height, width), _, _ = item_georeference(item)
        except Exception as e:  # one bad item, whatever it raises, is reported and skipped
            name = str(item.get("id") or source.where)
            errors.append((name, _one_line(_item_error(e), name)))
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


def _batched(
    conn: Any,
    extra: list[Any],
    sources: tuple[str, ...],
    collection: str | None,
    options: dict[str, Any],
    strict: bool,
    on_conflict: str,
    progress: Any,
    summary: Summary,
    errors: list[tuple[str, str]],
) -> None:
    """The normal path: batches of items stored by `ItemWriter` while the next are indexed."""
    from stacchip_db.db.writer import ItemWriter

    with (
        ItemWriter(
            conn, chip_size=options["chip_size"], strict=strict, on_conflict=on_conflict,
            background=True, extra_connections=extra,
        ) as writer,
        progress as bar,
    ):
        for item, chips, dropped in _indexed(sources, collection, options, bar, errors, summary):
            if writer.add(item, chips):
                summary.dropped_nodata += dropped
    errors += [(f.item_id, _one_line(f.message, f.item_id)) for f in writer.failures]
    summary.items = writer.result.items
    summary.chips = writer.result.chips
    summary.skipped = len(writer.result.skipped)
    summary.collections_created = writer.result.collections_created


def _bulk(
    conn: Any,
    sources: tuple[str, ...],
    collection: str | None,
    options: dict[str, Any],
    strict: bool,
    on_conflict: str,
    progress: Any,
    summary: Summary,
    errors: list[tuple[str, str]],
) -> None:
    """The bulk path: index every item, then one `bulk_load` (all or nothing)."""
    from stacchip_db.db.bulk import bulk_load
    from stacchip_db.db.items import check_item

    clock = time.perf_counter()
    pairs: list[tuple[dict[str, Any], Any]] = []
    dropped: dict[tuple[str, str], int] = {}  # per item: a duplicate counts once (the last)
    with progress as bar:
        for item, chips, n in _indexed(sources, collection, options, bar, errors, summary):
            pairs.append((item, chips))
            dropped[check_item(item)[:2]] = n
    summary.timings["index"] = time.perf_counter() - clock
    try:
        result = bulk_load(
            conn, pairs, chip_size=options["chip_size"], strict=strict, on_conflict=on_conflict
        )
    except StacchipError as e:  # the load is one transaction: nothing was stored
        errors.append(("bulk load", f"bulk load of {len(pairs)} items failed, nothing stored: "
                       f"{' '.join(str(e).split())}"))
        return
    summary.items = result.items
    summary.chips = result.chips
    summary.skipped = len(result.skipped)
    summary.duplicates = result.duplicates
    summary.collections_created = result.collections_created
    skipped = set(result.skipped)
    summary.dropped_nodata = sum(n for (_, item_id), n in dropped.items() if item_id not in skipped)
    summary.timings.update(result.timings)


# -- export-index -----------------------------------------------------------------------------


@click.command("export-index")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--collection", "collections", multiple=True,
    help="Export only this collection (repeatable); default: all.",
)
@click.option(
    "--chip-size", type=click.IntRange(min=1), default=256, show_default=True,
    help="Export the chips indexed at this size.",
)
@with_database
def export_index(
    out_dir: Path, collections: tuple[str, ...], chip_size: int, db: Database
) -> None:
    """Write the chip index as the original stacchip's GeoParquet files.

    One file per item: OUT_DIR/{collection}/{item_id}/index_{item_id}.parquet, with columns
    chipid, date, chip_index_x, chip_index_y, cloud_cover_percentage, nodata_percentage and
    geometry (readable with geopandas.read_parquet).
    """
    from stacchip_db.export import export_index as write_index

    with db.connect() as conn:
        result = write_index(conn, out_dir, collections=collections or None, chip_size=chip_size)
    text = f"exported {result.chips:,} chips of {plural(result.files, 'item')} to {out_dir}"
    if result.skipped:  # each was named by a warning as it was skipped
        text += (
            f"; {plural(len(result.skipped), 'item')} skipped: their collection or id cannot be "
            "a folder name"
        )
    click.echo(text)
