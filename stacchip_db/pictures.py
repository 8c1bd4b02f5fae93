"""Pictures of a chip selection: RGB previews of chips, and a map of their footprints.

Both render with matplotlib's Agg backend (no display needed) into PNG files:

- `preview_png`: a grid of RGB renderings, one per chip, each channel stretched between its own
  2nd and 98th percentile (nodata left out, shown black), titled with the chip id;
- `map_png`: chip footprints filled by cloud fraction over the outlines of their items'
  footprints and Natural Earth's 1:110m countries, in longitude/latitude.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import numpy as np
import shapely

from stacchip_db.dataset import ChipSelection
from stacchip_db.errors import StacchipError
from stacchip_db.read_engine import DATASETS, FailedChip, failed_chips
from stacchip_db.reader import read_item_chips
from stacchip_db.sensors import sensor_for

log = logging.getLogger(__name__)

MAX_PREVIEW = 16
"""Default number of chips in a preview."""


class PictureError(StacchipError):
    """Nothing to draw, or the picture cannot be written."""


def _pyplot():  # Agg before pyplot is imported anywhere: works without a display
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stretch(
    pixels: np.ndarray, nodata: float | None, low: float = 2, high: float = 98
) -> np.ndarray:
    """`(3, H, W)` -> float `(H, W, 3)` in [0, 1], each channel between its percentiles.

    Nodata pixels (all channels equal to `nodata`) are black and do not count.
    """
    data = pixels.astype(np.float64)
    valid = np.ones(data.shape[1:], dtype=bool) if nodata is None else ~(data == nodata).all(axis=0)
    valid &= np.isfinite(data).all(axis=0)
    out = np.zeros((*data.shape[1:], 3), dtype=np.float64)
    if not valid.any():
        return out
    lo, hi = np.percentile(data[:, valid], [low, high], axis=1)  # per channel, vectorised
    scale = np.where(hi > lo, hi - lo, 1.0)
    out[:] = np.clip((data - lo[:, None, None]) / scale[:, None, None], 0, 1).transpose(1, 2, 0)
    out[~valid] = 0
    return out


@dataclass
class Preview:
    """What `preview_png` drew: `tiles` chips shown, of which `failures` could not be read."""

    tiles: int
    failures: list[FailedChip] = field(default_factory=list)

    @property
    def drawn(self) -> int:
        """Chips drawn with their pixels."""
        return self.tiles - len(self.failures)


def preview_png(
    selection: ChipSelection,
    out: str | Path,
    *,
    platform: str | None = None,
    rgb: Sequence[str] | None = None,
    max_chips: int = MAX_PREVIEW,
    columns: int | None = None,
) -> Preview:
    """Draw the first `max_chips` chips of the selection; say what was drawn.

    A chip whose asset cannot be read is logged (chip id, href, why), drawn as an empty tile
    titled "unreadable" and listed in `Preview.failures`: the picture is then incomplete.
    """
    rows = selection.rows[:max_chips]
    if not rows:
        raise PictureError("the selection is empty: nothing to preview; widen the filters")
    tiles: dict[int, np.ndarray | None] = {}
    failures: list[FailedChip] = []
    positions = sorted(range(len(rows)), key=lambda p: (rows[p].item_key, rows[p].chip_size))
    for (key, chip_size), group in groupby(
        positions, key=lambda p: (rows[p].item_key, rows[p].chip_size)
    ):
        members = list(group)
        known = sensor_for(key[0], platform)
        bands = list(rgb) if rgb else list(known.rgb)
        got = read_item_chips(
            selection.items[key],
            [(rows[p].chip_index_x, rows[p].chip_index_y) for p in members],
            bands,
            chip_size=chip_size,
            datasets=DATASETS,
        )
        for i, p in enumerate(members):
            tiles[p] = stretch(got.pixels[i], known.nodata) if got.ok[i] else None
        for failure in failed_chips([rows[p] for p in members], got.failures):
            log.warning("%s; drawn as a blank tile", failure)
            failures.append(failure)
    plt = _pyplot()
    ncols = columns or math.ceil(math.sqrt(len(rows)))
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.8 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for p, row in enumerate(rows):
        ax = axes.ravel()[p]
        tile = tiles[p]
        if tile is not None:
            ax.imshow(tile, interpolation="nearest")
        ax.set_title(row.chip_id if tile is not None else f"{row.chip_id}\nunreadable",
                     fontsize=6)  # fmt: skip
    fig.tight_layout()
    _save(fig, out, plt)
    return Preview(len(rows), failures)


MAX_POLYGONS = 20_000
"""Above this many chips `map_png` bins chip centres into a grid image instead of drawing each
footprint: hundreds of thousands of polygons take minutes to draw and are specks anyway."""

GRID_CELLS = 400
"""Cells along the longer side of the binned map (a few pixels each at the map's size)."""

BASEMAP = Path(__file__).resolve().parent / "basemap" / "ne_110m_countries.geojson"
"""Country outlines under the map: Natural Earth 1:110m (public domain), see basemap/README.md."""


@functools.cache
def _country_rings() -> list[np.ndarray]:
    document = json.loads(BASEMAP.read_text())
    rings = []
    for feature in document["features"]:
        geometry = shapely.geometry.shape(feature["geometry"])
        for part in getattr(geometry, "geoms", [geometry]):
            rings.append(np.asarray(part.exterior.coords)[:, :2])
    return rings


def has_clouds(selection: ChipSelection) -> bool:
    """Whether cloud fractions mean anything here: some chip is cloudy, or some item has a
    cloud quality band (Sentinel-2 SCL, Landsat QA_PIXEL, MODIS QC); NAIP, LINZ or Sentinel-1
    chips alone have none, and a cloud colour bar would only mislead."""
    from stacchip_db.quality import NONE_RULE, resolve_rule

    if any(r.cloud_fraction > 0 for r in selection.rows):
        return True
    return any(resolve_rule("auto", item) is not NONE_RULE for item in selection.items.values())


def map_png(selection: ChipSelection, out: str | Path, *, title: str | None = None) -> int:
    """Chip footprints over their items' footprints and the countries; return chips drawn.

    Chips are coloured by cloud fraction (with a colour bar) when the selection has clouds
    (`has_clouds`), else drawn in one colour. Above `MAX_POLYGONS` chips, their centres are
    binned into a grid image (the mean cloud fraction of each cell). Stages are logged at info
    level, as a large map takes a while.
    """
    if not selection.rows:
        raise PictureError("the selection is empty: nothing to map; widen the filters")
    from matplotlib.collections import PolyCollection

    started = time.perf_counter()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 8))
    item_rings = []
    for item in selection.items.values():
        geometry = shapely.geometry.shape(item["geometry"])
        for part in getattr(geometry, "geoms", [geometry]):
            item_rings.append(np.asarray(part.exterior.coords)[:, :2])
    chips = shapely.from_wkb(np.asarray([r.geometry for r in selection.rows], dtype=object))
    cloud = np.array([r.cloud_fraction for r in selection.rows])
    clouds = has_clouds(selection)
    bounds = shapely.bounds(chips)
    every = np.concatenate([*item_rings, bounds[:, :2], bounds[:, 2:]])
    pad = 0.02 * max(np.ptp(every[:, 0]), np.ptp(every[:, 1]), 1e-6)
    west, east = every[:, 0].min() - pad, every[:, 0].max() + pad
    south, north = every[:, 1].min() - pad, every[:, 1].max() + pad
    binned = len(chips) > MAX_POLYGONS
    items = len(selection.items)
    log.info(
        "map: drawing %d chips of %d item%s%s", len(chips), items, "s" * (items != 1),
        f" binned into a {GRID_CELLS}-cell grid (more than {MAX_POLYGONS})" if binned else "",
    )  # fmt: skip
    ax.add_collection(
        PolyCollection(_country_rings(), facecolors="#eeeeee", edgecolors="#888888",
                       linewidths=0.4, zorder=0)
    )  # fmt: skip
    ax.add_collection(
        PolyCollection(item_rings, facecolors="none", edgecolors="black", linewidths=1.2,
                       label="items", zorder=3)
    )  # fmt: skip
    style = {"cmap": "viridis", "vmin": 0, "vmax": 1} if clouds else {}
    if binned:
        drawn = _binned(ax, shapely.get_coordinates(shapely.centroid(chips)), cloud, clouds,
                        (west, east, south, north), style)  # fmt: skip
    else:
        chip_rings = [np.asarray(shapely.get_exterior_ring(c).coords)[:, :2] for c in chips]
        drawn = PolyCollection(
            chip_rings, array=cloud if clouds else None, edgecolors="white", linewidths=0.2,
            facecolors=None if clouds else "tab:blue", zorder=2,
        )  # fmt: skip
        if clouds:
            drawn.set_cmap(style["cmap"])
            drawn.set_clim(0, 1)
        ax.add_collection(drawn)
    if clouds:
        fig.colorbar(drawn, ax=ax, shrink=0.7, label="cloud fraction")
    ax.set_xlim(west, east)
    ax.set_ylim(south, north)
    mid_lat = math.radians((south + north) / 2)
    ax.set_aspect(1 / max(math.cos(mid_lat), 1e-3))  # degrees look square at that latitude
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(title or f"{len(selection.rows)} chips of {items} item{'s' * (items != 1)}")
    fig.tight_layout()
    _save(fig, out, plt)
    log.info("map: wrote %s in %.1f s", out, time.perf_counter() - started)
    return len(selection.rows)


def _binned(ax, centres: np.ndarray, cloud: np.ndarray, clouds: bool,
            extent: tuple[float, float, float, float], style: dict):  # fmt: skip
    """Chip centres as a grid image: each cell's mean cloud fraction, or one colour."""
    west, east, south, north = extent
    step = max(east - west, north - south) / GRID_CELLS
    nx, ny = max(1, math.ceil((east - west) / step)), max(1, math.ceil((north - south) / step))
    col = np.clip(((centres[:, 0] - west) / step).astype(int), 0, nx - 1)
    row = np.clip(((centres[:, 1] - south) / step).astype(int), 0, ny - 1)
    cell = row * nx + col
    count = np.bincount(cell, minlength=nx * ny)
    if clouds:
        values = np.bincount(cell, weights=cloud, minlength=nx * ny) / np.maximum(count, 1)
    else:
        values = np.ones(nx * ny)
    image = np.ma.masked_array(values, count == 0).reshape(ny, nx)
    if not clouds:
        from matplotlib.colors import ListedColormap

        style = {"cmap": ListedColormap(["tab:blue"])}
    return ax.imshow(image, origin="lower", extent=(west, west + nx * step, south,
                     south + ny * step), interpolation="nearest", zorder=2, **style)  # fmt: skip


def _save(fig, out: str | Path, plt) -> None:
    try:
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise PictureError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        plt.close(fig)
