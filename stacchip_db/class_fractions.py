"""Per-chip class fractions of a categorical raster (a land-cover map such as ESA WorldCover).

The raster is read once per item window, not per chip: every chip of the window is sampled on
a regular lattice of `samples` x `samples` points (the centres of the chip's cells in the
item's own grid, `grid.py`), the points are taken to the raster's CRS exactly (pyproj, no
approximation) and each takes the value of the raster pixel that holds it: nearest-neighbour
reprojection, what `rasterio.warp.reproject(..., resampling=nearest)` gives on the chip's
`samples` x `samples` grid. A chip's fraction of a class is its points of that class / all its
points; points on the raster's nodata value or outside the raster are nodata (in no class) and
their share is reported as the chip's nodata fraction. With the default 32 x 32 points a
fraction is a multiple of 1/1024, exact in binary.

Pure: no database (`layers.py` stores the results).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyproj
from rasterio.windows import Window

from stacchip_db.errors import StacchipError
from stacchip_db.grid import ChipGrid
from stacchip_db.text import first_line

SAMPLES = 32
"""Points per chip side (a power of two: fractions are then exact binary numbers)."""


class ClassRasterError(StacchipError):
    """A raster cannot be a layer of classes (not categorical, rotated, without CRS)."""


@dataclass(frozen=True)
class ChipClasses:
    """Counts of the sampled points per chip: `counts[i, j]` points of chip i hold class
    `values[j]`; `nodata[i]` points are nodata; each chip has `samples**2` points."""

    values: np.ndarray
    counts: np.ndarray
    nodata: np.ndarray
    samples: int

    @property
    def points(self) -> int:
        return self.samples * self.samples


def check_class_raster(dataset: Any, source: str) -> None:
    """Refuse a raster that is not one band of integer classes on an unrotated, georeferenced
    grid (one line naming `source`)."""
    dtype = np.dtype(dataset.dtypes[0])
    if dtype.kind not in "iu":
        raise ClassRasterError(
            f"raster {source} is not categorical: its band 1 holds {dtype} values; a class "
            "layer needs integer classes (a land-cover map such as ESA WorldCover)"
        )
    if dataset.crs is None:
        raise ClassRasterError(f"raster {source} has no CRS; give a georeferenced raster")
    t = dataset.transform
    if t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
        raise ClassRasterError(
            f"raster {source} is rotated or not north-up ({tuple(t)[:6]}); warp it to a "
            "north-up grid first (gdalwarp)"
        )


def chip_classes(
    grid: ChipGrid,
    dataset: Any,
    chips: Sequence[tuple[int, int]],
    *,
    samples: int = SAMPLES,
) -> ChipClasses:
    """Class counts of `chips` (`(x, y)` chip indices of `grid`) in `dataset` (an open rasterio
    dataset of classes, band 1), in the order given. One read: the raster window covering
    the chips' points."""
    keys = np.asarray(chips, dtype=np.int64).reshape(-1, 2)
    if len(keys) == 0:
        return ChipClasses(np.zeros(0, np.int64), np.zeros((0, 0), np.int64),
                           np.zeros(0, np.int64), samples)  # fmt: skip
    x0, y0 = keys.min(axis=0)
    x1, y1 = keys.max(axis=0) + 1
    nx, ny = int(x1 - x0), int(y1 - y0)
    cs = grid.chip_size
    # Cell centres of the chips' lattices in the item's pixel coordinates, then its CRS.
    step = cs / samples
    cols = x0 * cs + (np.arange(nx * samples) + 0.5) * step
    rows = y0 * cs + (np.arange(ny * samples) + 0.5) * step
    cc, rr = np.meshgrid(cols, rows)
    t = grid.transform
    xs = t.a * cc + t.b * rr + t.c
    ys = t.d * cc + t.e * rr + t.f
    transformer = pyproj.Transformer.from_crs(grid.crs, dataset.crs, always_xy=True)
    rx, ry = transformer.transform(xs, ys, errcheck=False)
    inverse = ~dataset.transform
    pc = np.floor(inverse.a * rx + inverse.b * ry + inverse.c)
    pr = np.floor(inverse.d * rx + inverse.e * ry + inverse.f)
    inside = (
        np.isfinite(pc) & np.isfinite(pr)
        & (pc >= 0) & (pc < dataset.width) & (pr >= 0) & (pr < dataset.height)
    )  # fmt: skip
    values = np.zeros(cc.shape, dtype=np.int64)
    if inside.any():
        c0, c1 = int(pc[inside].min()), int(pc[inside].max()) + 1
        r0, r1 = int(pr[inside].min()), int(pr[inside].max()) + 1
        try:
            band = dataset.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
        except Exception as exc:  # rasterio/GDAL: a lost URL, a corrupt tile
            raise ClassRasterError(
                f"raster {dataset.name} could not be read for item {grid.item_id}: "
                f"{first_line(exc)[:300]}"
            ) from exc
        values[inside] = band[pr[inside].astype(np.int64) - r0, pc[inside].astype(np.int64) - c0]
    valid = inside
    if dataset.nodata is not None and np.isfinite(dataset.nodata):
        valid = inside & (values != int(dataset.nodata))
    # Points per chip: (ny, S, nx, S) -> (ny, nx, S*S), then the requested chips' rows.
    per_chip = values.reshape(ny, samples, nx, samples).transpose(0, 2, 1, 3)
    per_chip = per_chip.reshape(ny * nx, samples * samples)
    valid_chip = valid.reshape(ny, samples, nx, samples).transpose(0, 2, 1, 3)
    valid_chip = valid_chip.reshape(ny * nx, samples * samples)
    position = (keys[:, 1] - y0) * nx + (keys[:, 0] - x0)
    per_chip, valid_chip = per_chip[position], valid_chip[position]
    classes, inverse_index = np.unique(per_chip[valid_chip], return_inverse=True)
    chip_of = np.broadcast_to(np.arange(len(keys))[:, None], per_chip.shape)[valid_chip]
    counts = np.bincount(
        chip_of * len(classes) + inverse_index, minlength=len(keys) * len(classes)
    ).reshape(len(keys), len(classes))
    nodata = samples * samples - valid_chip.sum(axis=1)
    return ChipClasses(classes, counts, nodata, samples)
