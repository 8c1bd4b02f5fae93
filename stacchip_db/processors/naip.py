"""NAIP: the latest aerial image at the sample's centroid, plus one earlier one at random.

Rules (the original stacchip's): search the `naip` collection at the centroid of the sample
geometry, up to 10 items sorted by `naip:year`; take the latest and one other chosen at random,
seeded by the job index (`--latest-only`: only the latest). No quality band.

Planetary Computer's hrefs need a SAS token, appended where they are copied (`signing`;
`--no-sign` turns it off).
"""

from __future__ import annotations

import logging
import random

import click
import pystac

from stacchip_db.processors import register
from stacchip_db.processors.base import PlanContext, Processor, Scene
from stacchip_db.sensors import collection_profile
from stacchip_db.stac_api import search

log = logging.getLogger(__name__)

MAX_ITEMS = 10


def _year_and_date(item: pystac.Item) -> tuple[str, str]:
    return str(item.properties.get("naip:year", "")), str(item.properties.get("datetime", ""))


@register
class Naip(Processor):
    """NAIP: the latest image at the sample's centroid and one other at random."""

    name = "naip"
    default_stac_api = "https://planetarycomputer.microsoft.com/api/stac/v1"
    default_collection = "naip"
    profile = collection_profile("naip")
    cli_options = (
        click.option(
            "--latest-only", is_flag=True, help="Take only the latest image, not a random other."
        ),
    )

    def plan(self, context: PlanContext) -> list[Scene]:
        centroid = context.sample.geometry.centroid
        items = search(
            context.client,
            max_items=MAX_ITEMS,
            collections=[context.request.collection],
            intersects=centroid,
            sortby=[{"field": "properties.naip:year", "direction": "desc"}],
        )
        if not items:
            log.info("no NAIP image at %.5f, %.5f: nothing to do", centroid.x, centroid.y)
            return []
        # Sorted here as well: the API's order is a hint, the rule is "latest".
        items.sort(
            key=lambda i: (
                str(i.properties.get("naip:year", "")),
                str(i.properties.get("datetime")),
            ),
            reverse=True,
        )
        scenes = [Scene(item=items[0], label="latest")]
        others = items[1:]
        if others and not context.options.get("latest_only", False):
            scenes.append(
                Scene(item=random.Random(context.request.index).choice(others), label="random")
            )
        return scenes
