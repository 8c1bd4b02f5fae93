"""The chip filter, split and sample options, defined once for every command that selects chips.

`filter_options` adds the filters and split options and hands the command `chip_filter:
ChipFilter`; `sample_options(required=...)` adds -n/--sample, --seed, --stratify-by and
--cell-size and hands it `sampling: Sampling | None` (None when -n is not given);
`selection_options(...)` is both. Bad values are usage errors (exit 2) naming the option.

    @click.command()
    @selection_options()
    @with_database
    def stats(chip_filter: ChipFilter, sampling: Sampling | None, db: Database) -> None: ...
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click
import psycopg

from stacchip_db.selection import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CELL_SIZE,
    SPLITS,
    STRATA,
    ChipFilter,
    Sampling,
    SelectionError,
    SelectionQuery,
    explain_empty,
    parse_bbox,
    parse_end,
    parse_int_list,
    parse_interval,
    parse_split_fractions,
    parse_start,
    read_geometry,
)

_FILTER_PARAMS = (
    "collections", "bbox", "intersects", "start", "end", "datetime_interval", "months",
    "quarters", "max_cloud", "max_nodata", "chip_size", "split", "block_size",
    "split_fractions", "split_buffer",
)
_SAMPLE_PARAMS = ("sample_n", "seed", "stratify_by", "cell_size")
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
    """Pop the filter options out of a command's kwargs and make the `ChipFilter`."""
    start, end = _time_bounds(kwargs)
    values = {name: kwargs.pop(name) for name in _FILTER_PARAMS if name in kwargs}
    try:
        return ChipFilter(
            collections=tuple(values["collections"]),
            bbox=values["bbox"],
            intersects=values["intersects"],
            start=start,
            end=end,
            months=values["months"] or (),
            quarters=values["quarters"] or (),
            max_cloud=values["max_cloud"],
            max_nodata=values["max_nodata"],
            chip_size=values["chip_size"],
            split=values["split"],
            block_size=values["block_size"],
            split_fractions=values["split_fractions"] or (0.8, 0.1, 0.1),
            split_buffer=values["split_buffer"],
        )
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
            "--stratify-by", type=click.Choice(STRATA),
            help="Equal counts per collection, year, quarter or cell (capped by what each has).",
        ),
        click.option(
            "--cell-size", type=float, default=DEFAULT_CELL_SIZE, show_default=True,
            metavar="DEG", callback=_parsed(_positive_degrees),
            help="Cell side in degrees for --stratify-by cell.",
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
            if n is None:
                if stratify_by is not None:
                    raise _fail("--stratify-by needs a sample size -n N", "--stratify-by")
                return func(*args, sampling=None, **kwargs)
            sampling = Sampling(n=n, seed=seed, stratify_by=stratify_by, cell_size=cell_size)
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
