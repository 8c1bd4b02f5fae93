"""Per-chip cloud and nodata fractions from a scene's quality band.

A rule says which asset holds the quality band and how its values map to per-pixel codes
(bit 0: cloud, bit 1: nodata). `chip_fractions` reads that band once, at its own resolution
and only over the chipped part of the scene, turns it into codes with a lookup table and sums
the codes per chip with reshape + sum, a chip row at a time: no per-chip Python loop, no
per-chip file access, and no upsampling of a 20 m band to the 10 m grid (the fractions are
those of a nearest-neighbour upsampling, at a quarter of the memory).

| rule | asset (as Earth Search v1 keys it) | nodata | cloud |
| --- | --- | --- | --- |
| `s2` | `scl` | class 0 | classes 1, 3, 8, 9, 10 |
| `landsat` | `qa_pixel` | bit 0 | bits 1, 3, 4 (dilated cloud, cloud, shadow) |
| `modis` | `sur_refl_qc_500m` | bits 0 and 1 set | bit 0 set, bit 1 clear |
| `nodata_value_rule(asset, v)` | any | band 1 == v | never |
| `none` | - | never | never |

The MODIS row follows the original stacchip's code (bits 0-1 == 0b01); see `MODIS_RULE`.

Which rule and which asset key an item gets is `choose_rule`'s: `auto` asks the sensor
registry (`sensors.profile_for`) for the item's sensor and catalog layout, so Planetary
Computer's `SCL` is read with the `s2` rule as Earth Search's `scl` is. Whatever the rule,
pixels outside the item's geometry are nodata (`chip_fractions`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.features import rasterize

from stacchip_db.errors import StacchipError
from stacchip_db.grid import ChipGrid, ItemView, item_view, outside_footprint
from stacchip_db.sensors import Profile, asset_nodata, find_asset, profile_for, quality_keys
from stacchip_db.signing import sign_href

CLOUD = np.uint8(1)
"""Code bit of a cloudy pixel."""
NODATA = np.uint8(2)
"""Code bit of a pixel without data."""


READ_THREADS = os.environ.get("GDAL_NUM_THREADS", "ALL_CPUS")
"""GDAL decoding threads for the quality band (one large multi-tile read: decoding dominates)."""


class QualityError(StacchipError):
    """The quality band is missing, unreadable or does not fit the chip grid."""


@dataclass(frozen=True, eq=False)
class QualityRule:
    """How to get per-pixel cloud/nodata codes for one kind of scene.

    `asset` is the key of the quality asset (None: no band, every fraction is 0); `classify`
    maps a 2D array of that band to uint8 codes of the same shape (bit 0 cloud, bit 1 nodata).
    `pair_lut`, optional, is a fast path for uint8 bands: 65536 codes of two horizontally
    adjacent pixels read as one uint16 (bits 0-1: their cloud count, bits 2-3: their nodata
    count), which halves the lookups, the biggest cost of a Sentinel-2 index. `fill`, a band
    value the rule reads as nodata, is what pixels outside the item's geometry become.
    """

    name: str
    asset: str | None
    classify: Callable[[np.ndarray], np.ndarray] | None
    pair_lut: np.ndarray | None = None
    fill: float | None = None


def lookup_classifier(lut: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Classifier mapping integer pixel values through `lut` (length a power of two).

    Values are masked with `len(lut) - 1` first, so a 32-entry table looks at bits 0-4 only.
    One table lookup per pixel is several times faster than `np.isin` or a chain of bit tests.
    `np.take` copies the indices to intp first (8 bytes a pixel): apply it to a chip row at a
    time (as `band_fractions` does), not to a whole band.
    """
    lut = np.ascontiguousarray(lut, dtype=np.uint8)
    size = len(lut)
    if size < 2 or size & (size - 1):
        raise ValueError(f"lookup table length {size} is not a power of two >= 2")
    mask = size - 1

    def classify(values: np.ndarray) -> np.ndarray:
        if values.dtype.kind not in "ui":
            raise QualityError(
                f"quality band has data type {values.dtype}, expected integers; check the asset"
            )
        if values.dtype == np.uint8 and size == 256:
            return np.take(lut, values)
        return np.take(lut, values & values.dtype.type(mask))

    return classify


def class_rule(name: str, asset: str, *, nodata: set[int], cloud: set[int]) -> QualityRule:
    """Rule for a classification band (values 0..255): listed classes are nodata or cloud."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[sorted(cloud)] |= CLOUD
    lut[sorted(nodata)] |= NODATA
    pair = np.arange(2**16)
    clouds = lut & CLOUD
    nodatas = lut >> 1
    pair_lut = (clouds[pair & 0xFF] + clouds[pair >> 8]) | (
        (nodatas[pair & 0xFF] + nodatas[pair >> 8]) << 2
    )
    fill = min(nodata) if nodata else None
    return QualityRule(name, asset, lookup_classifier(lut), pair_lut.astype(np.uint8), fill)


def bits_rule(name: str, asset: str, *, bits: int, code: Callable[[int], int]) -> QualityRule:
    """Rule for a bit-flag band: `code(v)` gives the code of the low `bits` bits' value `v`."""
    lut = np.array([code(v) for v in range(1 << bits)], dtype=np.uint8)
    fill = next((v for v in range(1 << bits) if lut[v] == NODATA), None)
    return QualityRule(name, asset, lookup_classifier(lut), fill=fill)


def nodata_value_rule(asset: str, value: float, *, name: str = "nodata") -> QualityRule:
    """Rule for scenes without a cloud band (LINZ, Sentinel-1): nodata where band 1 == value.

    A NaN `value` matches NaN pixels. Never reports clouds.
    """

    def classify(values: np.ndarray) -> np.ndarray:
        hit = np.isnan(values) if math.isnan(value) else values == value
        return hit.view(np.uint8) * NODATA

    return QualityRule(name, asset, classify, fill=value)


S2_RULE = class_rule("s2", "scl", nodata={0}, cloud={1, 3, 8, 9, 10})
"""Sentinel-2 L2A scene classification: 0 no data; 1 saturated/defective, 3 cloud shadow,
8/9 cloud medium/high probability, 10 thin cirrus."""

LANDSAT_RULE = bits_rule(
    "landsat",
    "qa_pixel",
    bits=5,
    code=lambda v: (NODATA if v & 0b1 else 0) | (CLOUD if v & 0b11010 else 0),
)
"""Landsat Collection 2 QA_PIXEL: bit 0 fill; bits 1, 3, 4 dilated cloud, cloud, cloud shadow."""

MODIS_RULE = bits_rule(
    "modis",
    "sur_refl_qc_500m",
    bits=2,
    code=lambda v: {0b11: NODATA, 0b01: CLOUD}.get(v, 0),
)
"""MODIS MOD09A1 500 m QC, MODLAND bits 0-1, as the original stacchip reads them: 0b11 nodata,
0b01 cloud. (The MOD09 user guide calls 0b10 "not produced due to cloud" and 0b01 "less than
ideal quality"; this rule keeps the original's reading so that indexes agree.)"""

NONE_RULE = QualityRule("none", None, None)
"""No quality band (NAIP): every chip is cloud- and nodata-free."""

RULES: dict[str, QualityRule] = {}
"""Named rules usable as `quality=` in `index_item` and on the command line."""

AUTO_ORDER = ("s2", "landsat", "modis")
"""Rules `auto` tries, in order: the first whose asset the item has wins, else `none`."""


def register_rule(rule: QualityRule) -> QualityRule:
    """Add (or replace) a named rule, e.g. a processor's `nodata_value_rule`."""
    RULES[rule.name] = rule
    return rule


for _rule in (S2_RULE, LANDSAT_RULE, MODIS_RULE, NONE_RULE):
    register_rule(_rule)


class NoQualityBandWarning(UserWarning):
    """`quality='auto'` found no quality band: fractions come from the footprint alone."""


@dataclass(frozen=True)
class QualityChoice:
    """The rule an item is indexed with, and why.

    `profile` names the recognised sensor and catalog layout (None: not recognised);
    `found` is False when `auto` looked for a quality band and found none, so cloud fractions
    are 0 and nodata comes only from the item's geometry (`warning` says so).
    """

    rule: QualityRule
    profile: str | None = None
    found: bool = True
    warning: str | None = None


def _bound(rule: QualityRule, asset: str) -> QualityRule:
    """`rule` reading asset `asset` (the same object when the key is the rule's own)."""
    return rule if rule.asset == asset else replace(rule, asset=asset)


def profile_rule(profile: Profile, item: Any = None, *, asset: str | None = None) -> QualityRule:
    """The quality rule of a recognised sensor, on the item's own key for its quality asset.

    Without `item`, on the layout's key. `nodata` sensors (Sentinel-1, LINZ) read the value
    from the asset's `raster:bands`, else take the sensor's. Raises QualityError when the
    item has no such asset.
    """
    sensor, layout = profile.sensor, profile.layout
    if sensor.quality == "none" and asset is None:
        return NONE_RULE
    fields: Mapping[str, Any] = {}
    key = asset or layout.quality_asset
    if item is not None and key is not None:
        view = item_view(item)
        found = find_asset(view.assets, key)
        if found is None:
            raise QualityError(
                f"item {view.id}: {profile.name} keeps its quality band in asset {key!r}, which "
                f"the item does not have (assets: {', '.join(sorted(view.assets))}); name the "
                "band with `quality_asset` or pick another `quality` rule"
            )
        key, fields = found, view.assets[found]
    if key is None or sensor.quality == "none":
        raise QualityError(f"{profile.name} has no quality rule for asset {asset!r}")
    if sensor.quality == "nodata":
        return nodata_value_rule(key, asset_nodata(fields, sensor.nodata), name=sensor.rule_name)
    return _bound(RULES[sensor.quality], key)


def _known_band(rule: QualityRule, assets: Mapping[str, Any]) -> str | None:
    """The item's key of `rule`'s band under any name a catalog gives it (scl, SCL, …)."""
    for key in dict.fromkeys([rule.asset, *quality_keys(rule.name)]):
        found = find_asset(assets, key) if key else None
        if found is not None:
            return found
    return None


def choose_rule(
    quality: str | QualityRule, item: Any, *, quality_asset: str | None = None
) -> QualityChoice:
    """The rule for `item`: a rule, a registered name, or `auto` (from the item's profile).

    `auto` takes the rule of the sensor and catalog layout `sensors.profile_for` recognises,
    on the item's key for its quality band (`SCL` on Planetary Computer, `scl` on Earth
    Search); for an unknown layout the first rule whose band the item has under a name some
    catalog uses; else none, with a warning in the choice. A named rule reads its band under
    any of those names. `quality_asset` names the quality band's key when none of them fits.
    """
    view = item_view(item)
    if isinstance(quality, QualityRule):
        return QualityChoice(_bound(quality, quality_asset) if quality_asset else quality)
    profile = profile_for(view)
    profile_name = None if profile is None else profile.name
    if quality == "auto":
        # A known sensor without a quality band (NAIP) given an asset: find a rule by its name.
        if profile is not None and not (profile.sensor.quality == "none" and quality_asset):
            return _profile_choice(profile, view, quality_asset)
        for name in AUTO_ORDER:
            if quality_asset is not None:
                if quality_asset in quality_keys(name) or quality_asset == RULES[name].asset:
                    return QualityChoice(_bound(RULES[name], quality_asset), profile_name)
                continue
            found = _known_band(RULES[name], view.assets)
            if found is not None:
                return QualityChoice(_bound(RULES[name], found), profile_name)
        if quality_asset is not None:
            raise QualityError(
                f"item {view.id}: `quality_asset` {quality_asset!r} is given but no rule is known "
                f"for it; pass `quality` as one of {', '.join(sorted(RULES))}"
            )
        return _none_found(view, profile_name, "no asset of a known quality band")
    if quality not in RULES:
        raise QualityError(
            f"unknown quality rule {quality!r}; use auto or one of {', '.join(sorted(RULES))}"
        )
    rule = RULES[quality]
    if rule.asset is None:
        return QualityChoice(rule, profile_name)
    key = quality_asset or _known_band(rule, view.assets)
    return QualityChoice(_bound(rule, key) if key else rule, profile_name)


def _profile_choice(profile: Profile, view: ItemView, quality_asset: str | None) -> QualityChoice:
    key = profile.layout.quality_asset
    wanted = quality_asset is None and profile.sensor.quality != "none"
    if wanted and (key is None or find_asset(view.assets, key) is None):
        return _none_found(view, profile.name, f"{profile.name} keeps it in {key!r}")
    return QualityChoice(profile_rule(profile, view, asset=quality_asset), profile.name)


def _none_found(view: ItemView, profile: str | None, why: str) -> QualityChoice:
    where = f"collection {view.collection!r}" if view.collection else "items without collection"
    warning = (
        f"{where}: quality auto found no quality band ({why}): cloud fractions are 0 and "
        "nodata comes only from the item geometry; name the band with `quality_asset` or pick "
        "a `quality` rule"
    )
    return QualityChoice(NONE_RULE, profile, found=False, warning=warning)


def resolve_rule(
    quality: str | QualityRule, item: Any, *, quality_asset: str | None = None
) -> QualityRule:
    """The rule object for `quality` (see `choose_rule`)."""
    return choose_rule(quality, item, quality_asset=quality_asset).rule


def band_fractions(
    band: np.ndarray, rule: QualityRule, ny: int, nx: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-chip `(cloud_fraction, nodata_fraction)`, float32 `(ny, nx)`, of a quality band.

    `band` covers exactly `ny x nx` chips (its block size is inferred from its shape). It is
    classified one chip row at a time, each row's chips reduced at once by reshape + sum: the
    row's temporaries (codes, np.take's index copy) stay in the CPU cache and the memory on
    top of the band stays at one chip row, where classifying the whole band at once would
    double it and run slower.
    """
    if rule.classify is None:
        raise ValueError(f"quality rule {rule.name!r} has no classifier")
    cy, cx = band.shape[0] // ny, band.shape[1] // nx
    if (cy * ny, cx * nx) != band.shape:
        raise ValueError(f"band of shape {band.shape} does not split into {ny} x {nx} chips")
    pairs = (
        rule.pair_lut is not None
        and band.dtype == np.uint8
        and cx % 2 == 0
        and band.strides[1] == 1
        and band.strides[0] % 2 == 0
    )
    # codes: per pixel, bit 0 cloud and bit 1 nodata; per pair, 2-bit counts of each.
    shift, per_code = (2, 2) if pairs else (1, 1)
    low_bits = np.uint8((1 << shift) - 1)
    column_dtype = np.uint16 if cy * per_code < 2**16 else np.uint32
    counts = np.empty((2, ny, nx), dtype=np.uint64)
    for row in range(ny):
        strip = band[row * cy : (row + 1) * cy]
        codes = np.take(rule.pair_lut, strip.view(np.uint16)) if pairs else rule.classify(strip)
        for i, part in enumerate((codes & low_bits, codes >> shift)):
            # Down the rows first (contiguous vertical adds vectorise well), then across.
            columns = part.sum(axis=0, dtype=column_dtype)
            counts[i, row] = columns.reshape(nx, cx // per_code).sum(axis=1, dtype=np.uint64)
    fractions = (counts / float(cy * cx)).astype(np.float32)
    return fractions[0], fractions[1]


def read_quality_band(grid: ChipGrid, href: str, *, asset: str = "quality") -> np.ndarray:
    """Band 1 of `href` over the chipped area (maybe a view), at its own resolution if possible.

    When the band's grid is the item's grid coarsened by integer factors that divide the chip
    size, the array has `chip_size / factor` pixels per chip; otherwise it is resampled
    (nearest) onto the finest grid, as the original stacchip always did. Windows reaching past
    the file's edge are filled with the file's nodata value (or 0).
    """
    where = f"asset {asset!r} ({href})"
    try:
        # Planetary Computer blobs need a SAS token appended (`signing`; the error names
        # the plain href).
        signed = sign_href(href)
        with rasterio.Env(GDAL_NUM_THREADS=READ_THREADS), rasterio.open(signed) as src:
            window = grid.grid_window(src.transform, asset=where)
            fx, fy, _, _ = grid.alignment(src.transform, asset=where)
            native = (
                grid.chip_size % fx == 0
                and grid.chip_size % fy == 0
                and float(window.col_off).is_integer()
                and float(window.row_off).is_integer()
            )
            inside = (
                window.col_off >= 0
                and window.row_off >= 0
                and window.col_off + window.width <= src.width
                and window.row_off + window.height <= src.height
            )
            options: dict[str, Any] = {}
            if native and inside and window.width * window.height * 2 >= src.width * src.height:
                # Most of the file: read all of it and slice. GDAL decodes a whole-band request
                # straight into the array (multi-threaded); a window request also fills GDAL's
                # block cache with a second copy of the band.
                rows, cols = window.toslices()
                return src.read(1)[rows, cols]
            if not native:
                options["out_shape"] = (
                    grid.y_size * grid.chip_size,
                    grid.x_size * grid.chip_size,
                )
                options["resampling"] = Resampling.nearest
            if not inside:  # only then: fill_value makes rasterio's read several times slower
                options["boundless"] = True
                options["fill_value"] = src.nodata if src.nodata is not None else 0
            return src.read(1, window=window, **options)
    except RasterioError as e:
        raise QualityError(f"item {grid.item_id}: cannot read {where}: {e}") from e


OUTSIDE_CELLS = 32
"""Cells per chip side on which the item's geometry is rasterized when no band is read."""

_OUTSIDE_RULE = class_rule("outside", "-", nodata={1}, cloud=set())
"""Counts the burnt cells of a geometry mask (1 = outside the item's geometry) as nodata."""


def _burn_outside(band: np.ndarray, outside: Any, transform: Affine, fill: float) -> None:
    """Set the pixels of `band` whose centres lie in `outside` to `fill`, in place.

    Rasterized over the bounding window of `outside` only (rasterio copies its output array,
    so a mask of that window costs less than burning into the band itself).
    """
    height, width = band.shape
    inverse = ~transform
    xs, ys = zip(*(inverse @ corner for corner in _box_corners(outside.bounds)), strict=True)
    col0, col1 = max(0, math.floor(min(xs))), min(width, math.ceil(max(xs)))
    row0, row1 = max(0, math.floor(min(ys))), min(height, math.ceil(max(ys)))
    if col0 >= col1 or row0 >= row1:
        return
    mask = rasterize(
        [(outside, 1)],
        out_shape=(row1 - row0, col1 - col0),
        transform=transform @ Affine.translation(col0, row0),
        fill=0,
        dtype="uint8",
    )
    np.copyto(band[row0:row1, col0:col1], band.dtype.type(fill), where=mask.view(bool))


def _chip_boxes(grid: ChipGrid) -> np.ndarray:
    """Every chip's footprint as a shapely Polygon in the grid's CRS, ordered by y then x."""
    xs, ys = grid.indices()
    cols = np.stack([xs, xs + 1, xs + 1, xs], axis=1) * float(grid.chip_size)
    rows = np.stack([ys, ys, ys + 1, ys + 1], axis=1) * float(grid.chip_size)
    t = grid.transform
    corners = np.stack([t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f], axis=-1)
    return shapely.polygons(corners)


def _split_chips(grid: ChipGrid, outside: Any) -> tuple[np.ndarray, np.ndarray]:
    """`(empty, crossed)`: bool `(y_size, x_size)` arrays of the chips wholly inside `outside`
    and of those its edge crosses.

    Vector tests over all chips at once, so that only crossed chips are rasterized: on an
    edge tile most chips are wholly outside, and a geometry 1 m inside a full tile's edge
    crosses a row and a column of chips but no pixel of the others.
    """
    boxes = _chip_boxes(grid)
    shapely.prepare(outside)
    empty = shapely.contains(outside, boxes)
    crossed = ~empty & shapely.intersects(outside, boxes)
    shape = (grid.y_size, grid.x_size)
    return empty.reshape(shape), crossed.reshape(shape)


def _burn_crossed(
    band: np.ndarray, outside: Any, transform: Affine, fill: float, crossed: np.ndarray
) -> None:
    """`_burn_outside` over the crossed chips only: one window per run of adjacent crossed
    chips in a chip row (a row at a time, like `band_fractions`), not the whole band."""
    ny, nx = crossed.shape
    per_y, per_x = band.shape[0] // ny, band.shape[1] // nx
    for y in np.flatnonzero(crossed.any(axis=1)):
        columns = np.flatnonzero(crossed[y])
        for run in np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1):
            rows = slice(y * per_y, (y + 1) * per_y)
            cols = slice(run[0] * per_x, (run[-1] + 1) * per_x)
            window = transform @ Affine.translation(cols.start, rows.start)
            _burn_outside(band[rows, cols], outside, window, fill)


def _box_corners(bounds: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    left, bottom, right, top = bounds
    return [(left, bottom), (left, top), (right, bottom), (right, top)]


def _fits(fill: float | None, dtype: np.dtype) -> bool:
    """Whether `fill` is a value of `dtype` (NaN only of floats)."""
    if fill is None:
        return False
    if dtype.kind == "f":
        return True
    if isinstance(fill, float) and not fill.is_integer():
        return False
    info = np.iinfo(dtype)
    return info.min <= fill <= info.max


def outside_fractions(grid: ChipGrid, outside: Any) -> np.ndarray:
    """Per-chip fraction (float32 `(y_size, x_size)`) of each chip lying in `outside`.

    The geometry is rasterized on `OUTSIDE_CELLS` x `OUTSIDE_CELLS` cells per chip (pixel
    centres), then summed per chip by `band_fractions`.
    """
    cells = min(grid.chip_size, OUTSIDE_CELLS)
    mask = np.zeros((grid.y_size * cells, grid.x_size * cells), dtype=np.uint8)
    _burn_outside(mask, outside, grid.transform @ Affine.scale(grid.chip_size / cells), 1)
    return band_fractions(mask, _OUTSIDE_RULE, grid.y_size, grid.x_size)[1]


def chip_fractions(
    grid: ChipGrid,
    item: Any,
    quality: str | QualityRule | QualityChoice = "auto",
    *,
    quality_asset: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-chip `(cloud_fraction, nodata_fraction)`, float32 arrays of shape `(y_size, x_size)`.

    Reads the rule's asset (href as given: local path, /vsicurl/, s3://, https://) once.
    Pixels outside the item's `geometry` are nodata whatever the rule (also `none`): they are
    set to the rule's `fill` value in the band before it is classified, so a pixel the band
    and the geometry both call nodata counts once. Chips wholly outside get nodata 1.0.
    """
    choice = (
        quality
        if isinstance(quality, QualityChoice)
        else choose_rule(quality, item, quality_asset=quality_asset)
    )
    rule = choice.rule
    outside = outside_footprint(grid, item)
    if rule.asset is None or rule.classify is None:
        zeros = np.zeros((grid.y_size, grid.x_size), dtype=np.float32)
        nodata = zeros.copy() if outside is None else outside_fractions(grid, outside)
        return zeros, nodata
    view = item_view(item)
    if rule.asset not in view.assets:
        raise QualityError(
            f"item {view.id}: quality rule {rule.name!r} needs asset {rule.asset!r}, which the "
            f"item does not have (assets: {', '.join(sorted(view.assets))}); name its quality "
            "band with `quality_asset` or pick another `quality` rule"
        )
    band = read_quality_band(grid, view.assets[rule.asset]["href"], asset=rule.asset)
    extra = None
    empty = None
    if outside is not None:
        if _fits(rule.fill, band.dtype):
            empty, crossed = _split_chips(grid, outside)
            if crossed.any():
                if not band.flags.writeable:
                    band = band.copy()
                height, width = band.shape
                scale = Affine.scale(
                    grid.x_size * grid.chip_size / width, grid.y_size * grid.chip_size / height
                )
                fill = float(rule.fill)  # type: ignore[arg-type]
                _burn_crossed(band, outside, grid.transform @ scale, fill, crossed)
        else:  # no value of this band means nodata to the rule: the larger of the two
            extra = outside_fractions(grid, outside)
    try:
        cloud, nodata = band_fractions(band, rule, grid.y_size, grid.x_size)
    except QualityError as e:
        raise QualityError(f"item {view.id}: asset {rule.asset!r}: {e}") from e
    if extra is not None:
        nodata = np.maximum(nodata, extra)
    if empty is not None:  # every pixel centre of these chips is outside
        cloud[empty], nodata[empty] = 0.0, 1.0
    return cloud, nodata
