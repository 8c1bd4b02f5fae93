"""Time series of places: T dates of each location, as stacks for prechip and `ChipDataset`.

A stack is one place (`stacchip.chips.location`) of one collection (its bands) at T dates in
time order. `plan_stacks` makes them from selected rows: rows grouped by (collection, location),
one chip per distinct datetime (the least cloudy when a place has two chips of one instant),
places with fewer than T dates left out and counted, T dates picked (`PICKS`):

- `least-cloudy`: the T chips of lowest cloud fraction (then nodata fraction, then earliest);
- `spread`: T dates spread evenly over the place's time range (positions
  `round(linspace(0, n - 1, T))` of its n dates: first, last and evenly between);
- `latest`: the T most recent dates.

Stacks come in the order of their first chip's key (collection, item, chip size, y, x), so the
places of one tile are neighbours and a cube's chips of one date are one item's.

For prechip (`prechip.export_cubes(time_series=T)`), `plan_stack_cubes` cuts each collection's
stacks into cubes of `cube_size` stacks; a cube is a block of the read engine whose rows are its
chips sorted by key (each item's chips consecutive, as the engine asks), with `order` giving
the block row of stack n, step t: the engine's float32 block is written as `pixels`
(N, T, C, H, W) in that order, chip by chip (`stack_arrays`, `StackedPixels`). A place with a
chip that could not be read is left out of its cube whole (a stack with a hole is no time
series). `ChipDataset(..., time_series=T)` reads the same stacks chip by chip through the same
reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import numpy as np

from stacchip_db.dataset import ChipRow, bands_for, check_one_chip_size, clay_norms
from stacchip_db.errors import ConfigError
from stacchip_db.read_engine import BlockRead

PICKS = ("least-cloudy", "spread", "latest")
"""How the T dates of a place are chosen among its dates."""
DEFAULT_PICK = "least-cloudy"


@dataclass(frozen=True)
class Stack:
    """One place of one collection at T dates: `positions` of its rows, in time order."""

    collection: str
    location: int
    positions: tuple[int, ...]


def _key(row: ChipRow) -> tuple[str, str, int, int, int]:
    return row.collection, row.item_id, row.chip_size, row.chip_index_y, row.chip_index_x


def check_time_series(time_series: int, pick: str) -> None:
    """ConfigError naming `time_series` or `pick` when they are not usable."""
    if isinstance(time_series, bool) or not isinstance(time_series, int) or time_series < 1:
        raise ConfigError(f"`time_series` {time_series!r} is not a positive number of dates")
    if pick not in PICKS:
        raise ConfigError(f"`pick` {pick!r} is not one of {', '.join(PICKS)}")


def _pick(positions: list[int], rows: Sequence[ChipRow], t: int, pick: str) -> list[int]:
    """T of a place's positions (one per datetime, in time order), in time order."""
    if pick == "latest":
        return positions[-t:]
    if pick == "spread":
        return [positions[int(i)] for i in np.round(np.linspace(0, len(positions) - 1, t))]
    ranked = sorted(
        positions,
        key=lambda p: (rows[p].cloud_fraction, rows[p].nodata_fraction, rows[p].datetime),
    )
    return sorted(ranked[:t], key=lambda p: rows[p].datetime)


def plan_stacks(
    rows: Sequence[ChipRow], time_series: int, pick: str = DEFAULT_PICK
) -> tuple[list[Stack], int]:
    """The stacks of `rows` (see the module doc) and the number of places left out because
    they have fewer than `time_series` dates."""
    check_time_series(time_series, pick)
    missing = [i for i, r in enumerate(rows) if r.location is None]
    if missing:
        raise ConfigError(
            f"chip {rows[missing[0]].chip_id} has no location; time series need the chips' "
            "`stacchip.chips.location` (run `stacchip-db db init`)"
        )

    def place(p: int) -> tuple[str, int]:
        return rows[p].collection, int(rows[p].location)  # type: ignore[arg-type]

    stacks: list[tuple[tuple[Any, ...], Stack]] = []
    short = 0
    for (collection, location), group in groupby(sorted(range(len(rows)), key=place), key=place):
        by_time: dict[Any, int] = {}
        for p in group:  # one chip per instant: the least cloudy, then the first by key
            when = rows[p].datetime
            q = by_time.get(when)
            if q is None or (rows[p].cloud_fraction, _key(rows[p])) < (
                rows[q].cloud_fraction,
                _key(rows[q]),
            ):
                by_time[when] = p
        dates = [by_time[when] for when in sorted(by_time)]
        if len(dates) < time_series:
            short += 1
            continue
        chosen = tuple(_pick(dates, rows, time_series, pick))
        first = min(_key(rows[p]) for p in chosen)
        stacks.append((first, Stack(collection, location, chosen)))
    stacks.sort(key=lambda pair: pair[0])
    return [stack for _, stack in stacks], short


@dataclass
class StackCube:
    """Cube `index` of `collection`: its stacks, and the read engine's block of their chips
    (`rows` sorted by key, `bands`); `order[n, t]` is the block row of stack n, date t."""

    collection: str
    index: int
    stacks: list[Stack]
    rows: list[ChipRow]
    order: np.ndarray
    bands: list[str]

    @property
    def name(self) -> str:
        return f"{self.collection}/cube_{self.index}"


def plan_stack_cubes(
    rows: Sequence[ChipRow],
    stacks: Sequence[Stack],
    *,
    cube_size: int,
    keep_partial: bool,
    bands: Sequence[str] | None,
    platform: str | None,
) -> list[StackCube]:
    """Each collection's stacks cut into cubes of `cube_size` (the last, partial one only with
    `keep_partial`), collections in name order."""
    cubes: list[StackCube] = []
    for collection, group in groupby(
        sorted(stacks, key=lambda s: s.collection), key=lambda s: s.collection
    ):
        members = list(group)
        check_one_chip_size(collection, {rows[p].chip_size for s in members for p in s.positions})
        collection_bands = bands_for(collection, bands, platform)
        for k, start in enumerate(range(0, len(members), cube_size)):
            part = members[start : start + cube_size]
            if len(part) < cube_size and not keep_partial:
                break
            flat = [p for s in part for p in s.positions]
            by_key = sorted(range(len(flat)), key=lambda i: _key(rows[flat[i]]))
            order = np.empty(len(flat), dtype=np.intp)
            order[by_key] = np.arange(len(flat))
            cubes.append(
                StackCube(
                    collection,
                    k,
                    part,
                    [rows[flat[i]] for i in by_key],
                    order.reshape(len(part), len(part[0].positions)),
                    collection_bands,
                )
            )
    return cubes


class StackedPixels:
    """`pixels` (N, T, C, H, W) of a stack cube, not copied: rows `order` of the read block,
    written straight into the npz member (`write_npy`) one chip at a time. The block holds
    N x T chips already (1.3 GB for 128 x 4 x 10 bands of 256 px): a gathered copy would double
    that, and its time halved the export's rate."""

    def __init__(self, block: np.ndarray, order: np.ndarray) -> None:
        self.block = block
        self.order = order
        self.shape = (*order.shape, *block.shape[1:])
        self.dtype = block.dtype

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        gathered = self.block[self.order.ravel()].reshape(self.shape)
        return gathered if dtype is None else gathered.astype(dtype)

    def write_npy(self, stream: Any) -> None:
        """The array in `.npy` format (version 1.0, C order) to a binary `stream`."""
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": self.shape}  # fmt: skip
        np.lib.format.write_array_header_1_0(stream, header)
        for row in self.order.ravel():
            stream.write(np.ascontiguousarray(self.block[row]).data)


def stack_arrays(
    cube: BlockRead[StackCube], items: dict[tuple[str, str], dict[str, Any]]
) -> tuple[dict[str, Any], list[int]]:
    """The npz arrays of a stack cube without the places of which a chip could not be read,
    and the indices (into `cube.block.stacks`) of the places kept.

    `pixels` (N, T, C, H, W) as `StackedPixels` (`np.asarray` gathers it; prechip writes it
    without a copy); `lat_norm`, `lon_norm` (N, 2) of the place; `week_norm`,
    `hour_norm` (N, T, 2) of each date; `location` int64 (N,).
    """
    block = cube.block
    kept = [n for n in range(len(block.stacks)) if cube.ok[block.order[n]].all()]
    order = block.order[kept]
    pixels = StackedPixels(cube.pixels, order)
    if not kept:
        return {"pixels": pixels}, kept
    rows = [block.rows[i] for i in order.ravel()]
    norms = clay_norms(rows, items)
    n, t = order.shape
    arrays = {
        "pixels": pixels,
        "lat_norm": norms["lat_norm"].reshape(n, t, 2)[:, 0],
        "lon_norm": norms["lon_norm"].reshape(n, t, 2)[:, 0],
        "week_norm": norms["week_norm"].reshape(n, t, 2),
        "hour_norm": norms["hour_norm"].reshape(n, t, 2),
        "location": np.array([block.stacks[k].location for k in kept], dtype=np.int64),
    }
    return arrays, kept
