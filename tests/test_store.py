"""Storing items and chips: pgstac upsert + stacchip.chips replacement (stacchip_db.db: store,
writer, bulk, and their COPY encoder).

Real items from tests/data/stac (`fixtures_dir`), small synthetic COGs for their quality bands,
a fresh migrated database per test.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from stacchip_db.db import connect
from stacchip_db.db.bulk import (
    bulk_copy_data,
    bulk_load,
    chips_table_is_empty,
)
from stacchip_db.db.items import ItemError, prepare_item
from stacchip_db.db.store import (
    CollectionMissing,
    ItemExists,
    OnConflict,
    chips_copy_data,
    store_item,
    store_items,
)
from stacchip_db.db.writer import ItemWriter
from stacchip_db.errors import DatabaseError
from stacchip_db.index import index_item, item_datetime
from stacchip_db.synthetic import synthesize_item
from tests.conftest import run_cli

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


def _row_versions(url: str, item_id: str) -> dict[tuple[int, int], tuple[str, float]]:
    """(x, y) -> (xmin, cloud): xmin changes when a row is written again."""
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT chip_index_x, chip_index_y, xmin::text, cloud_fraction FROM stacchip.chips "
            "WHERE item_id = %s",
            (item_id,),
        ).fetchall()
    return {(x, y): (xmin, cloud) for x, y, xmin, cloud in rows}


def test_restoring_rewrites_only_the_rows_that_changed(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    item, chips = _scene(fixtures_dir, tmp_path, "s2")
    with connect(database_url) as conn:
        store_item(conn, item, chips, chip_size=CHIP_SIZE)
        first = _row_versions(database_url, item["id"])
        store_item(conn, item, chips, chip_size=CHIP_SIZE)  # identical: nothing rewritten
        assert _row_versions(database_url, item["id"]) == first
        # One chip's cloud changes and the last chip disappears: only those rows move.
        cloud = chips.column("cloud_fraction").to_numpy(zero_copy_only=False).copy()
        cloud[0] = 0.75 if cloud[0] != 0.75 else 0.25
        changed = chips.set_column(
            chips.schema.get_field_index("cloud_fraction"), "cloud_fraction",
            pa.array(cloud, pa.float32()),
        ).slice(0, chips.num_rows - 1)
        store_item(conn, item, changed, chip_size=CHIP_SIZE)
    after = _row_versions(database_url, item["id"])
    keys = list(zip(chips.column("chip_index_x").to_pylist(),
                    chips.column("chip_index_y").to_pylist(), strict=True))
    assert set(after) == set(keys[:-1])
    assert after[keys[0]][1] == pytest.approx(float(cloud[0]))
    assert after[keys[0]][0] != first[keys[0]][0]
    assert all(after[k] == first[k] for k in keys[1:-1])
    assert _counts(database_url) == (len(keys) - 1, len(keys) - 1, 1)


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


# -- bulk load --------------------------------------------------------------------------------

_ALL_ROWS = (
    "SELECT collection, item_id, chip_size, chip_index_x, chip_index_y, datetime, cloud_fraction, "
    "nodata_fraction, ST_AsEWKB(geometry), "
    "stacchip.chip_sample_key(collection, item_id, chip_size, chip_index_x, chip_index_y) "
    "FROM stacchip.chips ORDER BY collection, item_id, chip_size, chip_index_x, chip_index_y"
)
_PGSTAC_ITEMS = (
    "SELECT id, collection, datetime, end_datetime, ST_AsEWKB(geometry), content "
    "FROM pgstac.items ORDER BY collection, id"
)
_DEFINITIONS = """
SELECT 'index', indexname, indexdef FROM pg_indexes
 WHERE schemaname = 'stacchip' AND tablename = 'chips'
UNION ALL
SELECT 'constraint', conname, contype::text || ' ' || pg_get_constraintdef(oid) || ' validated='
       || convalidated::text || ' deferrable=' || condeferrable::text FROM pg_constraint
 WHERE conrelid = 'stacchip.chips'::regclass
UNION ALL
SELECT 'index flags', c.relname, concat_ws(' ', x.indisclustered, x.indisunique, x.indisprimary,
       x.indisvalid, coalesce(obj_description(c.oid, 'pg_class'), '-'))
  FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
 WHERE x.indrelid = 'stacchip.chips'::regclass
ORDER BY 1, 2
"""


_PARTITIONS = "SELECT collection, partition::text FROM stacchip.chip_partitions ORDER BY 1"


def _snapshot(url: str, query: str) -> list[tuple]:
    with connect(url) as conn:
        return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                for row in conn.execute(query).fetchall()]


def _naip_pairs(fixtures_dir: Path, n: int, chip_size: int = 1024) -> list[tuple[dict, pa.Table]]:
    items = [json.loads(line) for line in (fixtures_dir / NAIP_200).read_text().splitlines()[:n]]
    return [(i, index_item(i, quality="none", chip_size=chip_size)) for i in items]


def test_bulk_load_writes_exactly_what_the_normal_path_writes(
    pg_server: Any, template_database: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    pairs = _naip_pairs(fixtures_dir, 8, chip_size=256)
    for name in ("s2", "landsat"):  # synthetic quality bands: clouds, nodata, dropped chips
        item, _ = _scene(fixtures_dir, tmp_path, name)
        pairs.append((item, index_item(item, chip_size=256)))
    urls = []
    for _ in range(2):
        name = pg_server.new_name("stacchip_test")
        urls.append((name, pg_server.create(name, template=template_database)))
    try:
        (_, normal), (_, bulk) = urls
        with connect(normal) as conn:
            store_items(conn, pairs, chip_size=256)
        with connect(bulk) as conn:
            assert chips_table_is_empty(conn)
            result = bulk_load(conn, pairs, chip_size=256, batch_items=4)
            assert not chips_table_is_empty(conn)
        expected = sum(chips.num_rows for _, chips in pairs)
        assert (result.items, result.chips, result.duplicates) == (len(pairs), expected, 0)
        assert result.collections_created == sorted({i["collection"] for i, _ in pairs})
        assert {"upsert", "copy", "rebuild"} <= set(result.timings)
        rows = _snapshot(bulk, _ALL_ROWS)
        assert len(rows) == expected
        assert rows == _snapshot(normal, _ALL_ROWS)
        assert _snapshot(bulk, _PGSTAC_ITEMS) == _snapshot(normal, _PGSTAC_ITEMS)
        assert _snapshot(bulk, _DEFINITIONS) == _snapshot(normal, _DEFINITIONS)
        assert {r[8][:9] for r in rows} == {bytes.fromhex("0103000020e6100000")}  # SRID 4326
    finally:
        for name, _ in urls:
            pg_server.drop(name)


def test_bulk_load_recreates_every_index_and_constraint_exactly(
    database_url: str, fixtures_dir: Path
) -> None:
    pairs = _naip_pairs(fixtures_dir, 6)
    with connect(database_url) as conn:
        store_items(conn, pairs[:3], chip_size=1024)
        # What later migrations might add to the partitioned table (a unique key must hold
        # the partition key, collection): a partial unique index, a unique constraint,
        # comments. The partition the bulk load builds apart must carry each of them.
        conn.execute("CREATE UNIQUE INDEX chips_cloudy_idx ON stacchip.chips (item_id, "
                     "chip_index_x, chip_index_y, chip_size, collection) "
                     "WHERE cloud_fraction > 0.5")
        conn.execute("ALTER TABLE stacchip.chips ADD CONSTRAINT chips_key_unique UNIQUE "
                     "(item_id, collection, chip_size, chip_index_y, chip_index_x)")
        conn.execute("COMMENT ON INDEX stacchip.chips_datetime_idx IS 'by date'")
        conn.execute("COMMENT ON CONSTRAINT chips_pkey ON stacchip.chips IS 'the key'")
        conn.commit()
    names = {row[0] for row in _snapshot(database_url, "SELECT indexname FROM pg_indexes "
                                         "WHERE schemaname = 'stacchip' AND tablename = 'chips'")}
    assert {"chips_pkey", "chips_geometry_datetime_idx", "chips_sample_key_idx", "chips_cloudy_idx",
            "chips_key_unique"} <= names
    before = _snapshot(database_url, _DEFINITIONS)
    assert any("by date" in str(row) for row in before)
    partition_before = _snapshot(database_url, _PARTITIONS)
    with connect(database_url) as conn:
        result = bulk_load(conn, pairs[2:], chip_size=1024)
    assert result.items == 4
    assert _snapshot(database_url, _DEFINITIONS) == before
    partitions = _snapshot(database_url, _PARTITIONS)
    assert len(partitions) == 1 and partitions != partition_before  # the partition swapped
    with connect(database_url) as conn:
        comment = conn.execute(
            "SELECT obj_description(oid, 'pg_constraint') FROM pg_constraint "
            "WHERE conname = 'chips_pkey'"
        ).fetchone()[0]
        # every index of the parent has its (valid) index in the new partition
        unattached = conn.execute(
            """
            SELECT p.indexrelid::regclass::text FROM pg_index p
            WHERE p.indrelid = 'stacchip.chips'::regclass AND NOT EXISTS (
                SELECT 1 FROM pg_inherits h JOIN pg_index c ON c.indexrelid = h.inhrelid
                WHERE h.inhparent = p.indexrelid AND c.indrelid = %s::regclass
                  AND c.indisvalid)
            """,
            (f"stacchip.{partitions[0][1]}",),
        ).fetchall()
        checks = conn.execute(  # the CHECK that let ATTACH skip its scan is gone
            "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'c' "
            "AND NOT conislocal", (f"stacchip.{partitions[0][1]}",)
        ).fetchall()
    assert comment == "the key"
    assert unattached == []
    assert len(checks) == 4  # the four of the contract, inherited
    expected = sum(chips.num_rows for _, chips in pairs)
    assert _counts(database_url) == (expected, expected, 6)


def test_bulk_load_over_existing_rows_replaces_them_last_duplicate_wins(
    database_url: str, fixtures_dir: Path
) -> None:
    pairs = _naip_pairs(fixtures_dir, 8)
    with connect(database_url) as conn:
        store_items(conn, pairs, chip_size=1024)
        at_512 = [(i, index_item(i, quality="none", chip_size=512)) for i, _ in pairs[:2]]
        store_items(conn, at_512, chip_size=512)  # another chip size: kept
    before = _snapshot(database_url, _ALL_ROWS)
    (first, first_chips), (second, second_chips) = pairs[:2]
    fewer = first_chips.slice(0, 5)  # re-indexed with fewer chips: stale rows must go
    cloudy = second_chips.set_column(
        2, "cloud_fraction", pa.array(np.full(second_chips.num_rows, 0.5, np.float32))
    )
    with connect(database_url) as conn:
        result = bulk_load(
            conn, [(second, second_chips), (first, fewer), (second, cloudy)], chip_size=1024
        )
    assert (result.items, result.chips, result.duplicates) == (2, 5 + cloudy.num_rows, 1)
    after = _snapshot(database_url, _ALL_ROWS)
    changed = {first["id"], second["id"]}
    untouched = [r for r in before if r[1] not in changed or r[2] == 512]
    assert [r for r in after if r[1] not in changed or r[2] == 512] == untouched
    first_rows = [r for r in after if r[1] == first["id"] and r[2] == 1024]
    assert [(r[3], r[4]) for r in first_rows] == sorted(
        zip(fewer["chip_index_x"].to_pylist(), fewer["chip_index_y"].to_pylist(), strict=True)
    )
    second_rows = [r for r in after if r[1] == second["id"] and r[2] == 1024]
    assert len(second_rows) == cloudy.num_rows and {r[6] for r in second_rows} == {0.5}
    total = sum(c.num_rows for _, c in pairs[2:]) + 5 + cloudy.num_rows
    total += sum(chips.num_rows for _, chips in at_512)
    assert _counts(database_url) == (total, total, 8)


def test_bulk_load_is_all_or_nothing(database_url: str, fixtures_dir: Path) -> None:
    pairs = _naip_pairs(fixtures_dir, 4)
    with connect(database_url) as conn:
        store_items(conn, pairs[:1], chip_size=1024)
    before = _snapshot(database_url, _ALL_ROWS), _snapshot(database_url, _DEFINITIONS)
    item, chips = pairs[3]
    bad = chips.set_column(  # cloud fraction 2: the CHECK constraint refuses it during COPY
        2, "cloud_fraction", pa.array(np.full(chips.num_rows, 2.0, np.float32))
    )
    with connect(database_url) as conn, pytest.raises(DatabaseError, match="bulk loading"):
        bulk_load(conn, [*pairs[:3], (item, bad)], chip_size=1024)
    assert (_snapshot(database_url, _ALL_ROWS), _snapshot(database_url, _DEFINITIONS)) == before
    assert _counts(database_url)[2] == 1  # the pgstac upserts were rolled back too


def test_bulk_copy_data_with_mixed_lengths_keeps_key_order() -> None:
    import shapely

    square, triangle = shapely.box(0, 0, 1, 1), shapely.Polygon([(0, 0), (1, 0), (0, 1)])
    table = pa.table(
        {
            "chip_index_x": pa.array([1, 0, 1, 0], pa.int32()),
            "chip_index_y": pa.array([0, 0, 1, 1], pa.int32()),
            "cloud_fraction": pa.array([0.0, 0.5, 1.0, 0.25], pa.float32()),
            "nodata_fraction": pa.array([0.0, 0.0, 0.25, 0.5], pa.float32()),
            "geometry": pa.array(shapely.to_wkb([square, triangle, square, square]).tolist()),
        }
    )
    def item(item_id: str) -> dict:
        return {"type": "Feature", "id": item_id, "collection": "c", "bbox": [0, 0, 1, 1],
                "geometry": shapely.geometry.mapping(square),
                "properties": {"datetime": "2020-01-01T00:00:00Z"}}

    prepared = [prepare_item(item(i), table) for i in ("bb", "a", "ccc")]
    data, rows = bulk_copy_data(prepared, 8)
    assert rows == 12
    # Decode: per row, 9 fields: collection, item id, chip size, x, y, datetime, 2 fractions, WKB.
    view, at, decoded = memoryview(data), 19, []
    for _ in range(rows):
        assert int.from_bytes(view[at : at + 2], "big") == 9
        at, fields = at + 2, []
        for _ in range(9):
            size = int.from_bytes(view[at : at + 4], "big")
            fields.append(bytes(view[at + 4 : at + 4 + size]))
            at += 4 + size
        decoded.append(fields)
    assert bytes(view[at:]) == b"\xff\xff"
    keys = [(f[1].decode(), int.from_bytes(f[3], "big"), int.from_bytes(f[4], "big"))
            for f in decoded]
    assert keys == sorted(keys)  # primary-key order (presorted for the key's index build)
    wkb = {(x, y): g for x, y, g in zip(table["chip_index_x"].to_pylist(),
                                        table["chip_index_y"].to_pylist(),
                                        table["geometry"].to_pylist(), strict=True)}
    assert all(f[8] == wkb[(k[1], k[2])] for f, k in zip(decoded, keys, strict=True))


def test_copy_encoder_refuses_a_layout_it_cannot_build() -> None:
    from stacchip_db.db.copy import copy_chip_rows

    table = pa.table(
        {
            "chip_index_x": pa.array([0], pa.int32()),
            "chip_index_y": pa.array([0], pa.int32()),
            "cloud_fraction": pa.array([0.0], pa.float32()),
            "nodata_fraction": pa.array([0.0], pa.float32()),
            "geometry": pa.array([b"\x01"], pa.binary()),
        }
    )
    with pytest.raises(ValueError, match="no COPY encoding for column footprint"):
        copy_chip_rows(("item_no", "footprint"), [table])
    with pytest.raises(ValueError, match="text columns must lead"):
        copy_chip_rows(("chip_size", "item_id"), [table], {"chip_size": [8], "item_id": ["a"]})
    with pytest.raises(ValueError, match="column datetime: no value per item"):
        copy_chip_rows(("item_no", "datetime"), [table])
    parts, rows = copy_chip_rows(("item_no", "chip_index_x"), [table, table])
    assert rows == 2
    # Per row: field count 2, then length 4 and value of item_no, length 4 and value of x.
    expected = b"".join(
        b"".join(v.to_bytes(size, "big") for v, size in ((2, 2), (4, 4), (n, 4), (4, 4), (0, 4)))
        for n in (0, 1)
    )
    assert b"".join(parts)[19:-2] == expected  # between the header and the trailer


def _hold_attach(url: str) -> Any:
    """A session holding stacchip.chips' SHARE UPDATE EXCLUSIVE lock (what ATTACH PARTITION
    takes) until it commits: a bulk load then waits with its partition built, not attached.
    Readers and writers (ACCESS SHARE, ROW EXCLUSIVE) do not conflict with it."""
    blocker = connect(url)
    blocker.execute("LOCK TABLE stacchip.chips IN SHARE UPDATE EXCLUSIVE MODE")
    return blocker


def _waits_for_lock(url: str, pid: int) -> bool:
    with connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
            (pid,),
        ).fetchone()[0] > 0


@pytest.mark.timeout(120)
def test_a_normal_writer_waits_for_the_bulk_load_then_succeeds(
    database_url: str, fixtures_dir: Path
) -> None:
    pairs = _naip_pairs(fixtures_dir, 6)
    outcome: dict[str, Any] = {}

    def run(name: str, work: Any) -> None:
        try:
            outcome[name] = work()
        except BaseException as e:  # reported by the assertions below
            outcome[name] = e
        outcome[name + " done"] = time.monotonic()

    blocker = _hold_attach(database_url)
    bulk_conn = connect(database_url)
    bulk_pid = bulk_conn.info.backend_pid
    bulk = threading.Thread(
        target=run, args=("bulk", lambda: bulk_load(bulk_conn, pairs[:5], chip_size=1024))
    )
    bulk.start()
    deadline = time.monotonic() + 60
    while not _waits_for_lock(database_url, bulk_pid):  # built, waiting to attach
        assert time.monotonic() < deadline and bulk.is_alive(), outcome
        time.sleep(0.02)
    writer_conn = connect(database_url)
    writer_pid = writer_conn.info.backend_pid
    item, chips = pairs[5]
    writer = threading.Thread(
        target=run, args=("writer", lambda: store_item(writer_conn, item, chips, chip_size=1024))
    )
    writer.start()
    while not _waits_for_lock(database_url, writer_pid):  # the collection's lock: the bulk's
        assert time.monotonic() < deadline and writer.is_alive(), outcome
        time.sleep(0.02)
    assert bulk.is_alive()
    blocker.commit()
    blocker.close()
    bulk.join(60)
    writer.join(60)
    bulk_conn.close()
    writer_conn.close()
    assert outcome["bulk"].items == 5 and outcome["writer"].items == 1, outcome
    assert outcome["bulk done"] <= outcome["writer done"]
    expected = sum(chips.num_rows for _, chips in pairs)
    assert _counts(database_url) == (expected, expected, 6)


def _into(outcome: dict[str, Any], work: Any) -> None:
    """Thread target: `work()`'s result (or exception) as `outcome["bulk"]`."""
    try:
        outcome["bulk"] = work()
    except BaseException as e:  # reported by the test's assertions
        outcome["bulk"] = e


def _bulk_in_thread(
    bulk_conn: Any, pairs: list[tuple[dict, pa.Table]], outcome: dict[str, Any]
) -> threading.Thread:
    """A started thread bulk-loading `pairs` on `bulk_conn`; its result lands in `outcome`."""
    bulk = threading.Thread(
        target=_into, args=(outcome, lambda: bulk_load(bulk_conn, pairs, chip_size=1024))
    )
    bulk.start()
    return bulk


@pytest.mark.timeout(120)
def test_other_collections_are_read_and_written_during_a_bulk_load(
    database_url: str, fixtures_dir: Path
) -> None:
    """A bulk load of collection B builds B's partition apart: readers (CLI list, seeded
    sample) and writers of collection A go on meanwhile, and see no row of B until it
    commits."""
    pairs = _naip_pairs(fixtures_dir, 6)
    other = [({**item, "collection": "naip-a"}, chips) for item, chips in pairs[3:]]
    with connect(database_url) as conn:
        store_items(conn, other, chip_size=1024)
    a_chips = sum(chips.num_rows for _, chips in other)
    blocker = _hold_attach(database_url)
    bulk_conn = connect(database_url)
    bulk_pid = bulk_conn.info.backend_pid
    outcome: dict[str, Any] = {}
    bulk = _bulk_in_thread(bulk_conn, pairs[:3], outcome)
    try:
        deadline = time.monotonic() + 60
        while not _waits_for_lock(database_url, bulk_pid):  # B built, waiting to attach
            assert time.monotonic() < deadline and bulk.is_alive(), outcome
            time.sleep(0.02)
        started = time.monotonic()
        listed = run_cli(["chips", "--format", "csv", "--collection", "naip-a"],
                         database_url=database_url)
        everything = run_cli(["chips", "--format", "csv"], database_url=database_url)
        sampled = run_cli(["sample", "-n", "5", "--seed", "3", "--format", "csv"],
                          database_url=database_url)
        with connect(database_url) as conn:
            # A writer of A (an item pgstac already has a partition for: pgstac's own
            # partition DDL, for a new time range, would wait for the load's pgstac upsert).
            item, chips = other[0]
            cloudy = chips.set_column(
                2, "cloud_fraction", pa.array(np.full(chips.num_rows, 0.5, np.float32))
            )
            stored = store_items(conn, [(item, cloudy)], chip_size=1024)
            b_empty = chips_table_is_empty(conn, ["naip"])
        waited = time.monotonic() - started
        assert bulk.is_alive()  # all of that while the bulk load of B was under way
    finally:
        blocker.commit()
        blocker.close()
        bulk.join(60)
        bulk_conn.close()
    for result in (listed, everything, sampled):
        assert result.exit_code == 0, result.output
    assert len(listed.stdout.splitlines()) == 1 + a_chips
    assert len(everything.stdout.splitlines()) == 1 + a_chips  # no row of B yet
    assert {line.split(",")[1] for line in sampled.stdout.splitlines()[1:]} == {"naip-a"}
    assert stored.items == 1
    assert b_empty  # B's rows are not there until the load commits
    assert waited < 30
    assert outcome["bulk"].items == 3, outcome
    expected = sum(chips.num_rows for _, chips in [*pairs[:3], *other])
    assert _counts(database_url) == (expected, expected, 6)


@pytest.mark.timeout(120)
def test_a_bulk_load_waiting_for_a_reader_does_not_hold_up_other_readers(
    database_url: str, fixtures_dir: Path
) -> None:
    pairs = _naip_pairs(fixtures_dir, 3)
    store_items(connect(database_url, autocommit=True), pairs[:1], chip_size=1024)
    reader = connect(database_url)
    reader.execute("SELECT count(*) FROM stacchip.chips")  # holds ACCESS SHARE until commit
    bulk_conn = connect(database_url)
    bulk_pid = bulk_conn.info.backend_pid
    outcome: dict[str, Any] = {}
    bulk = _bulk_in_thread(bulk_conn, pairs, outcome)
    try:
        with connect(database_url, autocommit=True) as watcher:
            deadline = time.monotonic() + 60
            while not watcher.execute(  # the bulk load has asked for the table lock
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND query LIKE 'LOCK %%'",
                (bulk_pid,),
            ).fetchone()[0]:
                assert time.monotonic() < deadline and bulk.is_alive(), outcome
                time.sleep(0.02)
        # a new reader gets through (it would queue behind a plain waiting LOCK TABLE)
        listed = run_cli(["chips", "--format", "csv"], database_url=database_url)
        assert listed.exit_code == 0, listed.output
        assert len(listed.stdout.splitlines()) == 1 + pairs[0][1].num_rows
        assert bulk.is_alive()  # still waiting for the first reader
    finally:
        reader.commit()
        reader.close()
        bulk.join(60)
        bulk_conn.close()
    assert outcome["bulk"].items == 3
    expected = sum(chips.num_rows for _, chips in pairs)
    assert _counts(database_url) == (expected, expected, 3)
