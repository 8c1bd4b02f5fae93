"""Which chips: filters, seeded samples and spatial-block splits, as calls to the SQL functions.

The selection logic lives in SQL (`sql/010_selection.sql`: `stacchip.select_chips`,
`stacchip.sample_chips`, `stacchip.sample_chips_stratified`) so psql, QGIS and Python users
get the same chips as the CLI. This module turns a `ChipFilter` (and optionally a `Sampling`)
into one call of those functions with named arguments, as psycopg SQL plus parameters, or as
one pasteable string with the values inlined (`--sql`). Every query returns `CHIP_COLUMNS`.

Other commands (prechip, stats, preview, map) build their selection here and wrap it:
`SELECT … FROM ({selection.query}) AS chips`.

Time bounds are half-open in SQL (`start_time <= datetime < end_time`); the CLI's `parse_end`
(`cli/selection_options.py`, where option text is parsed) turns an inclusive user bound (a
date: that whole day) into the exclusive one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import Field, dataclass, field, fields
from datetime import UTC, datetime, time, timedelta
from typing import Any

import psycopg
import pyarrow as pa
import shapely
from psycopg import sql
from psycopg.types.json import Jsonb

from stacchip_db.chip_schema import chip_field
from stacchip_db.db.locks import READ_LOCK_TIMEOUT_S, lock_waits, set_lock_timeout
from stacchip_db.db.sql_template import selection_filters
from stacchip_db.errors import StacchipError

CHIP_COLUMNS = (
    "chip_id",
    "collection",
    "item_id",
    "chip_size",
    "chip_index_x",
    "chip_index_y",
    "datetime",
    "cloud_fraction",
    "nodata_fraction",
    "geometry",
)
"""Columns of every selection, in this order (`geometry`: the footprint, EPSG:4326)."""

CHIP_KEY = ("collection", "item_id", "chip_size", "chip_index_x", "chip_index_y")
"""The primary key of `stacchip.chips`."""

SPLITS = ("train", "val", "test")
STRATA = ("collection", "year", "quarter", "cell")
LOCATION_STRATA = ("collection", "cell")
"""Strata of a sample of places: a place spans dates, so years and quarters do not apply."""
LAYER_STRATUM = "layer:"
"""`stratify_by` prefix of a layer's strata (`layer:NAME`)."""
DEFAULT_BLOCK_SIZE = 1.0
"""Degrees; a block is the unit that goes whole into one split."""
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_CELL_SIZE = 1.0
"""Degrees; the cell of `stratify_by='cell'`."""
SQL_NAME = "sql"
"""`ChipFilter` field metadata: the SQL parameter's name, when it is not the field's."""
SQL_VALUE = "sql_value"
"""`ChipFilter`/`Sampling` field metadata: turns the field's value into the SQL argument's."""
LAYER_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
"""A layer's name (`stacchip.layers.name`): a lower-case SQL identifier."""


class SelectionError(StacchipError):
    """A filter, sample or split parameter is invalid."""


@dataclass(frozen=True)
class ChipFilter:
    """What chips to select; every field left at its default means "no filter".

    `bbox` is (minx, miny, maxx, maxy) in degrees; `intersects` is WKT in EPSG:4326; `start` is
    inclusive and `end` exclusive (see `parse_end`); fractions are 0..1. With `split`, only the
    chips of that split; `split_buffer` (degrees, 0 = strict) drops chips whose footprint grown
    by it crosses the edge of their block. `within` is `(layer,)` or `(layer, column, value)`:
    chips intersecting that vector layer's features (those whose `column` reads `value`);
    `min_fractions` holds `(layer, class, fraction)`: chips with at least that share of the
    raster layer's class (each one must hold).

    Each field is the filter parameter of the same name in `sql/010_selection.sql`'s filter
    block (or the name in its `SQL_NAME` metadata), which the call passes it to: a new filter
    is a field here and a line there (tests check that the two lists agree).
    """

    collections: tuple[str, ...] = ()
    bbox: tuple[float, float, float, float] | None = None
    intersects: str | None = None
    start: datetime | None = field(default=None, metadata={SQL_NAME: "start_time"})
    end: datetime | None = field(default=None, metadata={SQL_NAME: "end_time"})
    months: tuple[int, ...] = ()
    quarters: tuple[int, ...] = ()
    max_cloud: float | None = None
    max_nodata: float | None = None
    chip_size: int | None = None
    split: str | None = None
    block_size: float = DEFAULT_BLOCK_SIZE
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS
    split_buffer: float | None = None
    within: tuple[str, ...] = ()
    min_fractions: tuple[tuple[str, str, float], ...] = field(
        default=(), metadata={SQL_VALUE: lambda value: Jsonb(_fractions_json(value))}
    )

    def __post_init__(self) -> None:
        if self.within:
            check_within(self.within)
        for layer, class_name, fraction in self.min_fractions:
            check_layer_name(layer, "min_fractions")
            if not class_name:
                raise SelectionError(f"`min_fractions`: layer {layer!r} needs a class name")
            if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
                raise SelectionError(
                    f"`min_fractions`: {fraction!r} for {layer}:{class_name} is not a fraction "
                    "between 0 and 1"
                )
        if self.bbox is not None:
            check_bbox(self.bbox)
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise SelectionError(f"{name} {value.isoformat()} has no time zone: add one (Z)")
        if self.start and self.end and self.start >= self.end:
            raise SelectionError(
                f"the time range is empty: start {self.start.isoformat()} is not before "
                f"end {self.end.isoformat()}"
            )
        _check_range("months", self.months, 1, 12)
        _check_range("quarters", self.quarters, 1, 4)
        for name in ("max_cloud", "max_nodata"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise SelectionError(
                    f"{name} {value!r} is not a fraction between 0 and 1 (20% is 0.2)"
                )
        if self.chip_size is not None and self.chip_size <= 0:
            raise SelectionError(f"chip size {self.chip_size} is not a positive number of pixels")
        if self.split is not None and self.split not in SPLITS:
            raise SelectionError(f"split {self.split!r} is not one of {', '.join(SPLITS)}")
        _check_degrees("block size", self.block_size)
        check_split_fractions(self.split_fractions)
        if self.split_buffer is not None and not (
            math.isfinite(self.split_buffer) and self.split_buffer >= 0
        ):
            raise SelectionError(f"split buffer {self.split_buffer!r} is not >= 0 degrees")


@dataclass(frozen=True)
class Sampling:
    """A reproducible sample of `n` chips without replacement, optionally stratified.

    `stratify_by` is one of `STRATA` or `layer:NAME` (strata: a raster layer's dominant class,
    or the stratum column of the vector layer feature holding the chip's centre). `quotas`
    (with a layer only) holds `(stratum, share)`: exactly round(share * n) chips of each named
    stratum (all it has when fewer), the rest of `n` from the other strata in sampling order.

    With `by_location`, `n` places (`stacchip.chips.location`), each with all its chips that
    pass the filters (`stacchip.sample_locations`); strata are then `LOCATION_STRATA`.
    """

    n: int
    seed: int = 0
    stratify_by: str | None = None
    cell_size: float = DEFAULT_CELL_SIZE
    quotas: tuple[tuple[str, float], ...] = ()
    by_location: bool = False

    def __post_init__(self) -> None:
        if self.n < 0:
            raise SelectionError(f"sample size {self.n} is negative")
        if not -(2**63) <= self.seed < 2**63:
            raise SelectionError(f"seed {self.seed} does not fit a 64-bit integer")
        if self.stratify_by is not None and self.stratify_by not in STRATA:
            layer = self.stratify_by.removeprefix(LAYER_STRATUM)
            if not self.stratify_by.startswith(LAYER_STRATUM) or not LAYER_NAME.fullmatch(layer):
                raise SelectionError(
                    f"stratify by {self.stratify_by!r}: choose one of {', '.join(STRATA)} or "
                    "layer:NAME (a layer's name: lower-case letters, digits, _)"
                )
        _check_degrees("cell size", self.cell_size)
        if self.by_location and self.stratify_by not in (None, *LOCATION_STRATA):
            raise SelectionError(
                f"`stratify_by` {self.stratify_by!r} does not apply to a sample of places (a "
                f"place spans dates): stratify by {' or '.join(LOCATION_STRATA)}, or filter "
                "the dates"
            )
        if self.quotas:
            check_quotas(self.quotas, self.n, has_layer=self.layer is not None)

    @property
    def layer(self) -> str | None:
        """The layer whose classes or features are the strata (`layer:NAME`), else None."""
        if self.stratify_by is not None and self.stratify_by.startswith(LAYER_STRATUM):
            return self.stratify_by.removeprefix(LAYER_STRATUM)
        return None


@dataclass(frozen=True)
class SelectionQuery:
    """One SELECT returning `CHIP_COLUMNS`: psycopg SQL with named placeholders, and values.

    `chip_filter` and `sampling` are what it was built from (`explain_empty` reads them).
    """

    query: sql.Composed
    params: dict[str, Any] = field(default_factory=dict)
    inlined: sql.Composed | None = None
    chip_filter: ChipFilter | None = None
    sampling: Sampling | None = None

    def as_string(self) -> str:
        """The query with every value inlined as a literal: paste it into psql or QGIS."""
        if self.inlined is None:
            raise SelectionError("this query was built without its inlined form")
        return self.inlined.as_string(None)


# -- building the call ------------------------------------------------------------------------

# The sampling arguments, before the filters in the functions' parameter lists.
_SAMPLING_TYPES = {
    "n": "int", "seed": "bigint", "stratify_by": "text", "cell_size": "float8", "layer": "text",
    "quotas": "jsonb",
}


def sql_parameter(chip_filter_field: Field[Any]) -> str:
    """The SQL filter parameter a `ChipFilter` field is passed to."""
    return chip_filter_field.metadata.get(SQL_NAME, chip_filter_field.name)


def _sql_types() -> dict[str, str]:
    """SQL parameter -> its type as `sql/010_selection.sql` declares it (the casts of the call)."""
    return {p.name: p.type for p in selection_filters()} | _SAMPLING_TYPES


def _sql_value(value: Any, sql_type: str, convert: Any = None) -> Any:
    """A field's value as psycopg should send it to a parameter of `sql_type`."""
    if convert is not None:
        return convert(value)
    if isinstance(value, tuple):
        value = list(value)
        return [float(v) for v in value] if sql_type.startswith("float8") else value
    return float(value) if sql_type == "float8" else value


def _filter_values(chip_filter: ChipFilter) -> dict[str, Any]:
    """The SQL arguments this filter sets (unset ones are left to the functions' defaults)."""
    types = _sql_types()
    values: dict[str, Any] = {}
    for chip_filter_field in fields(ChipFilter):
        value = getattr(chip_filter, chip_filter_field.name)
        if value is None or value == ():
            continue
        name = sql_parameter(chip_filter_field)
        values[name] = _sql_value(value, types[name], chip_filter_field.metadata.get(SQL_VALUE))
    # Block size and fractions only shape a split: without one they would be noise in `--sql`.
    if chip_filter.split is None and chip_filter.split_buffer is None:
        del values["block_size"], values["split_fractions"]
    elif chip_filter.split_fractions == DEFAULT_SPLIT_FRACTIONS:
        del values["split_fractions"]
    return values


def build_selection(
    chip_filter: ChipFilter,
    sampling: Sampling | None = None,
    *,
    limit: int | None = None,
) -> SelectionQuery:
    """The SELECT for these chips: `stacchip.select_chips(...)` in chip-key order, or a sample.

    A sample comes in sampling order (its first k rows are the sample of k with that seed).
    `limit` cuts the result; with a sample, prefer a smaller `n`, which is cheaper.
    """
    if limit is not None and limit < 0:
        raise SelectionError(f"limit {limit} is negative")
    arguments = _filter_values(chip_filter)
    if sampling is None:
        function = "select_chips"
        order = sql.SQL("\nORDER BY {}").format(sql.SQL(", ").join(map(sql.Identifier, CHIP_KEY)))
    else:
        head: dict[str, Any] = {"n": sampling.n, "seed": sampling.seed}
        if sampling.layer is not None:
            # sql/030: a layer's strata, and quotas, are a function of their own
            function = "sample_chips_by_layer"
            head["layer"] = sampling.layer
            if sampling.quotas:
                head["quotas"] = Jsonb(dict(sampling.quotas))
        elif sampling.by_location:  # sql/040: samples of places
            function = "sample_locations"
            if sampling.stratify_by is not None:
                function += "_stratified"
                head |= {"stratify_by": sampling.stratify_by, "cell_size": sampling.cell_size}
        elif sampling.stratify_by is not None:
            function = "sample_chips_stratified"
            head |= {"stratify_by": sampling.stratify_by, "cell_size": sampling.cell_size}
        else:
            function = "sample_chips"
        arguments = head | arguments
        order = sql.SQL("")
    tail = sql.SQL("\nLIMIT {}").format(sql.Literal(limit)) if limit is not None else sql.SQL("")

    types = _sql_types()

    def call(value_of: Any) -> sql.Composed:
        # A geometry comes as WKT in EPSG:4326.
        args = [
            sql.SQL("ST_GeomFromText({}, 4326)").format(value_of(name, value))
            if types[name] == "geometry"
            else value_of(name, value)
            for name, value in arguments.items()
        ]
        return sql.SQL("SELECT {}\nFROM stacchip.{}(\n    {}\n){}{}").format(
            sql.SQL(", ".join(CHIP_COLUMNS)),
            sql.SQL(function),
            sql.SQL(",\n    ").join(
                sql.SQL("{} => {}").format(sql.SQL(name), arg)
                for name, arg in zip(arguments, args, strict=True)
            ),
            order,
            tail,
        )

    def placeholder(name: str, _value: Any) -> sql.Composable:
        if types[name] == "geometry":
            return sql.Placeholder(name)
        return sql.SQL("{}::{}").format(sql.Placeholder(name), sql.SQL(types[name]))

    def literal(name: str, value: Any) -> sql.Composable:
        # psycopg writes some literals with a cast already ('…'::timestamptz); add ours if not.
        text = sql.Literal(value).as_string(None)
        if types[name] != "geometry" and not text.endswith(f"::{types[name]}"):
            text = f"{text}::{types[name]}"
        return sql.SQL(text)

    return SelectionQuery(
        query=call(placeholder),
        params=dict(arguments),
        inlined=call(literal),
        chip_filter=chip_filter,
        sampling=sampling,
    )


def function_call(
    function: str, chip_filter: ChipFilter, head: dict[str, Any] | None = None
) -> tuple[sql.Composed, dict[str, Any]]:
    """`stacchip.{function}(name => %(name)s::type, …)` with `head`'s arguments first, then the
    filters the `chip_filter` sets, and its parameters: a call of any function that takes the
    selection filters (`sql/040`'s summaries and audit), as `build_selection` calls its own."""
    arguments = (head or {}) | _filter_values(chip_filter)
    types = _sql_types()
    args = []
    for name in arguments:
        if types.get(name) == "geometry":
            args.append(sql.SQL("ST_GeomFromText({}, 4326)").format(sql.Placeholder(name)))
        elif name in types:
            args.append(sql.SQL("{}::{}").format(sql.Placeholder(name), sql.SQL(types[name])))
        else:
            args.append(sql.Placeholder(name))
    call = sql.SQL("stacchip.{}({})").format(
        sql.Identifier(function),
        sql.SQL(", ").join(
            sql.SQL("{} => {}").format(sql.SQL(name), arg)
            for name, arg in zip(arguments, args, strict=True)
        ),
    )
    return call, dict(arguments)


BATCH_ROWS = 10_000
"""Rows `stream_chips` fetches per round trip (and yields per batch)."""

CHIP_SCHEMA = pa.schema([chip_field(name) for name in CHIP_COLUMNS])
"""Arrow types of `CHIP_COLUMNS`; `geometry` is ISO WKB (EPSG:4326)."""


def _session_settings(conn: psycopg.Connection, selection: SelectionQuery) -> None:
    """`SET LOCAL`s of a selection's transaction.

    Filters and unstratified samples run without parallel workers: they read a few thousand
    index-chosen rows, and starting workers costs more than the whole scan (bbox + date + cloud
    at 10 M chips: ~5 ms alone, 20-90 ms with workers on a busy 2-core machine). Stratified
    samples keep them: by cell they rank every matching chip. Readers give up a lock wait
    after `READ_LOCK_TIMEOUT_S` (a bulk load holds the table for minutes).
    """
    if selection.params.get("stratify_by") is None:
        conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
    set_lock_timeout(conn, READ_LOCK_TIMEOUT_S)


def execute_selection(conn: psycopg.Connection, selection: SelectionQuery) -> psycopg.Cursor:
    """Run the selection; the caller fetches (the rows are on the client when this returns).

    Never a prepared statement: its generic plan would not see which filters are unset (they
    fold away only with the values known). The settings (`_session_settings`) are `SET
    LOCAL`: they last until the caller's transaction ends. A lock wait that runs out raises
    `TableLocked`.
    """
    with lock_waits(conn, "selecting chips"), conn.transaction():
        _session_settings(conn, selection)
        return conn.execute(selection.query, selection.params, prepare=False)


def stream_chips(
    conn: psycopg.Connection,
    selection: SelectionQuery,
    *,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[pa.RecordBatch]:
    """The selected chips as Arrow record batches (`CHIP_SCHEMA`) of at most `batch_rows`,
    in the selection's order, through a server-side cursor: memory does not grow with the
    number of chips.

    The rows are read in one transaction (a snapshot) that stays open until the iterator is
    exhausted or closed. A lock wait that runs out raises `TableLocked`.
    """
    if batch_rows < 1:
        raise SelectionError(f"batch_rows {batch_rows} is not a positive number of rows")
    with lock_waits(conn, "selecting chips"), conn.transaction():
        _session_settings(conn, selection)
        # A cursor is planned for its first tenth by default (a fast start at the price of
        # the whole); every row is read here, so plan for all of them, as a plain query is.
        conn.execute("SET LOCAL cursor_tuple_fraction = 1.0")
        with conn.cursor(name="stacchip_selection") as cursor:
            cursor.execute(selection.query, selection.params)
            while rows := cursor.fetchmany(batch_rows):
                yield _chip_batch(rows)


def _chip_batch(rows: list[tuple[Any, ...]]) -> pa.RecordBatch:
    columns = list(zip(*rows, strict=True))
    # the server sends PostGIS's hex EWKB (with SRID); files get plain ISO WKB
    wkb = shapely.to_wkb(shapely.from_wkb(list(columns[-1])), flavor="iso", include_srid=False)
    arrays = [pa.array(values, field.type) for values, field in
              zip([*columns[:-1], list(wkb)], CHIP_SCHEMA, strict=True)]
    return pa.RecordBatch.from_arrays(arrays, schema=CHIP_SCHEMA)


def fetch_chips(conn: psycopg.Connection, selection: SelectionQuery) -> pa.Table:
    """The selected chips as one in-memory Arrow table (`CHIP_SCHEMA`), for small selections;
    large ones: `stream_chips`."""
    return pa.Table.from_batches(list(stream_chips(conn, selection)), schema=CHIP_SCHEMA)


# -- why a selection is empty -----------------------------------------------------------------

# Filters checked one at a time, in this order, by `explain_empty`: the first that matches no
# chip on its own is named. (ChipFilter fields that go together are checked together.)
_ALONE = (
    ("collections",),
    ("chip_size",),
    ("bbox",),
    ("intersects",),
    ("start", "end"),
    ("months",),
    ("quarters",),
    ("max_cloud",),
    ("max_nodata",),
    ("within",),
    ("min_fractions",),
)


def explain_empty(conn: psycopg.Connection, selection: SelectionQuery) -> str:
    """Why `selection` returned no chips, as one line naming the filter that removed them all.

    Run it only once a selection came back empty: it asks the database a few `EXISTS`
    questions (each filter alone, then the split without and with its buffer) and says which
    filter matches nothing by itself (a collection that does not exist, with the closest names
    that do; a bbox outside every chip, or one whose numbers look like lat,lon; a time range,
    size or fraction no chip has) or that the split holds none of the chips the other filters
    keep. When every filter matches chips alone, it says that only their combination is empty.
    """
    f = selection.chip_filter
    sampling = selection.sampling
    if sampling is not None and sampling.n == 0:
        return "the sample size n is 0"
    if f is None:
        return "the query selected no chips"
    if not _exists(conn, ChipFilter()):
        return "the database holds no chips yet: index or ingest items first"
    notes: list[str] = []
    missing = [c for c in f.collections if not _exists(conn, ChipFilter(collections=(c,)))]
    if missing:
        notes.append(_missing_collections(conn, missing))
        if len(missing) == len(f.collections):
            return notes[0]
    for names in _ALONE[1:]:
        alone = ChipFilter(**{name: getattr(f, name) for name in names})
        if alone != ChipFilter() and not _exists(conn, alone):
            return "; ".join([*notes, _no_chip_alone(conn, f, names[0])])
    if f.split is not None:
        kept = _split_reason(conn, f)
        if kept is not None:
            return "; ".join([*notes, kept])
    return "; ".join(
        [*notes, "each filter matches chips on its own, but no chip passes all of them together: "
         "widen one of them"]
    )


def _exists(conn: psycopg.Connection, chip_filter: ChipFilter) -> bool:
    built = build_selection(chip_filter, limit=1)
    query = sql.SQL("SELECT EXISTS ({})").format(built.query)
    return bool(conn.execute(query, built.params, prepare=False).fetchone()[0])


def _missing_collections(conn: psycopg.Connection, missing: Sequence[str]) -> str:
    import difflib

    present = [
        row[0]
        for row in conn.execute(
            "SELECT id FROM pgstac.collections AS c WHERE EXISTS "
            "(SELECT 1 FROM stacchip.chips WHERE collection = c.id) ORDER BY id"
        )
    ]
    names = ", ".join(repr(c) for c in missing)
    text = f"no chips of collection {names}"
    close = sorted({m for c in missing for m in difflib.get_close_matches(c, present, n=2)})
    if close:
        text += f" (did you mean {' or '.join(repr(c) for c in close)}?)"
    shown = ", ".join(present[:10])
    if len(present) > 10:
        shown += f" and {len(present) - 10} more"
    return f"{text}; collections with chips: {shown}"


def _no_chip_alone(conn: psycopg.Connection, f: ChipFilter, name: str) -> str:
    """The line for a filter that alone matches no chip, with what the chips do have."""
    if name == "chip_size":
        sizes = [r[0] for r in conn.execute(
            "SELECT DISTINCT chip_size FROM stacchip.chips ORDER BY 1")]  # fmt: skip
        return f"no chips of size {f.chip_size} px; sizes indexed: {', '.join(map(str, sizes))}"
    if name == "bbox":
        assert f.bbox is not None
        minx, miny, maxx, maxy = f.bbox
        box = ",".join(f"{v:g}" for v in f.bbox)
        swapped = (miny, minx, maxy, maxx)
        if all(abs(v) <= 90 for v in (minx, maxx)) and _exists(conn, ChipFilter(bbox=swapped)):
            return (
                f"bbox {box} is outside every chip, but read as lat,lon it is not: give "
                f"lon,lat order minx,miny,maxx,maxy = {','.join(f'{v:g}' for v in swapped)}"
            )
        return f"bbox {box} is outside every chip; {_extent(conn)}"
    if name == "intersects":
        return f"the intersects geometry is outside every chip; {_extent(conn)}"
    if name == "within":
        match = f" whose {f.within[1]} is {f.within[2]!r}" if len(f.within) == 3 else ""
        return f"no chip intersects a feature of layer {f.within[0]!r}{match}"
    if name == "min_fractions":
        wanted = ", ".join(f"{layer}:{c}>={v:g}" for layer, c, v in f.min_fractions)
        return (
            f"no chip has {wanted} (chips get fractions when a raster layer is added or "
            "refreshed: stacchip-db layer list)"
        )
    if name == "start":
        first, last = conn.execute(
            "SELECT min(datetime), max(datetime) FROM stacchip.chips"
        ).fetchone()
        bounds = [f"on or after {_instant(f.start)}" if f.start else "",
                  f"before {_instant(f.end)}" if f.end else ""]  # fmt: skip
        return (
            f"no chip is dated {' and '.join(b for b in bounds if b)}; chips are dated "
            f"{first.date().isoformat()} to {last.date().isoformat()}"
        )
    if name in ("months", "quarters"):
        field_name = "month" if name == "months" else "quarter"
        have = [r[0] for r in conn.execute(sql.SQL(
            "SELECT DISTINCT extract({} FROM datetime AT TIME ZONE 'UTC')::int "
            "FROM stacchip.chips ORDER BY 1").format(sql.SQL(field_name)))]  # fmt: skip
        asked = ",".join(map(str, getattr(f, name)))
        return f"no chip is from {name} {asked}; chips are from {name} {','.join(map(str, have))}"
    column = "cloud_fraction" if name == "max_cloud" else "nodata_fraction"
    lowest = conn.execute(
        sql.SQL("SELECT min({}) FROM stacchip.chips").format(sql.Identifier(column))
    ).fetchone()[0]
    return f"no chip has {column} <= {getattr(f, name):g}; the lowest is {lowest:.3g}"


def _instant(moment: datetime) -> str:
    """A bound as users write it: the date alone at midnight UTC, else the ISO datetime."""
    if moment.astimezone(UTC).time() == time() and moment.utcoffset() == timedelta(0):
        return moment.date().isoformat()
    return moment.isoformat()


def _extent(conn: psycopg.Connection) -> str:
    """Where the chips are: the bounding box of their items' footprints (cheap, from pgstac)."""
    box = conn.execute(
        "SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e) FROM (SELECT ST_Extent(i.geometry)"
        " AS e FROM pgstac.items AS i WHERE EXISTS (SELECT 1 FROM stacchip.chips AS c "
        "WHERE c.collection = i.collection AND c.item_id = i.id)) AS x"
    ).fetchone()
    minx, miny, maxx, maxy = box
    return f"the chips lie within lon {minx:.4g}..{maxx:.4g}, lat {miny:.4g}..{maxy:.4g}"


def _split_reason(conn: psycopg.Connection, f: ChipFilter) -> str | None:
    """Why the split is empty when the other filters keep chips; None when they keep none."""
    from dataclasses import replace

    others = replace(f, split=None, split_buffer=None)
    built = build_selection(others)
    counts = dict(
        conn.execute(
            sql.SQL(
                "SELECT stacchip.chip_split(geometry, %(_block)s::float8, "
                "%(_fractions)s::float8[]), count(*) FROM ({}) AS chips GROUP BY 1"
            ).format(built.query),
            {**built.params, "_block": f.block_size, "_fractions": list(f.split_fractions)},
            prepare=False,
        ).fetchall()
    )
    total = sum(counts.values())
    if total == 0:
        return None
    if counts.get(f.split, 0) == 0:
        where = ", ".join(f"{n} in {name}" for name, n in sorted(counts.items()))
        return (
            f"split {f.split!r} holds none of the {total} chips the other filters keep ({where}; "
            f"{f.block_size:g}-degree blocks): choose another split, a smaller block size or a "
            "larger area"
        )
    return (
        f"split {f.split!r} has {counts[f.split]} of the {total} chips the other filters keep, "
        f"but all of them come within {f.split_buffer:g} degrees of a block edge (split buffer)"
    )


# -- checking typed values (ChipFilter, Sampling) ---------------------------------------------


def check_bbox(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) in degrees, checked."""
    if len(bbox) != 4:
        raise SelectionError(f"a bbox has 4 numbers minx,miny,maxx,maxy, not {len(bbox)}")
    minx, miny, maxx, maxy = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (minx, miny, maxx, maxy)):
        raise SelectionError("bbox values must be finite numbers")
    if not (-180 <= minx <= 180 and -180 <= maxx <= 180 and -90 <= miny <= 90
            and -90 <= maxy <= 90):
        raise SelectionError(
            f"bbox {minx},{miny},{maxx},{maxy} is not in degrees (lon -180..180, lat -90..90)"
        )
    if minx > maxx or miny > maxy:
        raise SelectionError(
            f"bbox {minx},{miny},{maxx},{maxy} has min > max: give minx,miny,maxx,maxy "
            "(split a box across the antimeridian into two queries)"
        )
    return minx, miny, maxx, maxy


def check_split_fractions(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) != 3:
        raise SelectionError(
            f"split fractions need three numbers train,val,test, not {len(values)}"
        )
    if any(not math.isfinite(v) or v < 0 for v in values) or not math.isclose(
        sum(values), 1.0, abs_tol=1e-9
    ):
        raise SelectionError(
            f"split fractions {','.join(map(str, values))} must be >= 0 and sum to 1 "
            "(e.g. 0.8,0.1,0.1)"
        )
    return float(values[0]), float(values[1]), float(values[2])


def _check_range(what: str, values: Sequence[int], low: int, high: int) -> None:
    bad = [v for v in values if not low <= v <= high]
    if bad:
        raise SelectionError(f"{what} {bad[0]} is out of range: give numbers {low}-{high}")


def _check_degrees(what: str, value: float) -> None:
    if not (math.isfinite(value) and 0 < value <= 360):
        raise SelectionError(f"{what} {value!r} is not a positive number of degrees (<= 360)")


def check_layer_name(name: str, what: str) -> str:
    """A layer's name, checked (`what` names the parameter in messages)."""
    if not LAYER_NAME.fullmatch(name):
        raise SelectionError(
            f"`{what}`: {name!r} is not a layer name (lower-case letters, digits and _, "
            "starting with a letter)"
        )
    return name


def check_within(within: Sequence[str]) -> tuple[str, ...]:
    """`(layer,)` or `(layer, column, value)`, checked."""
    if len(within) not in (1, 3):
        raise SelectionError(
            f"`within` is (layer,) or (layer, column, value), not {len(within)} values"
        )
    check_layer_name(within[0], "within")
    if len(within) == 3 and not within[1]:
        raise SelectionError("`within`: the column name is empty")
    return tuple(within)


def _fractions_json(min_fractions: Sequence[tuple[str, str, float]]) -> dict[str, Any]:
    """`min_fractions` as the SQL parameter's JSON: {"layer": {"class": fraction}}."""
    result: dict[str, dict[str, float]] = {}
    for layer, class_name, fraction in min_fractions:
        per_layer = result.setdefault(layer, {})
        # two thresholds of one class: the stricter holds (both must)
        per_layer[class_name] = max(fraction, per_layer.get(class_name, 0.0))
    return result


def quota_counts(quotas: Sequence[tuple[str, float]], n: int) -> dict[str, int]:
    """round(share * n) per stratum, half up (as the SQL function rounds its numeric)."""
    from decimal import ROUND_HALF_UP, Decimal

    return {
        stratum: int((Decimal(repr(share)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        for stratum, share in quotas
    }


def check_quotas(quotas: Sequence[tuple[str, float]], n: int, *, has_layer: bool) -> None:
    """Quotas need a layer's strata; shares are in (0, 1], sum to at most 1, name each stratum
    once, and their chips fit in `n`."""
    if not has_layer:
        raise SelectionError("`quotas` need strata of a layer: stratify by layer:NAME")
    names = [stratum for stratum, _ in quotas]
    if len(set(names)) != len(names):
        raise SelectionError(f"`quotas` name a stratum twice: {', '.join(names)}")
    for stratum, share in quotas:
        if not stratum:
            raise SelectionError("`quotas`: a stratum name is empty")
        if not (math.isfinite(share) and 0.0 < share <= 1.0):
            raise SelectionError(
                f"`quotas`: share {share!r} of {stratum!r} is not a fraction in (0, 1] "
                "(30% is 0.3)"
            )
    total = sum(share for _, share in quotas)
    if total > 1.0 + 1e-9:
        raise SelectionError(f"`quotas`: the shares add up to {total:g}, more than 1")
    counts = quota_counts(quotas, n)
    if sum(counts.values()) > n:
        raise SelectionError(
            f"`quotas`: the shares round to {sum(counts.values())} chips, more than the sample "
            f"size {n}; lower a share"
        )
