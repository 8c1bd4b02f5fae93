"""Sentinel-1 RTC: one scene of a random quarter of a random year, over the sample geometry.

Rules (the original stacchip's, with its slips fixed):
- Planetary Computer's `sentinel-1-rtc` (hrefs signed where they are read, `signing`);
- one year of 2018-2023 and one quarter of it, drawn with the job index as seed (the same
  draws as the original: `sample(years, 1)` then `sample(quarters, 1)`);
- the first item of that quarter *intersecting the sample geometry* (the original's CQL2
  filter ended up without its spatial part in one version; here the geometry is always a
  filter); an empty quarter is logged and skipped (the original took `[0]` of it);
- assets `vv` and `vh`, rewritten as deflate-compressed COGs (RTC sources are large
  uncompressed-ish COGs; the copies are about half the size);
- quality: nodata where `vv` equals its nodata value (the file's, written into the stored
  item's `raster:bands`; -32768 when neither says), never cloud.

The Batch entrypoint reads the sample source from `STACCHIP_SAMPLE_SOURCE`, as every processor
but sentinel-2 does (the original's Sentinel-1 job reused `STACCHIP_MGRS_SOURCE`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stacchip_db.processors import register
from stacchip_db.processors.base import (
    QUARTERS,
    YEARS,
    PlanContext,
    Processor,
    Scene,
    SceneReport,
    asset_path,
)
from stacchip_db.processors.derived import derive_object, open_source, write_cog
from stacchip_db.quality import QualityRule, profile_rule
from stacchip_db.sensors import collection_profile
from stacchip_db.stac_api import search_one

log = logging.getLogger(__name__)

PROFILE = collection_profile("sentinel-1-rtc")
"""Planetary Computer's layout: vv and vh, nodata -32768 unless `raster:bands` says."""


def choose_quarter(index: int) -> tuple[int, int]:
    """`(year, quarter 1-4)` drawn with the job index as seed, as the original drew them."""
    rng = random.Random(index)
    year = rng.sample(list(YEARS), 1)[0]
    quarter = rng.sample(range(len(QUARTERS)), 1)[0]
    return year, quarter + 1


@register
class Sentinel1(Processor):
    """Sentinel-1 RTC: one scene of a random quarter over the sample, vv and vh as COGs."""

    name = "sentinel-1"
    default_stac_api = "https://planetarycomputer.microsoft.com/api/stac/v1"
    default_collection = "sentinel-1-rtc"
    profile = PROFILE

    def plan(self, context: PlanContext) -> list[Scene]:
        year, quarter = choose_quarter(context.request.index)
        start, end = QUARTERS[quarter - 1]
        label = f"{year} Q{quarter}"
        item = search_one(
            context.client,
            collections=[context.request.collection],
            intersects=context.sample.geometry,
            datetime=f"{year}-{start}/{year}-{end}",
        )
        if item is None:
            log.info("sentinel-1 %s: no scene intersects the sample, skipped", label)
            return []
        return [Scene(item=item, label=label)]

    def prepare(self, item: dict[str, Any], folder: str, report: SceneReport) -> dict[str, Any]:
        for asset in item["assets"].values():
            source = asset["href"]
            destination = asset_path(folder, source)
            asset["href"] = derive_object(source, destination, _reencoder(source), report)
            asset["type"] = "image/tiff; application=geotiff; profile=cloud-optimized"
            with open_source(asset["href"]) as copy:  # the file's nodata wins over the catalog's
                if copy.nodata is not None:
                    asset.setdefault("raster:bands", [{}])[0]["nodata"] = copy.nodata
        return item

    def quality_rule(self, item: dict[str, Any]) -> QualityRule:
        return profile_rule(PROFILE, item)  # the file's nodata, written into raster:bands


def _reencoder(source: str) -> Callable[[Path], None]:
    """Writes `source` as a deflate-compressed COG (GDAL streams it, block by block)."""

    def reencode(path: Path) -> None:
        with open_source(source) as dataset:
            write_cog(dataset, path, overview_resampling="average")

    return reencode
