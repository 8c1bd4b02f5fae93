"""Test oracle for "chips clipped to the scene": which pixels lie outside an item's geometry.

Computed independently of `stacchip_db.quality` (no rasterio.features): every pixel centre is
tested with `shapely.contains_xy` against the item geometry, its vertices reprojected with
pyproj to the item's CRS.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyproj
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
    crs = chip_grid(item, chip_size=1).crs
    to_crs = pyproj.Transformer.from_crs(4326, crs, always_xy=True)
    geometry = shapely.transform(
        shape(item["geometry"]),
        lambda xy: np.column_stack(to_crs.transform(xy[:, 0], xy[:, 1])),
    )
    rows, cols = np.mgrid[0 : size[0], 0 : size[1]] + 0.5
    xs = transform.a * cols + transform.b * rows + transform.c
    ys = transform.d * cols + transform.e * rows + transform.f
    return ~shapely.contains_xy(geometry, xs, ys)
