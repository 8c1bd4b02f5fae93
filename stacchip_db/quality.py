"""Per-chip cloud and nodata fractions from a scene's quality band.

A rule says which asset holds the quality band and how its values map to per-pixel codes
(bit 0: cloud, bit 1: nodata). `chip_fractions` reads that band once, at its own resolution
and only over the chipped part of the scene, turns it into codes with a lookup table and sums
the codes per chip with reshape + sum, a chip row at a time: no per-chip Python loop, no
per-chip file access, and no upsampling of a 20 m band to the 10 m grid (the fractions are
those of a nearest-neighbour upsampling, at a quarter of the memory).

| rule | asset | nodata | cloud |
| --- | --- | --- | --- |
| `s2` | `scl` | class 0 | classes 1, 3, 8, 9, 10 |
| `landsat` | `qa_pixel` | bit 0 | bits 1, 3, 4 (dilated cloud, cloud, shadow) |
| `modis` | `sur_refl_qc_500m` | bits 0 and 1 set | bit 0 set, bit 1 clear |
| `nodata_value_rule(asset, v)` | any | band 1 == v | never |
| `none` | - | never | never |

The MODIS row follows the original stacchip's code (bits 0-1 == 0b01); see `MODIS_RULE`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioError

from stacchip_db.errors import StacchipError
from stacchip_db.grid import ChipGrid, item_view
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
    count), which halves the lookups, the biggest cost of a Sentinel-2 index.
    """

    name: str
    asset: str | None
    classify: Callable[[np.ndarray], np.ndarray] | None
    pair_lut: np.ndarray | None = None


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
    return QualityRule(name, asset, lookup_classifier(lut), pair_lut.astype(np.uint8))


def bits_rule(name: str, asset: str, *, bits: int, code: Callable[[int], int]) -> QualityRule:
    """Rule for a bit-flag band: `code(v)` gives the code of the low `bits` bits' value `v`."""
    lut = np.array([code(v) for v in range(1 << bits)], dtype=np.uint8)
    return QualityRule(name, asset, lookup_classifier(lut))


def nodata_value_rule(asset: str, value: float, *, name: str = "nodata") -> QualityRule:
    """Rule for scenes without a cloud band (LINZ, Sentinel-1): nodata where band 1 == value.

    A NaN `value` matches NaN pixels. Never reports clouds.
    """

    def classify(values: np.ndarray) -> np.ndarray:
        hit = np.isnan(values) if math.isnan(value) else values == value
        return hit.view(np.uint8) * NODATA

    return QualityRule(name, asset, classify)


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


def resolve_rule(quality: str | QualityRule, item: Any) -> QualityRule:
    """The rule object for `quality`: a rule, a registered name, or `auto` (from the assets)."""
    if isinstance(quality, QualityRule):
        return quality
    if quality == "auto":
        assets = item_view(item).assets
        for name in AUTO_ORDER:
            if RULES[name].asset in assets:
                return RULES[name]
        return NONE_RULE
    if quality not in RULES:
        raise QualityError(
            f"unknown quality rule {quality!r}; use auto or one of {', '.join(sorted(RULES))}"
        )
    return RULES[quality]


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


def chip_fractions(
    grid: ChipGrid, item: Any, quality: str | QualityRule = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-chip `(cloud_fraction, nodata_fraction)`, float32 arrays of shape `(y_size, x_size)`.

    Reads the rule's asset (href as given: local path, /vsicurl/, s3://, https://) once.
    """
    rule = resolve_rule(quality, item)
    if rule.asset is None or rule.classify is None:
        zeros = np.zeros((grid.y_size, grid.x_size), dtype=np.float32)
        return zeros, zeros.copy()
    view = item_view(item)
    if rule.asset not in view.assets:
        raise QualityError(
            f"item {view.id}: quality rule {rule.name!r} needs asset {rule.asset!r}, which the "
            f"item does not have (assets: {', '.join(sorted(view.assets))}); pick another rule"
        )
    band = read_quality_band(grid, view.assets[rule.asset]["href"], asset=rule.asset)
    try:
        return band_fractions(band, rule, grid.y_size, grid.x_size)
    except QualityError as e:
        raise QualityError(f"item {view.id}: asset {rule.asset!r}: {e}") from e
