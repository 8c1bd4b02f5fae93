"""Small, deterministic COGs standing in for a real STAC item's assets.

Tests, the demo, the benchmarks and the local STAC-API test server need items whose assets can
be read offline. `synthesize_item` takes a real item (a dict, e.g. a fixture from Earth Search),
writes a COG for each chosen asset on the asset's own CRS and grid (optionally coarsened by an
integer `scale`), and returns a copy of the item whose hrefs point at those files and whose
`proj:shape`/`proj:transform` (item and every asset) describe the coarsened grid. Everything
else (CRS, ids, datetimes, other assets' remote hrefs) stays as in the original item.

Pixel patterns are fixed shapes in scene-relative coordinates (so they look alike at every
scale), chosen to exercise the quality rules:

- `scl` (Sentinel-2): a seeded mix of clear classes (2, 4, 5, 7, 11) with a water band (6);
  a cloud blob (9 core, 8 rim), cloud shadow (3) beside it, a cirrus (10) strip; a nodata (0)
  wedge along the left edge, widest at the bottom, where whole chips are empty.
- `qa_pixel` (Landsat): the same shapes as real QA_PIXEL values: clear 21824, cloud 22280,
  dilated cloud 21826, shadow 23888, fill 1.
- `sur_refl_qc_500m` (MODIS): 0 clear, 0b01 under the blob (the `modis` rule's cloud), 0b11 in
  the wedge.
- any other asset: reflectance-like gradients plus seeded noise, one band per `eo:bands` entry,
  in the asset's `raster:bands` data type (default uint16).
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine

from stacchip_db.grid import item_crs, item_view
from stacchip_db.sensors import find_asset

LANDSAT_CLEAR, LANDSAT_WATER, LANDSAT_CLOUD, LANDSAT_DILATED, LANDSAT_SHADOW, LANDSAT_FILL = (
    21824,
    21952,
    22280,
    21826,
    23888,
    1,
)
"""QA_PIXEL values: clear land, clear water, high-confidence cloud, dilated cloud, shadow, fill."""


def scene_masks(shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Boolean masks of the synthetic scene's features on a `(height, width)` grid.

    Keys: `nodata` (left wedge), `cloud` (blob core), `cloud_rim`, `shadow`, `cirrus`, `water`.
    Features are defined on pixel centres in [0, 1] scene coordinates; `nodata` wins over all
    others, and the cloud features win over `water`.
    """
    height, width = shape
    v = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None]
    u = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, :]
    r2 = (u - 0.6) ** 2 + (v - 0.35) ** 2
    masks = {
        "nodata": u < 0.45 * v,
        "cloud": r2 < 0.12**2,
        "cloud_rim": (r2 >= 0.12**2) & (r2 < 0.18**2),
        "shadow": (u - 0.75) ** 2 + (v - 0.6) ** 2 < 0.08**2,
        "cirrus": (v > 0.8) & (v < 0.85) & (u > 0.5),
        "water": (u > 0.85) & (v > 0.1),
    }
    masks = {k: np.broadcast_to(m, shape) for k, m in masks.items()}
    for key in ("cloud", "cloud_rim", "shadow", "cirrus", "water"):
        masks[key] = masks[key] & ~masks["nodata"]
    return masks


def _paint(
    shape: tuple[int, int],
    dtype: str,
    base: int | np.ndarray,
    layers: Iterable[tuple[str, int]],
) -> np.ndarray:
    """`base` (a value or an array) with each `(mask name, value)` painted on in order."""
    masks = scene_masks(shape)
    out = np.empty(shape, dtype=dtype)
    out[...] = base
    for name, value in layers:
        out[masks[name]] = value
    return out


def _texture(
    shape: tuple[int, int],
    rng: np.random.Generator | None,
    values: list[int],
    dtype: str,
    block: int = 2,
) -> int | np.ndarray:
    """Random `block`-pixel patches of `values` (or just the first value without `rng`).

    Gives the quality COGs a realistic compressed size (a uniform band compresses to almost
    nothing, which would make reading look cheaper than on real scenes).
    """
    if rng is None:
        return values[0]
    height, width = shape
    patches = rng.choice(
        np.asarray(values, dtype=dtype), size=(-(-height // block), -(-width // block))
    )
    return np.repeat(np.repeat(patches, block, axis=0), block, axis=1)[:height, :width]


def scl_pattern(shape: tuple[int, int], rng: np.random.Generator | None = None) -> np.ndarray:
    """Sentinel-2 SCL classes (uint8) for the synthetic scene.

    With `rng`, the clear background is a random mix of classes 2, 4, 5, 7 and 11 (none of
    them cloud or nodata, so the fractions do not depend on the seed).
    """
    return _paint(
        shape,
        "uint8",
        _texture(shape, rng, [4, 4, 4, 5, 5, 7, 2, 11], "uint8"),
        [
            ("water", 6),
            ("cirrus", 10),
            ("shadow", 3),
            ("cloud_rim", 8),
            ("cloud", 9),
            ("nodata", 0),
        ],
    )


def qa_pixel_pattern(shape: tuple[int, int], rng: np.random.Generator | None = None) -> np.ndarray:
    """Landsat Collection 2 QA_PIXEL bit flags (uint16) for the synthetic scene."""
    return _paint(
        shape,
        "uint16",
        _texture(shape, rng, [LANDSAT_CLEAR] * 3 + [LANDSAT_WATER], "uint16"),
        [
            ("shadow", LANDSAT_SHADOW),
            ("cloud_rim", LANDSAT_DILATED),
            ("cloud", LANDSAT_CLOUD),
            ("nodata", LANDSAT_FILL),
        ],
    )


def modis_qc_pattern(shape: tuple[int, int], rng: np.random.Generator | None = None) -> np.ndarray:
    """MODIS 500 m QC (uint32): MODLAND bits 0b01 under the cloud blob, 0b11 in the wedge."""
    return _paint(shape, "uint32", 0, [("cloud", 0b01), ("cloud_rim", 0b01), ("nodata", 0b11)])


PATTERNS: dict[str, Callable[[tuple[int, int], np.random.Generator | None], np.ndarray]] = {
    "scl": scl_pattern,
    "qa_pixel": qa_pixel_pattern,
    "sur_refl_qc_500m": modis_qc_pattern,
}
"""Quality-band patterns by asset key, matched as `sensors.find_asset` does (`SCL`, `QA_PIXEL.TIF`
get the `scl` and `qa_pixel` patterns); other assets get `reflectance_pattern`."""


def reflectance_pattern(
    shape: tuple[int, int], rng: np.random.Generator, *, count: int = 1, dtype: str = "uint16"
) -> np.ndarray:
    """`(count, height, width)` smooth gradients plus seeded noise, zero in the nodata wedge."""
    height, width = shape
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    top = 10000.0 if info is None or info.max > 10000 else float(info.max)
    v = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    u = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    out = np.empty((count, height, width), dtype=dtype)
    nodata = scene_masks(shape)["nodata"]
    for band in range(count):
        level = top * (0.1 + 0.3 * u + 0.2 * v + 0.05 * band)
        noise = rng.normal(0.0, 0.02 * top, size=shape).astype(np.float32)
        out[band] = np.clip(level + noise, 1, top)
        out[band][nodata] = 0
    return out


def write_cog(
    path: str | Path,
    data: np.ndarray,
    *,
    crs: Any,
    transform: Affine,
    nodata: float | None = None,
    categorical: bool = True,
) -> Path:
    """Write a 2D or `(bands, h, w)` array as a deflate-compressed, tiled COG with overviews.

    `categorical` picks nearest-neighbour overviews (class and bit bands) over averaging.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = data[None] if data.ndim == 2 else data
    profile = {
        "driver": "COG",
        "width": array.shape[2],
        "height": array.shape[1],
        "count": array.shape[0],
        "dtype": array.dtype.name,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "compress": "DEFLATE",
        "blocksize": 512,
        "overview_resampling": "nearest" if categorical else "average",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
    return path


WORLDCOVER_CLASSES = {
    10: "tree", 20: "shrub", 30: "grass", 40: "crop", 50: "built", 60: "bare", 70: "snow",
    80: "water", 90: "wetland", 95: "mangrove", 100: "moss",
}  # fmt: skip
"""ESA WorldCover's class values and short names (nodata 0)."""


def write_class_raster(
    path: str | Path,
    bounds: tuple[float, float, float, float],
    resolution: float,
    *,
    seed: int = 0,
    block: int = 3,
    classes: Iterable[int] = tuple(WORLDCOVER_CLASSES),
    nodata_box: tuple[float, float, float, float] | None = None,
) -> Path:
    """A categorical uint8 COG in EPSG:4326 over `bounds` (minx, miny, maxx, maxy, degrees) at
    `resolution` degrees: classes drawn at random in `block` x `block` pixel squares, with a
    skew so that some classes dominate, nodata 0 (also inside `nodata_box`). Like ESA
    WorldCover, for tests and benchmarks of class layers."""
    minx, miny, maxx, maxy = bounds
    width = max(1, round((maxx - minx) / resolution))
    height = max(1, round((maxy - miny) / resolution))
    rng = np.random.default_rng(seed)
    values = np.array(list(classes), dtype=np.uint8)
    weights = 1.0 / np.arange(1, len(values) + 1)
    coarse = rng.choice(values, size=(-(-height // block), -(-width // block)),
                        p=weights / weights.sum())  # fmt: skip
    data = np.repeat(np.repeat(coarse, block, axis=0), block, axis=1)[:height, :width]
    transform = Affine(resolution, 0, minx, 0, -resolution, maxy)
    if nodata_box is not None:
        bx0, by0, bx1, by1 = nodata_box
        inverse = ~transform
        c0, r0 = (int(v) for v in inverse @ (bx0, by1))
        c1, r1 = (int(v) for v in inverse @ (bx1, by0))
        data[max(r0, 0) : max(r1, 0), max(c0, 0) : max(c1, 0)] = 0
    return write_cog(path, data, crs="EPSG:4326", transform=transform, nodata=0)


def _scaled(transform: list[float], scale: int) -> list[float]:
    a, b, c, d, e, f = (float(v) for v in transform[:6])
    return [a * scale, b * scale, c, d * scale, e * scale, f]


def _reshaped(shape: list[int], scale: int) -> list[int]:
    return [max(1, int(shape[0]) // scale), max(1, int(shape[1]) // scale)]


def synthesize_item(
    item: Mapping[str, Any],
    out_dir: str | Path,
    assets: Iterable[str],
    *,
    scale: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Write COGs for `assets` of `item` into `out_dir`; return the rewritten item dict.

    `scale` (a positive integer) divides every grid's shape and multiplies its pixel size, so
    a 10980 x 10980 Sentinel-2 scene becomes 1098 x 1098 at `scale=10` on the same footprint
    and the 20 m / 10 m ratio survives. Files are named `{item id}_{asset}.tif`; the same
    `seed` gives the same pixels. Other assets keep their hrefs but get scaled metadata, so the
    item's grid stays consistent.
    """
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale {scale!r} is not a positive integer")
    out = copy.deepcopy(dict(item))
    props = out.setdefault("properties", {})
    for fields in [props, *out.get("assets", {}).values()]:
        if "proj:transform" in fields:
            fields["proj:transform"] = _scaled(fields["proj:transform"], scale)
        if "proj:shape" in fields:
            fields["proj:shape"] = _reshaped(fields["proj:shape"], scale)
    view = item_view(out)
    out_dir = Path(out_dir)
    for key in assets:
        if key not in view.assets:
            raise KeyError(f"item {view.id} has no asset {key!r}")
        fields = out["assets"][key]
        shape = fields.get("proj:shape", props.get("proj:shape"))
        transform = fields.get("proj:transform", props.get("proj:transform"))
        if shape is None or transform is None:
            raise ValueError(f"item {view.id}: asset {key!r} has no proj:shape/proj:transform")
        grid_shape = (int(shape[0]), int(shape[1]))
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        raster_bands = fields.get("raster:bands") or [{}]
        nodata = raster_bands[0].get("nodata")
        pattern = find_asset(PATTERNS, key)
        if pattern is not None:
            data = PATTERNS[pattern](grid_shape, rng)
            categorical = True
        else:
            count = len(fields.get("eo:bands") or raster_bands)
            dtype = raster_bands[0].get("data_type", "uint16")
            data = reflectance_pattern(grid_shape, rng, count=count, dtype=dtype)
            categorical = False
        path = write_cog(
            out_dir / f"{view.id}_{key}.tif",
            data,
            crs=item_crs(view, prefer_asset=key).to_wkt(),
            transform=Affine(*transform[:6]),
            nodata=nodata,
            categorical=categorical,
        )
        fields["href"] = str(path.resolve())
    return out


def item_from_arrays(
    item_id: str,
    out_dir: str | Path,
    assets: Mapping[str, tuple[np.ndarray, int]],
    *,
    shape: tuple[int, int],
    crs: str = "EPSG:32633",
    pixel_size: float = 10.0,
    origin: tuple[float, float] = (500000.0, 4500000.0),
    datetime: str = "2024-03-11T10:00:00Z",
    nodata: float | None = None,
) -> dict[str, Any]:
    """A minimal STAC item dict whose assets are COGs of the given arrays.

    `assets` maps a key to `(array, factor)`: the array's pixels are `factor` times the item
    grid's `pixel_size`, north-up from `origin` (upper-left corner). The item carries
    `proj:code`, `proj:shape` (`shape`) and `proj:transform`; each asset its own grid. For
    tests that need exact, hand-made quality patterns.
    """
    left, top = origin
    out_dir = Path(out_dir)
    item_assets: dict[str, Any] = {}
    for key, (array, factor) in assets.items():
        transform = Affine(pixel_size * factor, 0.0, left, 0.0, -pixel_size * factor, top)
        path = write_cog(
            out_dir / f"{item_id}_{key}.tif", array, crs=crs, transform=transform, nodata=nodata
        )
        item_assets[key] = {
            "href": str(path.resolve()),
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "proj:shape": list(array.shape[-2:]),
            "proj:transform": list(transform)[:6],
        }
    width, height = shape[1] * pixel_size, shape[0] * pixel_size
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": ["https://stac-extensions.github.io/projection/v2.0.0/schema.json"],
        "id": item_id,
        "bbox": [left, top - height, left + width, top],
        "geometry": None,
        "properties": {
            "datetime": datetime,
            "proj:code": crs,
            "proj:shape": list(shape),
            "proj:transform": [pixel_size, 0.0, left, 0.0, -pixel_size, top],
        },
        "links": [],
        "assets": item_assets,
    }


# -- many chip rows, made by the database itself -----------------------------------------------

_FILL_CHIPS = """
INSERT INTO stacchip.chips (collection, item_id, chip_size, chip_index_x, chip_index_y,
                            datetime, cloud_fraction, nodata_fraction, location, geometry)
SELECT %(collection)s, 'synthetic_' || k, %(chip_size)s, x, y,
       timestamptz '2018-01-01 10:30Z' + k * interval '1 day',
       ((g * 7919) %% 1000) / 1000.0, ((g * 104729) %% 7) / 10.0,
       ('x' || substr(md5('synthetic|' || %(chip_size)s || '|' || lon || '|' || lat || '|' || x
                          || '|' || y), 1, 16))::bit(64)::bigint,
       ST_MakeEnvelope(lon + x * 0.01, lat - (y + 1) * 0.01, lon + (x + 1) * 0.01,
                       lat - y * 0.01, 4326)
FROM generate_series(0::bigint, %(n)s - 1) AS g,
     LATERAL (SELECT (g / 10000)::int AS k, ((g %% 10000) %% 100)::int AS x,
                     ((g %% 10000) / 100)::int AS y) AS c,
     LATERAL (SELECT -180 + (k %% 360) AS lon, 80 - (k / 360) %% 160 AS lat) AS p
"""


def fill_chips(
    conn: Any, n: int, *, collection: str = "synthetic", chip_size: int = 256
) -> int:
    """Insert `n` rows into `stacchip.chips` (no pgstac items), made by the server in one
    statement: items `synthetic_{k}` of 100 x 100 chips of 0.01° on a 1° grid from 180°W 80°N,
    one day apart from 2018-01-01, cloud and nodata fractions spread by hashing the row number.
    Items `k` and `k + 57,600` lie on the same 1° cell (every 360 x 160 items the grid starts
    again), so their chips share locations: a hash of cell, chip size and chip position.

    For tests and benchmarks that need many chips fast (selection, streaming, memory); the
    caller commits. The collection's partition is made first where the schema has partitions
    (alembic 0008: `stacchip.chip_partition`; a migration test fills older schemas too), and
    the rows get their location where the column exists (alembic 0010). Returns `n`.
    """
    if n < 0:
        raise ValueError(f"n {n} is negative")
    partitioned = conn.execute(
        "SELECT to_regprocedure('stacchip.chip_partition(text)') IS NOT NULL"
    ).fetchone()[0]
    if partitioned:
        conn.execute("SELECT stacchip.chip_partition(%s)", (collection,))
    located = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'stacchip.chips'::regclass "
        "AND attname = 'location' AND NOT attisdropped)"
    ).fetchone()[0]
    fill = _FILL_CHIPS
    if not located:  # before alembic 0010: no location column
        fill = fill.replace("nodata_fraction, location, geometry", "nodata_fraction, geometry")
        fill = fill[: fill.index("       ('x' ||")] + fill[fill.index("       ST_MakeEnvelope") :]
    conn.execute(fill, {"n": n, "collection": collection, "chip_size": chip_size})
    return n
