"""`stacchip_db.index_items` called from Python, and the item reader under it (`item_sources`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import stacchip_db
from stacchip_db.db import Database, connect
from stacchip_db.errors import ConfigError
from stacchip_db.index import index_item
from stacchip_db.indexing import IndexPlan, IndexSummary, index_items
from stacchip_db.item_sources import SourceError, count_items, expand_sources, read_items
from tests.conftest import run_cli

NAIP_200 = "naip-planetary-computer-200.ndjson"
CHIP_SIZE = 1024


def _naip(fixtures_dir: Path, n: int) -> list[dict]:
    lines = (fixtures_dir / NAIP_200).read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def _ndjson(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def _expected(items: list[dict]) -> int:
    return sum(index_item(i, quality="none", chip_size=CHIP_SIZE).num_rows for i in items)


def _stored(url: str) -> tuple[int, int]:
    """(pgstac items, chip rows) in the database."""
    with connect(url) as conn:
        items = conn.execute("SELECT count(*) FROM pgstac.items").fetchone()[0]
        chips = conn.execute("SELECT count(*) FROM stacchip.chips").fetchone()[0]
    return items, chips


def test_index_items_into_an_empty_table_is_a_bulk_load(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    items = _naip(fixtures_dir, 4)
    path = _ndjson(tmp_path / "items.ndjson", items)
    plans: list[IndexPlan] = []
    read: list[int] = []
    summary = index_items(
        [path], database_url, quality="none", chip_size=CHIP_SIZE,
        progress=read.append, on_plan=plans.append,
    )  # fmt: skip
    assert isinstance(summary, IndexSummary)
    assert plans == [IndexPlan(items=4, bulk=True, automatic=True, why="stacchip.chips is empty")]
    assert read == [1, 1, 1, 1]
    assert (summary.bulk, summary.items, summary.failed) == (True, 4, [])
    assert summary.chips == _expected(items) == _stored(database_url)[1]
    assert {"index", "upsert", "copy", "rebuild"} <= set(summary.timings)
    assert summary.quality_rows() == [
        {
            "collection": "naip",
            "rule": "none",
            "asset": None,
            "profile": "naip (planetary-computer)",
            "items": 4,
        }
    ]
    assert summary.describe().startswith(f"indexed 4 items: {summary.chips:,} chips stored")
    assert json.loads(json.dumps(summary.to_dict()))["items"] == 4
    # the package exports the call
    assert stacchip_db.index_items is index_items and stacchip_db.IndexSummary is IndexSummary


def test_a_collection_without_chips_is_bulk_loaded_beside_stored_ones(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    """Bulk is chosen by the first item's collection: a new collection is built apart while
    another has chips; more items of a collection that has chips go the batched way."""
    items = _naip(fixtures_dir, 6)
    index_items(
        [_ndjson(tmp_path / "a.ndjson", items[:2])], database_url, quality="none",
        chip_size=CHIP_SIZE, collection="naip-a", bulk=False,
    )  # fmt: skip
    for item in items[2:]:
        item["collection"] = "naip-b"
    plans: list[IndexPlan] = []
    new = index_items(
        [_ndjson(tmp_path / "b.ndjson", items[2:4])], database_url, quality="none",
        chip_size=CHIP_SIZE, on_plan=plans.append,
    )  # fmt: skip
    assert plans == [
        IndexPlan(items=2, bulk=True, automatic=True, why="collection 'naip-b' has no chips yet")
    ]
    assert (new.bulk, new.items, new.failed) == (True, 2, [])
    more = index_items(
        [_ndjson(tmp_path / "b2.ndjson", items[4:])], database_url, quality="none",
        chip_size=CHIP_SIZE,
    )  # fmt: skip
    assert (more.bulk, more.items, more.failed) == (False, 2, [])
    assert _stored(database_url) == (6, _expected(items))


def test_index_items_batched_on_several_writers_and_ignore(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    items = _naip(fixtures_dir, 6)
    first = _ndjson(tmp_path / "first.ndjson", items[:3])
    index_items(first, Database(database_url), quality="none", chip_size=CHIP_SIZE)  # one alone
    folder = tmp_path / "folder"
    folder.mkdir()
    for n, item in enumerate(items):
        (folder / f"{n}.json").write_text(json.dumps(item))
    plans: list[IndexPlan] = []
    summary = index_items(
        [str(folder)], Database(database_url), quality="none", chip_size=CHIP_SIZE,
        writers=2, on_conflict="ignore", on_plan=plans.append,
    )  # fmt: skip
    assert plans == [IndexPlan(items=6, bulk=False, automatic=True)]  # not empty any more
    assert summary.bulk is False and summary.failed == []
    assert summary.items == 3 and sorted(summary.skipped) == sorted(i["id"] for i in items[:3])
    assert summary.chips == _expected(items[3:])
    assert _stored(database_url) == (6, _expected(items))
    assert "3 items already stored" in summary.describe()


def test_bad_inputs_are_failures_in_library_words(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    items = _naip(fixtures_dir, 3)
    path = tmp_path / "mixed.ndjson"
    path.write_text(
        json.dumps(items[0]) + "\n{not json\n" + json.dumps(items[1]) + "\n"
        + json.dumps({"type": "Collection", "id": "naip"}) + "\n"
    )  # fmt: skip
    big = {**items[2], "id": "too-many-chips"}
    big["properties"] = {**big["properties"], "proj:shape": [100_000, 100_000]}  # 9,409 chips
    (tmp_path / "big.json").write_text(json.dumps(big))
    summary = index_items(
        [path, tmp_path / "big.json"], database_url, quality="none", chip_size=CHIP_SIZE,
        max_chips=1000, bulk=False,
    )  # fmt: skip
    assert summary.items == 2 and summary.chips == _expected(items[:2])
    where = [failure.item_id for failure in summary.failed]
    assert where == [f"{path} line 2", f"{path} line 4", "too-many-chips"]
    assert "not JSON" in summary.failed[0].message
    assert "a STAC Collection, not an item" in summary.failed[1].message
    # library messages name the Python parameter; only the CLI names its flags
    too_many = summary.failed[2].message
    assert "too-many-chips" in too_many
    assert "`max_chips`" in too_many and "--max-chips" not in too_many
    assert "3 items failed" in summary.describe()
    errors = summary.to_dict()["errors"]
    assert errors[0] == {"item": f"{path} line 2", "error": summary.failed[0].message}


def test_parameters_are_checked_before_anything_is_read(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    path = _ndjson(tmp_path / "items.ndjson", _naip(fixtures_dir, 1))
    nowhere = "postgresql://nobody@127.0.0.1:1/none"  # never connected to
    with pytest.raises(SourceError, match=r"missing\.json does not exist.*`sources`"):
        index_items([path, tmp_path / "missing.json"], nowhere)
    with pytest.raises(ConfigError, match="`writers`"):
        index_items([path], nowhere, writers=0)
    with pytest.raises(ConfigError, match="`on_conflict` 'merge'"):
        index_items([path], nowhere, on_conflict="merge")
    with pytest.raises(ConfigError, match="`chip_size`"):
        index_items([path], nowhere, chip_size=0)
    with pytest.raises(ConfigError, match="`max_nodata`"):
        index_items([path], nowhere, max_nodata=1.5)
    assert _stored(database_url) == (0, 0)


def test_the_cli_names_its_argument_where_the_library_names_sources(
    database_url: str, tmp_path: Path
) -> None:
    result = run_cli(["index", str(tmp_path / "nope.json")], database_url=database_url)
    assert result.exit_code == 2
    assert "nope.json does not exist" in result.stderr and "as PATH_OR_URL" in result.stderr
    assert "`sources`" not in result.stderr


def test_read_items_of_files_collections_and_relative_hrefs(tmp_path: Path) -> None:
    assets = {"b1": {"href": "./b1.tif"}, "remote": {"href": "s3://x/y.tif"}}
    item = {"type": "Feature", "id": "a", "assets": assets}
    folder = tmp_path / "items"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.json").write_text(json.dumps(item))
    collection = {"type": "FeatureCollection", "features": [{**item, "id": "c"}, [1]]}
    (folder / "fc.geojson").write_text(json.dumps(collection))
    (folder / ".hidden.json").write_text("{broken")
    (folder / "notes.txt").write_text("left alone")
    sources = expand_sources([folder])
    assert sources == (str(folder / "fc.geojson"), str(folder / "sub" / "a.json"))
    assert count_items(sources) == 2
    read = list(read_items(sources))
    assert [r.where for r in read] == [
        f"{folder / 'fc.geojson'} feature 0", f"{folder / 'fc.geojson'} feature 1",
        str(folder / "sub" / "a.json"),
    ]  # fmt: skip
    assert read[1].item is None and "not a STAC item (a JSON list)" in (read[1].error or "")
    assert read[2].item is not None
    assert read[2].item["assets"]["b1"]["href"] == str(folder / "sub" / "b1.tif")
    assert read[2].item["assets"]["remote"]["href"] == "s3://x/y.tif"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match=r"holds no \.json"):
        expand_sources([empty])
