"""Sentinel-2 L2A: the least cloudy scene per quarter of two random years, per MGRS tile.

Rules (the original stacchip's, with its slips fixed):
- the sample row's `name` is an MGRS tile (e.g. `20HNJ`), its geometry the search area;
- two distinct years in 2018-2023, drawn with the job index as seed;
- per quarter, the item intersecting the geometry with `grid:code = MGRS-{name}` and
  `s2:nodata_pixel_percentage <= 20`, sorted by `eo:cloud_cover` ascending, first one;
- a scene above `--max-cloud-cover` percent (default 75) is skipped (the original compared the
  0-100 percentage with 0.75, so it skipped almost everything but clear scenes);
- an empty quarter is logged and skipped (the original took `[0]` of an empty result).
"""

from __future__ import annotations

import logging
import random

import pystac

from stacchip_db.processors import register
from stacchip_db.processors.base import (
    MAX_CLOUD_COVER,
    QUARTERS,
    YEARS,
    PlanContext,
    Processor,
    Scene,
    max_cloud_cover_option,
)
from stacchip_db.sensors import collection_profile
from stacchip_db.stac_api import search_one
from stacchip_db.storage import s3_url_from_https

log = logging.getLogger(__name__)

MAX_NODATA_PIXEL_PERCENTAGE = 20
PROFILE = collection_profile("sentinel-2-l2a")
"""Earth Search v1's layout (the default API): assets `blue` … `swir22` and `scl`."""


def choose_years(index: int) -> list[int]:
    """Two distinct years of `YEARS`, seeded by the job index, in order."""
    return sorted(random.Random(index).sample(list(YEARS), 2))


@register
class Sentinel2(Processor):
    """Sentinel-2 L2A: least cloudy scene per quarter of two random years, per MGRS tile."""

    name = "sentinel-2"
    default_stac_api = "https://earth-search.aws.element84.com/v1"
    default_collection = "sentinel-2-l2a"
    profile = PROFILE
    requester_pays = False  # sentinel-cogs is a free, public bucket
    sample_source_env = "STACCHIP_MGRS_SOURCE"
    cli_options = (
        max_cloud_cover_option,
    )

    def plan(self, context: PlanContext) -> list[Scene]:
        tile = str(context.sample.attribute("name", context.request.sample_source)).strip()
        max_cloud = float(context.options.get("max_cloud_cover", MAX_CLOUD_COVER))
        scenes = []
        for year in choose_years(context.request.index):
            for quarter, (start, end) in enumerate(QUARTERS, 1):
                label = f"{year} Q{quarter}"
                item = search_one(
                    context.client,
                    collections=[context.request.collection],
                    intersects=context.sample.geometry,
                    datetime=f"{year}-{start}/{year}-{end}",
                    query={
                        "grid:code": {"eq": f"MGRS-{tile}"},
                        "s2:nodata_pixel_percentage": {"lte": MAX_NODATA_PIXEL_PERCENTAGE},
                    },
                    sortby=[{"field": "properties.eo:cloud_cover", "direction": "asc"}],
                )
                if item is None:
                    log.info("MGRS %s %s: no scene, skipped", tile, label)
                    continue
                cloud = float(item.properties.get("eo:cloud_cover", 0.0))
                if cloud > max_cloud:
                    log.info(
                        "MGRS %s %s: least cloudy scene %s has %.1f %% cloud > %.1f %%, skipped",
                        tile,
                        label,
                        item.id,
                        cloud,
                        max_cloud,
                    )
                    continue
                scenes.append(Scene(item=item, label=label))
        return scenes

    def source_href(self, item: pystac.Item, key: str) -> str:
        # Earth Search serves https:// URLs of the sentinel-cogs bucket; as s3:// they are
        # copied server-side when the target is S3.
        return s3_url_from_https(super().source_href(item, key))
