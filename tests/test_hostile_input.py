"""Issue 10, parts 3-5: ids cannot escape paths, one item cannot take the machine down, one bad
item cannot end the run. Real database, real COGs, the real CLI, a loopback STAC API and S3."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest

from stacchip_db.db import connect
from stacchip_db.db.items import minimal_collection
from stacchip_db.db.store import store_item
from stacchip_db.db.writer import ItemWriter
from stacchip_db.demo import (
    NAIP_COLLECTION_FIXTURE,
    StacApiServer,
    collection_document,
    load_catalog,
    naip_item,
    naip_sample_geometry,
    write_sample_source,
)
from stacchip_db.export import export_index
from stacchip_db.grid import MAX_CHIPS, TooManyChipsError
from stacchip_db.index import index_item
from stacchip_db.paths import UnsafeName, check_name
from stacchip_db.storage import under
from tests.conftest import REPO, error_line, run_cli, store_indexed

NAIP_200 = "naip-planetary-computer-200.ndjson"
NAIP_BIG = "naip_m_4207009_ne_19_060_20211024.json"  # proj:shape 12666 x 9704


def _naip(fixtures_dir: Path, n: int) -> list[dict[str, Any]]:
    lines = (fixtures_dir / NAIP_200).read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error: ")]


def _stored(url: str) -> tuple[set[str], set[str]]:
    with connect(url) as conn:
        items = {r[0] for r in conn.execute("SELECT id FROM pgstac.items")}
        chips = {r[0] for r in conn.execute("SELECT DISTINCT item_id FROM stacchip.chips")}
    return items, chips


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# -- the one check ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../../x", "..", ".", "/abs/path", "a/b", "a\\b", "", "a\0b", "new\nline"]
)
def test_check_name_refuses_what_is_not_one_segment(name: str, tmp_path: Path) -> None:
    with pytest.raises(UnsafeName, match="item id"):
        check_name(name, "item id")
    with pytest.raises(UnsafeName):
        under(str(tmp_path), "collection", name)
    with pytest.raises(UnsafeName):
        under("s3://bucket/prefix", name)


@pytest.mark.parametrize("name", ["S2A_T20HNJ_20240311T140636_L2A", "m_42070.tif", "a b", "x..y"])
def test_check_name_keeps_real_names(name: str, tmp_path: Path) -> None:
    assert check_name(name, "item id") == name
    assert under(str(tmp_path), name) == str(tmp_path / name)
    assert under("s3://bucket/p/", name) == f"s3://bucket/p/{name}"


# -- index: each bad item one line, the good ones around it stored --------------------------------


def _hostile_items(fixtures_dir: Path, tmp_path: Path) -> tuple[list[dict], dict[str, list[str]]]:
    """Good items around bad ones; for each bad item's id, what its error line must say."""
    base = _naip(fixtures_dir, 4)
    good_a, good_b, no_bbox = base[0], base[1], base[2]
    no_bbox.pop("bbox")
    no_bbox["collection"] = "naip-without-bbox"  # a new collection made from the geometry
    absolute = str(tmp_path / "abs")
    expected: dict[str, list[str]] = {}

    def variant(item_id: str, change: Any, *expect: str) -> dict:
        item = copy.deepcopy(base[3])
        item["id"] = item_id
        change(item)
        expected[item_id] = [item_id, *expect]
        return item

    items = [
        good_a,
        variant("../../x", lambda i: None, "item id '../../x'", "contains '/'"),
        variant(absolute, lambda i: None, f"item id '{absolute}'"),
        variant("rel-collection", lambda i: i.update(collection="../../x"),
                "collection '../../x'"),
        variant("abs-collection", lambda i: i.update(collection=absolute),
                f"collection '{absolute}'"),
        variant("dot-dot", lambda i: i.update(collection=".."), "collection '..'"),
        variant("list-properties", lambda i: i.update(properties=[]),
                "properties is a JSON list"),
        variant("list-assets", lambda i: i.update(assets=[]), "assets is a JSON list"),
        variant("infinite-shape", lambda i: i["properties"].update({"proj:shape": [math.inf, 100]}),
                "proj:shape=[inf, 100]", "positive whole numbers"),
        variant("nan-transform",
                lambda i: i["properties"].update({"proj:transform": [math.nan, 0, 0, 0, -1, 0]}),
                "proj:transform", "not a finite number"),
        no_bbox,
        good_b,
    ]
    return items, expected


@pytest.mark.parametrize("mode", ["--no-bulk", "--bulk"])
def test_each_bad_item_is_one_line_and_the_good_ones_are_stored(
    database_url: str, fixtures_dir: Path, tmp_path: Path, mode: str
) -> None:
    items, expected = _hostile_items(fixtures_dir, tmp_path)
    path = tmp_path / "items.ndjson"
    path.write_text("\n".join(json.dumps(item) for item in items) + "\n")  # Infinity, NaN: JSON5
    result = run_cli(
        ["index", mode, "--quality", "none", "--chip-size", "1024", "--json", str(path)],
        database_url=database_url,
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stderr
    errors = _errors(result.stderr)
    assert len(errors) == len(expected), result.stderr
    for item_id, words in expected.items():
        [line] = [e for e in errors if f"item {item_id}:" in e]
        assert all(word in line for word in words), (words, line)
    good = {items[0]["id"], items[-2]["id"], items[-1]["id"]}
    assert _stored(database_url) == (good, good)
    summary = json.loads(result.stdout)
    assert summary["items"] == 3 and summary["failed"] == len(expected)
    assert "naip-without-bbox" in summary["collections_created"]
    with connect(database_url) as conn:
        [(bbox,)] = conn.execute(
            "SELECT content->'extent'->'spatial'->'bbox'->0 FROM pgstac.collections "
            "WHERE id = 'naip-without-bbox'"
        ).fetchall()
    lon, lat = zip(*items[-2]["geometry"]["coordinates"][0], strict=True)
    assert bbox == pytest.approx([min(lon), min(lat), max(lon), max(lat)])
    assert not (tmp_path / "x").exists() and not (tmp_path / "abs").exists()


def test_items_without_bbox_into_a_new_collection_through_the_library(
    database_url: str, fixtures_dir: Path
) -> None:
    items = _naip(fixtures_dir, 3)
    for item in items:
        item.pop("bbox")
        item["collection"] = "fresh"
    with connect(database_url, autocommit=True) as conn, ItemWriter(conn, chip_size=2048) as w:
        for item in items:
            w.add(item, index_item(item, quality="none", chip_size=2048))
    assert w.failures == [] and w.result.collections_created == ["fresh"]
    assert _stored(database_url)[0] == {i["id"] for i in items}
    assert minimal_collection("fresh", items[0])["extent"]["spatial"]["bbox"][0][0] < -85


# -- bounds on the grid ---------------------------------------------------------------------------


def _peak_bytes(call: Any) -> tuple[Any, int]:
    """`call()`'s result (or exception) and the peak of Python/numpy allocations during it."""
    tracemalloc.start()
    try:
        try:
            outcome = call()
        except Exception as e:  # returned, so the peak is read in any case
            outcome = e
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_huge_proj_shape_is_refused_before_allocating(fixtures_dir: Path) -> None:
    item = json.loads((fixtures_dir / NAIP_BIG).read_text())
    item["properties"]["proj:shape"] = [10**7, 10**7]  # 1.5 billion chips of 256 px
    error, peak = _peak_bytes(lambda: index_item(item, quality="none"))
    assert isinstance(error, TooManyChipsError), error
    assert f"{(10**7 // 256) ** 2:,} chips (10000000 x 10000000 px in chips of 256 px), more " \
        "than `max_chips` 1,000,000" in str(error)
    assert peak < 16 * 2**20  # the grid would need gigabytes


def test_chip_size_1_on_naip_is_refused_and_max_chips_raises_the_bound(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "naip.json"
    item = json.loads((fixtures_dir / NAIP_BIG).read_text())
    item["collection"] = "naip"
    path.write_text(json.dumps(item))
    args = ["index", "--quality", "none", str(path)]
    result, peak = _peak_bytes(
        lambda: run_cli([*args, "--chip-size", "1"], database_url=database_url)
    )
    line = error_line(result)
    assert f"item {item['id']}: 122,910,864 chips (12666 x 9704 px in chips of 1 px), more " \
        f"than --max-chips {MAX_CHIPS:,}; use a larger --chip-size" in line
    assert peak < 64 * 2**20  # 122 M chips would be tens of gigabytes
    assert _stored(database_url) == (set(), set())
    small = error_line(run_cli([*args, "--max-chips", "1000"], database_url=database_url))
    assert "1,813 chips (12666 x 9704 px in chips of 256 px), more than --max-chips 1,000" in small
    ok = run_cli([*args, "--max-chips", "2000"], database_url=database_url)
    assert ok.exit_code == 0, ok.output
    assert "1,813 chips stored" in ok.stdout


# -- a lost database -------------------------------------------------------------------------------


def test_a_lost_connection_ends_index_with_one_line(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    """The server drops `index`'s connections between two items: one line, no ValueError."""
    first, second = (json.dumps(i) for i in _naip(fixtures_dir, 2))
    fifo = tmp_path / "items.ndjson"
    os.mkfifo(fifo)
    command = [
        sys.executable, "-m", "stacchip_db.cli", "--database-url", database_url, "index",
        "--no-bulk", "--quality", "none", "--chip-size", "64", str(fifo),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        with fifo.open("w") as feed:
            feed.write(first + "\n")
            feed.flush()
            deadline = time.monotonic() + 120
            while not _stored(database_url)[1]:  # > 50,000 chips: its own batch
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
            with connect(database_url, autocommit=True) as admin:
                killed = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'stacchip-db' AND pid <> pg_backend_pid() "
                    "AND datname = current_database()"
                ).fetchone()[0]
            assert killed >= 1
            feed.write(second + "\n")
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 1, (out, err)
    assert "Traceback" not in err and "ValueError" not in err
    [line] = _errors(err)
    assert "lost the database connection" in line


def test_a_lost_connection_is_not_blamed_on_the_caller(
    database_url: str, fixtures_dir: Path
) -> None:
    """ItemWriter: the batch that meets a dead connection raises DatabaseUnavailable; it does
    not retry item by item into a ValueError about transactions."""
    from stacchip_db.errors import DatabaseUnavailable

    items = _naip(fixtures_dir, 3)
    tables = [index_item(i, quality="none", chip_size=2048) for i in items]
    conn = connect(database_url, autocommit=True)
    writer = ItemWriter(conn, chip_size=2048, batch_items=2)
    writer.add(items[0], tables[0])
    writer.flush()
    with connect(database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
    writer.add(items[1], tables[1])
    with pytest.raises(DatabaseUnavailable, match="lost the database connection"):
        writer.add(items[2], tables[2])  # a batch of two: written, fails
    with pytest.raises(DatabaseUnavailable, match="lost the database connection"):
        store_item(conn, items[1], tables[1], chip_size=2048)
    assert writer.failures == []
    assert _stored(database_url)[0] == {items[0]["id"]}
    conn.close()


# -- impossible dates ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option", [["--end", "9999"], ["--end", "9999-12-31"], ["--datetime", "2020/9999"]]
)
def test_an_end_past_9999_is_a_usage_error(database_url: str, option: list[str]) -> None:
    result = run_cli(["chips", *option], database_url=database_url)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "past the last date" in result.output and option[0] in result.output


# -- export-index and prechip: names stored by another tool ----------------------------------------


def _store_unsafe_copy(url: str, source: dict, collection: str, item_id: str) -> None:
    """Put `source` and its chips into the database under unsafe names, as a tool that does
    not check them would (pgstac's functions, plain SQL)."""
    item = copy.deepcopy(source)
    document = minimal_collection("placeholder", item)
    document["id"] = item["collection"] = collection
    item["id"] = item_id
    with psycopg.connect(url, autocommit=True) as conn:
        exists = "SELECT 1 FROM pgstac.collections WHERE id = %s"
        if not conn.execute(exists, (collection,)).fetchone():
            conn.execute("SELECT pgstac.create_collection(%s::jsonb)", (json.dumps(document),))
        conn.execute("SELECT pgstac.upsert_item(%s::jsonb)", (json.dumps(item),))
        conn.execute("SELECT stacchip.chip_partition(%s)", (collection,))
        conn.execute(
            """
            INSERT INTO stacchip.chips (collection, item_id, chip_size, chip_index_x,
                chip_index_y, datetime, cloud_fraction, nodata_fraction, geometry)
            SELECT %s, %s, chip_size, chip_index_x, chip_index_y, datetime, cloud_fraction,
                   nodata_fraction, geometry
            FROM stacchip.chips WHERE collection = %s AND item_id = %s
            """,
            (collection, item_id, source["collection"], source["id"]),
        )


def test_export_index_skips_unsafe_names_and_exports_the_rest(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    good = _naip(fixtures_dir, 2)
    with connect(database_url, autocommit=True) as conn:
        for item in good:
            store_item(conn, item, index_item(item, quality="none", chip_size=1024), chip_size=1024)
    absolute = str(tmp_path / "abs")
    unsafe = [("../../x", "rel"), (absolute, "abs"), ("naip", "../../y"), ("naip", absolute)]
    for collection, item_id in unsafe:
        _store_unsafe_copy(database_url, good[0], collection, item_id)
    out = tmp_path / "deep" / "out"
    result = run_cli(["export-index", "--chip-size", "1024", str(out)], database_url=database_url)
    assert result.exit_code == 0, result.output
    assert "exported" in result.stdout and "of 2 items" in result.stdout
    assert "4 items skipped: their collection or id cannot be a folder name" in result.stdout
    for collection, item_id in unsafe:
        assert any(item_id in line and collection in line for line in result.stderr.splitlines())
    assert _files(tmp_path) == {
        out / "naip" / i["id"] / f"index_{i['id']}.parquet" for i in good
    }
    with connect(database_url) as conn:  # the library: the same, as data
        skipped = export_index(conn, tmp_path / "lib", chip_size=1024).skipped
    assert sorted((c, i) for c, i, _ in skipped) == sorted(unsafe)


def test_prechip_skips_an_unsafe_collection(
    database_url: str, s2_items: list[dict], tmp_path: Path
) -> None:
    n = store_indexed(database_url, s2_items[:1], chip_size=64)
    absolute = str(tmp_path / "abs")
    for collection in ("../../x", absolute):
        _store_unsafe_copy(database_url, s2_items[0], collection, s2_items[0]["id"])
    out = tmp_path / "deep" / "out"
    query = "SELECT collection, item_id, chip_size, chip_index_x, chip_index_y FROM stacchip.chips"
    result = run_cli(
        ["prechip", "--query", query, "--out", str(out), "--cube-size", "100",
         "--platform", "sentinel-2-l2a"],
        database_url=database_url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{2 * n} chips skipped: collection cannot be a folder name" in result.stdout
    assert f"wrote {n // 100 * 100} chips" in result.stdout
    assert "'../../x' cannot be a folder name" in result.stderr and absolute in result.stderr
    assert all(p.is_relative_to(out) for p in _files(tmp_path))
    assert {p.relative_to(out) for p in _files(tmp_path)} >= {
        Path(s2_items[0]["collection"], "manifest.parquet")
    }


# -- ingest: ids and file names from a remote STAC API ---------------------------------------------


@pytest.fixture(scope="module")
def hostile_api(pg_server: Any, stac_catalog: Any, tmp_path_factory: Any) -> Iterator[Any]:
    """A STAC API serving NAIP scenes under ids, collections and hrefs that try to escape."""
    base = stac_catalog.bases["naip"]
    absolute = str(tmp_path_factory.mktemp("outside") / "abs")

    def scene(collection: str, year: int, item_id: str | None = None) -> dict:
        item = naip_item(base, year)
        item["collection"] = collection
        item["id"] = item_id or item["id"]
        return item

    escaping_file = scene("naip-file", 2023)
    image = escaping_file["assets"]["image"]
    image["href"] = image["href"] + "/.."
    malformed = scene("naip-malformed", 2023)
    malformed["assets"]["image"] = 5  # served by the API, but not something pystac can read
    collections = {
        "naip-ids": [scene("naip-ids", 2023, "../../escaped"), scene("naip-ids", 2021)],
        "naip-malformed": [malformed, scene("naip-malformed", 2021)],
        absolute: [scene(absolute, 2023)],
        "naip-file": [escaping_file],
    }
    name = pg_server.new_name("hostile_stac")
    url = pg_server.create(name)
    load_catalog(
        url,
        [collection_document(NAIP_COLLECTION_FIXTURE, c) for c in collections],
        [item for items in collections.values() for item in items],
    )
    server = StacApiServer(url).start()
    try:
        yield server, collections, absolute, base
    finally:
        server.stop()
        pg_server.drop(name)


@pytest.mark.parametrize("target_kind", ["local", "s3"])
def test_ingest_refuses_escaping_ids_and_goes_on(
    database_url: str, hostile_api: Any, tmp_path: Path, s3_bucket: str, target_kind: str
) -> None:
    server, collections, absolute, base = hostile_api
    sample = write_sample_source(tmp_path / "s.geojson", [(naip_sample_geometry(base), {})])
    target = str(tmp_path / "out" / "t") if target_kind == "local" else f"s3://{s3_bucket}/t"
    good = collections["naip-ids"][1]["id"]

    def ingest(collection: str) -> Any:
        return run_cli(
            ["ingest", "naip", "--index", "0", "--sample-source", str(sample), "--target", target,
             "--stac-api", server.url, "--collection", collection, "--json"],
            database_url=database_url,
        )  # fmt: skip

    ids = ingest("naip-ids")
    line = error_line(ids)
    assert "1 of 2 scenes failed (the others are stored)" in line
    assert "item ../../escaped: item id '../../escaped' contains '/'" in line
    scenes = {s["id"]: s for s in json.loads(ids.stdout)["scenes"]}
    assert scenes[good]["status"] == "stored" and scenes["../../escaped"]["status"] == "failed"
    assert "item id '../../escaped'" in scenes["../../escaped"]["error"]
    assert _stored(database_url) == ({good}, {good})

    line = error_line(ingest(absolute))
    assert f"collection '{absolute}' contains '/'" in line
    line = error_line(ingest("naip-file"))
    assert "asset file name '..' would leave its folder" in line
    assert _stored(database_url) == ({good}, {good})

    if target_kind == "local":
        written = {p.relative_to(tmp_path) for p in _files(tmp_path)}
        assert all(p.parts[:3] == ("out", "t", "naip-ids") for p in written - {Path("s.geojson")})
        assert Path("out", "t", "naip-ids", good, "stac_item.json") in written
    else:
        keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
        assert keys and all(k.startswith(f"t/naip-ids/{good}/") for k in keys)
        assert _files(tmp_path) == {sample}
    assert not Path(absolute).exists()


def test_ingest_skips_an_item_the_api_serves_malformed(
    database_url: str, hostile_api: Any, tmp_path: Path
) -> None:
    server, collections, _, base = hostile_api
    malformed, good = (i["id"] for i in collections["naip-malformed"])
    sample = write_sample_source(tmp_path / "s.geojson", [(naip_sample_geometry(base), {})])
    result = run_cli(
        ["ingest", "naip", "--index", "0", "--sample-source", str(sample), "--target",
         str(tmp_path / "t"), "--stac-api", server.url, "--collection", "naip-malformed",
         "--json"],
        database_url=database_url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"item {malformed} is not a STAC item" in result.stderr
    assert [s["id"] for s in json.loads(result.stdout)["scenes"]] == [good]
    assert _stored(database_url) == ({good}, {good})
