"""LINZ aerial imagery: a sample of the tiles of one New Zealand survey, resampled to 0.3 m.

Rules (the original stacchip's, with its slips fixed):
- the source is not a STAC API but the `nz-imagery` bucket (LINZ's static catalog): the job
  index picks one of `NZ_PREFIXES` (`--prefix`, repeatable, replaces the list), and the job
  lists the `.tiff` objects under `{source}/{prefix}`; `--stac-api` names the source bucket
  (default `s3://nz-imagery`). The job reads no sample source;
- half of the tiles are taken, at least 10 (all of them when there are fewer; the original
  then failed) and at most 2000, drawn with seed 42 from the listing in key order;
- each tile's STAC item is the JSON beside it (`{key without .tiff}.json`);
- the tile is resampled (bilinear) to 0.3 m, its alpha band dropped, and written as a
  deflate-compressed COG to `{target}/linz/{item id}/{tile name}`; the stored item is made
  from that COG with rio-stac (projection fields included), with the original item's id
  and its `start_datetime` as `datetime`;
- quality: nodata where band 1 is 0, never cloud.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import numpy as np
import pystac
from affine import Affine
from botocore.exceptions import BotoCoreError, ClientError
from rasterio.enums import ColorInterp, Resampling
from rio_stac import create_stac_item

from stacchip_db import storage
from stacchip_db.errors import StacchipError
from stacchip_db.processors import register
from stacchip_db.processors.base import (
    JobRequest,
    PlanContext,
    Processor,
    Scene,
    SceneReport,
    asset_path,
)
from stacchip_db.processors.derived import derive_object, open_source, write_array_cog
from stacchip_db.sensors import collection_profile
from stacchip_db.text import first_line

log = logging.getLogger(__name__)

TARGET_RESOLUTION = 0.3
"""Metres per pixel of every stored LINZ tile (surveys range from 0.05 to 0.3 m)."""
PROFILE = collection_profile("linz")
ASSET = PROFILE.layout.quality_asset or "visual"
"""Key of the image asset in LINZ's items, kept in the stored ones."""
SAMPLE_SEED = 42
MIN_TILES, MAX_TILES = 10, 2000
NZ_PREFIXES = (
    "auckland/auckland_2022_0.075m/",
    "wellington/wellington_2021_0.075m/",
    "wellington/wellington_2021_0.3m/",
    "bay-of-plenty/bay-of-plenty_2023_0.1m/",
    "bay-of-plenty/tauranga_2022_0.1m/",
    "bay-of-plenty/tauranga-winter_2022_0.1m/",
    "canterbury/canterbury_2023_0.3m/",
    "canterbury/ashburton_2023_0.1m/",
    "canterbury/hurunui_2023_0.075m/",
    "canterbury/timaru_2022-2023_0.1m/",
    "canterbury/selwyn_2022-2023_0.075m/",
    "gisborne/gisborne_2023_0.075m/",
    "hawkes-bay/hawkes-bay_2022_0.05m/",
    "hawkes-bay/napier_2017-2018_0.05m/",
    "hawkes-bay/wairoa_2014-2015_0.1m/",
    "manawatu-whanganui/manawatu-whanganui_2021-2022_0.3m/",
    "manawatu-whanganui/palmerston-north_2022_0.125m/",
    "manawatu-whanganui/rangitikei_2021_0.125m/",
    "manawatu-whanganui/tararua_2024_0.1m/",
    "manawatu-whanganui/whanganui_2022_0.075m/",
    "marlborough/marlborough_2023_0.075m/",
    "nelson/nelson_2022_0.075m/",
    "northland/northland_2016_0.1m/",
    "otago/queenstown_2021_0.1m/",
    "otago/otago_2018_0.1m/",
    "otago/dunedin_2018-2019_0.1m/",
    "southland/southland_2023_0.1m/",
    "southland/invercargill_2022_0.05m/",
    "taranaki/taranaki_2022_0.05m/",
    "taranaki/new-plymouth_2017_0.1m/",
    "tasman/tasman_2023_0.075m/",
    "waikato/hamilton_2023_0.05m/",
    "waikato/otorohanga_2021_0.1m/",
    "waikato/taupo_2023_0.075m/",
    "waikato/thames-coromandel_2021_0.1m/",
    "waikato/waikato_2021_0.1m/",
    "waikato/waipa_2021_0.1m/",
    "west-coast/buller_2020_0.2m/",
    "west-coast/west-coast_2016_0.1m/",
)
"""The original's New Zealand surveys; the job index picks one."""


class LinzSourceError(StacchipError):
    """The source bucket, prefix or a tile's item does not fit the LINZ rules."""


def sample_size(count: int) -> int:
    """How many of `count` tiles a job takes: half, at least 10, at most 2000, at most all."""
    return min(count, max(min(count // 2, MAX_TILES), MIN_TILES))


def choose_tiles(keys: list[str]) -> list[str]:
    """The tiles to ingest: `sample_size` of them, drawn with seed 42 from the sorted keys."""
    ordered = sorted(keys)
    return random.Random(SAMPLE_SEED).sample(ordered, sample_size(len(ordered)))


def prefix_for(request: JobRequest) -> str:
    """The prefix of job `request.index` (of `--prefix` values, else `NZ_PREFIXES`)."""
    prefixes = tuple(request.options.get("prefix") or ()) or NZ_PREFIXES
    if not 0 <= request.index < len(prefixes):
        raise LinzSourceError(
            f"job index {request.index} is out of range: there are {len(prefixes)} LINZ "
            f"prefixes (indexes 0-{len(prefixes) - 1}); use a smaller `index` or more `prefix`"
        )
    return prefixes[request.index].strip("/") + "/"


def list_tiffs(url: str) -> list[str]:
    """`s3://` URLs of the `.tiff` objects under the prefix URL `url`."""
    bucket, prefix = storage.split_s3(url)
    keys = []
    try:
        pages = (
            storage.s3_client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=prefix)
        )
        for page in pages:
            keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".tiff")]
    except (ClientError, BotoCoreError) as exc:
        raise LinzSourceError(
            f"cannot list {url}: {first_line(exc)}; check `stac_api` (the source "
            "bucket) and `prefix`"
        ) from exc
    return [f"s3://{bucket}/{key}" for key in keys]


@register
class Linz(Processor):
    """LINZ aerial imagery: half the tiles of one survey, resampled to 0.3 m COGs."""

    name = "linz"
    default_stac_api = "s3://nz-imagery"
    default_collection = "linz"
    profile = PROFILE
    assets = (ASSET,)
    uses_sample_source = False
    searches_stac_api = False
    cli_options = (
        click.option(
            "--prefix",
            multiple=True,
            help="Survey prefix in the source bucket (repeatable); the job index picks one. "
            "Default: the original's 39 New Zealand surveys.",
        ),
    )

    def job_source(self, request: JobRequest) -> str:
        return storage.join(request.stac_api, prefix_for(request)) + "/"

    def plan(self, context: PlanContext) -> list[Scene]:
        root = context.request.stac_api
        if not storage.is_s3(root):
            raise LinzSourceError(
                f"LINZ source {root!r} is not an s3:// bucket; pass `stac_api` s3://nz-imagery "
                "(or the bucket holding the tiles)"
            )
        url = storage.join(root, prefix_for(context.request)) + "/"
        tiffs = list_tiffs(url)
        chosen = choose_tiles(tiffs)
        log.info("linz %s: %d tiles, keeping %d", url, len(tiffs), len(chosen))
        scenes = []
        for number, tiff in enumerate(chosen, 1):
            item = _original_item(tiff)
            item.collection_id = context.request.collection
            if ASSET not in item.assets:
                raise LinzSourceError(
                    f"item of {tiff} has no {ASSET!r} asset (it has "
                    f"{', '.join(sorted(item.assets))}); is it a LINZ imagery item?"
                )
            item.assets[ASSET].href = tiff
            scenes.append(Scene(item=item, label=f"tile {number}/{len(chosen)}"))
        return scenes

    def prepare(self, item: dict[str, Any], folder: str, report: SceneReport) -> dict[str, Any]:
        source = item["assets"][ASSET]["href"]
        destination = asset_path(folder, source)
        href = derive_object(source, destination, _resampler(source), report)
        start = item["properties"].get("start_datetime") or item["properties"].get("datetime")
        if not start:
            raise LinzSourceError(f"item {item['id']} has no start_datetime; fix the source item")
        stored = create_stac_item(
            href,
            input_datetime=datetime.fromisoformat(str(start).replace("Z", "+00:00")),
            id=item["id"],
            collection=item["collection"],
            asset_name=ASSET,
            asset_href=href,
            asset_media_type=pystac.MediaType.COG,
            with_proj=True,
        )
        data = stored.to_dict(include_self_link=False, transform_hrefs=False)
        data["links"] = []
        return data


def _original_item(tiff: str) -> pystac.Item:
    """The LINZ item JSON beside `tiff`."""
    href = tiff.removesuffix(".tiff") + ".json"
    text = storage.read_text(href)
    try:
        return pystac.Item.from_dict(json.loads(text), preserve_dict=False)
    except (ValueError, KeyError, TypeError) as exc:
        raise LinzSourceError(f"{href} is not a STAC item: {exc}") from exc


def _resampler(source: str) -> Callable[[Path], None]:
    """Writes `source` resampled (bilinear) to 0.3 m without its alpha band, as a COG."""

    def resample(path: Path) -> None:
        with open_source(source) as dataset:
            factor = abs(dataset.transform.a) / TARGET_RESOLUTION
            height = max(1, int(dataset.height * factor))
            width = max(1, int(dataset.width * factor))
            bands = [i + 1 for i, c in enumerate(dataset.colorinterp) if c != ColorInterp.alpha][:3]
            data: np.ndarray = dataset.read(
                bands, out_shape=(len(bands), height, width), resampling=Resampling.bilinear
            )
            transform = dataset.transform @ Affine.scale(
                dataset.width / width, dataset.height / height
            )
            profile = {"crs": dataset.crs, "transform": transform, "nodata": dataset.nodata}
        write_array_cog(path, data, profile, overview_resampling="average")

    return resample
