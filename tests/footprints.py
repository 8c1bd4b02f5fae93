"""Test oracle for "chips clipped to the scene": which pixels lie outside an item's geometry.

Computed independently of `stacchip_db.quality` (no rasterio.features): every pixel centre is
tested with `shapely.contains_xy` against the item geometry, its vertices reprojected with
pyproj to the item's CRS.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyproj
import rasterio
import shapely
from affine import Affine
from shapely.geometry import shape

from stacchip_db.grid import chip_grid
from tests.conftest import FIXTURES

CATALOGS = FIXTURES / "catalogs"


def catalog_items(name: str) -> list[dict]:
    """The items of `tests/data/stac/catalogs/{name}.ndjson`."""
    path: Path = CATALOGS / f"{name}.ndjson"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def catalog_item(name: str, item_id: str) -> dict:
    return next(item for item in catalog_items(name) if item["id"] == item_id)


def outside_mask(item: dict, transform: Affine, size: tuple[int, int]) -> np.ndarray:
    """Bool `(height, width)`: True where the pixel centre of the grid is outside the geometry."""
    crs = chip_grid(item, chip_size=1, max_chips=None).crs  # only the CRS is wanted
    to_crs = pyproj.Transformer.from_crs(4326, crs, always_xy=True)
    geometry = shapely.transform(
        shape(item["geometry"]),
        lambda xy: np.column_stack(to_crs.transform(xy[:, 0], xy[:, 1])),
    )
    rows, cols = np.mgrid[0 : size[0], 0 : size[1]] + 0.5
    xs = transform.a * cols + transform.b * rows + transform.c
    ys = transform.d * cols + transform.e * rows + transform.f
    return ~shapely.contains_xy(geometry, xs, ys)


def reference_fractions(
    item: dict,
    asset: str,
    chip_size: int,
    cloud: set[int] | Callable[[np.ndarray], np.ndarray],
    nodata: set[int] | Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """`(y, x, 2)` (cloud, nodata) fractions the original stacchip's way: upsample the band
    to the finest grid (nearest), loop over chips.

    `cloud` / `nodata` are the classes of a class band or functions of the band giving a bool
    mask (bit flags). Pixels whose centre (on the band's grid) is outside the item's geometry
    are nodata, never cloud.
    """
    grid = chip_grid(item, chip_size=chip_size)
    with rasterio.open(item["assets"][asset]["href"]) as src:
        band = src.read(1)
        outside = (
            outside_mask(item, src.transform, band.shape)
            if item.get("geometry")
            else np.zeros(band.shape, dtype=bool)
        )
    factor = grid.shape[0] // band.shape[0]

    def full(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(a, factor, axis=0), factor, axis=1)

    def hit(test: set[int] | Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return test(band) if callable(test) else np.isin(band, list(test))

    is_cloud = full(hit(cloud) & ~outside)
    is_nodata = full(hit(nodata) | outside)
    out = np.zeros((grid.y_size, grid.x_size, 2))
    for y in range(grid.y_size):
        for x in range(grid.x_size):
            window = np.s_[y * chip_size : (y + 1) * chip_size, x * chip_size : (x + 1) * chip_size]
            out[y, x] = is_cloud[window].mean(), is_nodata[window].mean()
    return out.astype(np.float32)
