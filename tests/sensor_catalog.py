"""A second loopback STAC API for the Landsat, Sentinel-1 and MODIS processors.

Session-scoped, built like `stac_server` (stac-fastapi-pgstac over a pgstac database on the
test server) from small generated COGs:

- `landsat-c2l1` and `landsat-c2l2-sr`: the shared Landsat 9 fixture (EPSG:3031) as Level-1
  (with lwir, lwir_high and a 15 m pan band) and Level-2 scenes. Every quarter of 2018-2023
  has a winner (2-8 % cloud) beside traps the rules must pass over: a 16.8 % scene (first in
  a text sort), a clearer LANDSAT_7 scene, and a clearer scene away from the sample's
  centroid. `LANDSAT_CLOUDY_QUARTER` has only scenes above 75 %, `LANDSAT_EMPTY_QUARTER`
  none. `href`s point at landsatlook (unreachable in tests); the COGs are behind
  `alternate.s3.href` in a requester-pays bucket of the loopback S3 server.
- `sentinel-1-rtc`: a Planetary-Computer-like RTC item (UTM 33N, float32 vv/vh, nodata
  -32768 in a wedge) per quarter intersecting the sample, and a newer one elsewhere (first
  in the API's order when the spatial filter is missing). `S1_EMPTY_QUARTER` has only the
  one elsewhere.
- `modis-09A1-061`: MOD09A1-like items of tile `MODIS_TILE` (sinusoidal CRS as proj:wkt2,
  datetime null with start/end) in `MODIS_MONTHS`, and one of a neighbouring tile.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyproj
import pytest
import rasterio
from affine import Affine

from stacchip_db.demo import StacApiServer, collection_document, load_catalog
from stacchip_db.synthetic import modis_qc_pattern, scene_masks, synthesize_item, write_cog
from tests.conftest import FIXTURES

LANDSAT_FIXTURE = "landsat-c2l2-sr-LC09_L2SR_086107_20240311_20240312_02_T2_SR.json"
LANDSAT_COLLECTION_FIXTURE = "landsat-c2-l2-collection.json"
L1, L2 = "landsat-c2l1", "landsat-c2l2-sr"
LANDSAT_CLOUDY_QUARTER = (2020, 3)
LANDSAT_EMPTY_QUARTER = (2020, 1)
LANDSAT_SCALE = 30  # 8271 x 8331 px at 30 m -> 275 x 277 px at 900 m
S1, S1_EPSG = "sentinel-1-rtc", 32633
S1_ORIGIN, S1_PIXEL, S1_SHAPE = (500000.0, 5000000.0), 20.0, (320, 320)
S1_EMPTY_QUARTER = (2019, 2)
S1_NODATA = -32768.0
MODIS = "modis-09A1-061"
MODIS_TILE = (5, 18)  # (vertical, horizontal): 0-11 E, 30-40 N
MODIS_MONTHS = ((2018, 1), (2018, 7), (2021, 3))
MODIS_TILE_METRES = 1111950.5197665233
MODIS_SINUSOIDAL = pyproj.CRS.from_proj4("+proj=sinu +lon_0=0 +R=6371007.181 +units=m")
MODIS_QC_NODATA = 787410671  # Planetary Computer's raster:bands nodata of sur_refl_qc_500m


@dataclass
class SensorCatalog:
    server: StacApiServer
    items: dict[str, list[dict[str, Any]]]
    landsat_bucket: str
    landsat_centre: tuple[float, float]
    s1_centre: tuple[float, float]

    @property
    def url(self) -> str:
        return self.server.url


def quarter_of(item: dict[str, Any]) -> tuple[int, int]:
    stamp = item["properties"]["datetime"]
    return int(stamp[:4]), (int(stamp[5:7]) - 1) // 3 + 1


# -- Landsat ----------------------------------------------------------------------------------


def _landsat_bases(out_dir: Path) -> dict[str, dict[str, Any]]:
    fixture = json.loads((FIXTURES / LANDSAT_FIXTURE).read_text())
    l1 = copy.deepcopy(fixture)
    l1["collection"] = L1
    height, width = fixture["properties"]["proj:shape"]
    x0, y0 = fixture["properties"]["proj:transform"][2], fixture["properties"]["proj:transform"][5]
    for key, name in (("lwir", "B10"), ("lwir_high", "B11")):
        l1["assets"][key] = copy.deepcopy(fixture["assets"]["blue"]) | {
            "eo:bands": [{"name": name, "common_name": "lwir", "gsd": 100}]
        }
    l1["assets"]["pan"] = copy.deepcopy(fixture["assets"]["blue"]) | {
        "eo:bands": [{"name": "B8", "common_name": "pan", "gsd": 15}],
        "proj:shape": [2 * height, 2 * width],
        "proj:transform": [15, 0, x0, 0, -15, y0],
    }
    l2_assets = ["blue", "green", "red", "nir08", "swir16", "swir22", "qa_pixel"]
    l1_assets = [*l2_assets[:-1], "lwir", "lwir_high", "pan", "qa_pixel"]
    return {
        L1: synthesize_item(l1, out_dir / "l1", l1_assets, scale=LANDSAT_SCALE),
        L2: synthesize_item(fixture, out_dir / "l2", l2_assets, scale=LANDSAT_SCALE),
    }


def _upload_landsat(base: dict[str, Any], s3: Any, bucket: str) -> dict[str, Any]:
    """COGs into the requester-pays bucket; href unreachable, alternate.s3.href the copy."""
    out = copy.deepcopy(base)
    for asset in out["assets"].values():
        path = Path(asset["href"])
        if not path.is_file():
            continue
        object_key = f"collection02/{out['collection']}/{path.name}"
        s3.upload_file(str(path), bucket, object_key)
        asset["href"] = f"https://landsatlook.usgs.gov/data/{object_key}"
        asset["alternate"] = {
            "s3": {"storage:requester_pays": True, "href": f"s3://{bucket}/{object_key}"}
        }
    return out


def _landsat_item(
    base: dict[str, Any], day: date, cloud: float, platform: str, *, elsewhere: bool = False
) -> dict[str, Any]:
    item = copy.deepcopy(base)
    level = "L1TP" if base["collection"] == L1 else "L2SR"
    sat = "LC09" if platform == "LANDSAT_9" else ("LE07" if platform == "LANDSAT_7" else "LC08")
    row = "108" if elsewhere else "107"
    item["id"] = f"{sat}_{level}_086{row}_{day:%Y%m%d}_02_T1"
    props = item["properties"]
    props.update(
        {
            "datetime": f"{day.isoformat()}T23:34:56Z",
            "eo:cloud_cover": cloud,
            "platform": platform,
        }
    )
    for key in ("created", "updated"):
        props.pop(key, None)
    if elsewhere:  # a footprint 5 degrees east of the sample's centroid
        ring = [[x + 5.0, y] for x, y in item["geometry"]["coordinates"][0]]
        item["geometry"] = {"type": "Polygon", "coordinates": [ring]}
        west, south, east, north = item["bbox"]
        item["bbox"] = [west + 5.0, south, east + 5.0, north]
    item["links"] = []
    return item


def landsat_items(bases: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    items = []
    for base in bases.values():
        for year in range(2018, 2024):
            for quarter in range(1, 5):
                if (year, quarter) == LANDSAT_EMPTY_QUARTER:
                    continue
                month = 3 * (quarter - 1) + 1
                if (year, quarter) == LANDSAT_CLOUDY_QUARTER:
                    items += [
                        _landsat_item(base, date(year, month, 10), 80.0, "LANDSAT_8"),
                        _landsat_item(base, date(year, month + 1, 10), 91.5, "LANDSAT_9"),
                    ]
                    continue
                winner = 2.0 + (year * 4 + quarter) % 7
                items += [
                    _landsat_item(base, date(year, month + 1, 10), winner, "LANDSAT_8"),
                    _landsat_item(base, date(year, month, 20), 16.8, "LANDSAT_9"),
                    _landsat_item(base, date(year, month + 2, 5), 0.5, "LANDSAT_7"),
                    _landsat_item(
                        base, date(year, month + 2, 15), 1.0, "LANDSAT_9", elsewhere=True
                    ),
                ]
    return items


def expected_landsat_choice(
    items: list[dict[str, Any]], collection: str, year: int, quarter: int
) -> str | None:
    """What the rules must pick, from the catalog's items (the traps carry 'LE07'/'086108')."""
    candidates = [
        i
        for i in items
        if i["collection"] == collection
        and quarter_of(i) == (year, quarter)
        and i["properties"]["platform"] in ("LANDSAT_8", "LANDSAT_9")
        and "_086108_" not in i["id"]
    ]
    if not candidates:
        return None
    best = min(candidates, key=lambda i: i["properties"]["eo:cloud_cover"])
    return best["id"] if best["properties"]["eo:cloud_cover"] <= 75 else None


# -- Sentinel-1 RTC ---------------------------------------------------------------------------


def _s1_base(out_dir: Path) -> dict[str, Any]:
    height, width = S1_SHAPE
    left, top = S1_ORIGIN
    transform = Affine(S1_PIXEL, 0, left, 0, -S1_PIXEL, top)
    rng = np.random.default_rng(1)
    masks = scene_masks(S1_SHAPE)
    assets = {}
    for key, level in (("vv", 0.2), ("vh", 0.05)):
        data = (level + rng.gamma(2.0, 0.02, size=S1_SHAPE)).astype("float32")
        data[masks["nodata"]] = S1_NODATA
        path = out_dir / "s1" / f"iw-{key}.rtc.tiff"
        path.parent.mkdir(parents=True, exist_ok=True)
        # An uncompressed GeoTIFF: the processor must re-encode it (deflate COG).
        profile = {"driver": "GTiff", "tiled": True, "compress": "none", "dtype": "float32"}
        with rasterio.open(
            path, "w", **profile, width=width, height=height, count=1,
            crs=f"EPSG:{S1_EPSG}", transform=transform, nodata=S1_NODATA,
        ) as dst:  # fmt: skip
            dst.write(data, 1)
        assets[key] = {
            "href": str(path),
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "roles": ["data"],
            "raster:bands": [
                {"nodata": S1_NODATA, "data_type": "float32", "spatial_resolution": S1_PIXEL}
            ],
        }
    assets["rendered_preview"] = {"href": "https://example.invalid/preview.png", "roles": ["x"]}
    bounds = rasterio.transform.array_bounds(height, width, transform)
    to_lonlat = pyproj.Transformer.from_crs(S1_EPSG, 4326, always_xy=True)
    west, south, east, north = to_lonlat.transform_bounds(*bounds)
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
            "https://stac-extensions.github.io/sar/v1.0.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
        ],
        "id": "S1",
        "collection": S1,
        "bbox": [west, south, east, north],
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "datetime": None,
            "platform": "SENTINEL-1A",
            "constellation": "Sentinel-1",
            "sar:instrument_mode": "IW",
            "sar:polarizations": ["VV", "VH"],
            "sar:product_type": "GRD",
            "sat:orbit_state": "ascending",
            "proj:epsg": S1_EPSG,
            "proj:shape": [height, width],
            "proj:transform": [S1_PIXEL, 0.0, left, 0.0, -S1_PIXEL, top],
        },
        "links": [],
        "assets": assets,
    }


def _s1_item(base: dict[str, Any], day: date, *, elsewhere: bool = False) -> dict[str, Any]:
    item = copy.deepcopy(base)
    item["id"] = f"S1A_IW_GRDH_1SDV_{day:%Y%m%d}T050000_{'0999' if elsewhere else '0001'}_rtc"
    item["properties"]["datetime"] = f"{day.isoformat()}T05:00:00Z"
    if elsewhere:  # two degrees west: does not intersect the sample
        ring = [[x - 2.0, y] for x, y in item["geometry"]["coordinates"][0]]
        item["geometry"] = {"type": "Polygon", "coordinates": [ring]}
        item["bbox"] = [item["bbox"][0] - 2, item["bbox"][1], item["bbox"][2] - 2, item["bbox"][3]]
    return item


def s1_items(base: dict[str, Any]) -> list[dict[str, Any]]:
    items = []
    for year in range(2018, 2024):
        for quarter in range(1, 5):
            month = 3 * (quarter - 1) + 1
            if (year, quarter) != S1_EMPTY_QUARTER:
                items.append(_s1_item(base, date(year, month + 1, 3)))
            items.append(_s1_item(base, date(year, month + 2, 20), elsewhere=True))
    return items


# -- MODIS ------------------------------------------------------------------------------------


def _modis_base(out_dir: Path, tile: tuple[int, int]) -> dict[str, Any]:
    vertical, horizontal = tile
    left = -20015109.355797505 + horizontal * MODIS_TILE_METRES
    top = 10007554.677898752 - vertical * MODIS_TILE_METRES
    size, pixel = 300, MODIS_TILE_METRES / 300  # 2400 px of 463 m, scaled down by 8
    item: dict[str, Any] = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": ["https://stac-extensions.github.io/projection/v1.1.0/schema.json"],
        "id": "MOD09A1",
        "collection": MODIS,
        "properties": {
            "datetime": None,
            "platform": "terra",
            "instruments": ["modis"],
            "modis:horizontal-tile": horizontal,
            "modis:vertical-tile": vertical,
            "modis:tile-id": f"51{vertical:03d}{horizontal:03d}",
            "proj:wkt2": MODIS_SINUSOIDAL.to_wkt(),
            "proj:shape": [size, size],
            "proj:transform": [pixel, 0.0, left, 0.0, -pixel, top],
        },
        "links": [],
        "assets": {},
    }
    transform = Affine(pixel, 0, left, 0, -pixel, top)
    rng = np.random.default_rng(5)
    folder = out_dir / f"modis-h{horizontal:02d}v{vertical:02d}"
    for band in range(1, 8):
        key = f"sur_refl_b0{band}"
        data = rng.integers(100, 5000, size=(size, size)).astype("int16")
        path = write_cog(
            folder / f"{key}.tif", data, crs=MODIS_SINUSOIDAL.to_wkt(), transform=transform,
            nodata=-28672, categorical=False,
        )  # fmt: skip
        item["assets"][key] = {
            "href": str(path),
            "raster:bands": [{"nodata": -28672, "data_type": "int16"}],
        }
    qc = write_cog(
        folder / "sur_refl_qc_500m.tif", modis_qc_pattern((size, size)),
        crs=MODIS_SINUSOIDAL.to_wkt(), transform=transform, nodata=MODIS_QC_NODATA,
    )  # fmt: skip
    item["assets"]["sur_refl_qc_500m"] = {
        "href": str(qc),
        "raster:bands": [{"nodata": MODIS_QC_NODATA, "data_type": "uint32"}],
    }
    item["assets"]["metadata"] = {"href": "https://example.invalid/MOD09A1.hdf.xml"}
    to_lonlat = pyproj.Transformer.from_crs(MODIS_SINUSOIDAL, 4326, always_xy=True)
    corners = [(left, top - size * pixel), (left + size * pixel, top - size * pixel)]
    corners += [(left + size * pixel, top), (left, top)]
    ring = [list(to_lonlat.transform(x, y)) for x, y in corners]
    ring.append(ring[0])
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    item["geometry"] = {"type": "Polygon", "coordinates": [ring]}
    item["bbox"] = [min(xs), min(ys), max(xs), max(ys)]
    return item


def _modis_item(base: dict[str, Any], start: date) -> dict[str, Any]:
    item = copy.deepcopy(base)
    props = item["properties"]
    vertical, horizontal = props["modis:vertical-tile"], props["modis:horizontal-tile"]
    item["id"] = f"MOD09A1.A{start:%Y%j}.h{horizontal:02d}v{vertical:02d}.061"
    props["start_datetime"] = f"{start.isoformat()}T00:00:00Z"
    props["end_datetime"] = f"{(start + timedelta(days=7)).isoformat()}T23:59:59Z"
    return item


def modis_items(out_dir: Path) -> list[dict[str, Any]]:
    tile = _modis_base(out_dir, MODIS_TILE)
    neighbour = _modis_base(out_dir, (MODIS_TILE[0], MODIS_TILE[1] + 1))
    items = [_modis_item(tile, date(year, month, 9)) for year, month in MODIS_MONTHS]
    items += [_modis_item(neighbour, date(year, month, 17)) for year, month in MODIS_MONTHS]
    return items


# -- the fixture ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sensor_api(
    pg_server: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SensorCatalog]:
    out_dir = tmp_path_factory.mktemp("sensors")
    bucket = s3_server.new_bucket("usgs-landsat", requester_pays=True)
    s3 = s3_server.client()
    bases = {
        name: _upload_landsat(base, s3, bucket) for name, base in _landsat_bases(out_dir).items()
    }
    s1_base = _s1_base(out_dir)
    items = {
        "landsat": landsat_items(bases),
        S1: s1_items(s1_base),
        MODIS: modis_items(out_dir),
    }
    name = pg_server.new_name("sensor_source")
    url = pg_server.create(name)
    collections = [
        collection_document(LANDSAT_COLLECTION_FIXTURE, collection, FIXTURES)
        for collection in (L1, L2, S1, MODIS)
    ]
    load_catalog(url, collections, [item for group in items.values() for item in group])
    west, south, east, north = bases[L2]["bbox"]
    landsat_centre = ((west + east) / 2, (south + north) / 2)
    s1_west, s1_south, s1_east, s1_north = s1_base["bbox"]
    server = StacApiServer(url).start()
    try:
        yield SensorCatalog(
            server=server,
            items=items,
            landsat_bucket=bucket,
            landsat_centre=landsat_centre,
            s1_centre=((s1_west + s1_east) / 2, (s1_south + s1_north) / 2),
        )
    finally:
        server.stop()
        pg_server.drop(name)


def box_around(centre: tuple[float, float], half: float) -> dict[str, Any]:
    """A GeoJSON square of `2 * half` degrees around `centre`."""
    x, y = centre
    ring = [[x - half, y - half], [x + half, y - half], [x + half, y + half]]
    ring += [[x - half, y + half], [x - half, y - half]]
    return {"type": "Polygon", "coordinates": [ring]}
