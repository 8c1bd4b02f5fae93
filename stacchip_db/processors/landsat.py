"""Landsat Collection 2: least cloudy scene per quarter, Level-1 in one year, Level-2 in another.

Rules (the original stacchip's, with its slips fixed):
- two distinct years of 2018-2023 drawn with the job index as seed: `landsat-c2l1` scenes in
  the first, `landsat-c2l2-sr` (`--collection`) scenes in the second (the original re-seeded
  before each collection and so used one year for both);
- per quarter, the least cloudy item (`eo:cloud_cover`) at the sample geometry's centroid
  with platform LANDSAT_8 or LANDSAT_9 (one sorted search per platform); a scene above
  `--max-cloud-cover` percent (default 75) is skipped, as is an empty quarter (the original
  took `[0]` of it);
- assets: Level-1 blue green red nir08 swir16 swir22 lwir lwir_high pan qa_pixel, Level-2
  blue green red nir08 swir16 swir22 qa_pixel (the original's asset filter dropped the
  Level-1-only bands);
- copied from `alternate.s3.href` when the asset has one (the usgs-landsat bucket, requester
  pays), else from `href`;
- quality: QA_PIXEL, and only chips without any fill pixel are stored (`max_nodata` 0).

The chip grid is the item's own `proj:shape`/`proj:transform`: the 30 m grid, as the
original's LandsatIndexer used. A 256 px chip is 7.68 km and the 15 m `pan` band (Level-1)
covers it with 512 x 512 of its pixels; the grid is not moved to the finer pan grid because
that would halve every chip and break agreement with the original's chip ids, and the Clay
band order for Landsat does not read pan.
"""

from __future__ import annotations

import logging
import random

import click
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

log = logging.getLogger(__name__)

PLATFORMS = ("LANDSAT_8", "LANDSAT_9")
L1_COLLECTION = "landsat-c2l1"
L2_COLLECTION = "landsat-c2l2-sr"
L2_PROFILE = collection_profile(L2_COLLECTION)
L2_ASSETS = L2_PROFILE.layout.assets
L1_ASSETS = collection_profile(L1_COLLECTION).layout.assets


def choose_years(index: int) -> tuple[int, int]:
    """`(Level-1 year, Level-2 year)`: two distinct years drawn with the job index as seed."""
    first, second = random.Random(index).sample(list(YEARS), 2)
    return first, second


def is_level1(collection: str | None) -> bool:
    """Level-1 collections (`landsat-c2l1`, `landsat-c2-l1`) keep the thermal and pan bands."""
    return collection is not None and "l1" in collection.replace("-", "").lower()


@register
class Landsat(Processor):
    """Landsat C2: least cloudy scene per quarter, Level-1 in one year and Level-2 in another."""

    name = "landsat"
    default_stac_api = "https://landsatlook.usgs.gov/stac-server"
    default_collection = L2_COLLECTION
    profile = L2_PROFILE
    max_nodata = 0.0
    requester_pays = True  # usgs-landsat charges the requester
    cli_options = (
        click.option(
            "--l1-collection",
            default=L1_COLLECTION,
            show_default=True,
            help="Level-1 collection searched in the first year (--collection: Level-2).",
        ),
        max_cloud_cover_option,
    )

    def plan(self, context: PlanContext) -> list[Scene]:
        max_cloud = float(context.options.get("max_cloud_cover", MAX_CLOUD_COVER))
        l1_year, l2_year = choose_years(context.request.index)
        l1_collection = str(context.options.get("l1_collection") or L1_COLLECTION)
        scenes = []
        for collection, year in ((l1_collection, l1_year), (context.request.collection, l2_year)):
            for quarter, (start, end) in enumerate(QUARTERS, 1):
                label = f"{year} Q{quarter}"
                item = self._least_cloudy(context, collection, f"{year}-{start}/{year}-{end}")
                if item is None:
                    log.info("landsat %s %s: no scene, skipped", collection, label)
                    continue
                cloud = _cloud_cover(item)
                if cloud > max_cloud:
                    log.info(
                        "landsat %s %s: least cloudy scene %s has %.1f %% cloud > %.1f %%, skipped",
                        collection,
                        label,
                        item.id,
                        cloud,
                        max_cloud,
                    )
                    continue
                scenes.append(Scene(item=item, label=label))
        return scenes

    def _least_cloudy(
        self, context: PlanContext, collection: str, period: str
    ) -> pystac.Item | None:
        """The least cloudy item at the centroid among LANDSAT_8 and LANDSAT_9 scenes.

        One sorted search per platform, with `eq`: the query extension of stac-fastapi
        (pgstac) has no `in`, and CQL2 support varies between the APIs this may point at.
        """
        found = [
            search_one(
                context.client,
                collections=[collection],
                intersects=context.sample.geometry.centroid,
                datetime=period,
                query={"platform": {"eq": platform}},
                sortby=[{"field": "properties.eo:cloud_cover", "direction": "asc"}],
            )
            for platform in PLATFORMS
        ]
        items = [item for item in found if item is not None]
        return min(items, key=_cloud_cover, default=None)

    def assets_for(self, item: pystac.Item) -> tuple[str, ...]:
        return L1_ASSETS if is_level1(item.collection_id) else L2_ASSETS

    def source_href(self, item: pystac.Item, key: str) -> str:
        alternate = item.assets[key].extra_fields.get("alternate") or {}
        s3_href = (alternate.get("s3") or {}).get("href")
        return str(s3_href) if s3_href else super().source_href(item, key)


def _cloud_cover(item: pystac.Item) -> float:
    return float(item.properties.get("eo:cloud_cover", 0.0))
