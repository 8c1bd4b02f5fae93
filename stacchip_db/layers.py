"""Auxiliary layers: vector features and categorical rasters that chips are selected by.

A **vector layer** (`add_vector_layer`) is any file or URL geopandas/pyogrio opens (GeoPackage,
FlatGeobuf, GeoParquet, Shapefile, GeoJSON; local, `https://`, `s3://`), loaded into a table
of its own, `stacchip_layers.<name>` (`feature_id`, the kept attribute columns, `geometry` in
EPSG:4326 with a GiST index). Selections take chips intersecting its features (`within`) and
strata from the feature holding a chip's centre (its stratum column: the first `columns`).

A **raster layer** (`add_raster_layer`) is a categorical raster (a COG of classes such as ESA
WorldCover; local, `https://`, `s3://`) registered by its href, with the per-chip class
fractions of every stored chip computed once (`class_fractions.py`: one read per item window,
nearest neighbour, nodata excluded and reported) into `stacchip.chip_classes`. Chips stored
later get theirs from `fill_fractions` (called after `index_items` and each processor scene
stores) or `refresh_layer`, which computes only what is missing.

`stacchip.layers` is the registry (alembic 0009). Adding a layer is one transaction: a source
that cannot be read, a raster that is not categorical or any failure while loading leaves
nothing behind.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from stacchip_db.class_fractions import SAMPLES, ChipClasses, check_class_raster, chip_classes
from stacchip_db.db.items import stored_items
from stacchip_db.errors import StacchipError
from stacchip_db.grid import chip_grid
from stacchip_db.selection import LAYER_NAME
from stacchip_db.signing import sign_href
from stacchip_db.text import first_line, plural

log = logging.getLogger(__name__)

LAYER_SCHEMA = "stacchip_layers"
"""The schema of the vector layers' tables (alembic 0009)."""
VECTOR, RASTER = "vector", "raster"
RESERVED_COLUMNS = ("feature_id", "geometry")
"""Columns every vector layer table has; an attribute of the same name is refused."""
CLASS_NAME = "[A-Za-z0-9_.-]+"
"""A class name: what `--class NAME:CLASS>=F` and `--quota CLASS=SHARE` can spell."""
ITEMS_PER_BATCH = 200
"""Items whose fractions are computed and written together."""


class LayerError(StacchipError):
    """A layer cannot be added, found, read or used."""


@dataclass(frozen=True)
class Layer:
    """One row of `stacchip.layers`; `chips` is the number of chips with fractions (raster)."""

    name: str
    kind: str
    source: str
    columns: tuple[str, ...] = ()
    stratum_column: str | None = None
    classes: tuple[tuple[int, str], ...] = ()
    nodata: float | None = None
    features: int | None = None
    added_at: datetime | None = None
    chips: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "columns": list(self.columns),
            "stratum_column": self.stratum_column,
            "classes": {str(value): name for value, name in self.classes},
            "nodata": self.nodata,
            "features": self.features,
            "chips": self.chips,
            "added_at": self.added_at.isoformat() if self.added_at else None,
        }


@dataclass
class FractionSummary:
    """What computing a raster layer's fractions did."""

    layer: str
    chips: int = 0
    items: int = 0
    chips_with_nodata: int = 0
    nodata_sum: float = 0.0
    items_without_stac: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> str:
        text = (
            f"layer {self.layer}: class fractions of {plural(self.chips, 'chip')} of "
            f"{plural(self.items, 'item')} in {self.seconds:.1f} s"
        )
        if self.chips_with_nodata:
            mean = self.nodata_sum / self.chips
            text += (
                f"; {plural(self.chips_with_nodata, 'chip')} partly nodata (excluded from the "
                f"fractions; mean nodata fraction {mean:.3f})"
            )
        if self.items_without_stac:
            text += (
                f"; {plural(len(self.items_without_stac), 'item')} skipped, not in pgstac "
                f"(e.g. {self.items_without_stac[0]})"
            )
        return text


# -- the registry -----------------------------------------------------------------------------

_SELECT_LAYERS = """
SELECT l.name, l.kind, l.source, l.columns, l.stratum_column, l.class_values, l.class_names,
       l.nodata, l.features, l.added_at,
       CASE WHEN l.kind = 'raster' THEN
           (SELECT count(*) FROM stacchip.chip_classes AS f WHERE f.layer = l.name) END
FROM stacchip.layers AS l
"""


def _layer(row: Sequence[Any]) -> Layer:
    values, names = row[5] or [], row[6] or []
    return Layer(
        name=row[0], kind=row[1], source=row[2], columns=tuple(row[3] or ()),
        stratum_column=row[4], classes=tuple(zip(values, names, strict=True)), nodata=row[7],
        features=row[8], added_at=row[9], chips=row[10],
    )  # fmt: skip


def list_layers(conn: psycopg.Connection) -> list[Layer]:
    """Every layer, by name."""
    return [_layer(row) for row in conn.execute(_SELECT_LAYERS + " ORDER BY l.name")]


def get_layer(conn: psycopg.Connection, name: str) -> Layer:
    """The layer `name`; `LayerError` naming `name` when there is none."""
    row = conn.execute(_SELECT_LAYERS + " WHERE l.name = %s", (name,)).fetchone()
    if row is None:
        known = [layer.name for layer in list_layers(conn)]
        raise LayerError(
            f"unknown layer {name!r} (`name`); layers: {', '.join(known) or 'none yet'}"
        )
    return _layer(row)


def _check_new_name(conn: psycopg.Connection, name: str) -> None:
    if not LAYER_NAME.fullmatch(name):
        raise LayerError(
            f"layer name {name!r} (`name`) must be lower-case letters, digits and _, starting "
            "with a letter (at most 63 characters)"
        )
    if conn.execute("SELECT 1 FROM stacchip.layers WHERE name = %s", (name,)).fetchone():
        raise LayerError(
            f"layer {name!r} (`name`) exists already: remove it first (stacchip-db layer remove "
            f"{name}) or choose another name"
        )


def remove_layer(conn: psycopg.Connection, name: str) -> Layer:
    """Drop a layer: its table (vector) or its fractions (raster) and its registry row."""
    with conn.transaction():
        layer = get_layer(conn, name)
        if layer.kind == VECTOR:
            conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(LAYER_SCHEMA, name))
            )
        conn.execute("DELETE FROM stacchip.chip_classes WHERE layer = %s", (name,))
        conn.execute("DELETE FROM stacchip.layers WHERE name = %s", (name,))
    return layer


def _grant_to_query_login(conn: psycopg.Connection, name: str) -> None:
    """The restricted login that runs user SQL (sql/020) may read the new table."""
    row = conn.execute(
        "SELECT q.role FROM stacchip.query_login AS q JOIN pg_roles AS r ON r.rolname = q.role"
    ).fetchone()
    if row is None:
        return
    conn.execute(
        sql.SQL("GRANT SELECT ON {} TO {}").format(
            sql.Identifier(LAYER_SCHEMA, name), sql.Identifier(row[0])
        )
    )


# -- vector layers ----------------------------------------------------------------------------


def _read_vector(source: str) -> Any:
    import geopandas  # only here: a second of import time

    try:
        return geopandas.read_file(source)
    except Exception as exc:  # pyogrio/GDAL raise many types for unreadable sources
        raise LayerError(
            f"layer source {source} (`source`) cannot be read: {first_line(exc)[:300]}; give a "
            "path or URL of a vector file geopandas opens (.gpkg, .fgb, .parquet, .shp, .geojson)"
        ) from exc


def _sql_type(dtype: Any) -> str:
    """The column type of a pandas dtype (anything unusual is text)."""
    kind = getattr(dtype, "kind", "O")
    if kind in "iu":
        return "bigint"
    if kind == "f":
        return "double precision"
    if kind == "b":
        return "boolean"
    if kind == "M":
        return "timestamptz"
    return "text"


def _plain(value: Any) -> Any:
    """A cell as COPY takes it: numpy scalars as Python values; NaN, NaT and NA as NULL."""
    if value is None:
        return None
    try:
        if value != value:  # NaN and NaT are not equal to themselves
            return None
    except (TypeError, ValueError):  # pandas' NA has no truth value: missing
        return None
    if hasattr(value, "to_pydatetime"):
        return value.to_pydatetime()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def add_vector_layer(
    conn: psycopg.Connection, name: str, source: str, *, columns: Sequence[str] = ()
) -> Layer:
    """Load the vector layer at `source` as `stacchip_layers.<name>`.

    `columns`: the attribute columns kept, the first being the layer's stratum column (for
    stratified samples); none = every attribute column, and no stratum column. Geometries are
    reprojected to EPSG:4326 (a layer without CRS must be in lon/lat), invalid ones made valid,
    empty ones dropped. One transaction: on any error nothing is left.
    """
    import shapely

    _check_new_name(conn, name)
    frame = _read_vector(source)
    geometry_name = frame.geometry.name
    attributes = [str(c) for c in frame.columns if c != geometry_name]
    keep = list(columns) if columns else attributes
    missing = [c for c in keep if c not in attributes]
    if missing:
        raise LayerError(
            f"layer source {source} has no column {', '.join(map(repr, missing))} (`columns`); "
            f"its columns: {', '.join(attributes) or 'none'}"
        )
    if len(set(keep)) != len(keep):
        raise LayerError(f"`columns` names a column twice: {', '.join(keep)}")
    clash = [c for c in keep if c.lower() in RESERVED_COLUMNS]
    if clash:
        raise LayerError(
            f"layer source {source} has a column {clash[0]!r}, a name the layer table uses "
            f"itself; keep other columns with `columns`"
        )
    if frame.crs is None:
        bounds = frame.total_bounds
        if len(frame) and not (-180 <= bounds[0] <= bounds[2] <= 180
                               and -90 <= bounds[1] <= bounds[3] <= 90):  # fmt: skip
            raise LayerError(
                f"layer source {source} has no CRS and its coordinates are not degrees; "
                "give a file with a CRS"
            )
    elif frame.crs.to_epsg() != 4326:
        frame = frame.to_crs(4326)
    geometries = frame.geometry.values
    keep_rows = ~(shapely.is_missing(geometries) | shapely.is_empty(geometries))
    invalid = keep_rows & ~shapely.is_valid(geometries)
    if invalid.any():
        geometries = geometries.copy()
        geometries[invalid] = shapely.make_valid(geometries[invalid])
    dropped = int((~keep_rows).sum())
    table = sql.Identifier(LAYER_SCHEMA, name)
    definitions = [sql.SQL("feature_id bigint PRIMARY KEY")] + [
        sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(_sql_type(frame[c].dtype)))
        for c in keep
    ] + [sql.SQL("geometry geometry(Geometry, 4326) NOT NULL")]
    with conn.transaction():
        conn.execute(sql.SQL("CREATE TABLE {} ({})").format(table, sql.SQL(", ").join(definitions)))
        names = sql.SQL(", ").join(
            sql.Identifier(c) for c in ["feature_id", *keep, "geometry"]
        )
        wkb = shapely.to_wkb(shapely.set_srid(geometries, 4326), hex=True, include_srid=True)
        records = frame[keep].itertuples(index=False, name=None) if keep else iter(
            [()] * len(frame)
        )
        with conn.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(table, names)) as copy:
            for number, (values, ewkb, wanted) in enumerate(
                zip(records, wkb, keep_rows, strict=True)
            ):
                if wanted:
                    copy.write_row([number, *(_plain(v) for v in values), ewkb])
        conn.execute(
            sql.SQL("CREATE INDEX {} ON {} USING gist (geometry)").format(
                sql.Identifier(f"{name}_geometry_idx"), table
            )
        )
        conn.execute(sql.SQL("ANALYZE {}").format(table))
        features = len(frame) - dropped
        conn.execute(
            "INSERT INTO stacchip.layers (name, kind, source, columns, stratum_column, features) "
            "VALUES (%s, 'vector', %s, %s, %s, %s)",
            (name, source, keep, columns[0] if columns else None, features),
        )
        _grant_to_query_login(conn, name)
    if dropped:
        log.warning("layer %s: %s without geometry left out", name, plural(dropped, "feature"))
    return get_layer(conn, name)


# -- raster layers ----------------------------------------------------------------------------


def _open_raster(source: str) -> Any:
    import rasterio

    try:
        return rasterio.open(sign_href(source))
    except Exception as exc:  # rasterio/GDAL: RasterioIOError, CPLE_*…
        raise LayerError(
            f"layer source {source} (`source`) cannot be read as a raster: "
            f"{first_line(exc)[:300]}; give a path or URL of a categorical GeoTIFF/COG"
        ) from exc


def _check_classes(classes: Mapping[int, str]) -> list[tuple[int, str]]:
    import re

    pairs = [(int(value), str(name)) for value, name in classes.items()]
    bad = [name for _, name in pairs if not re.fullmatch(CLASS_NAME, name)]
    if bad:
        raise LayerError(
            f"class name {bad[0]!r} (`classes`) must be letters, digits, _, . or - only"
        )
    names = [name for _, name in pairs]
    if len(set(names)) != len(names):
        raise LayerError(f"`classes` name a class twice: {', '.join(names)}")
    return pairs


def add_raster_layer(
    conn: psycopg.Connection,
    name: str,
    source: str,
    *,
    classes: Mapping[int, str] | None = None,
    samples: int = SAMPLES,
) -> tuple[Layer, FractionSummary]:
    """Register the categorical raster at `source` and compute the class fractions of every
    stored chip (`samples` x `samples` points per chip).

    `classes` maps pixel values to class names (`{10: "tree", 20: "shrub"}`); a value not
    named there is a class named by its number. The raster's nodata value (and any point off
    the raster) is in no class: each chip's `nodata_fraction` reports its share. One
    transaction: on any error nothing is left.
    """
    _check_new_name(conn, name)
    pairs = _check_classes(classes or {})
    if samples < 1:
        raise LayerError(f"`samples` {samples} is not a positive number of points")
    with _open_raster(source) as dataset:
        _check_raster(dataset, source)
        with conn.transaction():
            conn.execute(
                "INSERT INTO stacchip.layers (name, kind, source, class_values, class_names, "
                "nodata) VALUES (%s, 'raster', %s, %s, %s, %s)",
                (name, source, [v for v, _ in pairs], [n for _, n in pairs], dataset.nodata),
            )
            summary = _fill(conn, get_layer(conn, name), dataset, items=None, samples=samples)
    return get_layer(conn, name), summary


def _check_raster(dataset: Any, source: str) -> None:
    try:
        check_class_raster(dataset, source)
    except StacchipError as exc:
        raise LayerError(str(exc)) from exc


def refresh_layer(
    conn: psycopg.Connection, name: str, *, samples: int = SAMPLES
) -> FractionSummary:
    """Compute the class fractions of the stored chips that have none yet for raster layer
    `name` (vector layers need nothing: they are read when selecting)."""
    layer = get_layer(conn, name)
    if layer.kind != RASTER:
        return FractionSummary(layer=name)
    with _open_raster(layer.source) as dataset:
        _check_raster(dataset, layer.source)
        with conn.transaction():
            return _fill(conn, layer, dataset, items=None, samples=samples)


def fill_fractions(
    conn: psycopg.Connection, *, items: Iterable[tuple[str, str]] | None = None
) -> list[FractionSummary]:
    """The missing class fractions of every raster layer, for the chips of `items`
    (`(collection, item_id)` pairs; None: every chip). What runs after chips are stored; a
    database without raster layers costs one query."""
    names = [r[0] for r in conn.execute(
        "SELECT name FROM stacchip.layers WHERE kind = 'raster' ORDER BY name")]  # fmt: skip
    if not names:
        return []
    wanted = None if items is None else sorted(set(items))
    summaries = []
    for name in names:
        layer = get_layer(conn, name)
        with _open_raster(layer.source) as dataset, conn.transaction():
            summaries.append(_fill(conn, layer, dataset, items=wanted, samples=SAMPLES))
    return summaries


_PENDING = """
SELECT c.collection, c.item_id, c.chip_size,
       array_agg(c.chip_index_x ORDER BY c.chip_index_y, c.chip_index_x),
       array_agg(c.chip_index_y ORDER BY c.chip_index_y, c.chip_index_x)
FROM stacchip.chips AS c
WHERE {items}
  NOT EXISTS (SELECT 1 FROM stacchip.chip_classes AS f
              WHERE f.layer = %(layer)s AND f.collection = c.collection
                AND f.item_id = c.item_id AND f.chip_size = c.chip_size
                AND f.chip_index_x = c.chip_index_x AND f.chip_index_y = c.chip_index_y)
GROUP BY c.collection, c.item_id, c.chip_size
ORDER BY c.collection, c.item_id, c.chip_size
"""


def _fill(
    conn: psycopg.Connection,
    layer: Layer,
    dataset: Any,
    *,
    items: Sequence[tuple[str, str]] | None,
    samples: int,
) -> FractionSummary:
    """Fractions of the chips of `layer` that have none (of `items` only, when given)."""
    started = time.perf_counter()
    summary = FractionSummary(layer=layer.name)
    params: dict[str, Any] = {"layer": layer.name}
    where = ""
    if items is not None:
        if not items:
            return summary
        where = ("(c.collection, c.item_id) IN (SELECT * FROM unnest("
                 "%(collections)s::text[], %(ids)s::text[])) AND")  # fmt: skip
        params |= {"collections": [c for c, _ in items], "ids": [i for _, i in items]}
    pending = conn.execute(_PENDING.format(items=where), params).fetchall()
    names = dict(layer.classes)
    order = {value: position for position, (value, _) in enumerate(layer.classes)}
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS stacchip_classes_in (collection text, item_id text, "
        "chip_size int, chip_index_x int, chip_index_y int, fractions jsonb, dominant text, "
        "nodata_fraction real) ON COMMIT DROP"
    )
    for start in range(0, len(pending), ITEMS_PER_BATCH):
        batch = pending[start : start + ITEMS_PER_BATCH]
        stac = stored_items(conn, [(r[0], r[1]) for r in batch])
        rows = []
        for collection, item_id, chip_size, xs, ys in batch:
            item = stac.get((collection, item_id))
            if item is None:
                summary.items_without_stac.append(f"{collection}/{item_id}")
                continue
            grid = chip_grid(item, chip_size=chip_size, max_chips=None)
            try:
                counted = chip_classes(
                    grid, dataset, list(zip(xs, ys, strict=True)), samples=samples
                )
            except StacchipError as exc:
                raise LayerError(f"layer {layer.name}: {exc}") from exc
            rows += _rows(collection, item_id, chip_size, xs, ys, counted, names, order)
            summary.items += 1
            summary.chips += len(xs)
            summary.chips_with_nodata += int((counted.nodata > 0).sum())
            summary.nodata_sum += float(counted.nodata.sum()) / counted.points
            for value in counted.values.tolist():
                if value not in names:  # a class the layer did not name: named by its value
                    names[value] = str(value)
                    order[value] = len(order)
        if rows:
            with conn.cursor().copy("COPY stacchip_classes_in FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            conn.execute(
                "INSERT INTO stacchip.chip_classes (layer, collection, item_id, chip_size, "
                "chip_index_x, chip_index_y, sample_key, fractions, dominant, nodata_fraction) "
                "SELECT %s, i.collection, i.item_id, i.chip_size, i.chip_index_x, i.chip_index_y,"
                " stacchip.chip_sample_key(i.collection, i.item_id, i.chip_size, i.chip_index_x,"
                " i.chip_index_y), i.fractions, i.dominant, i.nodata_fraction "
                "FROM stacchip_classes_in AS i ON CONFLICT DO NOTHING",
                (layer.name,),
            )
            conn.execute("TRUNCATE stacchip_classes_in")
    if len(names) > len(layer.classes):
        values = sorted(names, key=lambda v: order[v])
        conn.execute(
            "UPDATE stacchip.layers SET class_values = %s, class_names = %s WHERE name = %s",
            (values, [names[v] for v in values], layer.name),
        )
    summary.seconds = time.perf_counter() - started
    if summary.items_without_stac:
        log.warning(
            "layer %s: %s without a pgstac item skipped (their grids are unknown)",
            layer.name, plural(len(summary.items_without_stac), "item"),
        )  # fmt: skip
    return summary


def _rows(
    collection: str,
    item_id: str,
    chip_size: int,
    xs: Sequence[int],
    ys: Sequence[int],
    counted: ChipClasses,
    names: Mapping[int, str],
    order: Mapping[int, int],
) -> list[tuple[Any, ...]]:
    """COPY rows of `stacchip_classes_in`: fractions as JSON, the dominant class, nodata."""
    values = counted.values.tolist()
    labels = [names.get(v, str(v)) for v in values]
    # Ties go to the class listed first (then the lower value): the same on every run.
    rank = np.array([order.get(v, len(order) + i) for i, v in enumerate(values)])
    by_rank = np.argsort(rank, kind="stable")
    points = counted.points
    rows = []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        counts = counted.counts[i]
        fractions = {labels[j]: counts[j] / points for j in np.flatnonzero(counts).tolist()}
        dominant = None
        if fractions:
            dominant = labels[by_rank[int(np.argmax(counts[by_rank]))]]
        rows.append((
            collection, item_id, chip_size, x, y, json.dumps(fractions), dominant,
            float(counted.nodata[i]) / points,
        ))  # fmt: skip
    return rows
