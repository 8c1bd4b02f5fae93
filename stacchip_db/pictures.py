"""Pictures of a chip selection: RGB previews of chips, and a map of their footprints.

Both render with matplotlib's Agg backend (no display needed) into PNG files:

- `preview_png`: a grid of RGB renderings, one per chip, each channel stretched between its own
  2nd and 98th percentile (nodata left out, shown black), titled with the chip id;
- `map_png`: chip footprints filled by cloud fraction over the outlines of their items'
  footprints, in longitude/latitude.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import numpy as np
import shapely

from stacchip_db.dataset import ChipSelection
from stacchip_db.errors import StacchipError
from stacchip_db.prechip import FailedChip, failed_chips
from stacchip_db.reader import platform_for, read_item_chips

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
        known = platform_for(key[0], platform)
        bands = list(rgb) if rgb else list(known.rgb)
        got = read_item_chips(
            selection.items[key],
            [(rows[p].chip_index_x, rows[p].chip_index_y) for p in members],
            bands,
            chip_size=chip_size,
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


def map_png(selection: ChipSelection, out: str | Path, *, title: str | None = None) -> int:
    """Chip footprints coloured by cloud fraction over item footprints; return chips drawn."""
    if not selection.rows:
        raise PictureError("the selection is empty: nothing to map; widen the filters")
    from matplotlib.collections import PolyCollection

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 8))
    item_rings = []
    for item in selection.items.values():
        geometry = shapely.geometry.shape(item["geometry"])
        for part in getattr(geometry, "geoms", [geometry]):
            item_rings.append(np.asarray(part.exterior.coords)[:, :2])
    ax.add_collection(
        PolyCollection(item_rings, facecolors="none", edgecolors="black", linewidths=1.2,
                       label="items")
    )  # fmt: skip
    chips = shapely.from_wkb(np.asarray([r.geometry for r in selection.rows], dtype=object))
    chip_rings = [np.asarray(shapely.get_exterior_ring(c).coords)[:, :2] for c in chips]
    cloud = np.array([r.cloud_fraction for r in selection.rows])
    chip_patches = PolyCollection(
        chip_rings, array=cloud, cmap="viridis", edgecolors="white", linewidths=0.2
    )
    chip_patches.set_clim(0, 1)
    ax.add_collection(chip_patches)
    fig.colorbar(chip_patches, ax=ax, shrink=0.7, label="cloud fraction")
    every = np.concatenate(item_rings + chip_rings)
    pad = 0.02 * max(np.ptp(every[:, 0]), np.ptp(every[:, 1]), 1e-6)
    ax.set_xlim(every[:, 0].min() - pad, every[:, 0].max() + pad)
    ax.set_ylim(every[:, 1].min() - pad, every[:, 1].max() + pad)
    mid_lat = math.radians(float(np.mean(every[:, 1])))
    ax.set_aspect(1 / max(math.cos(mid_lat), 1e-3))  # degrees look square at that latitude
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    items = len(selection.items)
    ax.set_title(title or f"{len(selection.rows)} chips of {items} item{'s' * (items != 1)}")
    fig.tight_layout()
    _save(fig, out, plt)
    return len(selection.rows)


def _save(fig, out: str | Path, plt) -> None:
    try:
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise PictureError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        plt.close(fig)
