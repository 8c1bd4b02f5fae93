"""Chip locations: the key (grid), its column and migration, `locations`, `sample --by-location`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import psycopg
import pytest

from stacchip_db.db.migrate import init_database
from stacchip_db.db.store import store_item
from stacchip_db.grid import chip_grid, grid_locations
from stacchip_db.index import index_item, key_locations
from stacchip_db.locations import summarise_locations
from stacchip_db.selection import ChipFilter, Sampling, SelectionError, build_selection
from stacchip_db.synthetic import fill_chips
from tests.conftest import FIXTURES, S2_FIXTURE, run_cli

S2 = json.loads((FIXTURES / S2_FIXTURE).read_text())


def dated(item: dict, item_id: str, when: str, *, shift: tuple[float, float] = (0, 0)) -> dict:
    """`item` as another date (and, with `shift`, another place: metres added to the grid's
    origin on every asset)."""
    out = copy.deepcopy(item)
    out["id"] = item_id
    out["properties"]["datetime"] = when
    for fields in [out["properties"], *out["assets"].values()]:
        if "proj:transform" in fields:
            t = list(fields["proj:transform"])
            t[2] += shift[0]
            t[5] += shift[1]
            fields["proj:transform"] = t
    return out


def locations(item: dict, chip_size: int) -> np.ndarray:
    table = index_item(item, quality="none", chip_size=chip_size, max_nodata=1.0)
    return table.column("location").to_numpy()


def test_locations_are_equal_across_dates_and_differ_across_tiles_and_chip_sizes() -> None:
    march = locations(S2, 1024)
    june = locations(dated(S2, "june", "2024-06-11T14:11:54Z"), 1024)
    assert len(march) == 100 and len(set(march)) == 100  # one place per chip of a scene
    assert np.array_equal(march, june)
    # The next MGRS tile of the zone: 109,800 m east, not a multiple of 10,240 m chips.
    east = locations(dated(S2, "east", "2024-03-11T14:11:54Z", shift=(109_800, 0)), 1024)
    assert not set(east) & set(march)
    assert not set(locations(S2, 512)) & set(march)
    # Shifted by exactly one chip, the grids share the chips that cover the same ground.
    one_chip = locations(dated(S2, "shifted", "2024-03-11T14:11:54Z", shift=(10_240, 0)), 1024)
    assert len(set(one_chip) & set(march)) == 90


def test_location_key_is_the_documented_text_hash() -> None:
    grid = chip_grid(S2, chip_size=1024)
    key = grid_locations(grid.crs, grid.transform, 1024, np.array([1]), np.array([2]))[0]
    import hashlib

    text = "EPSG:32720|10.000000|0.000000|0.000000|-10.000000|1024|510220.000000|6379520.000000"
    assert key == int.from_bytes(hashlib.md5(text.encode()).digest()[:8], "big", signed=True)


def test_stored_locations_the_migration_and_the_fallback(database_url: str) -> None:
    items = [S2, dated(S2, "june", "2024-06-11T14:11:54Z")]
    with psycopg.connect(database_url, autocommit=True) as conn:
        for item in items:
            store_item(conn, item, index_item(item, quality="none", chip_size=1024, max_nodata=1),
                       chip_size=1024)  # fmt: skip
        # A row whose item is not in pgstac, inserted without a location (another tool).
        conn.execute("SELECT stacchip.chip_partition('other')")
        conn.execute(
            "INSERT INTO stacchip.chips (collection, item_id, chip_size, chip_index_x, "
            "chip_index_y, datetime, cloud_fraction, nodata_fraction, geometry) VALUES "
            "('other', 'lonely', 8, 1, 2, now(), 0, 0, ST_MakeEnvelope(0, 0, 1, 1, 4326))"
        )
        stored = dict(conn.execute(
            "SELECT item_id || '-' || chip_index_x || '-' || chip_index_y, location "
            "FROM stacchip.chips").fetchall())  # fmt: skip
        # Back to 0007 (no column) and up again: the migration computes the same keys.
        conn.execute("DROP TRIGGER chips_location_default ON stacchip.chips")
        conn.execute("DROP FUNCTION stacchip.chip_location_default()")
        conn.execute("ALTER TABLE stacchip.chips DROP COLUMN location CASCADE")
        conn.execute("UPDATE stacchip.alembic_version SET version_num = '0009'")
    init_database(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrated = dict(conn.execute(
            "SELECT item_id || '-' || chip_index_x || '-' || chip_index_y, location "
            "FROM stacchip.chips").fetchall())  # fmt: skip
        indexed = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'chips_location_idx'"
        ).fetchone()
    assert migrated == stored
    expected = locations(S2, 1024)
    assert [stored[f"{S2['id']}-{x}-{y}"] for y in range(10) for x in range(10)] == list(expected)
    assert stored["lonely-1-2"] == key_locations("other", "lonely", 8, [1], [2])[0]
    assert indexed is not None


def test_locations_summary_and_command(database_url: str) -> None:
    items = [S2, dated(S2, "june", "2024-06-11T14:11:54Z"),
             dated(S2, "east", "2024-03-11T14:11:54Z", shift=(109_800, 0))]  # fmt: skip
    with psycopg.connect(database_url, autocommit=True) as conn:
        for item in items:
            store_item(conn, item, index_item(item, quality="none", chip_size=1024, max_nodata=1),
                       chip_size=1024)  # fmt: skip
        summary = summarise_locations(conn, ChipFilter())
        june_only = summarise_locations(conn, ChipFilter(start=_utc("2024-06-01")))
    assert (summary.locations, summary.chips) == (200, 300)
    assert summary.dates == {1: 100, 2: 100} and summary.with_at_least(2) == 100
    assert (june_only.locations, june_only.dates) == (100, {1: 100})
    result = run_cli(["locations"], database_url=database_url)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("200 locations with 300 chips")
    as_json = json.loads(run_cli(["locations", "--json", "--start", "2024-06-01"],
                                 database_url=database_url).output)  # fmt: skip
    assert as_json["locations"] == 100 and as_json["dates"][0]["dates"] == 1


def _utc(day: str):
    from datetime import UTC, datetime

    return datetime.fromisoformat(day).replace(tzinfo=UTC)


def _sample(url: str, chip_filter: ChipFilter, sampling: Sampling) -> list[tuple]:
    """(collection, item_id, x, y, split, location) of the sampled chips, in order."""
    from psycopg import sql

    built = build_selection(chip_filter, sampling)
    query = sql.SQL(
        "SELECT s.collection, s.item_id, s.chip_index_x, s.chip_index_y, "
        "stacchip.chip_split(s.geometry), c.location "
        "FROM (SELECT row_number() OVER () AS n, q.* FROM ({}) AS q) AS s "
        "JOIN stacchip.chips c USING (collection, item_id, chip_size, chip_index_x, chip_index_y) "
        "ORDER BY s.n"  # the selection's order, kept through the join
    ).format(built.query)
    with psycopg.connect(url) as conn:
        return conn.execute(query, built.params).fetchall()


def test_sample_by_location_takes_places_with_their_passing_chips(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        # The fill's places are a hash of cell, chip size and position, not of the collection:
        # the two collections' chips share every place.
        fill_chips(conn, 20_000, collection="one")
        fill_chips(conn, 20_000, collection="two")  # the same places as "one"
    rows = _sample(database_url, ChipFilter(), Sampling(5, seed=3, by_location=True))
    places = list(dict.fromkeys(r[-1] for r in rows))
    assert len(places) == 5 and len(rows) == 10  # each place: one chip per collection
    # Rows come place by place; a smaller sample is the start of a larger one.
    assert [r[-1] for r in rows] == sorted([r[-1] for r in rows], key=places.index)
    more = _sample(database_url, ChipFilter(), Sampling(8, seed=3, by_location=True))
    assert list(dict.fromkeys(r[-1] for r in more))[:5] == places
    # Filters apply per chip: only collection two's chips of the sampled places.
    two = _sample(database_url, ChipFilter(collections=("two",)),
                  Sampling(5, seed=3, by_location=True))  # fmt: skip
    assert {r[0] for r in two} == {"two"} and [r[-1] for r in two] == places
    # A split applies to the place as a whole.
    val = _sample(database_url, ChipFilter(split="val"), Sampling(50, seed=1, by_location=True))
    assert len({r[-1] for r in val}) == 50 and {r[4] for r in val} == {"val"}
    # Strata: by collection, places of each collection.
    strata = _sample(database_url, ChipFilter(),
                     Sampling(6, seed=2, stratify_by="collection", by_location=True))  # fmt: skip
    assert sorted(r[0] for r in strata) == ["one"] * 3 + ["two"] * 3
    with pytest.raises(SelectionError, match="`stratify_by` 'year' does not apply"):
        Sampling(6, stratify_by="year", by_location=True)


def test_sample_by_location_command(database_url: str, tmp_path: Path) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        fill_chips(conn, 10_000, collection="one")
        fill_chips(conn, 10_000, collection="two")
    out = tmp_path / "places.csv"
    result = run_cli(["sample", "-n", "4", "--seed", "7", "--by-location", "--format", "csv",
                      "-o", str(out)], database_url=database_url)  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 8
    refused = run_cli(["sample", "-n", "4", "--by-location", "--stratify-by", "quarter"],
                      database_url=database_url)  # fmt: skip
    assert refused.exit_code == 2 and "--stratify-by 'quarter' does not apply" in refused.output
