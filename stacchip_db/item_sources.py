"""STAC items read from where they are: JSON and ndjson files, folders of them, URLs.

A source is a local path or an http(s)/`s3://` URL. A file holds one item, a
FeatureCollection of items, or one item per line (ndjson: by suffix, or several JSON
documents in a `.json` file); a folder stands for the item files under it. Relative asset
hrefs are made absolute against the item's location, so stored items stay usable wherever
they are read from. What cannot be read as an item (a missing file, a broken line, a STAC
Collection) comes out as a `SourceItem` with an error, in its place, so a reader can report
it and go on with the rest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

from stacchip_db.errors import StacchipError

NDJSON_SUFFIXES = (".ndjson", ".jsonl", ".geojsonl", ".geojsons")
"""Files read one item per line."""
ITEM_SUFFIXES = (".json", ".geojson", *NDJSON_SUFFIXES)
"""Files read from a folder."""

_WHAT = "give STAC item files (.json, .geojson), ndjson files, folders of them or URLs as `sources`"


class SourceError(StacchipError):
    """A source does not exist, or is a folder holding no item file: nothing is read."""


@dataclass
class SourceItem:
    """One thing read from the sources: an item dict, or why it could not be read.

    `where` names the place: the source, `{source} line N` (ndjson) or `{source} feature N`
    (FeatureCollection).
    """

    where: str
    item: dict[str, Any] | None = None
    error: str | None = None


def is_url(source: str) -> bool:
    """Whether `source` is read over the network (http, https, s3) rather than from a path."""
    return urlparse(source).scheme in ("http", "https", "s3")


def expand_sources(sources: Iterable[str | os.PathLike[str]]) -> tuple[str, ...]:
    """URLs as given, files checked, folders replaced by the item files under them (sorted,
    hidden ones left out).

    Raises `SourceError` (before anything is read) for a path that does not exist or a folder
    holding no `ITEM_SUFFIXES` file.
    """
    expanded: list[str] = []
    for entry in sources:
        source = os.fspath(entry)
        path = Path(source)
        if is_url(source) or (path.exists() and not path.is_dir()):
            expanded.append(source)  # a file, or a pipe (`<(…)`, a FIFO) streamed as it comes
        elif path.is_dir():
            found = sorted(
                str(p) for p in path.rglob("*")
                if p.suffix.lower() in ITEM_SUFFIXES and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )  # fmt: skip
            if not found:
                suffixes = ", ".join(ITEM_SUFFIXES)
                raise SourceError(f"folder {source} holds no {suffixes} files; {_WHAT}")
            expanded += found
        else:
            raise SourceError(f"{source} does not exist; {_WHAT}")
    return tuple(expanded)


def read_items(sources: Iterable[str]) -> Iterator[SourceItem]:
    """Items from JSON / ndjson files and URLs (`expand_sources`' output), in order;
    unreadable ones as errors, one per file, line or feature."""
    for source in sources:
        base = _base_of(source)
        ndjson = urlparse(source).path.lower().endswith(NDJSON_SUFFIXES)
        if ndjson and not is_url(source):
            try:
                with open(source, "rb") as handle:  # decoded line by line: one bad line, one error
                    yield from _lines(handle, source, base)
            except OSError as e:
                yield SourceItem(source, error=f"cannot read {source}: {e.strerror}")
            continue
        try:
            if is_url(source):
                from stacchip_db.storage import read_text  # boto3/requests: only when needed

                text = read_text(source)
            else:
                text = Path(source).read_text(encoding="utf-8")
        except OSError as e:
            yield SourceItem(source, error=f"cannot read {source}: {e.strerror}")
            continue
        except UnicodeDecodeError as e:
            yield SourceItem(source, error=f"{source}: not UTF-8 text ({e.reason}); pass STAC JSON")
            continue
        except StacchipError as e:  # storage's one-line errors (HTTP status, missing object)
            yield SourceItem(source, error=str(e))
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
                yield SourceItem(source, error=f"{source}: not JSON ({e.msg} at line {e.lineno})")
            continue
        yield from _items_of(document, source, base)


def count_items(sources: Iterable[str]) -> int:
    """A cheap estimate for a progress bar: lines of local ndjson files, 1 per other source."""
    total = 0
    for source in sources:
        path = Path(source)
        if not is_url(source) and source.lower().endswith(NDJSON_SUFFIXES) and path.is_file():
            with path.open("rb") as handle:
                total += sum(1 for line in handle if line.strip())
        else:
            total += 1
    return total


def _base_of(source: str) -> str:
    """What relative asset hrefs in items read from `source` are relative to."""
    return source if is_url(source) else str(Path(source).resolve())


def _absolute_hrefs(item: dict[str, Any], base: str) -> dict[str, Any]:
    """Asset hrefs made absolute against the item's location, so stored items stay usable."""
    for asset in (item.get("assets") or {}).values():
        href = asset.get("href") if isinstance(asset, dict) else None
        if not isinstance(href, str) or urlparse(href).scheme or href.startswith("/"):
            continue
        if is_url(base):
            asset["href"] = urljoin(base, href)
        else:
            asset["href"] = str((Path(base).parent / href).resolve())
    return item


def _items_of(document: Any, where: str, base: str) -> Iterator[SourceItem]:
    """Items of a parsed JSON document: an item, or a FeatureCollection of items."""
    if isinstance(document, dict) and document.get("type") == "FeatureCollection":
        for n, feature in enumerate(document.get("features") or []):
            yield from _items_of(feature, f"{where} feature {n}", base)
    elif isinstance(document, dict) and document.get("type") in ("Collection", "Catalog"):
        yield SourceItem(where, error=f"{where}: a STAC {document['type']}, not an item; index "
                         "its items (or leave it out of the folder)")  # fmt: skip
    elif isinstance(document, dict):
        yield SourceItem(where, _absolute_hrefs(document, base))
    else:
        yield SourceItem(
            where, error=f"{where}: not a STAC item (a JSON {type(document).__name__})"
        )


def _lines(lines: Iterator[str] | Iterator[bytes], source: str, base: str) -> Iterator[SourceItem]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            document = json.loads(line)  # bytes: UTF-8 (or -16/-32) detected by json
        except UnicodeDecodeError as e:
            yield SourceItem(where, error=f"{where}: not UTF-8 text ({e.reason}); fix or remove it")
            continue
        except json.JSONDecodeError as e:
            yield SourceItem(where, error=f"{where}: not JSON ({e.msg}); fix or remove the line")
            continue
        yield from _items_of(document, where, base)
