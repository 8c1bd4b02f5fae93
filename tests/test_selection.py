"""Chip selection, seeded sampling and block splits: the SQL functions and the query builder.

Chips are written through the real store (`stacchip_db.db.store.store_item`) from hand-made
grid-only chip tables with known footprints, dates and fractions, so each filter's expected
chips are known exactly. Large sets for statistics are generated in SQL.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields
from datetime import UTC, datetime

import psycopg
import pyarrow as pa
import pytest
import shapely

from stacchip_db.cli.selection_options import (
    parse_bbox,
    parse_end,
    parse_interval,
    parse_start,
    read_geometry,
)
from stacchip_db.db.sql_template import selection_filters
from stacchip_db.db.store import store_item
from stacchip_db.selection import (
    CHIP_COLUMNS,
    ChipFilter,
    Sampling,
    SelectionError,
    build_selection,
    fetch_chips,
    sql_parameter,
)


@dataclass(frozen=True)
class Chip:
    collection: str
    item_id: str
    chip_size: int
    x: int
    y: int
    when: datetime
    cloud: float
    nodata: float
    box: tuple[float, float, float, float]

    @property
    def chip_id(self) -> str:
        return f"{self.item_id}-{self.x}-{self.y}"


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def grid_item(collection: str, item_id: str, when: datetime, lon: float, lat: float, *,
              nx: int = 3, ny: int = 2, step: float = 0.1, chip_size: int = 256,
              clouds: list[float] | None = None, nodatas: list[float] | None = None
              ) -> list[Chip]:
    """An item's chips: an nx × ny grid of `step`-degree boxes from (lon, lat) going south-east."""
    chips = []
    for i, (y, x) in enumerate((y, x) for y in range(ny) for x in range(nx)):
        box = (lon + x * step, lat - (y + 1) * step, lon + (x + 1) * step, lat - y * step)
        chips.append(Chip(collection, item_id, chip_size, x, y, when,
                          clouds[i] if clouds else 0.0, nodatas[i] if nodatas else 0.0, box))
    return chips


def store_chips(url: str, chips: list[Chip]) -> None:
    """Store each item of `chips` (grouped by item) with the real store."""
    by_item: dict[tuple[str, str, int], list[Chip]] = {}
    for chip in chips:
        by_item.setdefault((chip.collection, chip.item_id, chip.chip_size), []).append(chip)
    with psycopg.connect(url, autocommit=True) as conn:
        for (collection, item_id, chip_size), rows in by_item.items():
            boxes = [shapely.box(*c.box) for c in rows]
            footprint = shapely.union_all(boxes).envelope
            item = {
                "type": "Feature", "stac_version": "1.0.0", "id": item_id,
                "collection": collection,
                "geometry": shapely.geometry.mapping(footprint),
                "bbox": list(footprint.bounds),
                "properties": {"datetime": rows[0].when.isoformat().replace("+00:00", "Z")},
                "links": [], "assets": {},
            }
            table = pa.table({
                "chip_index_x": pa.array([c.x for c in rows], pa.int32()),
                "chip_index_y": pa.array([c.y for c in rows], pa.int32()),
                "cloud_fraction": pa.array([c.cloud for c in rows], pa.float32()),
                "nodata_fraction": pa.array([c.nodata for c in rows], pa.float32()),
                "geometry": pa.array(list(shapely.to_wkb(boxes)), pa.binary()),
            })
            store_item(conn, item, table, chip_size=chip_size)


# Four items: two overlapping collections near (10, 45), one far away, different dates/sizes.
CHIPS = [
    *grid_item("sentinel-2-l2a", "S2_A", _utc(2020, 3, 15, 10), 10.0, 45.2,
               clouds=[0.0, 0.1, 0.5, 0.9, 0.2, 0.0], nodatas=[0, 0, 0.3, 0, 0, 0.1]),
    *grid_item("sentinel-2-l2a", "S2_B", _utc(2021, 7, 1, 10), 20.0, -5.0,
               clouds=[0.3, 0.3, 0.05, 0.0, 1.0, 0.4]),
    *grid_item("landsat-c2-l2", "LC_C", _utc(2021, 11, 20, 15), 10.05, 45.15, nx=2, ny=2,
               chip_size=128, clouds=[0.0, 0.25, 0.6, 0.1], nodatas=[0.5, 0, 0, 0]),
    *grid_item("sentinel-2-l2a", "S2_D", _utc(2019, 1, 5, 10), 10.0, 45.2, nx=1, ny=1,
               chip_size=512, clouds=[0.2]),
]


@pytest.fixture
def chips_url(database_url: str) -> str:
    store_chips(database_url, CHIPS)
    return database_url


def select_ids(url: str, chip_filter: ChipFilter, sampling: Sampling | None = None,
               limit: int | None = None) -> list[str]:
    with psycopg.connect(url) as conn:
        table = fetch_chips(conn, build_selection(chip_filter, sampling, limit=limit))
    return table.column("chip_id").to_pylist()


def _intersects(chip: Chip, box: tuple[float, float, float, float]) -> bool:
    return shapely.intersects(shapely.box(*chip.box), shapely.box(*box))


FILTER_CASES = {
    "everything": (ChipFilter(), lambda c: True),
    "collection": (ChipFilter(collections=("landsat-c2-l2",)),
                   lambda c: c.collection == "landsat-c2-l2"),
    "two collections": (ChipFilter(collections=("landsat-c2-l2", "sentinel-2-l2a")),
                        lambda c: True),
    "bbox": (ChipFilter(bbox=(10.12, 45.02, 10.18, 45.08)),
             lambda c: _intersects(c, (10.12, 45.02, 10.18, 45.08))),
    "intersects": (ChipFilter(intersects="POLYGON((10.01 45.19, 10.02 45.19, 10.02 45.18, "
                                         "10.01 45.19))"),
                   lambda c: shapely.intersects(shapely.box(*c.box), shapely.Polygon(
                       [(10.01, 45.19), (10.02, 45.19), (10.02, 45.18)]))),
    "start": (ChipFilter(start=_utc(2021, 1, 1)), lambda c: c.when >= _utc(2021, 1, 1)),
    "end exclusive": (ChipFilter(end=_utc(2021, 7, 1, 10)),
                      lambda c: c.when < _utc(2021, 7, 1, 10)),
    "range": (ChipFilter(start=parse_start("2020"), end=parse_end("2021-07-01")),
              lambda c: _utc(2020, 1, 1) <= c.when < _utc(2021, 7, 2)),
    "months": (ChipFilter(months=(1, 3)), lambda c: c.when.month in (1, 3)),
    "quarters": (ChipFilter(quarters=(3, 4)), lambda c: c.when.month >= 7),
    "max cloud": (ChipFilter(max_cloud=0.2), lambda c: c.cloud <= 0.2),
    "max nodata": (ChipFilter(max_nodata=0.0), lambda c: c.nodata == 0.0),
    "chip size": (ChipFilter(chip_size=128), lambda c: c.chip_size == 128),
    "combined": (ChipFilter(collections=("sentinel-2-l2a",), bbox=(9, 44, 11, 46),
                            max_cloud=0.5, max_nodata=0.2, start=_utc(2020, 1, 1)),
                 lambda c: c.collection == "sentinel-2-l2a" and c.cloud <= 0.5
                 and c.nodata <= 0.2 and c.when >= _utc(2020, 1, 1)
                 and _intersects(c, (9, 44, 11, 46))),
}


@pytest.mark.parametrize("case", list(FILTER_CASES))
def test_each_filter_selects_exactly_the_expected_chips(chips_url: str, case: str) -> None:
    chip_filter, keep = FILTER_CASES[case]
    expected = sorted(c.chip_id for c in CHIPS if keep(c))
    assert expected, "the case must select something"
    if case not in ("everything", "two collections"):
        assert len(expected) < len(CHIPS), "the case must leave something out"
    assert sorted(select_ids(chips_url, chip_filter)) == expected


def test_bbox_and_date_examples_by_name(chips_url: str) -> None:
    # Spelled out once, so a reader sees what the predicates above compute.
    ids = select_ids(chips_url, ChipFilter(bbox=(10.12, 45.02, 10.18, 45.08)))
    assert sorted(ids) == ["LC_C-0-0", "LC_C-0-1", "LC_C-1-0", "LC_C-1-1", "S2_A-1-1"]
    ids = select_ids(chips_url, ChipFilter(collections=("sentinel-2-l2a",),
                                           start=parse_start("2019"), end=parse_end("2019")))
    assert ids == ["S2_D-0-0"]


def test_select_returns_the_contract_columns_in_key_order(chips_url: str) -> None:
    with psycopg.connect(chips_url) as conn:
        table = fetch_chips(conn, build_selection(ChipFilter(), limit=5))
    assert tuple(table.column_names) == CHIP_COLUMNS
    keys = list(zip(*(table.column(n).to_pylist() for n in
                      ("collection", "item_id", "chip_size", "chip_index_x", "chip_index_y")),
                    strict=True))
    assert keys == sorted(keys) and len(keys) == 5
    first = shapely.from_wkb(table.column("geometry")[0].as_py())
    assert first.geom_type == "Polygon" and first.is_valid


def test_inlined_sql_returns_the_same_rows(chips_url: str) -> None:
    selection = build_selection(
        ChipFilter(collections=("sentinel-2-l2a",), months=(3, 7), max_cloud=0.35,
                   intersects="POLYGON((0 -10, 30 -10, 30 50, 0 50, 0 -10))"),
        Sampling(4, seed=11),
    )
    with psycopg.connect(chips_url) as conn:
        via_params = conn.execute(selection.query, selection.params).fetchall()
        via_text = conn.execute(selection.as_string()).fetchall()
    assert via_params == via_text and len(via_text) == 4


def test_sql_functions_are_callable_by_hand(chips_url: str) -> None:
    with psycopg.connect(chips_url) as conn:
        rows = conn.execute(
            "SELECT chip_id FROM stacchip.select_chips(bbox => '{10.12,45.02,10.18,45.08}', "
            "max_cloud => 0.3) ORDER BY chip_id"
        ).fetchall()
        assert [r[0] for r in rows] == ["LC_C-0-0", "LC_C-1-0", "LC_C-1-1", "S2_A-1-1"]
        sampled = conn.execute("SELECT count(*) FROM stacchip.sample_chips(5, 42)").fetchone()
        assert sampled == (5,)
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="stratify_by"):
            conn.execute("SELECT * FROM stacchip.sample_chips_stratified(5, 1, 'month')")


def test_filters_use_the_indexes(chips_url: str) -> None:
    # The functions must be inlined for the planner to see the filters; a tiny table would be
    # scanned anyway, so forbid sequential scans and look at what remains possible.
    with psycopg.connect(chips_url) as conn:
        conn.execute("SET enable_seqscan = off")

        def plan(query: str) -> str:
            return "\n".join(r[0] for r in conn.execute("EXPLAIN " + query).fetchall())

        # Either GiST: on geometry, or on (geometry, datetime) (alembic 0004).
        assert "Index Cond: (geometry &&" in plan(
            "SELECT * FROM stacchip.select_chips(bbox => '{10,45,10.1,45.1}')")
        assert "chips_geometry_datetime_idx" in plan(
            "SELECT * FROM stacchip.select_chips(bbox => '{10,45,10.1,45.1}', "
            "start_time => '2020-01-01Z', end_time => '2021-01-01Z')")
        assert "chips_sample_key_idx" in plan(
            "SELECT * FROM stacchip.sample_chips(10, 3, max_cloud => 0.5)")


SELECTION_FUNCTIONS = (
    "select_chips", "sample_chips", "sample_chips_stratified", "sample_chips_stratified_run"
)
SAMPLING_PARAMETERS = ("n", "seed", "stratify_by", "cell_size")


def test_every_chip_filter_field_is_a_parameter_of_each_selection_function(
    database_url: str,
) -> None:
    """ChipFilter's fields and each SQL function's filters are one list: names, types, order."""
    with psycopg.connect(database_url) as conn:
        declared: dict[str, list[tuple[str, str]]] = {}
        for function, name, sql_type in conn.execute(
            "SELECT p.proname, a.name, format_type(a.type, NULL) FROM pg_proc AS p, "
            "unnest(p.proargnames, p.proargtypes::oid[]) WITH ORDINALITY AS a(name, type, i) "
            "WHERE p.pronamespace = 'stacchip'::regnamespace AND p.proname = ANY (%s) "
            "AND p.proargmodes IS NULL "  # input parameters only, so names and types align
            "ORDER BY p.proname, a.i",
            [list(SELECTION_FUNCTIONS)],
        ):
            declared.setdefault(function, []).append((name, sql_type))
        # The types `build_selection` casts the values to, as the server spells them.
        expected = [
            (name, conn.execute("SELECT format_type(%s::regtype, NULL)", [sql_type]).fetchone()[0])
            for name, sql_type in ((p.name, p.type) for p in selection_filters())
        ]
    assert [sql_parameter(f) for f in fields(ChipFilter)] == [name for name, _ in expected]
    assert sorted(declared) == sorted(SELECTION_FUNCTIONS)
    for function, parameters in declared.items():
        filters = [(name, t) for name, t in parameters if name not in SAMPLING_PARAMETERS]
        assert filters == expected, function


# -- sampling ---------------------------------------------------------------------------------


@pytest.fixture
def many_url(database_url: str) -> str:
    """2,400 chips over 3 collections, 6 years and 40 one-degree cells, generated in SQL."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(  # writers by hand make the collections' partitions first (alembic 0008)
            "SELECT stacchip.chip_partition(c) FROM unnest('{s2,landsat,naip}'::text[]) AS c"
        )
        conn.execute(
            """
            INSERT INTO stacchip.chips (collection, item_id, chip_size, chip_index_x,
                chip_index_y, datetime, cloud_fraction, nodata_fraction, geometry)
            SELECT (ARRAY['s2', 'landsat', 'naip'])[1 + (i % 3)], 'item' || i, 256, x, y,
                   timestamptz '2018-01-15 00:00Z' + make_interval(months => (i * 7) % 72),
                   -- naip is cloudier: a quarter more cloud than the others
                   least(1, ((x * 7 + y * 3 + i) % 10) / 10.0 + CASE i % 3 WHEN 2 THEN 0.25
                                                                 ELSE 0 END), 0,
                   ST_MakeEnvelope(-100 + (i % 40) + x * 0.1, 40 + y * 0.1,
                                   -100 + (i % 40) + (x + 1) * 0.1, 40 + (y + 1) * 0.1, 4326)
            FROM generate_series(0, 59) i, generate_series(0, 7) x, generate_series(0, 4) y
            """
        )
        conn.execute("ANALYZE stacchip.chips")
    return database_url


def test_same_seed_same_chips_different_seed_different_chips(many_url: str) -> None:
    first = select_ids(many_url, ChipFilter(), Sampling(50, seed=7))
    again = select_ids(many_url, ChipFilter(), Sampling(50, seed=7))
    other = select_ids(many_url, ChipFilter(), Sampling(50, seed=8))
    assert first == again
    assert len(first) == len(set(first)) == 50
    assert set(first) != set(other)
    assert len(set(first) & set(other)) < 25


def test_sample_is_a_prefix_of_a_larger_sample(many_url: str) -> None:
    small = select_ids(many_url, ChipFilter(), Sampling(20, seed=3))
    large = select_ids(many_url, ChipFilter(), Sampling(300, seed=3))
    assert large[:20] == small and len(set(large)) == 300


def test_sample_larger_than_available_returns_all_of_them(many_url: str) -> None:
    chip_filter = ChipFilter(collections=("naip",), max_cloud=0.3)
    everything = select_ids(many_url, chip_filter)
    sampled = select_ids(many_url, chip_filter, Sampling(10_000, seed=1))
    assert len(sampled) == len(everything) > 0
    assert sorted(sampled) == sorted(everything)
    assert select_ids(many_url, chip_filter, Sampling(0, seed=1)) == []


def test_sample_respects_filters(many_url: str) -> None:
    chip_filter = ChipFilter(collections=("s2",), max_cloud=0.4, start=_utc(2020, 1, 1))
    allowed = set(select_ids(many_url, chip_filter))
    sampled = select_ids(many_url, chip_filter, Sampling(40, seed=5))
    assert len(sampled) == 40 and set(sampled) <= allowed


def test_sample_does_not_depend_on_physical_row_order(
    many_url: str, pg_server, template_database: str
) -> None:
    # The same rows written in the opposite order into another database: same sample.
    name = pg_server.new_name("stacchip_reordered")
    other = pg_server.create(name, template=template_database)
    try:
        with psycopg.connect(many_url) as source, psycopg.connect(other) as target:
            rows = source.execute(
                "SELECT collection, item_id, chip_size, chip_index_x, chip_index_y, datetime, "
                "cloud_fraction, nodata_fraction, geometry FROM stacchip.chips "
                "ORDER BY item_id DESC, chip_index_x DESC, chip_index_y DESC"
            ).fetchall()
            target.execute("SELECT stacchip.chip_partition(c) FROM unnest("
                           "'{s2,landsat,naip}'::text[]) AS c")
            with target.cursor().copy(
                "COPY stacchip.chips (collection, item_id, chip_size, chip_index_x, "
                "chip_index_y, datetime, cloud_fraction, nodata_fraction, geometry) FROM STDIN"
            ) as copy:
                for row in rows:
                    copy.write_row(row)
            target.commit()
        for sampling in (Sampling(30, seed=99), Sampling(30, seed=99, stratify_by="cell")):
            assert select_ids(many_url, ChipFilter(), sampling) == select_ids(
                other, ChipFilter(), sampling)
    finally:
        pg_server.drop(name)


def _strata(url: str, sampling: Sampling, chip_filter: ChipFilter | None = None) -> Counter:
    selection = build_selection(chip_filter or ChipFilter(), sampling)
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            psycopg.sql.SQL(
                "SELECT stacchip.chip_stratum({}, collection, datetime, geometry, {}), "
                "count(*), count(DISTINCT chip_id) FROM ({}) AS s GROUP BY 1"
            ).format(sampling.stratify_by, sampling.cell_size, selection.query),
            selection.params,
        ).fetchall()
    assert all(count == distinct for _, count, distinct in rows), "duplicates in a sample"
    return Counter({stratum: count for stratum, count, _ in rows})


@pytest.mark.parametrize("stratify_by, strata", [
    ("collection", 3), ("year", 6), ("quarter", 24), ("cell", 40)])
def test_strata_get_equal_counts(many_url: str, stratify_by: str, strata: int) -> None:
    counts = _strata(many_url, Sampling(strata * 5, seed=2, stratify_by=stratify_by))
    assert len(counts) == strata
    assert set(counts.values()) == {5}


def test_strata_are_capped_by_what_they_have(many_url: str) -> None:
    # With at most 30% cloud, naip (cloudier) has fewer chips than the quota of 100 a stratum.
    chip_filter = ChipFilter(max_cloud=0.3)
    with psycopg.connect(many_url) as conn:
        have = dict(conn.execute(
            "SELECT collection, count(*) FROM stacchip.chips WHERE cloud_fraction <= 0.3 "
            "GROUP BY 1").fetchall())
    assert have["naip"] < 100 < min(have["s2"], have["landsat"])
    counts = _strata(many_url, Sampling(300, seed=4, stratify_by="collection"), chip_filter)
    assert counts == Counter({"s2": 100, "landsat": 100, "naip": have["naip"]})


def test_strata_differ_by_at_most_one_when_n_does_not_divide(many_url: str) -> None:
    counts = _strata(many_url, Sampling(7, seed=9, stratify_by="collection"))
    assert sum(counts.values()) == 7 and sorted(counts.values()) == [2, 2, 3]


def test_sampling_rejects_bad_parameters() -> None:
    with pytest.raises(SelectionError, match="stratify by 'month'"):
        Sampling(5, stratify_by="month")
    with pytest.raises(SelectionError, match="negative"):
        Sampling(-1)


# -- splits -----------------------------------------------------------------------------------


def _splits(url: str, block_size: float, **kwargs: object) -> dict[str, str]:
    result = {}
    for split in ("train", "val", "test"):
        for chip_id in select_ids(url, ChipFilter(split=split, block_size=block_size, **kwargs)):
            assert chip_id not in result, f"{chip_id} is in two splits"
            result[chip_id] = split
    return result


def test_splits_are_stable_when_items_are_added(database_url: str) -> None:
    first = [c for i in range(12)
             for c in grid_item("s2", f"old{i}", _utc(2020, 1, 1 + i), i * 0.37, 10.0 + i * 0.21)]
    store_chips(database_url, first)
    before = _splits(database_url, 0.5)
    assert set(before) == {c.chip_id for c in first}
    added = [c for i in range(12)
             for c in grid_item("s2", f"new{i}", _utc(2021, 1, 1 + i), i * 0.37 + 0.05,
                                10.02 + i * 0.21)]
    store_chips(database_url, added)
    after = _splits(database_url, 0.5)
    assert {k: after[k] for k in before} == before
    assert len(after) == len(first) + len(added)


def test_chips_of_one_block_share_a_split(database_url: str) -> None:
    chips = [c for i in range(30)
             for c in grid_item("s2", f"it{i}", _utc(2020, 1, 1), (i % 6) * 0.9, (i // 6) * 0.9,
                                nx=4, ny=4, step=0.2)]
    store_chips(database_url, chips)
    splits = _splits(database_url, 1.0)
    by_block: dict[tuple[int, int], set[str]] = {}
    for chip in chips:
        centre = ((chip.box[0] + chip.box[2]) / 2, (chip.box[1] + chip.box[3]) / 2)
        block = (int(centre[0] // 1.0), int(centre[1] // 1.0))
        by_block.setdefault(block, set()).add(splits[chip.chip_id])
    assert all(len(names) == 1 for names in by_block.values())
    assert len({s for names in by_block.values() for s in names}) >= 2


def test_split_fractions_on_a_large_set(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT stacchip.chip_partition('s2')")
        conn.execute(
            """
            INSERT INTO stacchip.chips (collection, item_id, chip_size, chip_index_x,
                chip_index_y, datetime, cloud_fraction, nodata_fraction, geometry)
            SELECT 's2', 'grid', 256, x, y, timestamptz '2020-01-01Z', 0, 0,
                   ST_MakeEnvelope(x * 0.1 + 0.01, y * 0.1 + 0.01, x * 0.1 + 0.09,
                                   y * 0.1 + 0.09, 4326)
            FROM generate_series(0, 99) x, generate_series(0, 99) y
            """
        )
        counts = dict(conn.execute(
            "SELECT stacchip.chip_split(geometry, 0.1), count(*) FROM stacchip.chips GROUP BY 1"
        ).fetchall())
        custom = dict(conn.execute(
            "SELECT stacchip.chip_split(geometry, 0.1, '{0.5,0.5,0}'), count(*) "
            "FROM stacchip.chips GROUP BY 1"
        ).fetchall())
    total = sum(counts.values())
    assert total == 10_000
    assert abs(counts["train"] / total - 0.8) < 0.02
    assert abs(counts["val"] / total - 0.1) < 0.015
    assert abs(counts["test"] / total - 0.1) < 0.015
    assert set(custom) == {"train", "val"} and abs(custom["train"] / total - 0.5) < 0.03


def test_split_buffer_drops_chips_straddling_block_edges(database_url: str) -> None:
    chips = [
        Chip("s2", "edge", 256, 0, 0, _utc(2020, 1, 1), 0, 0, (0.95, 0.2, 1.05, 0.3)),
        Chip("s2", "edge", 256, 1, 0, _utc(2020, 1, 1), 0, 0, (0.5, 0.5, 0.6, 0.6)),
        Chip("s2", "edge", 256, 2, 0, _utc(2020, 1, 1), 0, 0, (0.88, 0.5, 0.98, 0.6)),
    ]
    store_chips(database_url, chips)
    loose = _splits(database_url, 1.0)
    strict = _splits(database_url, 1.0, split_buffer=0.0)
    buffered = _splits(database_url, 1.0, split_buffer=0.05)
    assert set(loose) == {"edge-0-0", "edge-1-0", "edge-2-0"}
    assert set(strict) == {"edge-1-0", "edge-2-0"}
    assert set(buffered) == {"edge-1-0"}
    assert {k: loose[k] for k in strict} == strict


# -- parsing ----------------------------------------------------------------------------------


def test_parsing_user_input(tmp_path) -> None:
    assert parse_bbox("1,2,3,4") == (1.0, 2.0, 3.0, 4.0)
    for bad in ("1,2,3", "a,b,c,d", "3,2,1,4", "0,0,200,1"):
        with pytest.raises(SelectionError, match="bbox"):
            parse_bbox(bad)
    assert parse_interval("2020-01-01/..") == (_utc(2020, 1, 1), None)
    assert parse_interval("../2021-06-30") == (None, _utc(2021, 7, 1))
    assert parse_interval("2021") == (_utc(2021, 1, 1), _utc(2022, 1, 1))
    assert parse_end("2021-06-30T12:00:00Z") == datetime(2021, 6, 30, 12, 0, 0, 1, tzinfo=UTC)
    with pytest.raises(SelectionError, match="is not a date"):
        parse_start("June")
    with pytest.raises(SelectionError, match="empty"):
        ChipFilter(start=_utc(2021, 1, 1), end=_utc(2020, 1, 1))
    with pytest.raises(SelectionError, match=r"20% is 0\.2"):
        ChipFilter(max_cloud=20)
    geojson = tmp_path / "area.geojson"
    geojson.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", '
                       '"properties": {}, "geometry": {"type": "Point", "coordinates": [1, 2]}}]}')
    assert read_geometry(geojson) == "POINT (1 2)"
    wkt = tmp_path / "area.wkt"
    wkt.write_text("POLYGON ((0 0, 1 0, 1 1, 0 0))\n")
    assert shapely.from_wkt(read_geometry(wkt)).area == 0.5
    with pytest.raises(SelectionError, match="does not exist"):
        read_geometry(tmp_path / "missing.geojson")


# The definition of a stratified sample, as one window-function query over every matching chip
# (what sample_chips_stratified computed before it walked each stratum): each stratum present gets
# its first k = ceil(n / strata) chips in seeded order (offset up, then wrapped), the total cut to
# n in (rank in stratum, lap, sampling key) order.
_REFERENCE_STRATIFIED = """
WITH keyed AS (
    SELECT s.chip_id,
           stacchip.chip_stratum(%(by)s, s.collection, s.datetime, s.geometry, 1.0) AS stratum,
           stacchip.chip_sample_key(s.collection, s.item_id, s.chip_size, s.chip_index_x,
                                    s.chip_index_y) AS key
    FROM stacchip.select_chips(max_cloud => %(max_cloud)s::real, months => %(months)s::int[],
                               start_time => %(start)s::timestamptz) AS s
), ranked AS (
    SELECT *, key < stacchip.sample_offset(%(seed)s) AS lap,
           row_number() OVER (PARTITION BY stratum
                              ORDER BY key < stacchip.sample_offset(%(seed)s), key) AS rank
    FROM keyed
)
SELECT chip_id FROM ranked
WHERE rank <= ceil(%(n)s::numeric / (SELECT count(DISTINCT stratum) FROM keyed))
ORDER BY rank, lap, key LIMIT %(n)s
"""


@pytest.mark.parametrize("stratify_by", ["collection", "year", "quarter", "cell"])
@pytest.mark.parametrize("n, seed, max_cloud, months, start", [
    (7, 9, None, None, None),
    (100, 1, 0.3, None, None),
    (1000, 2, None, [2, 3, 11], None),
    (5000, 3, 0.5, None, "2020-05-01Z"),
    (61, -4, 0.2, [1, 7], "2019-01-01Z"),
])
def test_stratified_sample_equals_its_definition(
    many_url: str, stratify_by: str, n: int, seed: int, max_cloud: float | None,
    months: list[int] | None, start: str | None,
) -> None:
    # Same chips in the same order as the reference, whichever plan each stratum gets.
    chip_filter = ChipFilter(
        max_cloud=max_cloud, months=tuple(months or ()),
        start=parse_start(start.rstrip("Z")) if start else None)
    with psycopg.connect(many_url) as conn:
        expected = [r[0] for r in conn.execute(_REFERENCE_STRATIFIED, {
            "by": stratify_by, "n": n, "seed": seed, "max_cloud": max_cloud,
            "months": months, "start": start}).fetchall()]
        # Also with the walks forced (as on a large table) and with bitmap scans only.
        forced = []
        for setting in ("enable_seqscan", "enable_indexscan"):
            conn.execute(f"SET {setting} = off")
            forced.append(fetch_chips(conn, build_selection(
                chip_filter, Sampling(n, seed=seed, stratify_by=stratify_by)
            )).column("chip_id").to_pylist())
            conn.execute(f"RESET {setting}")
    got = select_ids(many_url, chip_filter, Sampling(n, seed=seed, stratify_by=stratify_by))
    assert expected and got == expected
    assert forced == [expected, expected]


def test_stratified_sample_of_nothing(many_url: str) -> None:
    for by in ("collection", "year", "quarter", "cell"):
        assert select_ids(many_url, ChipFilter(collections=("nothing",)),
                          Sampling(10, seed=1, stratify_by=by)) == []
        assert select_ids(many_url, ChipFilter(), Sampling(0, seed=1, stratify_by=by)) == []
