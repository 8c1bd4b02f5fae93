"""Auxiliary layers (`stacchip-db layer …`, `stacchip_db.layers`): vector layers, raster class
fractions, selection by layers, quotas, and their one-line errors."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import geopandas
import psycopg
import pytest
import shapely
from shapely.geometry import Polygon, box

from stacchip_db.synthetic import fill_chips
from tests.conftest import error_line, run_cli

# fill_chips: items `synthetic_k` of 100 x 100 chips of 0.01 degree, item k at lon -180 + k,
# lat 80 - 0..1 (k < 360).
ZONES = {
    "a": Polygon([(-179.9, 79.2), (-179.3, 79.9), (-178.6, 79.5), (-179.2, 79.05)]),
    "b": box(-177.8, 79.3, -177.1, 79.6),
    "c": box(-150.0, 10.0, -149.0, 11.0),  # far from every chip
}


@pytest.fixture
def zones_gpkg(tmp_path: Path) -> Path:
    """Three zones with a name and a number, stored in Web Mercator (reprojected on load)."""
    frame = geopandas.GeoDataFrame(
        {"name": list(ZONES), "rank": [1, 2, 3]}, geometry=list(ZONES.values()), crs=4326
    ).to_crs(3857)
    path = tmp_path / "zones.gpkg"
    frame.to_file(path)
    return path


@pytest.fixture
def chips_url(database_url: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        fill_chips(conn, 40_000)
        conn.execute("ANALYZE stacchip.chips")
    return database_url


def _add(url: str, name: str, source: Path, *args: str) -> None:
    result = run_cli(["layer", "add", name, str(source), *args], database_url=url)
    assert result.exit_code == 0, result.output


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _chip_ids(url: str, args: list[str]) -> set[str]:
    result = run_cli(["chips", "--format", "csv", *args], database_url=url)
    assert result.exit_code == 0, result.output
    return {row["chip_id"] for row in _csv(result.stdout)}


def _expected_within(url: str, zone: shapely.Geometry) -> set[str]:
    """The chips whose footprint intersects `zone`, by shapely (reprojected back and forth)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT stacchip.chip_id(item_id, chip_index_x, chip_index_y), ST_AsBinary(geometry) "
            "FROM stacchip.chips"
        ).fetchall()
    footprints = shapely.from_wkb([bytes(r[1]) for r in rows])
    hits = shapely.intersects(footprints, zone)
    return {row[0] for row, hit in zip(rows, hits, strict=True) if hit}


def test_vector_layer_add_list_within_remove(chips_url: str, zones_gpkg: Path) -> None:
    result = run_cli(
        ["layer", "add", "zones", str(zones_gpkg), "--column", "name", "--column", "rank"],
        database_url=chips_url,
    )
    assert result.exit_code == 0, result.output
    assert "3 features" in result.output

    listed = run_cli(["layer", "list"], database_url=chips_url)
    assert listed.exit_code == 0 and listed.stdout.startswith("zones\tvector\t")
    assert "strata by name" in listed.stdout

    with psycopg.connect(chips_url) as conn:
        srid, kinds = conn.execute(
            "SELECT Find_SRID('stacchip_layers', 'zones', 'geometry'), "
            "(SELECT array_agg(data_type::text ORDER BY ordinal_position) FROM "
            "information_schema.columns WHERE table_schema = 'stacchip_layers' "
            "AND table_name = 'zones')"
        ).fetchone()
        indexes = [r[0] for r in conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = 'stacchip_layers'")]  # fmt: skip
        stored = dict(conn.execute(
            "SELECT name, ST_AsBinary(geometry) FROM stacchip_layers.zones"))  # fmt: skip
    assert srid == 4326 and kinds == ["bigint", "text", "bigint", "USER-DEFINED"]
    assert any("gist (geometry)" in i for i in indexes)
    # the stored zone is the source's, through Web Mercator and back
    back = {k: shapely.from_wkb(bytes(v)) for k, v in stored.items()}
    assert shapely.equals_exact(back["a"], ZONES["a"], tolerance=1e-9)

    # --within NAME:COLUMN=VALUE equals a shapely intersection of the footprints
    for name in ("a", "b"):
        got = _chip_ids(chips_url, ["--within", f"zones:name={name}"])
        assert got and got == _expected_within(chips_url, back[name]), name
    assert _chip_ids(chips_url, ["--within", "zones:rank=2"]) == _expected_within(
        chips_url, back["b"]
    )
    # --within NAME: any feature
    everything = shapely.union_all(list(back.values()))
    assert _chip_ids(chips_url, ["--within", "zones"]) == _expected_within(chips_url, everything)
    # a value no feature has: no chip (a warning, not an error)
    none = run_cli(["chips", "--within", "zones:name=zz"], database_url=chips_url)
    assert none.exit_code == 0 and "Warning: no chips selected" in none.output

    removed = run_cli(["layer", "remove", "zones"], database_url=chips_url)
    assert removed.exit_code == 0, removed.output
    with psycopg.connect(chips_url) as conn:
        assert conn.execute("SELECT to_regclass('stacchip_layers.zones')").fetchone()[0] is None
        assert conn.execute("SELECT count(*) FROM stacchip.layers").fetchone()[0] == 0


def test_within_uses_the_gist_index_and_runs_as_the_query_login(
    chips_url: str, zones_gpkg: Path
) -> None:
    _add(chips_url, "zones", zones_gpkg)
    with psycopg.connect(chips_url) as conn:
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT * FROM stacchip.select_chips(within => '{zones,name,b}')"))  # fmt: skip
    assert "chips_geometry_datetime_idx" in plan
    # prechip/stats/preview/map run their selection as the restricted login: it may read layers
    from stacchip_db.db.user_sql import connect_login, login_url

    with psycopg.connect(chips_url) as conn:
        url = login_url(conn, chips_url)
    with connect_login(url, explicit=False) as login:
        (count,) = login.execute(
            "SELECT count(*) FROM stacchip.select_chips(within => '{zones,name,b}')"
        ).fetchone()
    assert count == len(_chip_ids(chips_url, ["--within", "zones:name=b"])) > 0


def test_layer_errors_are_one_line_and_leave_nothing(
    chips_url: str, zones_gpkg: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.gpkg"
    broken.write_bytes(b"not a geopackage")
    line = error_line(run_cli(["layer", "add", "bad", str(broken)], database_url=chips_url))
    assert "SOURCE" in line and "cannot be read" in line
    missing = error_line(
        run_cli(["layer", "add", "bad", str(tmp_path / "nope.fgb")], database_url=chips_url)
    )
    assert "cannot be read" in missing
    column = error_line(
        run_cli(["layer", "add", "bad", str(zones_gpkg), "--column", "nme"], database_url=chips_url)
    )
    assert "'nme' (--column)" in column and "name, rank" in column
    bad_name = error_line(run_cli(["layer", "add", "Bad-Name", str(zones_gpkg)],
                                  database_url=chips_url))  # fmt: skip
    assert "NAME" in bad_name
    with psycopg.connect(chips_url) as conn:
        assert conn.execute("SELECT count(*) FROM stacchip.layers").fetchone()[0] == 0
        assert conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'stacchip_layers'"
        ).fetchone()[0] == 0

    unknown = error_line(run_cli(["chips", "--within", "nowhere"], database_url=chips_url))
    assert "unknown layer 'nowhere'" in unknown
    unknown = error_line(run_cli(["layer", "remove", "nowhere"], database_url=chips_url))
    assert "unknown layer 'nowhere'" in unknown
    _add(chips_url, "zones", zones_gpkg)
    twice = error_line(run_cli(["layer", "add", "zones", str(zones_gpkg)], database_url=chips_url))
    assert "exists already" in twice
    column = error_line(run_cli(["chips", "--within", "zones:nme=a"], database_url=chips_url))
    assert "no column 'nme'" in column
