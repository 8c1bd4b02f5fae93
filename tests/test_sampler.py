"""ChipSampler: ranks disjoint and complete, deterministic epochs, exact resume, balancing."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from stacchip_db import ChipDataset, ChipSampler
from stacchip_db.sampler import SamplerError, permutation
from tests.conftest import REPO, store_indexed

CHIP = 64
ALL = "SELECT collection, item_id, chip_size, chip_index_x, chip_index_y FROM stacchip.chips"


def _ranks(n: int, replicas: int, **kwargs: object) -> list[list[int]]:
    data = range(n)
    return [
        list(ChipSampler(data, num_replicas=replicas, rank=r, **kwargs)) for r in range(replicas)
    ]


def test_ranks_are_disjoint_and_complete() -> None:
    ranks = _ranks(100, 4, seed=7)
    assert [len(r) for r in ranks] == [25] * 4
    assert sorted(i for r in ranks for i in r) == list(range(100))

    # 103 chips on 4 ranks: every rank gets 26 (DDP needs equal counts); the one index two
    # ranks share is the padding, nothing else
    ranks = _ranks(103, 4, seed=7)
    assert [len(r) for r in ranks] == [26] * 4
    counts = Counter(i for r in ranks for i in r)
    assert set(counts) == set(range(103))
    assert sum(c - 1 for c in counts.values()) == 4 * 26 - 103
    assert all(len(set(r)) == len(r) for r in ranks)

    # drop_last: disjoint, the tail of the epoch's order left out
    ranks = _ranks(103, 4, seed=7, drop_last=True)
    assert [len(r) for r in ranks] == [25] * 4
    assert len({i for r in ranks for i in r}) == 100


def test_same_seed_and_epoch_give_the_same_order_on_any_machine() -> None:
    first = ChipSampler(range(50), num_replicas=1, rank=0, seed=3)
    again = ChipSampler(range(50), num_replicas=1, rank=0, seed=3)
    assert list(first) == list(again)
    epoch0 = list(first)
    first.set_epoch(1)
    again.set_epoch(1)
    assert list(first) == list(again) != epoch0
    assert sorted(list(first)) == list(range(50))
    other_seed = ChipSampler(range(50), num_replicas=1, rank=0, seed=4)
    assert list(other_seed) != epoch0
    # integer arithmetic only (splitmix64 keys): these exact orders on every platform and
    # numpy version; a change here changes every user's training order
    assert permutation(10, 0, 0).tolist() == [7, 4, 1, 2, 8, 0, 5, 6, 3, 9]
    assert permutation(10, 1234, 5).tolist() == [5, 6, 7, 4, 8, 9, 0, 2, 3, 1]
    assert list(ChipSampler(range(5), shuffle=False)) == [0, 1, 2, 3, 4]


def test_a_resumed_epoch_yields_exactly_the_rest() -> None:
    sampler = ChipSampler(range(40), num_replicas=2, rank=1, seed=11)
    sampler.set_epoch(3)
    whole = list(sampler)
    assert len(sampler) == 20
    it = iter(sampler)
    seen = [next(it) for _ in range(7)]
    state = sampler.state_dict()
    assert state["epoch"] == 3 and state["position"] == 7

    resumed = ChipSampler(range(40), num_replicas=2, rank=1, seed=11)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the usual loop calls set_epoch again: the position stays
    assert len(resumed) == 13
    rest = list(resumed)
    assert seen + rest == whole
    # the epoch after a resumed one is whole again, and the same as without the resume
    resumed.set_epoch(4)
    sampler.set_epoch(4)
    assert list(resumed) == list(sampler)
    assert len(resumed) == 20

    # a DataLoader hands indices out ahead of the loop: save what the loop consumed
    state = sampler.state_dict(consumed=8)
    again = ChipSampler(range(40), num_replicas=2, rank=1, seed=11)
    again.load_state_dict(state)
    assert list(again) == list(sampler)[8:]


def test_resume_refuses_a_state_of_other_settings() -> None:
    state = ChipSampler(range(40), num_replicas=2, rank=0, seed=1).state_dict()
    with pytest.raises(SamplerError, match=r"`state` was saved with seed=1, this sampler has 2"):
        ChipSampler(range(40), num_replicas=2, rank=0, seed=2).load_state_dict(state)
    with pytest.raises(SamplerError, match="num_replicas=2"):
        ChipSampler(range(40), num_replicas=4, rank=0, seed=1).load_state_dict(state)
    with pytest.raises(SamplerError, match="size=40"):
        ChipSampler(range(41), num_replicas=2, rank=0, seed=1).load_state_dict(state)
    with pytest.raises(SamplerError, match=r"`consumed` 21 is not in 0\.\.20"):
        ChipSampler(range(40), num_replicas=2, rank=0).state_dict(consumed=21)


def test_parameters_are_checked() -> None:
    with pytest.raises(SamplerError, match=r"`rank` 2 is not in 0\.\.1 \(`num_replicas`\)"):
        ChipSampler(range(4), num_replicas=2, rank=2)
    with pytest.raises(SamplerError, match="`num_replicas` must be at least 1"):
        ChipSampler(range(4), num_replicas=0, rank=0)
    with pytest.raises(SamplerError, match="`num_samples` needs `weights_by`"):
        ChipSampler(range(4), num_samples=10)
    with pytest.raises(SamplerError, match="`weights_by` has 3 labels for 4 chips"):
        ChipSampler(range(4), weights_by=["a", "b", "c"])
    with pytest.raises(SamplerError, match="has no chip rows"):
        ChipSampler(range(4), weights_by="collection")
    # without torch.distributed: one rank
    sampler = ChipSampler(range(4))
    assert (sampler.num_replicas, sampler.rank) == (1, 0)


def test_importing_the_sampler_does_not_import_torch() -> None:
    code = "import sys, stacchip_db.sampler; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_weights_by_balances_groups_without_random_repeats() -> None:
    labels = ["big"] * 90 + ["small"] * 10
    sampler = ChipSampler(range(100), weights_by=labels, seed=5)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    for order in epochs:
        assert len(order) == 100
        groups = Counter(labels[i] for i in order)
        assert groups == {"big": 50, "small": 50}
        # the small group is cycled: each of its chips 5 times, none more
        assert set(Counter(i for i in order if i >= 90).values()) == {5}
    # the big group is walked across epochs: 50 different chips in epoch 0, and its first
    # two epochs (100 draws) hold all 90 chips, 10 of them a second time (its next cycle)
    assert len({i for i in epochs[0] if i < 90}) == 50
    big = Counter(i for order in epochs[:2] for i in order if i < 90)
    assert len(big) == 90 and sorted(Counter(big.values()).items()) == [(1, 80), (2, 10)]
    # deterministic, and split across ranks like any order
    again = ChipSampler(range(100), weights_by=labels, seed=5)
    again.set_epoch(2)
    assert list(again) == epochs[2]
    ranks = [
        list(ChipSampler(range(100), weights_by=labels, seed=5, num_replicas=2, rank=r))
        for r in range(2)
    ]
    assert sorted(ranks[0] + ranks[1]) == sorted(epochs[0])
    # an epoch of another length
    longer = ChipSampler(range(100), weights_by=labels, num_samples=300)
    assert Counter(labels[i] for i in longer) == {"big": 150, "small": 150}


def test_weights_by_a_column_of_a_chip_dataset(database_url: str, s2_items: list[dict]) -> None:
    store_indexed(database_url, s2_items, chip_size=CHIP)
    first, second = (item["id"] for item in s2_items)
    query = (
        f"(SELECT * FROM ({ALL} WHERE item_id = '{first}') a) UNION ALL "
        f"(SELECT * FROM ({ALL} WHERE item_id = '{second}' LIMIT 12) b)"
    )
    dataset = ChipDataset(query, database_url=database_url)
    big = sum(row.item_id == first for row in dataset.rows)
    assert big > 100 and len(dataset) == big + 12
    sampler = ChipSampler(dataset, weights_by="item_id", seed=1)
    drawn = Counter(dataset.rows[i].item_id for i in sampler)
    assert abs(drawn[first] - drawn[second]) <= 1
    plain = Counter(dataset.rows[i].item_id for i in ChipSampler(dataset, seed=1))
    assert plain[second] == 12
    by_function = ChipSampler(dataset, weights_by=lambda row: row.item_id, seed=1)
    assert list(by_function) == list(sampler)
    with pytest.raises(SamplerError, match="chips have no column 'platform'"):
        ChipSampler(dataset, weights_by="platform")
