"""Auxiliary layers (`stacchip-db layer …`, `stacchip_db.layers`): vector layers, raster class
fractions, selection by layers, quotas, and their one-line errors."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import geopandas
import psycopg
import pytest
import shapely
from shapely.geometry import Polygon, box

from stacchip_db.class_fractions import SAMPLES
from stacchip_db.grid import chip_grid
from stacchip_db.synthetic import WORLDCOVER_CLASSES, fill_chips, write_class_raster, write_cog
from tests.conftest import error_line, run_cli, store_indexed

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
    assert none.exit_code == 0
    assert "no chip intersects a feature of layer 'zones' whose name is 'zz'" in none.output

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


# -- raster layers: class fractions -----------------------------------------------------------

CHIP = 64


def _item_bounds(item: dict) -> tuple[float, float, float, float]:
    return tuple(shapely.geometry.shape(item["geometry"]).bounds)


@pytest.fixture
def classes_tif(tmp_path: Path, s2_items: list[dict]) -> Path:
    """A WorldCover-like raster (EPSG:4326, ~0.0007 degrees) over most of the items (UTM): its
    east edge cuts the scene, and a box inside is nodata."""
    minx, miny, maxx, maxy = _item_bounds(s2_items[0])
    return write_class_raster(
        tmp_path / "classes.tif",
        (minx - 0.05, miny - 0.05, maxx - 0.3, maxy + 0.05),
        0.0007,
        seed=3,
        nodata_box=(minx + 0.2, miny + 0.2, minx + 0.4, miny + 0.3),
    )


def _direct(item: dict, x: int, y: int, source: Path) -> tuple[dict[int, int], int]:
    """The chip's class counts by rasterio alone, chip by chip: the centres of the chip's
    SAMPLES x SAMPLES cells taken to the raster's CRS (`rasterio.warp.transform`) and looked
    up with `dataset.index` (points off the raster are nodata)."""
    import numpy as np
    import rasterio
    from affine import Affine
    from rasterio.transform import rowcol
    from rasterio.warp import transform

    grid = chip_grid(item, chip_size=CHIP)
    chip_transform = (
        grid.transform @ Affine.translation(x * CHIP, y * CHIP) @ Affine.scale(CHIP / SAMPLES)
    )
    centres = np.arange(SAMPLES) + 0.5
    cols, rows = (a.ravel() for a in np.meshgrid(centres, centres))
    xs = chip_transform.a * cols + chip_transform.b * rows + chip_transform.c
    ys = chip_transform.d * cols + chip_transform.e * rows + chip_transform.f
    with rasterio.open(source) as src:
        lon, lat = transform(grid.crs.to_wkt(), src.crs, xs.tolist(), ys.tolist())
        band = src.read(1)
        r, c = rowcol(src.transform, lon, lat, op=math.floor)
    r, c = np.asarray(r), np.asarray(c)
    inside = (r >= 0) & (r < band.shape[0]) & (c >= 0) & (c < band.shape[1])
    values = np.zeros(len(r), dtype=np.uint8)
    values[inside] = band[r[inside], c[inside]]
    found, counts = np.unique(values, return_counts=True)
    by_value = dict(zip(found.tolist(), counts.tolist(), strict=True))
    return {v: n for v, n in by_value.items() if v != 0}, by_value.get(0, 0)


def _warped(item: dict, x: int, y: int, source: Path) -> dict[int, int]:
    """The chip's class counts from `rasterio.warp.reproject` (nearest) onto its cells."""
    import numpy as np
    import rasterio
    from affine import Affine
    from rasterio.warp import Resampling, reproject

    grid = chip_grid(item, chip_size=CHIP)
    chip_transform = (
        grid.transform @ Affine.translation(x * CHIP, y * CHIP) @ Affine.scale(CHIP / SAMPLES)
    )
    out = np.zeros((SAMPLES, SAMPLES), dtype=np.uint8)
    with rasterio.open(source) as src:
        reproject(
            rasterio.band(src, 1), out, dst_transform=chip_transform, dst_crs=grid.crs,
            dst_nodata=0, resampling=Resampling.nearest, tolerance=0,
        )  # fmt: skip
    found, counts = np.unique(out, return_counts=True)
    return {v: n for v, n in zip(found.tolist(), counts.tolist(), strict=True) if v != 0}


def test_class_fractions_equal_a_direct_rasterio_computation(
    database_url: str, s2_items: list[dict], classes_tif: Path
) -> None:
    store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    result = run_cli(
        ["layer", "add", "cover", str(classes_tif), "--raster", "--classes",
         ",".join(f"{v}={n}" for v, n in WORLDCOVER_CLASSES.items() if v != 100)],
        database_url=database_url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "partly nodata" in result.output
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT chip_index_x, chip_index_y, fractions, dominant, nodata_fraction "
            "FROM stacchip.chip_classes WHERE layer = 'cover' ORDER BY 2, 1"
        ).fetchall()
        stored = conn.execute("SELECT count(*) FROM stacchip.chips").fetchone()[0]
        (names,) = conn.execute(
            "SELECT class_names FROM stacchip.layers WHERE name = 'cover'"
        ).fetchone()
    assert len(rows) == stored > 100
    assert names[-1] == "100"  # a value --classes did not name is a class named by its number
    label = {**WORLDCOVER_CLASSES, 100: "100"}
    points = SAMPLES * SAMPLES
    nodata_seen = all_nodata = 0
    for x, y, fractions, dominant, nodata in rows:
        counts, nodata_points = _direct(s2_items[0], x, y, classes_tif)
        assert fractions == {label[v]: n / points for v, n in counts.items()}, (x, y)
        assert nodata == pytest.approx(nodata_points / points, abs=1e-7)
        if counts:
            best = max(counts.values())
            assert dominant == label[min(v for v, n in counts.items() if n == best)]
        else:
            assert dominant is None
            all_nodata += 1
        nodata_seen += nodata > 0
        # GDAL's warper agrees but for a rare point within ~1/300 pixel of a pixel edge
        warped = _warped(s2_items[0], x, y, classes_tif)
        assert sum(abs(warped.get(v, 0) - counts.get(v, 0)) for v in {*warped, *counts}) <= 8
    assert nodata_seen and all_nodata  # the nodata box and the raster's edge are reported


def test_chips_stored_later_get_fractions_and_refresh_fills_gaps(
    database_url: str, s2_items: list[dict], classes_tif: Path, tmp_path: Path
) -> None:
    from stacchip_db.indexing import index_items

    store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    _add(database_url, "cover", classes_tif, "--raster")
    item_file = tmp_path / "second.json"
    item_file.write_text(json.dumps(s2_items[1]))
    summary = index_items([item_file], database_url, chip_size=CHIP, bulk=False)
    assert summary.layers and "layer cover" in summary.layers[0]
    with psycopg.connect(database_url, autocommit=True) as conn:
        count = "SELECT count(*) FROM stacchip.chip_classes"
        chips = conn.execute("SELECT count(*) FROM stacchip.chips").fetchone()[0]
        assert conn.execute(count).fetchone()[0] == chips
        conn.execute("DELETE FROM stacchip.chip_classes WHERE chip_index_x = 3")
        missing = chips - conn.execute(count).fetchone()[0]
        refreshed = run_cli(["layer", "refresh", "cover"], database_url=database_url)
        assert refreshed.exit_code == 0, refreshed.output
        assert f"class fractions of {missing} chips" in refreshed.output
        assert conn.execute(count).fetchone()[0] == chips
    listed = run_cli(["layer", "list", "--json"], database_url=database_url)
    (entry,) = json.loads(listed.stdout)
    assert entry["kind"] == "raster" and entry["chips"] == chips


def test_raster_layer_errors_are_one_line_and_leave_nothing(
    database_url: str, s2_items: list[dict], tmp_path: Path
) -> None:
    import numpy as np
    from affine import Affine

    store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    minx, _, _, maxy = _item_bounds(s2_items[0])
    floats = write_cog(
        tmp_path / "ndvi.tif", np.zeros((50, 50), dtype=np.float32), crs="EPSG:4326",
        transform=Affine(0.05, 0, minx, 0, -0.05, maxy), categorical=False,
    )  # fmt: skip
    line = error_line(run_cli(["layer", "add", "ndvi", str(floats), "--raster"],
                              database_url=database_url))  # fmt: skip
    assert "is not categorical" in line and "float32" in line
    line = error_line(run_cli(["layer", "add", "gone", str(tmp_path / "gone.tif"), "--raster"],
                              database_url=database_url))  # fmt: skip
    assert "cannot be read as a raster" in line
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM stacchip.layers").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM stacchip.chip_classes").fetchone()[0] == 0
    line = error_line(run_cli(["chips", "--class", "nothing:tree>=0.1"], database_url=database_url))
    assert "unknown layer 'nothing'" in line


# -- samples stratified by a layer, quotas ----------------------------------------------------

SHARES = {"tree": 400, "crop": 300, "grass": 234, "built": 63, "water": 3}  # per mille of chips


@pytest.fixture
def cover_url(chips_url: str) -> str:
    """A raster layer `cover` whose fractions are generated: each chip's dominant class drawn
    by hashing its key, with the shares above."""
    cases = []
    low = 0
    for name, share in SHARES.items():
        cases.append(f"WHEN h < {low + share} THEN '{name}'")
        low += share
    with psycopg.connect(chips_url) as conn:
        conn.execute(
            "INSERT INTO stacchip.layers (name, kind, source, class_values, class_names, nodata) "
            "VALUES ('cover', 'raster', 'generated', '{1,2,3,4,5}', %s, 0)",
            (list(SHARES),),
        )
        conn.execute(
            f"""
            INSERT INTO stacchip.chip_classes
            SELECT 'cover', c.collection, c.item_id, c.chip_size, c.chip_index_x, c.chip_index_y,
                   k.key, jsonb_build_object(d.dominant, 0.75), d.dominant, 0.25
            FROM stacchip.chips AS c,
                 LATERAL (SELECT stacchip.chip_sample_key(c.collection, c.item_id, c.chip_size,
                          c.chip_index_x, c.chip_index_y) AS key) AS k,
                 LATERAL (SELECT abs(hashtext(c.item_id || c.chip_index_x || ',' ||
                          c.chip_index_y)) % 1000 AS h) AS m,
                 LATERAL (SELECT CASE {" ".join(cases)} END AS dominant) AS d
            """
        )
        conn.execute("ANALYZE stacchip.chip_classes")
    return chips_url


def _sample(url: str, args: list[str]) -> tuple[list[dict[str, str]], str]:
    result = run_cli(["sample", "--format", "csv", *args], database_url=url)
    assert result.exit_code == 0, result.output
    return _csv(result.stdout), result.stderr


def _dominant(url: str) -> dict[str, tuple[str, int, float]]:
    """chip_id -> (dominant class, sampling key, cloud fraction)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT stacchip.chip_id(c.item_id, c.chip_index_x, c.chip_index_y), f.dominant, "
            "f.sample_key, c.cloud_fraction FROM stacchip.chips AS c JOIN stacchip.chip_classes "
            "AS f USING (collection, item_id, chip_size, chip_index_x, chip_index_y)"
        ).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_quotas_are_exact_and_reproducible(cover_url: str) -> None:
    args = ["-n", "1000", "--seed", "7", "--stratify-by", "layer:cover", "--max-cloud", "0.5",
            "--quota", "tree=0.3,crop=0.2,built=0.1,water=0.25"]  # fmt: skip
    rows, warnings = _sample(cover_url, args)
    chips = _dominant(cover_url)
    taken = {}
    for row in rows:
        taken.setdefault(chips[row["chip_id"]][0], []).append(row["chip_id"])
    water = [c for c, (d, _, cloud) in chips.items() if d == "water" and cloud <= 0.5]
    assert len(water) < 250  # fewer than its quota asks: all of it, and a warning
    assert sorted(taken["water"]) == sorted(water)
    assert f"stratum 'water' of layer 'cover' has {len(water)} of the 250" in warnings
    assert (len(taken["tree"]), len(taken["crop"]), len(taken["built"])) == (300, 200, 100)
    assert len(rows) == 1000 and set(taken) == {"tree", "crop", "built", "water", "grass"}
    assert len(taken["grass"]) == 1000 - 600 - len(water)  # the rest from the other strata
    assert all(float(row["cloud_fraction"]) <= 0.5 for row in rows)

    # each quota is the stratum's first chips in the seeded order
    with psycopg.connect(cover_url) as conn:
        (offset,) = conn.execute("SELECT stacchip.sample_offset(7)").fetchone()
    for name, count in (("tree", 300), ("built", 100)):
        ordered = sorted(
            (key < offset, key, chip)
            for chip, (d, key, cloud) in chips.items() if d == name and cloud <= 0.5
        )  # fmt: skip
        assert sorted(taken[name]) == sorted(chip for _, _, chip in ordered[:count])

    # same seed, same chips; the --sql text gives them too; another seed, other chips
    again, _ = _sample(cover_url, args)
    assert [r["chip_id"] for r in again] == [r["chip_id"] for r in rows]
    printed = run_cli(["sample", *args, "--sql"], database_url=cover_url)
    assert "sample_chips_by_layer" in printed.stdout
    with psycopg.connect(cover_url) as conn:
        via_sql = [r[0] for r in conn.execute(printed.stdout)]
    assert via_sql == [r["chip_id"] for r in rows]
    other, _ = _sample(cover_url, [*args[:3], "8", *args[4:]])
    assert {r["chip_id"] for r in other} != {r["chip_id"] for r in rows}


def test_stratify_by_a_raster_layer_gives_equal_counts(cover_url: str) -> None:
    rows, _ = _sample(cover_url, ["-n", "100", "--seed", "1", "--stratify-by", "layer:cover"])
    chips = _dominant(cover_url)
    counts: dict[str, int] = {}
    for row in rows:
        counts[chips[row["chip_id"]][0]] = counts.get(chips[row["chip_id"]][0], 0) + 1
    assert counts == {name: 20 for name in SHARES}


def test_class_filter_keeps_chips_with_that_share(cover_url: str) -> None:
    chips = _dominant(cover_url)
    got = _chip_ids(cover_url, ["--class", "cover:built>=0.5"])
    assert got == {c for c, (d, _, _) in chips.items() if d == "built"}
    assert _chip_ids(cover_url, ["--class", "cover:built>=0.8"]) == set()
    both = _chip_ids(cover_url, ["--class", "cover:built>=0.5", "--class", "cover:tree>=0.5"])
    assert both == set()
    line = error_line(run_cli(["chips", "--class", "cover:forest>=0.1"], database_url=cover_url))
    assert "no class 'forest'" in line
    line = error_line(run_cli(["sample", "-n", "10", "--stratify-by", "layer:cover",
                               "--quota", "forest=0.5"], database_url=cover_url))  # fmt: skip
    assert "no stratum 'forest'" in line


def test_stratify_by_a_vector_layer_uses_the_feature_at_the_centre(
    chips_url: str, zones_gpkg: Path
) -> None:
    _add(chips_url, "zones", zones_gpkg, "--column", "name")
    rows, _ = _sample(chips_url, ["-n", "60", "--stratify-by", "layer:zones"])
    with psycopg.connect(chips_url) as conn:
        zones = {n: shapely.from_wkb(bytes(g)) for n, g in conn.execute(
            "SELECT name, ST_AsBinary(geometry) FROM stacchip_layers.zones")}  # fmt: skip
    counts: dict[str, int] = {}
    for row in rows:
        centre = shapely.from_wkt(row["geometry"]).centroid
        (zone,) = [n for n, g in zones.items() if g.intersects(centre)]
        counts[zone] = counts.get(zone, 0) + 1
    assert counts == {"a": 30, "b": 30}
    unusable = error_line(run_cli(["sample", "-n", "5", "--stratify-by", "layer:nothing"],
                                  database_url=chips_url))  # fmt: skip
    assert "unknown layer 'nothing'" in unusable
