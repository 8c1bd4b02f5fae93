"""Derived assets: COGs a processor writes itself into the target store instead of copying.

Sentinel-1 re-encodes its bands, MODIS reprojects them, LINZ resamples its tiles; what they
share is written here once, for their `Processor.prepare`:

- `derive_object` skips a derived object that already exists (re-runs and resumed jobs do
  not redo the work). That is safe because a derived object only ever appears whole: it is
  written through `storage.write_atomically` (a local file in a temporary folder beside it,
  then renamed; an S3 object uploaded, visible only when the upload completes).
- `write_cog` writes any open dataset (a file, a `WarpedVRT`, a `MemoryFile`) with GDAL's COG
  driver, deflate-compressed in 512 px tiles. From a `WarpedVRT` the reprojection streams
  block by block instead of holding whole bands in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader, MemoryFile

from stacchip_db import storage
from stacchip_db.errors import StacchipError
from stacchip_db.processors.base import SceneReport
from stacchip_db.signing import sign_href
from stacchip_db.storage import CopyResult
from stacchip_db.text import first_line

log = logging.getLogger(__name__)


class DerivedAssetError(StacchipError):
    """A source raster could not be read or its derived COG not written."""


def derive_object(
    source: str, destination: str, render: Callable[[Path], None], report: SceneReport
) -> str:
    """Make `destination` (a path or `s3://` URL) with `render(local_path)` unless it exists.

    Counts the object in `report` (copied or skipped, as a plain copy would) and returns
    `destination`. Errors reading `source` or writing the COG are one-line
    `DerivedAssetError`s naming both.
    """
    existing = storage.object_size(destination)
    if existing is not None:
        log.debug("skip %s: %s already exists (%d bytes)", source, destination, existing)
        _count(report, CopyResult(source, destination, existing, copied=False))
        return destination
    size = 0

    def fill(local: Path) -> None:
        nonlocal size
        try:
            render(local)
        except RasterioError as exc:
            raise DerivedAssetError(
                f"cannot derive {destination} from {source}: {first_line(exc)}; "
                "check the source href and that it is a readable raster"
            ) from exc
        size = local.stat().st_size

    storage.write_atomically(destination, fill)
    log.debug("derived %s -> %s (%d bytes)", source, destination, size)
    _count(report, CopyResult(source, destination, size, copied=True))
    return destination


def _count(report: SceneReport, result: CopyResult) -> None:
    if result.copied:
        report.copied_objects += 1
        report.copied_bytes += result.size
    else:
        report.skipped_objects += 1


def write_cog(dataset: Any, path: Path, *, overview_resampling: str = "nearest") -> None:
    """Write an open dataset (file, WarpedVRT, in-memory) as a deflate-compressed COG."""
    rasterio.shutil.copy(
        dataset,
        str(path),
        driver="COG",
        COMPRESS="DEFLATE",
        BLOCKSIZE="512",
        OVERVIEW_RESAMPLING=overview_resampling.upper(),
        NUM_THREADS="ALL_CPUS",
    )


def write_array_cog(
    path: Path, data: np.ndarray, profile: dict[str, Any], *, overview_resampling: str = "nearest"
) -> None:
    """Write a `(bands, height, width)` array with `profile`'s CRS/transform/nodata as a COG."""
    meta = {
        "driver": "GTiff",
        "count": data.shape[0],
        "height": data.shape[1],
        "width": data.shape[2],
        "dtype": data.dtype.name,
        "crs": profile.get("crs"),
        "transform": profile["transform"],
        "nodata": profile.get("nodata"),
    }
    with MemoryFile() as memory:
        with memory.open(**meta) as scratch:
            scratch.write(data)
        with memory.open() as dataset:
            write_cog(dataset, path, overview_resampling=overview_resampling)


@contextmanager
def open_source(href: str) -> Iterator[DatasetReader]:
    """Open a source raster (path, `s3://`, `https://`, Planetary Computer blobs signed);
    one-line error if it fails."""
    try:
        with rasterio.open(sign_href(href)) as dataset:
            yield dataset
    except RasterioError as exc:
        if storage.object_size(href) is None:
            raise storage.ObjectMissing(
                f"source object {href} does not exist; check the item's href"
            ) from exc
        raise DerivedAssetError(
            f"cannot read source raster {href}: {first_line(exc)}"
        ) from exc
