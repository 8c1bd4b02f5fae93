"""Storing items and chips: pgstac upsert + stacchip.chips replacement (stacchip_db.db.store).

Real items from the shared fixtures, small synthetic COGs for their quality bands, a fresh
migrated database per test.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from stacchip_db.db import connect
from stacchip_db.db.store import (
    CollectionMissing,
    ItemError,
    ItemExists,
    ItemWriter,
    OnConflict,
    chips_copy_data,
    store_item,
    store_items,
)
from stacchip_db.errors import DatabaseError
from stacchip_db.index import index_item, item_datetime
from stacchip_db.synthetic import synthesize_item

S2 = "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json"
LANDSAT = "landsat-c2l2-sr-LC09_L2SR_086107_20240311_20240312_02_T2_SR.json"
NAIP = "naip_m_4207009_ne_19_060_20211024.json"
NAIP_200 = "naip-planetary-computer-200.ndjson"
CHIP_SIZE = 64

# (fixture, quality asset to synthesise, scale, collection for items without one)
SCENES = {
    "s2": (S2, "scl", 10, None),
    "landsat": (LANDSAT, "qa_pixel", 10, None),
    "naip": (NAIP, None, 20, "naip"),
}


def _scene(fixtures_dir: Path, tmp_path: Path, name: str) -> tuple[dict[str, Any], pa.Table]:
    fixture, asset, scale, collection = SCENES[name]
    item = json.loads((fixtures_dir / fixture).read_text())
    if collection:
        item["collection"] = collection
    item = synthesize_item(item, tmp_path, [asset] if asset else [], scale=scale)
    quality = "auto" if asset else "none"
    return item, index_item(item, quality=quality, chip_size=CHIP_SIZE)


def _rows(url: str, item_id: str) -> list[tuple]:
    with connect(url) as conn:
        return conn.execute(
            "SELECT collection, chip_size, chip_index_x, chip_index_y, datetime, cloud_fraction, "
            "nodata_fraction, ST_AsBinary(geometry), ST_SRID(geometry) FROM stacchip.chips "
            "WHERE item_id = %s ORDER BY chip_size, chip_index_y, chip_index_x",
            (item_id,),
        ).fetchall()


def _counts(url: str) -> tuple[int, int, int]:
    """(chip rows, distinct chip keys, pgstac items)."""
    with connect(url) as conn:
        return conn.execute(
            "SELECT (SELECT count(*) FROM stacchip.chips), (SELECT count(*) FROM (SELECT DISTINCT "
            "collection, item_id, chip_size, chip_index_x, chip_index_y FROM stacchip.chips) k), "
            "(SELECT count(*) FROM pgstac.items)"
        ).fetchone()


@pytest.mark.parametrize("name", sorted(SCENES))
def test_store_item_writes_the_index_exactly(
    name: str, database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    item, chips = _scene(fixtures_dir, tmp_path, name)
    with connect(database_url) as conn:
        result = store_item(conn, item, chips, chip_size=CHIP_SIZE)
    assert (result.items, result.chips) == (1, chips.num_rows)
    rows = _rows(database_url, item["id"])
    assert len(rows) == chips.num_rows > 0
    expected = chips.to_pydict()
    assert [r[2] for r in rows] == expected["chip_index_x"]
    assert [r[3] for r in rows] == expected["chip_index_y"]
    np.testing.assert_array_equal(
        np.array([r[5] for r in rows], np.float32), np.array(expected["cloud_fraction"], np.float32)
    )
    np.testing.assert_array_equal(
        np.array([r[6] for r in rows], np.float32),
        np.array(expected["nodata_fraction"], np.float32),
    )
    assert [bytes(r[7]) for r in rows] == expected["geometry"]  # WKB round-trips exactly
    assert {(r[0], r[1], r[4], r[8]) for r in rows} == {
        (item["collection"], CHIP_SIZE, item_datetime(item), 4326)
    }


def test_synthetic_s2_scene_has_clouds_and_dropped_nodata_chips(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    item, chips = _scene(fixtures_dir, tmp_path, "s2")
    with connect(database_url) as conn:
        store_item(conn, item, chips, chip_size=CHIP_SIZE)
        total, cloudy, worst_nodata = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE cloud_fraction > 0.5), max(nodata_fraction) "
            "FROM stacchip.chips"
        ).fetchone()
    grid_size = (1098 // CHIP_SIZE) ** 2  # the 10980 px scene at scale 10
    assert 0 < total < grid_size  # the nodata wedge drops whole chips
    assert cloudy > 0
    assert worst_nodata <= 0.5


def test_restoring_is_idempotent_and_replaces_stale_rows(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    item, chips = _scene(fixtures_dir, tmp_path, "s2")
    with connect(database_url) as conn:
        store_item(conn, item, chips, chip_size=CHIP_SIZE)
        first = _rows(database_url, item["id"])
        store_item(conn, item, chips, chip_size=CHIP_SIZE)
        assert _rows(database_url, item["id"]) == first
        assert _counts(database_url) == (len(first), len(first), 1)
        # Re-indexed with a stricter nodata limit: fewer chips, none of the old ones left over.
        strict_chips = index_item(item, chip_size=CHIP_SIZE, max_nodata=0.0)
        store_item(conn, item, strict_chips, chip_size=CHIP_SIZE)
    assert strict_chips.num_rows < len(first)
    assert _counts(database_url) == (strict_chips.num_rows, strict_chips.num_rows, 1)
    # Another chip size is another set of rows of the same item.
    with connect(database_url) as conn:
        store_item(conn, item, index_item(item, chip_size=128), chip_size=128)
        sizes = dict(
            conn.execute("SELECT chip_size, count(*) FROM stacchip.chips GROUP BY 1").fetchall()
        )
    assert sizes[CHIP_SIZE] == strict_chips.num_rows and sizes[128] > 0


def test_pgstac_serves_the_stored_item(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    item, chips = _scene(fixtures_dir, tmp_path, "landsat")
    with connect(database_url) as conn:
        store_item(conn, item, chips, chip_size=CHIP_SIZE)
        got = conn.execute(
            "SELECT pgstac.get_item(%s, %s)", (item["id"], item["collection"])
        ).fetchone()[0]
        search = conn.execute(
            "SELECT pgstac.search(%s::jsonb)",
            (json.dumps({"collections": [item["collection"]], "ids": [item["id"]]}),),
        ).fetchone()[0]
    assert got["id"] == item["id"]
    assert got["assets"]["qa_pixel"]["href"] == item["assets"]["qa_pixel"]["href"]
    assert [f["id"] for f in search["features"]] == [item["id"]]


def test_missing_collection_is_created_minimal_and_valid(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    item, chips = _scene(fixtures_dir, tmp_path, "naip")
    with connect(database_url) as conn:
        result = store_item(conn, item, chips, chip_size=CHIP_SIZE)
        document = conn.execute("SELECT pgstac.get_collection('naip')").fetchone()[0]
    assert result.collections_created == ["naip"]
    assert document["type"] == "Collection" and document["id"] == "naip"
    assert document["license"] and document["description"]
    assert document["extent"]["spatial"]["bbox"] == [item["bbox"]]
    assert document["extent"]["temporal"]["interval"][0][0].startswith("2021-10-24")
    # pystac validates the structure (required fields, extent shape).
    import pystac

    assert pystac.Collection.from_dict(document).id == "naip"


def test_strict_mode_refuses_a_missing_collection_and_writes_nothing(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    item, chips = _scene(fixtures_dir, tmp_path, "naip")
    with connect(database_url) as conn, pytest.raises(CollectionMissing) as caught:
        store_item(conn, item, chips, chip_size=CHIP_SIZE, strict=True)
    message = str(caught.value)
    assert "'naip'" in message and item["id"] in message and "--strict" in message
    assert "\n" not in message
    assert _counts(database_url) == (0, 0, 0)


def test_strict_mode_uses_an_existing_collection(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    item, chips = _scene(fixtures_dir, tmp_path, "naip")
    collection = json.loads((fixtures_dir / "naip-collection.json").read_text())
    with connect(database_url) as conn:
        conn.execute("SELECT pgstac.create_collection(%s::jsonb)", (json.dumps(collection),))
        conn.commit()
        result = store_item(conn, item, chips, chip_size=CHIP_SIZE, strict=True)
        title = conn.execute("SELECT pgstac.get_collection('naip')->>'title'").fetchone()[0]
    assert result.collections_created == []
    assert title == collection["title"]  # not replaced by a minimal one
    assert _counts(database_url)[0] == chips.num_rows


def test_on_conflict_ignore_and_insert(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    item, chips = _scene(fixtures_dir, tmp_path, "s2")
    fewer = chips.slice(0, 3)
    with connect(database_url) as conn:
        store_item(conn, item, chips, chip_size=CHIP_SIZE, on_conflict=OnConflict.insert)
        ignored = store_item(conn, item, fewer, chip_size=CHIP_SIZE, on_conflict="ignore")
        assert (ignored.items, ignored.skipped) == (0, [item["id"]])
        assert _counts(database_url)[0] == chips.num_rows
        with pytest.raises(ItemExists, match=item["id"]):
            store_item(conn, item, fewer, chip_size=CHIP_SIZE, on_conflict="insert")
    assert _counts(database_url) == (chips.num_rows, chips.num_rows, 1)


def test_bad_items_are_refused_before_the_database(database_url: str) -> None:
    good_geometry = {"type": "Point", "coordinates": [0, 0]}
    cases = [
        ({"type": "Feature", "collection": "c", "geometry": good_geometry,
          "properties": {"datetime": "2020-01-01T00:00:00Z"}}, "without an id"),
        ({"type": "Feature", "id": "a", "geometry": good_geometry,
          "properties": {"datetime": "2020-01-01T00:00:00Z"}}, "item a: no collection"),
        ({"type": "Feature", "id": "b", "collection": "c", "geometry": good_geometry,
          "properties": {}}, "item b: neither datetime"),
        ({"type": "Feature", "id": "d", "collection": "c", "geometry": None,
          "properties": {"datetime": "2020-01-01T00:00:00Z"}}, "item d: no GeoJSON geometry"),
    ]
    table = pa.table({"chip_index_x": pa.array([], pa.int32())})
    with connect(database_url) as conn:
        for item, expected in cases:
            with pytest.raises(ItemError, match=expected):
                store_item(conn, item, table, chip_size=CHIP_SIZE)
    assert _counts(database_url) == (0, 0, 0)


def test_a_failing_batch_writes_nothing(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    item, chips = _scene(fixtures_dir, tmp_path, "s2")
    other = dict(item, id="other")
    bad = dict(item, id="bad", geometry={"type": "Polygon", "coordinates": [[[0, 0], [1]]]})
    with connect(database_url) as conn:
        with pytest.raises(DatabaseError, match="storing 3 items"):
            store_items(conn, [(item, chips), (other, chips), (bad, chips)], chip_size=CHIP_SIZE)
        assert _counts(database_url) == (0, 0, 0)
        # The writer isolates the bad item and stores the others.
        with ItemWriter(conn, chip_size=CHIP_SIZE) as writer:
            for it in (item, other, bad):
                writer.add(it, chips)
    assert [f.item_id for f in writer.failures] == ["bad"]
    assert "storing item bad" in writer.failures[0].message
    assert (writer.result.items, writer.result.chips) == (2, 2 * chips.num_rows)
    assert _counts(database_url) == (2 * chips.num_rows, 2 * chips.num_rows, 2)


def test_chips_with_mixed_wkb_lengths_round_trip(database_url: str) -> None:
    import shapely

    square = shapely.box(0, 0, 1, 1)
    triangle = shapely.Polygon([(0, 0), (1, 0), (0, 1)])
    geometries = list(shapely.to_wkb(np.array([square, triangle, square])))
    table = pa.table(
        {
            "chip_index_x": pa.array([0, 1, 2], pa.int32()),
            "chip_index_y": pa.array([0, 0, 0], pa.int32()),
            "cloud_fraction": pa.array([0.0, 0.5, 1.0], pa.float32()),
            "nodata_fraction": pa.array([0.0, 0.0, 0.25], pa.float32()),
            "geometry": pa.array(geometries, pa.binary()),
        }
    )
    data, rows = chips_copy_data([table, table.slice(1)])
    assert rows == 5
    # 19-byte header, 2-byte trailer; per row 46 bytes of fields, then the WKB (93 or 77 bytes).
    assert len(data) == 19 + 2 + 5 * 46 + 3 * 93 + 2 * 77
    item = {
        "type": "Feature", "stac_version": "1.0.0", "id": "tiny", "collection": "tiny",
        "geometry": shapely.geometry.mapping(square), "bbox": [0, 0, 1, 1],
        "properties": {"datetime": "2020-01-01T00:00:00Z"}, "assets": {}, "links": [],
    }
    with connect(database_url) as conn:
        store_item(conn, item, table.slice(1), chip_size=8)
    rows_back = _rows(database_url, "tiny")
    assert [(r[2], r[6], bytes(r[7])) for r in rows_back] == [
        (1, 0.0, geometries[1]), (2, 0.25, geometries[2])
    ]


@pytest.mark.parametrize("background, writers", [(False, 1), (True, 1), (True, 3)])
def test_item_writer_batches(
    background: bool, writers: int, database_url: str, fixtures_dir: Path
) -> None:
    lines = (fixtures_dir / NAIP_200).read_text().splitlines()[:12]
    items = [json.loads(line) for line in lines]
    extra = [connect(database_url) for _ in range(writers - 1)]
    with connect(database_url) as conn, ItemWriter(
        conn, chip_size=1024, batch_chips=200, background=background, extra_connections=extra
    ) as writer:
        for item in items:
            writer.add(item, index_item(item, quality="none", chip_size=1024))
    for extra_conn in extra:
        extra_conn.close()
    expected = sum(index_item(i, quality="none", chip_size=1024).num_rows for i in items)
    assert writer.failures == []
    assert (writer.result.items, writer.result.chips) == (12, expected)
    assert _counts(database_url) == (expected, expected, 12)


# -- concurrency ------------------------------------------------------------------------------


def _store_many(url: str, lines: list[str], repeat: int, cloud: float) -> int:
    """Child process: store each item `repeat` times, one transaction each."""
    stored = 0
    with connect(url) as conn:
        for _ in range(repeat):
            for line in lines:
                item = json.loads(line)
                chips = index_item(item, quality="none", chip_size=512)
                if cloud:
                    chips = chips.set_column(
                        2, "cloud_fraction", pa.array(np.full(chips.num_rows, cloud, np.float32))
                    )
                stored += store_item(conn, item, chips, chip_size=512).chips
    return stored


@pytest.mark.timeout(240)
def test_concurrent_writers_neither_deadlock_nor_lose_rows(
    database_url: str, fixtures_dir: Path
) -> None:
    lines = (fixtures_dir / NAIP_200).read_text().splitlines()[:24]
    shared = lines[0]
    jobs = [(database_url, lines[1 + i :: 4][:6], 1, 0.0) for i in range(4)]
    # Two processes write the same item over and over, each with its own cloud fraction.
    jobs += [(database_url, [shared], 4, 0.25), (database_url, [shared], 4, 0.75)]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        results = pool.starmap(_store_many, jobs, chunksize=1)
    assert all(r > 0 for r in results)
    items = [json.loads(line) for line in lines[:25]]
    per_item = {i["id"]: index_item(i, quality="none", chip_size=512).num_rows for i in items}
    expected = sum(per_item.values())
    assert _counts(database_url) == (expected, expected, len(per_item))  # the collection: once
    with connect(database_url) as conn:
        shared_id = json.loads(shared)["id"]
        clouds = conn.execute(
            "SELECT array_agg(DISTINCT cloud_fraction), count(*) FROM stacchip.chips "
            "WHERE item_id = %s",
            (shared_id,),
        ).fetchone()
        collections = conn.execute("SELECT count(*) FROM pgstac.collections").fetchone()[0]
    assert len(clouds[0]) == 1 and clouds[0][0] in (0.25, 0.75)  # one writer's rows, whole
    assert clouds[1] == per_item[shared_id]
    assert collections == 1
