"""MODIS MOD09A1 (8-day 500 m surface reflectance): one composite per month of one tile.

Rules (the original stacchip's, with its slips fixed):
- the job index picks a (vertical, horizontal) tile of the sinusoidal grid from the
  original's `SIN_GRID_TILES` (tiles chosen to have no nodata in the sinusoidal projection,
  away from the dateline cut); the job reads no sample source;
- for every month of 2018-2023, the first `modis-09A1-061` item of that tile in that month
  (the original took four random months of 2018, 2020, 2022 and 2023, and `[0]` of a
  result that may be empty); an empty month is logged and skipped, and so is a composite
  already taken for the month before (an 8-day composite can span two months);
- assets sur_refl_b01..b07 and sur_refl_qc_500m, reprojected (nearest neighbour) from the
  sinusoidal grid to EPSG:3857 with GDAL's suggested output grid (what the original's
  `calculate_default_transform` gives), as deflate-compressed COGs;
- the item's `datetime` is its `end_datetime` (a composite is dated by its last day), and
  its projection fields describe the new grid (`proj:code` EPSG:3857, `proj:shape`,
  `proj:transform`; the sinusoidal `proj:wkt2`/`proj:projjson`/`proj:bbox` are dropped);
- quality: the MODIS QC rule on sur_refl_qc_500m.
"""

from __future__ import annotations

import calendar
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

from stacchip_db.errors import StacchipError
from stacchip_db.processors import register
from stacchip_db.processors.base import (
    YEARS,
    JobRequest,
    PlanContext,
    Processor,
    Scene,
    SceneReport,
    asset_path,
)
from stacchip_db.processors.derived import derive_object, open_source, write_cog
from stacchip_db.sensors import collection_profile
from stacchip_db.stac_api import search_one

log = logging.getLogger(__name__)

DST_CRS = "EPSG:3857"
PROFILE = collection_profile("modis-09A1-061")
BANDS = PROFILE.sensor.bands
QC_ASSET = PROFILE.layout.quality_asset
PROJECTION_V2 = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"

_TILE_COLUMNS: dict[int, tuple[int, ...]] = {
    2: (*range(12, 24),),
    3: (9, *range(11, 16), *range(17, 27)),
    4: (8, *range(10, 15), *range(17, 29)),
    5: (*range(7, 13), *range(15, 22), *range(23, 31)),
    6: (3, *range(7, 12), *range(16, 32)),
    7: (3, *range(7, 12), *range(15, 34)),
    8: (1, 2, *range(8, 14), 16, *range(18, 24), *range(25, 35)),
    9: (*range(1, 5), *range(8, 15), 16, 19, 21, 22, 23, 25, *range(27, 35)),
    10: (*range(2, 6), *range(10, 15), 17, *range(19, 24), *range(27, 34)),
    11: (*range(3, 7), 8, *range(10, 16), *range(19, 24), *range(27, 33)),
    12: (11, 12, 13, 16, 17, 19, 20, 24, 27, 28, 29, 30),
    13: (12, 13, 17, 20, 21, 22, 28),
    14: (13, 14, 15, 16, 18, 22),
}
SIN_GRID_TILES: tuple[tuple[int, int], ...] = tuple(
    (vertical, horizontal) for vertical, columns in _TILE_COLUMNS.items() for horizontal in columns
)
"""(vertical, horizontal) sinusoidal tiles, in the original's order (the job index picks one)."""


class TileIndexError(StacchipError):
    """The job index is past the end of the tile list."""


def tile_for(index: int) -> tuple[int, int]:
    """The (vertical, horizontal) tile of job `index`."""
    if not 0 <= index < len(SIN_GRID_TILES):
        raise TileIndexError(
            f"job index {index} is out of range: the MODIS processor has {len(SIN_GRID_TILES)} "
            f"sinusoidal tiles (indexes 0-{len(SIN_GRID_TILES) - 1}); use a smaller `index`"
        )
    return SIN_GRID_TILES[index]


def month_range(year: int, month: int) -> str:
    """`YYYY-MM-01/YYYY-MM-DD`, the whole month."""
    last = calendar.monthrange(year, month)[1]
    return f"{year}-{month:02d}-01/{year}-{month:02d}-{last:02d}"


@register
class Modis(Processor):
    """MODIS MOD09A1: one composite a month of one sinusoidal tile, reprojected to EPSG:3857."""

    name = "modis"
    default_stac_api = "https://planetarycomputer.microsoft.com/api/stac/v1"
    default_collection = "modis-09A1-061"
    profile = PROFILE
    uses_sample_source = False

    def job_source(self, request: JobRequest) -> str:
        vertical, horizontal = tile_for(request.index)
        return f"{request.collection} tile h{horizontal:02d}v{vertical:02d}"

    def plan(self, context: PlanContext) -> list[Scene]:
        vertical, horizontal = tile_for(context.request.index)
        scenes = []
        for year in YEARS:
            for month in range(1, 13):
                label = f"{year}-{month:02d}"
                item = search_one(
                    context.client,
                    collections=[context.request.collection],
                    datetime=month_range(year, month),
                    query={
                        "modis:vertical-tile": {"eq": vertical},
                        "modis:horizontal-tile": {"eq": horizontal},
                    },
                )
                if item is None:
                    log.info("modis h%02dv%02d %s: no item, skipped", horizontal, vertical, label)
                    continue
                if any(scene.item.id == item.id for scene in scenes):
                    # An 8-day composite spanning a month's end is found in both months.
                    log.info("modis %s: %s already taken, skipped", label, item.id)
                    continue
                scenes.append(Scene(item=item, label=label))
        return scenes

    def prepare(self, item: dict[str, Any], folder: str, report: SceneReport) -> dict[str, Any]:
        for key, asset in item["assets"].items():
            source = asset["href"]
            destination = asset_path(folder, source)
            asset["href"] = derive_object(source, destination, _reprojector(source), report)
            asset["type"] = "image/tiff; application=geotiff; profile=cloud-optimized"
            for field in [k for k in asset if k.startswith("proj:")]:
                del asset[field]
            if key == QC_ASSET:
                with open_source(asset["href"]) as reprojected:
                    shape = [reprojected.height, reprojected.width]
                    transform = list(reprojected.transform)[:6]
        props = item["properties"]
        for field in [k for k in props if k.startswith("proj:")]:
            del props[field]
        props.update({"proj:code": DST_CRS, "proj:shape": shape, "proj:transform": transform})
        if props.get("end_datetime"):
            props["datetime"] = props["end_datetime"]
        extensions = [e for e in item.get("stac_extensions", []) if "/projection/" not in e]
        item["stac_extensions"] = [*extensions, PROJECTION_V2]
        return item


def _reprojector(source: str) -> Callable[[Path], None]:
    """Writes `source` reprojected (nearest) to EPSG:3857 as a COG, streamed by GDAL."""

    def reproject(path: Path) -> None:
        with (
            open_source(source) as dataset,
            WarpedVRT(dataset, crs=DST_CRS, resampling=Resampling.nearest) as warped,
        ):
            write_cog(warped, path)

    return reproject
