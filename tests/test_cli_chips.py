"""`stacchip-db chips` and `stacchip-db sample`: filters, outputs, --sql, usage errors."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import geopandas
import psycopg
import pyarrow.parquet as pq
import pytest

from stacchip_db.chip_formats import write_chips
from stacchip_db.selection import ChipFilter, build_selection, stream_chips
from stacchip_db.synthetic import fill_chips
from tests.conftest import REPO, error_line, run_cli
from tests.peak_rss import peak_rss_mib
from tests.test_selection import CHIPS, store_chips


@pytest.fixture
def chips_url(database_url: str) -> str:
    store_chips(database_url, CHIPS)
    return database_url


def _csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_chips_table_lists_the_filtered_chips(chips_url: str) -> None:
    result = run_cli(
        ["chips", "--collection", "landsat-c2-l2", "--max-cloud", "0.3"], database_url=chips_url
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["chip_id", "collection", "chip_size"]
    assert [line.split()[0] for line in lines[1:]] == ["LC_C-0-0", "LC_C-1-0", "LC_C-1-1"]


def test_chips_csv_with_limit(chips_url: str) -> None:
    result = run_cli(
        ["chips", "--format", "csv", "--limit", "4", "--bbox", "9,44,11,46"], database_url=chips_url
    )
    assert result.exit_code == 0, result.output
    rows = _csv_rows(result.stdout)
    assert len(rows) == 4
    assert rows[0]["geometry"].startswith("POLYGON")
    assert {"chip_id", "item_id", "chip_index_x", "cloud_fraction", "datetime"} <= set(rows[0])


def test_geojson_output_parses(chips_url: str, tmp_path: Path) -> None:
    out = tmp_path / "chips.geojson"
    result = run_cli(
        ["chips", "--format", "geojson", "--months", "7", "-o", str(out)], database_url=chips_url
    )
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    ids = sorted(f["properties"]["chip_id"] for f in document["features"])
    assert ids == [f"S2_B-{x}-{y}" for x in range(3) for y in range(2)]
    assert document["features"][0]["geometry"]["type"] == "Polygon"
    assert geopandas.read_file(out).shape[0] == 6


def test_parquet_output_is_geoparquet(chips_url: str, tmp_path: Path) -> None:
    out = tmp_path / "chips.parquet"
    result = run_cli(
        ["sample", "-n", "5", "--seed", "3", "--format", "parquet", "-o", str(out)],
        database_url=chips_url,
    )
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.num_rows == 5 and b"geo" in table.schema.metadata
    frame = geopandas.read_parquet(out)
    assert frame.crs.to_epsg() == 4326 and frame.geometry.is_valid.all()


def test_parquet_needs_an_output_file(chips_url: str) -> None:
    result = run_cli(["chips", "--format", "parquet"], database_url=chips_url)
    assert result.exit_code == 2 and "--output" in result.output


def test_sample_is_reproducible_from_the_command_line(chips_url: str) -> None:
    def ids(seed: str) -> list[str]:
        result = run_cli(
            ["sample", "-n", "6", "--seed", seed, "--format", "csv"], database_url=chips_url
        )
        assert result.exit_code == 0, result.output
        return [row["chip_id"] for row in _csv_rows(result.stdout)]

    assert ids("5") == ids("5")
    assert len(set(ids("5"))) == 6
    assert ids("5") != ids("6")


def test_sample_stratified_and_split(chips_url: str) -> None:
    result = run_cli(
        ["sample", "-n", "4", "--stratify-by", "collection", "--format", "csv"],
        database_url=chips_url,
    )
    assert result.exit_code == 0, result.output
    collections = [row["collection"] for row in _csv_rows(result.stdout)]
    assert sorted(collections) == ["landsat-c2-l2"] * 2 + ["sentinel-2-l2a"] * 2
    splits = {}
    for split in ("train", "val", "test"):
        result = run_cli(
            ["sample", "-n", "100", "--split", split, "--block-size", "0.05", "--format", "csv"],
            database_url=chips_url,
        )
        assert result.exit_code == 0, result.output
        splits[split] = {row["chip_id"] for row in _csv_rows(result.stdout)}
    assert sum(len(s) for s in splits.values()) == len(CHIPS)
    assert set.union(*splits.values()) == {c.chip_id for c in CHIPS}


def test_sql_prints_pasteable_sql_that_returns_the_same_rows(chips_url: str) -> None:
    args = [
        "sample",
        "-n",
        "5",
        "--seed",
        "8",
        "--max-cloud",
        "0.5",
        "--datetime",
        "2020-01-01/..",
        "--collection",
        "sentinel-2-l2a",
        "--collection",
        "landsat-c2-l2",
    ]
    printed = run_cli([*args, "--sql"], database_url=chips_url)
    assert printed.exit_code == 0, printed.output
    query = printed.stdout
    assert query.rstrip().endswith(";") and "stacchip.sample_chips(" in query
    ran = run_cli([*args, "--format", "csv"], database_url=chips_url)
    expected = [row["chip_id"] for row in _csv_rows(ran.stdout)]
    with psycopg.connect(chips_url) as conn:  # as psql would: the text alone, no parameters
        got = [row[0] for row in conn.execute(query).fetchall()]
    assert got == expected and len(got) == 5


def test_intersects_reads_a_geojson_file(chips_url: str, tmp_path: Path) -> None:
    area = tmp_path / "area.geojson"
    area.write_text(
        json.dumps(
            {
                "type": "Polygon",
                "coordinates": [
                    [[20.0, -5.2], [20.1, -5.2], [20.1, -5.0], [20.0, -5.0], [20.0, -5.2]]
                ],
            }
        )
    )
    result = run_cli(
        ["chips", "--intersects", str(area), "--format", "csv"], database_url=chips_url
    )
    assert result.exit_code == 0, result.output
    ids = sorted(row["chip_id"] for row in _csv_rows(result.stdout))
    # The polygon covers chip (0, 0) and (0, 1) and touches the edge of (1, 0) and (1, 1).
    assert ids == ["S2_B-0-0", "S2_B-0-1", "S2_B-1-0", "S2_B-1-1"]


@pytest.mark.parametrize(
    "args, hint",
    [
        (["chips", "--bbox", "1,2,3"], "--bbox"),
        (["chips", "--bbox", "west,2,3,4"], "--bbox"),
        (["chips", "--bbox", "10,50,0,40"], "--bbox"),
        (["chips", "--max-cloud", "20"], "--max-cloud"),
        (["chips", "--months", "13"], "--months"),
        (["chips", "--start", "yesterday"], "--start"),
        (["chips", "--start", "2022", "--end", "2021"], "--start/--end"),
        (["chips", "--datetime", "2020/2021", "--start", "2020"], "--datetime"),
        (["chips", "--split-fractions", "0.5,0.5,0.5"], "--split-fractions"),
        (["chips", "--intersects", "missing.geojson"], "--intersects"),
        (["sample", "--seed", "1"], "-n"),
        (["sample", "-n", "3", "--stratify-by", "month"], "--stratify-by"),
    ],
)
def test_bad_options_are_usage_errors_naming_the_option(
    chips_url: str, args: list[str], hint: str
) -> None:
    result = run_cli(args, database_url=chips_url)
    assert result.exit_code == 2, result.output
    assert hint in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_a_database_behind_is_one_line(empty_database_url: str) -> None:
    result = run_cli(["chips"], database_url=empty_database_url)
    assert "db init" in error_line(result)


def _warning(result) -> str:
    """The one warning line of a command that selected nothing (and still exited 0)."""
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith("Warning: no chips selected: ")
    return warnings[0]


def test_a_misspelt_collection_is_named_with_the_closest(chips_url: str) -> None:
    line = _warning(run_cli(["chips", "--collection", "sentinel-2-l2"], database_url=chips_url))
    assert "no chips of collection 'sentinel-2-l2' (did you mean 'sentinel-2-l2a'?)" in line
    assert "collections with chips: landsat-c2-l2, sentinel-2-l2a" in line


def test_a_bbox_in_lat_lon_order_is_recognised(chips_url: str) -> None:
    line = _warning(run_cli(["chips", "--bbox", "45.0,10.0,45.3,10.3"], database_url=chips_url))
    assert "bbox 45,10,45.3,10.3 is outside every chip, but read as lat,lon it is not" in line
    assert "minx,miny,maxx,maxy = 10,45,10.3,45.3" in line


def test_a_bbox_outside_every_chip_says_where_the_chips_are(chips_url: str) -> None:
    line = _warning(run_cli(["sample", "-n", "5", "--bbox", "100,10,101,11"],
                            database_url=chips_url))  # fmt: skip
    assert "bbox 100,10,101,11 is outside every chip" in line
    assert "the chips lie within lon 10..20.3, lat -5.2..45.2" in line


def test_a_time_range_without_chips_says_when_the_chips_are(chips_url: str) -> None:
    line = _warning(run_cli(["chips", "--datetime", "2010/2011"], database_url=chips_url))
    assert "no chip is dated on or after 2010-01-01 and before 2012-01-01" in line
    assert "chips are dated 2019-01-05 to 2021-11-20" in line


def test_a_split_without_chips_is_named(chips_url: str) -> None:
    bbox = "10,45,10.3,45.3"  # one 1-degree block: its chips all land in one split
    with psycopg.connect(chips_url) as conn:
        held = {row[0] for row in conn.execute(
            "SELECT DISTINCT stacchip.chip_split(geometry, 1.0) FROM stacchip.select_chips("
            "bbox => '{10,45,10.3,45.3}')")}  # fmt: skip
    empty = next(split for split in ("train", "val", "test") if split not in held)
    line = _warning(run_cli(["chips", "--bbox", bbox, "--split", empty], database_url=chips_url))
    assert f"split '{empty}' holds none of the" in line
    assert "chips the other filters keep" in line


def test_filters_empty_only_together_say_so(chips_url: str) -> None:
    result = run_cli(["chips", "--collection", "landsat-c2-l2", "--datetime", "2020"],
                     database_url=chips_url)  # fmt: skip
    assert "no chip passes all of them together" in _warning(result)


def test_exporters_warn_about_an_empty_selection(chips_url: str, tmp_path: Path) -> None:
    result = run_cli(["prechip", "--collection", "naip", "--out", str(tmp_path / "cubes")],
                     database_url=chips_url)  # fmt: skip
    assert "no chips of collection 'naip'" in _warning(result)
    query = "SELECT * FROM stacchip.chips WHERE false"
    result = run_cli(["stats", "--query", query], database_url=chips_url)
    assert "the query selected no chips" in _warning(result)


def test_an_empty_database_says_to_index_first(database_url: str) -> None:
    line = _warning(run_cli(["chips"], database_url=database_url))
    assert "holds no chips yet" in line


@pytest.mark.parametrize(
    ("args", "quoted"),
    [
        (["--datetime", "2021/2020"], "interval '2021/2020' is empty: it ends (2020, inclusive)"),
        (["--start", "2021", "--end", "2020"], "--end 2020 (inclusive) is before --start 2021"),
    ],
)
def test_an_empty_time_range_quotes_what_was_typed(
    chips_url: str, args: list[str], quoted: str
) -> None:
    result = run_cli(["chips", *args], database_url=chips_url)
    assert result.exit_code == 2, result.output
    assert "T00:00:00" not in result.stderr  # never the internal exclusive bound
    assert quoted in result.stderr, result.stderr
# -- streaming: memory does not grow with the selection ----------------------------------------

LARGE = 200_000


def _peak_rss(args: list[str], database_url: str, tmp_path: Path) -> float:
    """Run the CLI in its own process; its peak RSS in MiB."""
    env = {**os.environ, "STACCHIP_DATABASE_URL": database_url}
    return peak_rss_mib(args, env, REPO, tmp_path / "vmhwm.txt")


@pytest.fixture(scope="module")
def large_url(pg_server: Any, template_database: str) -> Iterator[str]:
    """A database with LARGE synthetic chips (made by the server: generate_series)."""
    name = pg_server.new_name("stream")
    url = pg_server.create(name, template=template_database)
    with psycopg.connect(url) as conn:
        fill_chips(conn, LARGE)
    yield url
    pg_server.drop(name)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("output_format", ["geojson", "csv"])
def test_chips_memory_does_not_grow_with_the_selection(
    large_url: str, tmp_path: Path, output_format: str
) -> None:
    out = tmp_path / f"chips.{output_format}"
    args = ["-q", "chips", "--format", output_format, "-o", str(out)]
    # Both runs read many batches (BATCH_ROWS each), so the fixed costs (imports, one batch
    # in flight) are the same; only holding the rows would make the larger one bigger.
    medium = _peak_rss([*args, "--limit", str(LARGE // 4)], large_url, tmp_path)
    medium_size = out.stat().st_size
    large = _peak_rss(args, large_url, tmp_path)
    with out.open() as stream:
        assert sum(1 for _ in stream) >= LARGE
    extra_text = (out.stat().st_size - medium_size) / 2**20
    # Held in memory, the 150,000 extra chips would cost far more than their text (the old
    # code: ~2 KiB a chip, ~290 MiB); streamed they cost nothing.
    assert large - medium < 30, (medium, large, extra_text)


def test_parquet_is_written_by_row_groups(chips_url: str, tmp_path: Path) -> None:
    out = tmp_path / "chips.parquet"
    selection = build_selection(ChipFilter())
    with psycopg.connect(chips_url) as conn:
        written = write_chips(stream_chips(conn, selection, batch_rows=4), "parquet", out)
    metadata = pq.ParquetFile(out).metadata
    assert written == metadata.num_rows == len(CHIPS)
    assert metadata.num_row_groups == -(-len(CHIPS) // 4)
    frame = geopandas.read_parquet(out)
    assert frame.crs.to_epsg() == 4326
    assert sorted(frame["chip_id"]) == sorted(c.chip_id for c in CHIPS)
    assert not list(tmp_path.glob(".chips.parquet.*"))  # no temporary file left beside it


def test_a_failed_run_leaves_no_file(chips_url: str, tmp_path: Path) -> None:
    out = tmp_path / "chips.geojson"
    out.write_text("earlier result\n")

    def failing() -> Iterator[Any]:
        with psycopg.connect(chips_url) as conn:
            yield from stream_chips(conn, build_selection(ChipFilter()), batch_rows=2)
        raise RuntimeError("the database went away")

    with pytest.raises(RuntimeError):
        write_chips(failing(), "geojson", out)
    assert out.read_text() == "earlier result\n"
    assert list(tmp_path.iterdir()) == [out]
