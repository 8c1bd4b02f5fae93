"""Time series: places at T dates, as prechip cubes and `ChipDataset` stacks."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from stacchip_db.dataset import ChipDataset, ChipRow, load_selection
from stacchip_db.errors import ConfigError
from stacchip_db.prechip import export_cubes
from stacchip_db.selection import ChipFilter
from stacchip_db.time_series import plan_stacks
from tests.conftest import FIXTURES, S2_BANDS, S2_FIXTURE, run_cli, store_indexed

DATES = ("2024-03-11T14:11:54Z", "2024-06-09T14:11:54Z", "2024-09-07T14:11:54Z")


@pytest.fixture(scope="module")
def dated_items(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One synthetic Sentinel-2 tile at three dates (other pixels at each)."""
    from stacchip_db.synthetic import synthesize_item

    source = json.loads((FIXTURES / S2_FIXTURE).read_text())
    items = []
    for n, when in enumerate(DATES):
        raw = copy.deepcopy(source)
        raw["id"] = f"{source['id']}_t{n}"
        raw["properties"]["datetime"] = when
        out = tmp_path_factory.mktemp(f"t{n}")
        items.append(synthesize_item(raw, out, [*S2_BANDS, "scl"], scale=10, seed=10 + n))
    return items


def _row(location: int, day: int, cloud: float, item: str = "i") -> ChipRow:
    when = datetime(2024, 1, day, tzinfo=UTC)
    return ChipRow("c", f"{item}{day}", 64, location, 0, when, cloud, 0.0, b"", location)


def test_plan_stacks_picks_dates_and_counts_short_places() -> None:
    rows = [_row(1, d, c) for d, c in ((1, 0.5), (5, 0.1), (9, 0.3), (13, 0.0), (17, 0.9))]
    rows += [_row(2, 3, 0.0), _row(2, 4, 0.0)]  # two dates only
    rows += [_row(1, 5, 0.05, item="dup")]  # a second chip of one instant: the less cloudy
    days = {
        pick: [[rows[p].datetime.day for p in s.positions] for s in plan_stacks(rows, 3, pick)[0]]
        for pick in ("latest", "spread", "least-cloudy")
    }
    assert days == {"latest": [[9, 13, 17]], "spread": [[1, 9, 17]],
                    "least-cloudy": [[5, 9, 13]]}  # fmt: skip
    stacks, short = plan_stacks(rows, 3, "least-cloudy")
    assert short == 1 and rows[stacks[0].positions[0]].item_id == "dup5"
    with pytest.raises(ConfigError, match="`pick` 'random'"):
        plan_stacks(rows, 3, "random")
    with pytest.raises(ConfigError, match="`time_series` 0"):
        plan_stacks(rows, 0)


def test_time_series_cubes_equal_single_date_reads(
    database_url: str, dated_items: list[dict], tmp_path: Path
) -> None:
    store_indexed(database_url, dated_items, chip_size=64)
    selection = load_selection(database_url, ChipFilter())
    places = {r.location for r in selection.rows}
    out = tmp_path / "cubes"
    summary = export_cubes(selection, str(out), cube_size=4, time_series=2, pick="latest")
    collection = dated_items[0]["collection"]
    cube = np.load(out / collection / "cube_0.npz")
    assert cube["pixels"].shape == (4, 2, 10, 64, 64) and cube["pixels"].dtype == np.float32
    assert cube["week_norm"].shape == cube["hour_norm"].shape == (4, 2, 2)
    assert cube["lat_norm"].shape == cube["lon_norm"].shape == (4, 2)
    manifest = pq.read_table(out / collection / "manifest.parquet").to_pylist()
    assert summary.written == len(manifest) == summary.locations * 2
    first = [m for m in manifest if m["cube"] == 0]
    assert [(m["row"], m["step"]) for m in first] == [(n, t) for n in range(4) for t in range(2)]
    # The two latest dates, in time order, of one place per row.
    for n in range(4):
        steps = [m for m in first if m["row"] == n]
        assert len({m["location"] for m in steps}) == 1
        assert [m["datetime"].month for m in steps] == [6, 9]
    # Each stacked chip equals the single-date read of that chip.
    singles = ChipDataset(
        f"SELECT * FROM stacchip.chips WHERE item_id || '-' || chip_index_x || '-' || "
        f"chip_index_y IN ({', '.join(repr(m['chip_id']) for m in first)})",
        database_url=database_url,
    )
    by_id = {singles[i]["chip_id"]: singles[i] for i in range(len(singles))}
    for m in first:
        assert np.array_equal(cube["pixels"][m["row"], m["step"]], by_id[m["chip_id"]]["pixels"])
        assert np.array_equal(cube["week_norm"][m["row"], m["step"]],
                              by_id[m["chip_id"]]["week_norm"])  # fmt: skip
    # ChipDataset(time_series=T) gives the same stacks.
    stacks = ChipDataset(ChipFilter(), database_url=database_url, time_series=2, pick="latest")
    assert len(stacks) == summary.locations + summary.not_in_full_cube // 2
    for n in range(4):
        item = stacks[n]
        assert item["pixels"].shape == (2, 10, 64, 64)
        assert np.array_equal(item["pixels"], cube["pixels"][n])
        assert item["chip_ids"] == [m["chip_id"] for m in first if m["row"] == n]
        assert item["week_norm"].shape == (2, 2) and item["lat_norm"].shape == (2,)
    # Places with fewer than T dates are left out and counted.
    short = export_cubes(selection, str(tmp_path / "four"), cube_size=4, time_series=4)
    assert (short.written, short.short_locations) == (0, len(places))
    assert "with fewer than 4 dates left out" in short.describe()


def test_prechip_time_series_command(
    database_url: str, dated_items: list[dict], tmp_path: Path
) -> None:
    store_indexed(database_url, dated_items, chip_size=64)
    out = tmp_path / "cubes"
    result = run_cli(
        ["prechip", "-n", "6", "--seed", "3", "--by-location", "--time-series", "3", "--pick",
         "spread", "--cube-size", "3", "--out", str(out)],
        database_url=database_url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "(6 locations x 3 dates)" in result.output
    collection = dated_items[0]["collection"]
    cubes = sorted((out / collection).glob("cube_*.npz"))
    assert len(cubes) == 2
    assert np.load(cubes[0])["pixels"].shape == (3, 3, 10, 64, 64)
