"""`ChipSampler`: the order a training run visits a dataset's chips in, per epoch and per rank.

A `torch.utils.data.Sampler`-compatible class (`__iter__`, `__len__`, `set_epoch`) that does
not import torch: the number of ranks and this process's rank are read from
`torch.distributed` only when they are not given and torch is already imported.

- **Deterministic on any machine.** The order is a function of `(seed, epoch)` alone: chips
  are sorted by a 64-bit key from splitmix64 over `(seed, epoch, index)`, integer arithmetic
  only, so it does not depend on numpy's or torch's random streams (which may change between
  versions) nor on the platform.
- **Ranks.** As `torch.utils.data.DistributedSampler` does: the epoch's order is padded with its
  own first indices to a multiple of `num_replicas` (`drop_last=False`; those repeats are the
  only chips two ranks share, fewer than `num_replicas`) or cut to one (`drop_last=True`), and
  rank r takes every `num_replicas`-th index from position r. Every rank gets the same count,
  which DDP needs (a rank with a batch more would wait for the others forever).
- **Resuming.** `state_dict()` records the epoch and how many of this rank's indices were
  handed out (or consumed, when told); `load_state_dict()` makes the next `__iter__` yield
  exactly the rest of that epoch.
- **Balancing.** `weights_by` (a column of the dataset's chip rows such as `"collection"`, a
  function of a row, or one label per chip) gives every group the same share of an epoch:
  ceil(num_samples / groups) draws each, taken from the group's own shuffled cycle, so a small
  group repeats (each of its chips equally often) and a large one is walked across epochs
  without repeats, instead of the largest platform dominating the training set.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any

import numpy as np

from stacchip_db.errors import StacchipError

_MASK = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class SamplerError(StacchipError):
    """A sampler parameter or a saved sampler state does not fit."""


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 values (wrapping arithmetic: the same on any machine)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _keys(seed: int, *parts: Any) -> np.ndarray:
    """64-bit keys of `parts` (ints or integer arrays, broadcast) under `seed`."""
    h = np.uint64(seed & _MASK)
    with np.errstate(over="ignore"):
        for part in parts:
            h = _mix((h + _GOLDEN) ^ np.asarray(part).astype(np.uint64))
    return np.asarray(h, dtype=np.uint64)


def permutation(n: int, seed: int, *parts: int) -> np.ndarray:
    """A permutation of `range(n)` determined by `seed` and `parts` (epoch, group …)."""
    keys = _keys(seed, *parts, np.arange(n, dtype=np.uint64))
    return np.argsort(np.broadcast_to(keys, (n,)), kind="stable").astype(np.int64)


def _distributed() -> tuple[int, int]:
    """`(world size, rank)` from torch.distributed when it is imported and initialised."""
    torch_distributed = sys.modules.get("torch.distributed")
    if torch_distributed is None and "torch" in sys.modules:
        # torch is not a dependency: only looked up when the program has imported it
        torch_distributed = importlib.import_module("torch.distributed")
    if (
        torch_distributed is not None
        and torch_distributed.is_available()
        and torch_distributed.is_initialized()
    ):
        return torch_distributed.get_world_size(), torch_distributed.get_rank()
    return 1, 0


class ChipSampler:
    """Indices of `dataset` for one rank and epoch: shuffled, split, resumable, balanced.

    `dataset` is anything with a length (a `ChipDataset`; its `rows` when `weights_by` names a
    column). `num_replicas`/`rank` default to torch.distributed's world size and rank (1 and 0
    without it). `shuffle=False` keeps the dataset's order. `num_samples` (with `weights_by`
    only) is the epoch's length over all ranks, default `len(dataset)`.
    A `ChipDataset` with `prefetch` reads ahead in this sampler's order (`ChipDataset.follow`).
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        weights_by: str | Callable[[Any], Any] | Sequence[Any] | None = None,
        num_samples: int | None = None,
    ) -> None:
        if num_replicas is None or rank is None:
            world, own = _distributed()
            num_replicas = world if num_replicas is None else num_replicas
            rank = own if rank is None else rank
        if num_replicas < 1:
            raise SamplerError(f"`num_replicas` must be at least 1, not {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise SamplerError(f"`rank` {rank} is not in 0..{num_replicas - 1} (`num_replicas`)")
        if num_samples is not None and weights_by is None:
            raise SamplerError(
                "`num_samples` needs `weights_by` (without it, an epoch is the dataset)"
            )
        if num_samples is not None and num_samples < 0:
            raise SamplerError(f"`num_samples` must not be negative, not {num_samples}")
        self.size = len(dataset)
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        self.weights_by = weights_by if isinstance(weights_by, str) or weights_by is None else (
            getattr(weights_by, "__name__", "labels")
        )  # fmt: skip
        self._groups = _groups(dataset, weights_by) if weights_by is not None else None
        self.epoch_size = self.size if num_samples is None else num_samples
        if drop_last and self.epoch_size % num_replicas:
            self.per_rank = self.epoch_size // num_replicas
        else:
            self.per_rank = math.ceil(self.epoch_size / num_replicas)
        self._start = 0  # where the next __iter__ begins (a resumed epoch's position)
        self._position = 0  # indices of this epoch handed out so far
        follow = getattr(dataset, "follow", None)
        if callable(follow):
            follow(self)

    # -- the order ------------------------------------------------------------------------------

    def epoch_order(self) -> np.ndarray:
        """All ranks' indices of the current epoch, before the split (`epoch_size` of them)."""
        if self._groups is None:
            if self.shuffle:
                return permutation(self.size, self.seed, self.epoch)
            return np.arange(self.size, dtype=np.int64)
        return _balanced(self._groups, self.epoch_size, self.seed, self.epoch, self.shuffle)

    def indices(self) -> np.ndarray:
        """This rank's indices of the current epoch, from where the next `__iter__` starts."""
        order = self.epoch_order()
        total = self.per_rank * self.num_replicas
        if total > len(order) and len(order):
            reps = math.ceil(total / len(order))
            order = np.tile(order, reps)
        order = order[:total]
        return order[self.rank : total : self.num_replicas][self._start :]

    def __iter__(self) -> Iterator[int]:
        rest = self.indices()
        self._position = self._start
        self._start = 0  # the next pass over this epoch is a whole one again
        for index in rest.tolist():
            self._position += 1
            yield index

    def __len__(self) -> int:
        return self.per_rank - self._start

    def set_epoch(self, epoch: int) -> None:
        """Use epoch `epoch`'s order from now on (a resumed epoch keeps its position)."""
        if epoch < 0:
            raise SamplerError(f"`epoch` must not be negative, not {epoch}")
        if epoch != self.epoch:
            self.epoch = epoch
            self._start = self._position = 0

    # -- resuming -------------------------------------------------------------------------------

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Where this rank is: epoch, position in its list, and what the order depends on.

        `consumed`: how many of this rank's indices of the current epoch the training loop has
        used (counting those before a resume), e.g. `(step + 1) * batch_size`; default: how
        many were handed out. A DataLoader hands out indices ahead of the loop (its workers
        prefetch), so pass `consumed` when saving from inside a DataLoader loop.
        """
        position = self._position if consumed is None else consumed
        if not 0 <= position <= self.per_rank:
            raise SamplerError(f"`consumed` {position} is not in 0..{self.per_rank}")
        return {
            "epoch": self.epoch,
            "position": position,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "size": self.size,
            "epoch_size": self.epoch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "weights_by": self.weights_by,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next `__iter__` yields the rest of the saved epoch.

        Raises SamplerError when the state was saved by a sampler with another seed, rank
        count, dataset size, epoch length, shuffle, drop_last or balance column: its positions
        would then mean other chips.
        """
        mine = self.state_dict(consumed=0)
        differ = [
            key for key in ("seed", "num_replicas", "size", "epoch_size", "shuffle", "drop_last",
                            "weights_by")
            if state.get(key) != mine[key]
        ]  # fmt: skip
        if differ:
            key = differ[0]
            raise SamplerError(
                f"`state` was saved with {key}={state.get(key)!r}, this sampler has "
                f"{mine[key]!r}; resume with the sampler's settings of that run"
            )
        position = int(state["position"])
        if not 0 <= position <= self.per_rank:
            raise SamplerError(f"`state` position {position} is not in 0..{self.per_rank}")
        self.epoch = int(state["epoch"])
        self._start = self._position = position


def _groups(
    dataset: Any, weights_by: str | Callable[[Any], Any] | Sequence[Any]
) -> list[np.ndarray]:
    """Indices of each group (groups in a fixed order: by their labels' repr)."""
    if isinstance(weights_by, str):
        rows = getattr(dataset, "rows", None)
        if rows is None:
            raise SamplerError(
                f"`weights_by`={weights_by!r} names a column, but the dataset has no chip rows; "
                "pass one label per chip instead"
            )
        if rows and not hasattr(rows[0], weights_by):
            raise SamplerError(f"`weights_by`: chips have no column {weights_by!r}")
        labels = [getattr(row, weights_by) for row in rows]
    elif callable(weights_by):
        labels = [weights_by(row) for row in dataset.rows]  # type: ignore[attr-defined]
    else:
        labels = list(weights_by)
    if len(labels) != len(dataset):
        raise SamplerError(f"`weights_by` has {len(labels)} labels for {len(dataset)} chips")
    members: dict[Any, list[int]] = {}
    for index, label in enumerate(labels):
        members.setdefault(label, []).append(index)
    return [np.asarray(members[k], dtype=np.int64) for k in sorted(members, key=repr)]


def _balanced(
    groups: list[np.ndarray], epoch_size: int, seed: int, epoch: int, shuffle: bool
) -> np.ndarray:
    """An epoch of `epoch_size` indices with the same number of draws from every group.

    Group g's draws are positions `epoch * quota …` of its endless stream: cycle c of the
    stream is the group's members in an order of their own (`seed`, g, c), so each member is
    drawn once per cycle. The draws of all groups are then shuffled together (or interleaved
    group by group without `shuffle`) and cut to `epoch_size`.
    """
    if not groups or epoch_size == 0:
        return np.zeros(0, dtype=np.int64)
    quota = math.ceil(epoch_size / len(groups))
    draws = []
    for g, members in enumerate(groups):
        size = len(members)
        start, end = epoch * quota, (epoch + 1) * quota
        first, last = start // size, (end - 1) // size
        cycle = np.repeat(np.arange(first, last + 1, dtype=np.int64), size)
        offset = np.tile(np.arange(size, dtype=np.int64), last - first + 1)
        if shuffle:
            keys = _keys(seed, g + 1, cycle, offset)
            offset = offset[np.lexsort((keys, cycle))]
        draws.append(members[offset[start - first * size : end - first * size]])
    if shuffle:
        together = np.concatenate(draws)
        order = together[permutation(len(together), seed, epoch)]
    else:
        order = np.stack(draws, axis=1).ravel()
    return order[:epoch_size]
