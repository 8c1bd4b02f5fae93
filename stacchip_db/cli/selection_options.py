"""The chip filter, split and sample options, defined once for every command that selects chips.

`filter_options` adds the filters and split options and hands the command `chip_filter:
ChipFilter`; `sample_options(required=...)` adds -n/--sample, --seed, --stratify-by and
--cell-size and hands it `sampling: Sampling | None` (None when -n is not given);
`selection_options(...)` is both. Bad values are usage errors (exit 2) naming the option.
The option texts (a bbox, dates, an interval, lists, a geometry file) are parsed here into the
typed values `ChipFilter` takes; the library checks those values, it parses no text.

    @click.command()
    @selection_options()
    @with_database
    def stats(chip_filter: ChipFilter, sampling: Sampling | None, db: Database) -> None: ...
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import click
import psycopg
import shapely
from shapely.errors import GEOSException
from shapely.geometry import shape

from stacchip_db.selection import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CELL_SIZE,
    LAYER_STRATUM,
    SPLITS,
    STRATA,
    ChipFilter,
    Sampling,
    SelectionError,
    SelectionQuery,
    check_bbox,
    check_layer_name,
    check_split_fractions,
    explain_empty,
)
from stacchip_db.text import first_line

# -- option text -> typed values (SelectionError: a usage error naming the option) ------------


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """`minx,miny,maxx,maxy` (degrees) -> a checked tuple."""
    try:
        values = [float(part) for part in text.replace(" ", "").split(",")]
    except ValueError as exc:
        raise SelectionError(
            f"bbox {text!r} is not four numbers minx,miny,maxx,maxy (degrees)"
        ) from exc
    return check_bbox(values)


def _parse_instant(text: str) -> tuple[datetime, bool]:
    """An ISO date or datetime (naive = UTC); the flag says whether it was a date alone."""
    value = text.strip()
    try:
        if len(value) == 4 and value.isdigit():  # a year alone
            return datetime(int(value), 1, 1, tzinfo=UTC), True
        if len(value) <= 10:
            day = date.fromisoformat(value)
            return datetime.combine(day, time(), tzinfo=UTC), True
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise SelectionError(
            f"{text!r} is not a date or datetime (2021-06-30, 2021-06-30T12:00:00Z, 2021)"
        ) from exc
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)), False


def parse_start(text: str) -> datetime:
    """An inclusive lower bound: a year, a date (from its midnight, UTC) or a datetime."""
    return _parse_instant(text)[0]


def parse_end(text: str) -> datetime:
    """An inclusive upper bound, returned exclusive: a year or date includes all of it."""
    moment, whole = _parse_instant(text)
    value = text.strip()
    try:  # the exclusive bound is one year/day/microsecond later: past datetime.max for 9999
        if whole and len(value) == 4:
            return moment.replace(year=moment.year + 1)
        return moment + (timedelta(days=1) if whole else timedelta(microseconds=1))
    except (ValueError, OverflowError) as exc:
        raise SelectionError(
            f"end {text!r} is past the last date that can be given (9999-12-30); give an "
            "earlier end or leave the end open"
        ) from exc


def parse_interval(text: str) -> tuple[datetime | None, datetime | None]:
    """A STAC-style interval `START/END` (either end `..` or empty = open), or one date/year."""
    if "/" not in text:
        return parse_start(text), parse_end(text)
    start_text, _, end_text = text.partition("/")
    start = None if start_text.strip() in ("", "..") else parse_start(start_text)
    end = None if end_text.strip() in ("", "..") else parse_end(end_text)
    if start is None and end is None:
        raise SelectionError(f"interval {text!r} is open at both ends: give a start or an end")
    if start is not None and end is not None and start >= end:
        raise SelectionError(
            f"interval {text!r} is empty: it ends ({end_text.strip()}, inclusive) before it "
            f"starts ({start_text.strip()}); give the earlier date first"
        )
    return start, end


def parse_int_list(text: str, what: str, low: int, high: int) -> tuple[int, ...]:
    """`6,7,8` -> (6, 7, 8), each within low..high."""
    try:
        values = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError as exc:
        raise SelectionError(f"{what} {text!r} is not a comma-separated list of numbers") from exc
    if not values:
        raise SelectionError(f"{what} is empty: give numbers {low}-{high}")
    bad = [v for v in values if not low <= v <= high]
    if bad:  # said here, naming the option's value (ChipFilter would name its field)
        raise SelectionError(f"{what} {bad[0]} is out of range: give numbers {low}-{high}")
    return values


def parse_split_fractions(text: str) -> tuple[float, float, float]:
    """`0.8,0.1,0.1` -> train, val, test fractions (non-negative, summing to 1)."""
    try:
        values = tuple(float(part) for part in text.replace(" ", "").split(","))
    except ValueError as exc:
        raise SelectionError(f"split fractions {text!r} are not three numbers") from exc
    return check_split_fractions(values)


def parse_within(text: str) -> tuple[str, ...]:
    """`NAME` or `NAME:COLUMN=VALUE` -> (name,) or (name, column, value)."""
    name, colon, match = text.partition(":")
    if not colon:
        return (_layer_name(name.strip()),)
    column, equals, value = match.partition("=")
    if not equals or not column.strip():
        raise SelectionError(f"{text!r} is not NAME or NAME:COLUMN=VALUE (countries:iso=FR)")
    return _layer_name(name.strip()), column.strip(), value


def parse_class_fraction(text: str) -> tuple[str, str, float]:
    """`NAME:CLASS>=FRACTION` -> (layer, class, fraction)."""
    name, colon, condition = text.partition(":")
    class_name, at_least, number = condition.partition(">=")
    try:
        fraction = float(number)
    except ValueError:
        fraction = None
    if not colon or not at_least or not class_name.strip() or fraction is None:
        raise SelectionError(
            f"{text!r} is not NAME:CLASS>=FRACTION (worldcover:tree>=0.3)"
        )
    if not 0.0 <= fraction <= 1.0:
        raise SelectionError(f"{text!r}: {fraction!r} is not a fraction between 0 and 1")
    return _layer_name(name.strip()), class_name.strip(), fraction


def parse_quotas(text: str) -> tuple[tuple[str, float], ...]:
    """`tree=0.3,crop=0.2` -> (("tree", 0.3), ("crop", 0.2))."""
    quotas = []
    for part in text.split(","):
        stratum, equals, number = part.strip().partition("=")
        try:
            share = float(number)
        except ValueError:
            share = None
        if not equals or not stratum.strip() or share is None:
            raise SelectionError(f"{part.strip()!r} is not CLASS=SHARE (tree=0.3,crop=0.2)")
        quotas.append((stratum.strip(), share))
    return tuple(quotas)


def parse_stratify_by(text: str) -> str:
    """One of `STRATA`, or `layer:NAME`."""
    if text in STRATA:
        return text
    if text.startswith(LAYER_STRATUM):
        return LAYER_STRATUM + _layer_name(text.removeprefix(LAYER_STRATUM))
    raise SelectionError(f"{text!r} is not one of {', '.join(STRATA)}, layer:NAME")


def _layer_name(name: str) -> str:
    try:
        return check_layer_name(name, "layer")
    except SelectionError:
        raise SelectionError(
            f"{name!r} is not a layer name (lower-case letters, digits, _; see stacchip-db "
            "layer list)"
        ) from None


def read_geometry(path: str | Path) -> str:
    """The union of the geometries in a file, as WKT in EPSG:4326.

    `.wkt`/`.txt`: WKT in lon/lat. `.json`/`.geojson`: a GeoJSON geometry, Feature or
    FeatureCollection (lon/lat by RFC 7946). Anything else geopandas reads (GeoPackage,
    FlatGeobuf, Shapefile…) is reprojected from its own CRS.
    """
    source = Path(path)
    if not source.is_file():
        raise SelectionError(f"geometry file {source} does not exist")
    suffix = source.suffix.lower()
    try:
        if suffix in (".wkt", ".txt"):
            geometry = shapely.from_wkt(source.read_text().strip())
        elif suffix in (".json", ".geojson"):
            geometry = _geojson_geometry(json.loads(source.read_text()))
        else:
            import geopandas  # only here: a second of import time the other paths do not pay

            frame = geopandas.read_file(source)
            if frame.crs is not None:
                frame = frame.to_crs(4326)
            geometry = shapely.union_all(frame.geometry.values)
    except (GEOSException, ValueError, KeyError, TypeError, OSError) as exc:
        raise SelectionError(
            f"geometry file {source} could not be read ({first_line(exc)}): give WKT, "
            "GeoJSON or a vector file geopandas reads"
        ) from exc
    if geometry is None or geometry.is_empty:
        raise SelectionError(f"geometry file {source} holds no geometry")
    return shapely.to_wkt(geometry, rounding_precision=-1)


def _geojson_geometry(document: dict[str, Any]) -> shapely.Geometry:
    kind = document.get("type")
    if kind == "FeatureCollection":
        shapes = [_geojson_geometry(f) for f in document.get("features", [])]
        return shapely.union_all(shapes) if shapes else None
    if kind == "Feature":
        return shape(document["geometry"])
    return shape(document)


# -- the options ------------------------------------------------------------------------------

_TYPED = "stacchip_db.typed"
"""`click.Context.meta` key: option name -> the text typed, for messages."""


def _parsed(parse: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback running `parse`, turning its `SelectionError` into a usage error."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        ctx.meta.setdefault(_TYPED, {})[param.name] = value  # messages quote what was typed
        try:
            return parse(value)
        except SelectionError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc

    return callback


def _parsed_each(
    parse: Callable[[str], Any],
) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """`_parsed` for a repeatable option: each value parsed, a tuple of the results."""
    one = _parsed(parse)

    def callback(ctx: click.Context, param: click.Parameter, values: Any) -> Any:
        return tuple(one(ctx, param, value) for value in values or ())

    return callback


def _fail(message: str, hint: str) -> click.BadParameter:
    return click.BadParameter(message, param_hint=hint)


def _time_bounds(kwargs: dict[str, Any]) -> tuple[Any, Any]:
    interval = kwargs.pop("datetime_interval")
    start, end = kwargs.pop("start"), kwargs.pop("end")
    if interval is not None:
        if start is not None or end is not None:
            raise _fail("give either --datetime or --start/--end, not both", "--datetime")
        return interval  # parse_interval refused an empty one, quoting it
    if start is not None and end is not None and start >= end:
        typed = click.get_current_context().meta.get(_TYPED, {})
        raise _fail(
            f"the time range is empty: --end {typed.get('end')} (inclusive) is before --start "
            f"{typed.get('start')}; give the earlier date to --start",
            "--start/--end",
        )
    return start, end


def _build_filter(kwargs: dict[str, Any]) -> ChipFilter:
    """Pop the filter options out of a command's kwargs and make the `ChipFilter`.

    Each option is named after its `ChipFilter` field (the one Python list of filters), so a
    new filter needs its option and nothing here; an option not given keeps the field's
    default. `--datetime` or `--start`/`--end` become the `start`/`end` fields."""
    start, end = _time_bounds(kwargs)
    given = {
        f.name: value
        for f in dataclasses.fields(ChipFilter)
        if f.name in kwargs and (value := kwargs.pop(f.name)) not in (None, ())
    }
    try:
        return ChipFilter(**{**given, "start": start, "end": end})
    except SelectionError as exc:
        # Each option was checked by its callback; what is left spans options: the time range.
        raise _fail(str(exc), "--start/--end/--datetime") from exc


def _unit_fraction(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise SelectionError(f"{value!r} is not a fraction between 0 and 1 (20% is 0.2)")
    return value


def _positive_degrees(value: float) -> float:
    if not 0 < value <= 360:
        raise SelectionError(f"{value!r} is not a positive number of degrees (<= 360)")
    return value


def _non_negative_degrees(value: float) -> float:
    if value < 0:
        raise SelectionError(f"{value!r} is negative; give degrees >= 0 (0 = strict)")
    return value


def _filter_decorators() -> list[Callable[[Callable[..., Any]], Callable[..., Any]]]:
    return [
        click.option(
            "--collection", "collections", multiple=True, metavar="ID",
            help="Only chips of this collection (repeat for several).",
        ),
        click.option(
            "--bbox", metavar="MINX,MINY,MAXX,MAXY", callback=_parsed(parse_bbox),
            help="Only chips whose footprint intersects this box (degrees, EPSG:4326).",
        ),
        click.option(
            "--intersects", metavar="FILE", callback=_parsed(read_geometry),
            help="Only chips intersecting the geometry in FILE: WKT (.wkt), GeoJSON, or any "
            "vector file geopandas reads (reprojected to EPSG:4326).",
        ),
        click.option(
            "--start", metavar="DATE", callback=_parsed(parse_start),
            help="Only chips from this date or datetime on (UTC unless given; 2021 = Jan 1).",
        ),
        click.option(
            "--end", metavar="DATE", callback=_parsed(parse_end),
            help="Only chips up to this date or datetime, inclusive (a date or year: all of it).",
        ),
        click.option(
            "--datetime", "datetime_interval", metavar="START/END",
            callback=_parsed(parse_interval),
            help="STAC-style interval instead of --start/--end (`..` = open), or one date.",
        ),
        click.option(
            "--months", metavar="M,M,…",
            callback=_parsed(lambda text: parse_int_list(text, "month", 1, 12)),
            help="Only chips from these calendar months (1-12, UTC).",
        ),
        click.option(
            "--quarters", metavar="Q,Q,…",
            callback=_parsed(lambda text: parse_int_list(text, "quarter", 1, 4)),
            help="Only chips from these quarters (1-4, UTC).",
        ),
        click.option(
            "--max-cloud", type=float, metavar="FRACTION", callback=_parsed(_unit_fraction),
            help="Only chips with cloud_fraction <= this (0..1).",
        ),
        click.option(
            "--max-nodata", type=float, metavar="FRACTION",
            callback=_parsed(_unit_fraction),
            help="Only chips with nodata_fraction <= this (0..1).",
        ),
        click.option(
            "--chip-size", type=click.IntRange(min=1), metavar="PX",
            help="Only chips of this size (pixels on the item's finest grid).",
        ),
        click.option(
            "--split", type=click.Choice(SPLITS),
            help="Only chips of this split (by spatial block, see --block-size).",
        ),
        click.option(
            "--block-size", type=float, default=DEFAULT_BLOCK_SIZE, show_default=True,
            metavar="DEG", callback=_parsed(_positive_degrees),
            help="Side of the split blocks in degrees; a block goes whole into one split.",
        ),
        click.option(
            "--split-fractions", metavar="TRAIN,VAL,TEST",
            callback=_parsed(parse_split_fractions),
            help="Fractions of blocks per split (default 0.8,0.1,0.1).",
        ),
        click.option(
            "--split-buffer", type=float, metavar="DEG", callback=_parsed(_non_negative_degrees),
            help="Leave out chips whose footprint, grown by DEG, crosses a block edge "
            "(0 = chips straddling an edge), so no footprint reaches a block of another split.",
        ),
        click.option(
            "--within", metavar="NAME[:COLUMN=VALUE]", callback=_parsed(parse_within),
            help="Only chips intersecting the features of vector layer NAME (those whose COLUMN "
            "is VALUE); see `stacchip-db layer`.",
        ),
        click.option(
            "--class", "min_fractions", multiple=True, metavar="NAME:CLASS>=FRACTION",
            callback=_parsed_each(parse_class_fraction),
            help="Only chips with at least FRACTION of CLASS in raster layer NAME (repeat: all "
            "must hold).",
        ),
    ]


def _sample_decorators(required: bool) -> list[Callable[[Callable[..., Any]], Callable[..., Any]]]:
    return [
        click.option(
            "-n", "--sample", "sample_n", type=click.IntRange(min=0), required=required,
            metavar="N", help="A reproducible sample of N chips, without replacement.",
        ),
        click.option(
            "--seed", type=click.IntRange(min=-(2**63), max=2**63 - 1), default=0,
            show_default=True, help="Seed of the sample: same seed and data, same chips.",
        ),
        click.option(
            "--stratify-by", metavar="|".join([*STRATA, "layer:NAME"]),
            callback=_parsed(parse_stratify_by),
            help="Equal counts per collection, year, quarter, cell, or class of layer NAME (a "
            "raster's dominant class; a vector layer's stratum column at the chip's centre), "
            "capped by what each has.",
        ),
        click.option(
            "--quota", "quotas", metavar="CLASS=SHARE,…", callback=_parsed(parse_quotas),
            help="With --stratify-by layer:NAME: exactly round(SHARE*N) chips of each CLASS "
            "(all it has when fewer), the rest of N from the other classes.",
        ),
        click.option(
            "--cell-size", type=float, default=DEFAULT_CELL_SIZE, show_default=True,
            metavar="DEG", callback=_parsed(_positive_degrees),
            help="Cell side in degrees for --stratify-by cell.",
        ),
        click.option(
            "--by-location", is_flag=True,
            help="Sample N places instead of N chips, each with all its chips that pass the "
            "filters (every date); --stratify-by collection or cell.",
        ),
    ]


def _apply(func: Callable[..., Any], decorators: list[Callable[..., Any]]) -> Callable[..., Any]:
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the filter and split options; the command receives `chip_filter: ChipFilter`."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, chip_filter=_build_filter(kwargs), **kwargs)

    return _apply(wrapper, _filter_decorators())


def sample_options(*, required: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the sample options; the command receives `sampling: Sampling | None`."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            n, seed = kwargs.pop("sample_n"), kwargs.pop("seed")
            stratify_by, cell_size = kwargs.pop("stratify_by"), kwargs.pop("cell_size")
            quotas = kwargs.pop("quotas") or ()
            by_location = kwargs.pop("by_location")
            if n is None:
                if stratify_by is not None:
                    raise _fail("--stratify-by needs a sample size -n N", "--stratify-by")
                if quotas:
                    raise _fail("--quota needs a sample size -n N", "--quota")
                if by_location:
                    raise _fail("--by-location needs a sample size -n N", "--by-location")
                return func(*args, sampling=None, **kwargs)
            if quotas and not (stratify_by or "").startswith(LAYER_STRATUM):
                raise _fail("--quota needs --stratify-by layer:NAME", "--quota")
            try:
                sampling = Sampling(
                    n=n, seed=seed, stratify_by=stratify_by, cell_size=cell_size, quotas=quotas,
                    by_location=by_location,
                )  # fmt: skip
            except SelectionError as exc:
                if "`stratify_by`" in str(exc):
                    raise _fail(str(exc).replace("`stratify_by`", "--stratify-by"),
                                "--stratify-by") from exc  # fmt: skip
                raise _fail(str(exc).replace("`quotas`", "--quota"), "--quota") from exc
            return func(*args, sampling=sampling, **kwargs)

        return _apply(wrapper, _sample_decorators(required))

    return decorate


def selection_options(
    *, sample_required: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Filters, split and sample options together: `chip_filter` and `sampling` kwargs."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        return filter_options(sample_options(required=sample_required)(func))

    return decorate


def warn_empty(conn: psycopg.Connection, selection: SelectionQuery | None) -> None:
    """One warning line on stderr saying why a selection came back empty (`None`: a --query)."""
    from stacchip_db.db import translate_errors

    with translate_errors("explaining the empty selection"):
        reason = "the query selected no chips" if selection is None else explain_empty(
            conn, selection
        )
    click.echo(f"Warning: no chips selected: {reason}", err=True)
