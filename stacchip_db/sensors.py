"""The sensor registry: every fact about a sensor and how each catalog spells it, in one place.

A `Sensor` is a platform as the Clay model knows it: its bands in export order, the value its
files use for "no data", the bands a picture shows as RGB and the kind of quality band it has.
A `Layout` is how one catalog serves that sensor: its collection ids, the asset key (and band
of that asset) of each export band, the key of the quality asset, and the other assets a
processor copies. The same sensor is spelt differently by each catalog: Sentinel-2's red edge
is `rededge1` on Earth Search v1 but `B05` on Planetary Computer and Earth Search v0, whose
quality band is `SCL`, not `scl`.

`profile_for(item)` recognises the `Profile` (sensor + layout) of a STAC item from its
collection id and asset keys; `sensor_for(collection)` finds the sensor of a collection id.
The reader (band order of exports), the quality rules (`--quality auto`), `stats`, the
processors and the CLI read these facts from here; nothing else holds them.

Asset keys are matched exactly, then without case and file extension, so a USGS item keying
its band `QA_PIXEL.TIF` matches `qa_pixel`. Bands without a layout entry are found by asset
key or by an `eo:bands` / `bands` name or common name (`band_names`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from stacchip_db.errors import StacchipError
from stacchip_db.grid import item_view


class BandError(StacchipError):
    """A requested band is not in the item, or the sensor of a collection is unknown."""


@dataclass(frozen=True)
class Layout:
    """How one catalog serves a sensor: collection ids and asset keys.

    `bands` maps each export band to `(asset key, 1-based band index of that asset)`;
    `quality_asset` is the key of the quality band (None: the sensor has none);
    `extra_assets` are further assets a processor keeps (Landsat Level-1's thermal and pan).
    """

    catalogs: tuple[str, ...]
    collections: tuple[str, ...]
    bands: Mapping[str, tuple[str, int]]
    quality_asset: str | None
    extra_assets: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The catalogs, as reports name this layout (`planetary-computer`, …)."""
        return "/".join(self.catalogs)

    @property
    def assets(self) -> tuple[str, ...]:
        """Every asset key a processor keeps: band assets, then quality, then extras."""
        keys = dict.fromkeys(key for key, _ in self.bands.values())
        if self.quality_asset is not None:
            keys[self.quality_asset] = None
        keys.update(dict.fromkeys(self.extra_assets))
        return tuple(keys)


@dataclass(frozen=True)
class Sensor:
    """A sensor as the Clay model knows it, and the catalogs that serve it.

    `quality` names the kind of quality rule (`s2`, `landsat`, `modis`, `none`, or `nodata`:
    no cloud band, nodata where the quality asset equals its nodata value); `rule_name` is
    what reports call that rule (default: `quality`). `nodata` is the value stats skip and,
    for `nodata` rules, the value used when the asset's `raster:bands` does not say.
    """

    name: str
    bands: tuple[str, ...]
    nodata: float
    rgb: tuple[str, str, str]
    quality: str
    words: tuple[str, ...]
    """Collection ids or `platform` properties containing one of these words are this sensor."""
    layouts: tuple[Layout, ...]
    rule_name: str = ""

    def __post_init__(self) -> None:
        if not self.rule_name:
            object.__setattr__(self, "rule_name", self.quality)

    def layout(self, catalog: str) -> Layout:
        """The layout of `catalog` (e.g. `earth-search-v1`)."""
        for layout in self.layouts:
            if catalog in layout.catalogs:
                return layout
        raise KeyError(f"sensor {self.name} has no layout for catalog {catalog!r}")


@dataclass(frozen=True)
class Profile:
    """A recognised item: its sensor and the layout its catalog uses."""

    sensor: Sensor
    layout: Layout

    @property
    def name(self) -> str:
        """`sensor (catalogs)`, as `index` reports it."""
        return f"{self.sensor.name} ({self.layout.name})"


def _single(**keys: str) -> dict[str, tuple[str, int]]:
    """Band -> (asset key, 1): one band per asset."""
    return {band: (key, 1) for band, key in keys.items()}


def _stacked(asset: str, bands: Iterable[str]) -> dict[str, tuple[str, int]]:
    """Band -> (asset, position): all bands in one multi-band asset, in order."""
    return {band: (asset, i) for i, band in enumerate(bands, start=1)}


S2_BANDS = (
    "blue", "green", "red", "rededge1", "rededge2", "rededge3", "nir", "nir08", "swir16", "swir22",
)
S2_NUMBERED = dict(
    blue="B02", green="B03", red="B04", rededge1="B05", rededge2="B06", rededge3="B07",
    nir="B08", nir08="B8A", swir16="B11", swir22="B12",
)
"""Sentinel-2's band numbers, the asset keys of Planetary Computer and Earth Search v0."""
LANDSAT_BANDS = ("red", "green", "blue", "nir08", "swir16", "swir22")
MODIS_BANDS = tuple(f"sur_refl_b0{i}" for i in range(1, 8))

SENSORS: dict[str, Sensor] = {
    s.name: s
    for s in (
        Sensor(
            "sentinel-2-l2a",
            S2_BANDS,
            0,
            ("red", "green", "blue"),
            "s2",
            ("sentinel-2", "sentinel2", "s2"),
            (
                Layout(
                    ("earth-search-v1",),
                    ("sentinel-2-l2a", "sentinel-2-c1-l2a"),
                    _single(**{b: b for b in S2_BANDS}),
                    "scl",
                ),
                Layout(
                    ("planetary-computer", "earth-search-v0"),
                    ("sentinel-2-l2a", "sentinel-s2-l2a-cogs"),
                    _single(**S2_NUMBERED),
                    "SCL",
                ),
            ),
        ),
        Sensor(
            "landsat",
            LANDSAT_BANDS,
            0,
            ("red", "green", "blue"),
            "landsat",
            ("landsat",),
            (
                Layout(
                    ("earth-search-v1", "planetary-computer", "usgs-landsatlook"),
                    ("landsat-c2-l2", "landsat-c2l2-sr"),
                    _single(**{b: b for b in LANDSAT_BANDS}),
                    "qa_pixel",
                ),
                Layout(
                    ("usgs-landsatlook",),
                    ("landsat-c2l1", "landsat-c2-l1"),
                    _single(**{b: b for b in LANDSAT_BANDS}),
                    "qa_pixel",
                    extra_assets=("lwir", "lwir_high", "pan"),
                ),
            ),
        ),
        Sensor(
            "naip",
            ("red", "green", "blue", "nir"),
            0,
            ("red", "green", "blue"),
            "none",
            ("naip",),
            (
                Layout(
                    ("planetary-computer",),
                    ("naip",),
                    _stacked("image", ("red", "green", "blue", "nir")),
                    None,
                ),
            ),
        ),
        Sensor(
            "linz",
            ("red", "green", "blue"),
            0,
            ("red", "green", "blue"),
            "nodata",
            ("linz",),
            (Layout(("linz",), ("linz",), _stacked("visual", ("red", "green", "blue")), "visual"),),
            rule_name="linz",
        ),
        Sensor(
            "sentinel-1-rtc",
            ("vv", "vh"),
            -32768,
            ("vv", "vh", "vv"),
            "nodata",
            ("sentinel-1", "s1"),
            (
                Layout(
                    ("planetary-computer",), ("sentinel-1-rtc",), _single(vv="vv", vh="vh"), "vv"
                ),
            ),
            rule_name="sentinel-1",
        ),
        Sensor(
            "sentinel-1-grd",
            ("vv", "vh"),
            0,
            ("vv", "vh", "vv"),
            "nodata",
            ("sentinel-1-grd",),
            (Layout(("earth-search-v1",), ("sentinel-1-grd",), _single(vv="vv", vh="vh"), "vv"),),
            rule_name="sentinel-1",
        ),
        Sensor(
            "modis",
            MODIS_BANDS,
            -28672,
            ("sur_refl_b01", "sur_refl_b04", "sur_refl_b03"),
            "modis",
            ("modis", "mod09"),
            (
                Layout(
                    ("planetary-computer",),
                    ("modis-09A1-061",),
                    _single(**{b: b for b in MODIS_BANDS}),
                    "sur_refl_qc_500m",
                ),
            ),
        ),
    )
}
"""Every sensor by name (the `--platform` choices), with its catalogs' layouts."""


def sensor_for(collection: str, name: str | None = None) -> Sensor:
    """The sensor named `name`, else the one serving collection id `collection`.

    A collection id a layout lists wins (`sentinel-1-grd`); otherwise the first sensor with
    one of its words in the id (`my-sentinel-2-copy`).
    """
    if name is not None:
        if name not in SENSORS:
            raise BandError(f"unknown platform {name!r}; use one of {', '.join(SENSORS)}")
        return SENSORS[name]
    for sensor in SENSORS.values():
        if any(collection in layout.collections for layout in sensor.layouts):
            return sensor
    lowered = collection.lower()
    for sensor in SENSORS.values():
        if any(word in lowered for word in sensor.words):
            return sensor
    raise BandError(
        f"cannot tell the platform of collection {collection!r}; pass `platform` "
        f"({', '.join(SENSORS)}) or `bands`"
    )


def collection_profile(collection: str) -> Profile:
    """The first sensor and layout listing collection id `collection` (processors' defaults)."""
    for sensor in SENSORS.values():
        for layout in sensor.layouts:
            if collection in layout.collections:
                return Profile(sensor, layout)
    raise BandError(f"no sensor layout lists collection {collection!r}")


# -- recognising an item --------------------------------------------------------------------------

_EXTENSIONS = (".tif", ".tiff", ".jp2")


def _normal(key: str) -> str:
    lowered = key.lower()
    for extension in _EXTENSIONS:
        if lowered.endswith(extension):
            return lowered[: -len(extension)]
    return lowered


def find_asset(assets: Mapping[str, Any], key: str) -> str | None:
    """The item's key for asset `key`: exact, else without case and file extension."""
    if key in assets:
        return key
    wanted = _normal(key)
    for candidate in assets:
        if _normal(candidate) == wanted:
            return candidate
    return None


def _layout_keys(layout: Layout) -> list[str]:
    keys = [key for key, _ in layout.bands.values()]
    return keys + ([layout.quality_asset] if layout.quality_asset else [])


def profile_for(item: Any) -> Profile | None:
    """The sensor and catalog layout of `item`, or None when no layout fits.

    A layout fits when the item has all of its band assets; among those, one listing the
    item's collection id wins, then the one with most of its keys present. An item of a
    listed collection that lacks some band assets still gets that collection's layout (the
    reader then names the missing bands).
    """
    view = item_view(item)
    collection = view.collection
    normal = {_normal(key) for key in view.assets}  # one pass over the keys, not one per lookup
    best: tuple[tuple[bool, bool, int], Profile] | None = None
    for sensor in SENSORS.values():
        for layout in sensor.layouts:
            present = sum(_normal(key) in normal for key in _layout_keys(layout))
            complete = all(_normal(key) in normal for key, _ in layout.bands.values())
            listed = collection in layout.collections
            if not (complete or listed):
                continue
            rank = (complete, listed, present)
            if best is None or rank > best[0]:
                best = (rank, Profile(sensor, layout))
    return None if best is None else best[1]


def band_names(fields: Mapping[str, Any]) -> list[set[str]]:
    """Lower-cased names (name, common_name, description) of each band of an asset."""
    entries = fields.get("eo:bands") or fields.get("bands") or []
    names = []
    for entry in entries:
        keys = ("name", "common_name", "eo:common_name", "description")
        names.append({str(entry[k]).lower() for k in keys if entry.get(k)})
    return names


def locate_band(item: Any, band: str, profile: Profile | None = None) -> tuple[str, int] | None:
    """`(asset key, 1-based band index)` holding export band `band` of `item`, or None.

    The item's catalog layout first (`rededge1` is `B05` on Planetary Computer), then an asset
    keyed `band`, then the first asset with a band named so in `eo:bands` (NAIP's `image`).
    """
    view = item_view(item)
    if profile is not None and band in profile.layout.bands:
        key, index = profile.layout.bands[band]
        found = find_asset(view.assets, key)
        if found is not None:
            return found, index
    found = find_asset(view.assets, band)
    if found is not None:
        return found, 1
    for key, fields in view.assets.items():
        hits = [i for i, names in enumerate(band_names(fields)) if band.lower() in names]
        if hits:
            return key, hits[0] + 1
    return None


def asset_nodata(fields: Mapping[str, Any], default: float) -> float:
    """The nodata value of an asset's first band (`raster:bands`), else `default`."""
    bands = fields.get("raster:bands") or [{}]
    value = bands[0].get("nodata") if isinstance(bands[0], Mapping) else None
    return default if value is None else float(value)


def quality_keys(rule: str) -> tuple[str, ...]:
    """The quality asset keys the catalogs use for rule kind `rule` (`s2`: scl, SCL)."""
    keys: dict[str, None] = {}
    for sensor in SENSORS.values():
        if sensor.quality == rule:
            for layout in sensor.layouts:
                if layout.quality_asset:
                    keys[layout.quality_asset] = None
    return tuple(keys)
