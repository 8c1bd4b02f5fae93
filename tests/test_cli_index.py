"""`stacchip-db index`: JSON, ndjson and URL inputs, per-item errors, summary, concurrency."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stacchip_db.db import connect
from stacchip_db.index import index_item
from stacchip_db.synthetic import synthesize_item
from tests.conftest import REPO, error_line, run_cli

S2 = "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json"
NAIP_200 = "naip-planetary-computer-200.ndjson"


def _chip_count(url: str, item_id: str | None = None) -> int:
    with connect(url) as conn:
        if item_id is None:
            return conn.execute("SELECT count(*) FROM stacchip.chips").fetchone()[0]
        return conn.execute(
            "SELECT count(*) FROM stacchip.chips WHERE item_id = %s", (item_id,)
        ).fetchone()[0]


def _naip_lines(fixtures_dir: Path, n: int) -> list[str]:
    return (fixtures_dir / NAIP_200).read_text().splitlines()[:n]


def _expected_chips(lines: list[str], chip_size: int) -> int:
    return sum(
        index_item(json.loads(line), quality="none", chip_size=chip_size).num_rows for line in lines
    )


@pytest.fixture
def s2_item_file(fixtures_dir: Path, tmp_path: Path) -> tuple[Path, dict]:
    item = json.loads((fixtures_dir / S2).read_text())
    item = synthesize_item(item, tmp_path / "cogs", ["scl"], scale=10)
    path = tmp_path / "item.json"
    path.write_text(json.dumps(item))
    return path, item


def test_index_a_json_item_with_quality(database_url: str, s2_item_file: tuple[Path, dict]) -> None:
    path, item = s2_item_file
    result = run_cli(["index", "--chip-size", "64", "--json", str(path)], database_url=database_url)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    expected = index_item(item, chip_size=64)
    assert summary["items"] == 1 and summary["failed"] == 0
    assert summary["chips"] == expected.num_rows == _chip_count(database_url)
    assert summary["dropped_nodata"] == (1098 // 64) ** 2 - expected.num_rows > 0
    with connect(database_url) as conn:
        cloudy = conn.execute(
            "SELECT count(*) FROM stacchip.chips WHERE cloud_fraction > 0"
        ).fetchone()[0]
    assert cloudy == sum(1 for v in expected["cloud_fraction"].to_pylist() if v > 0) > 0


def test_index_ndjson_twice_is_idempotent(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    lines = _naip_lines(fixtures_dir, 20)
    path = tmp_path / "items.ndjson"
    path.write_text("\n".join(lines) + "\n")
    expected = _expected_chips(lines, 1024)
    for _ in range(2):
        result = run_cli(
            ["index", "--quality", "none", "--chip-size", "1024", str(path)],
            database_url=database_url,
        )
        assert result.exit_code == 0, result.output
        assert f"indexed 20 items: {expected:,} chips stored" in result.stdout
    assert _chip_count(database_url) == expected
    with connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM pgstac.items").fetchone()[0] == 20


def test_collection_option_and_strict(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    item = json.loads(
        (fixtures_dir / "naip_m_4207009_ne_19_060_20211024.json").read_text()
    )  # has no collection
    path = tmp_path / "naip.json"
    path.write_text(json.dumps(item))
    strict = run_cli(
        ["index", "--quality", "none", "--collection", "aerial", "--strict", str(path)],
        database_url=database_url,
    )
    line = error_line(strict)
    assert item["id"] in line and "'aerial' does not exist" in line
    assert _chip_count(database_url) == 0
    missing = run_cli(["index", "--quality", "none", str(path)], database_url=database_url)
    assert "no collection" in error_line(missing) and "--collection" in error_line(missing)
    ok = run_cli(
        ["index", "--quality", "none", "--collection", "aerial", "--chip-size", "512", str(path)],
        database_url=database_url,
    )
    assert ok.exit_code == 0, ok.output
    with connect(database_url) as conn:
        rows = conn.execute("SELECT DISTINCT collection, chip_size FROM stacchip.chips").fetchall()
    assert rows == [("aerial", 512)]


def test_a_malformed_item_is_reported_and_the_others_stored(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    lines = _naip_lines(fixtures_dir, 6)
    bad = json.loads(lines[2])
    bad_id = bad["id"]
    del bad["properties"]["proj:transform"]
    bad["assets"] = {}
    lines[2] = json.dumps(bad)
    path = tmp_path / "mixed.ndjson"
    path.write_text("\n".join(lines) + "\n")
    result = run_cli(
        ["index", "--quality", "none", "--chip-size", "1024", str(path)], database_url=database_url
    )
    line = error_line(result)
    assert bad_id in line and "proj:transform" in line
    good = lines[:2] + lines[3:]
    assert _chip_count(database_url) == _expected_chips(good, 1024)
    assert _chip_count(database_url, bad_id) == 0
    assert "indexed 5 items" in result.stdout and "1 item failed" in result.stdout


def test_a_broken_json_line_is_one_line_and_the_others_are_stored(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    lines = _naip_lines(fixtures_dir, 2)
    path = tmp_path / "broken.ndjson"
    path.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    args = ["index", "--quality", "none", "--chip-size", "2048", "--json", str(path)]
    result = run_cli(args, database_url=database_url)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert "broken.ndjson line 2: not JSON" in errors[0]
    summary = json.loads(result.stdout)
    assert summary["items"] == 2 and summary["failed"] == 1


def test_a_missing_input_is_a_usage_error_and_nothing_is_indexed(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    good = tmp_path / "good.ndjson"
    good.write_text("\n".join(_naip_lines(fixtures_dir, 2)) + "\n")
    result = run_cli(["index", str(good), str(tmp_path / "nope.json")], database_url=database_url)
    assert result.exit_code == 2, result.output
    assert "nope.json does not exist" in result.stderr
    assert "Traceback" not in result.output
    assert _chip_count(database_url) == 0  # checked before anything is read


def test_a_folder_is_read_whole_and_one_item_is_singular(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    lines = _naip_lines(fixtures_dir, 3)
    folder = tmp_path / "items"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.json").write_text(lines[0])
    (folder / "nested" / "b.ndjson").write_text(lines[1] + "\n" + lines[2] + "\n")
    (folder / "notes.txt").write_text("not an item")  # other files are left alone
    (folder / ".hidden.json").write_text("{broken")  # hidden files too
    result = run_cli(["index", "--quality", "none", "--chip-size", "2048", str(folder)],
                     database_url=database_url)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "indexed 3 items" in result.stdout
    assert _chip_count(database_url) == _expected_chips(lines, 2048)

    one = tmp_path / "one.json"
    one.write_text(lines[0])
    result = run_cli(["index", "--quality", "none", "--chip-size", "2048", "--no-bulk", str(one)],
                     database_url=database_url)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "indexed 1 item:" in result.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(["index", str(empty)], database_url=database_url)
    assert result.exit_code == 2, result.output
    assert "folder" in result.stderr and "holds no .json" in result.stderr
    assert "Is a directory" not in result.stderr


def test_a_collection_document_is_named_as_such(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "catalog"
    folder.mkdir()
    (folder / "item.json").write_text(_naip_lines(fixtures_dir, 1)[0])
    (folder / "collection.json").write_text(json.dumps({"type": "Collection", "id": "naip"}))
    result = run_cli(["index", "--quality", "none", "--chip-size", "2048", str(folder)],
                     database_url=database_url)  # fmt: skip
    assert result.exit_code == 1
    assert "collection.json: a STAC Collection, not an item" in error_line(result)
    assert "indexed 1 item:" in result.stdout


# http.server with single byte ranges, which GDAL needs to read a COG over HTTP.
RANGE_SERVER = """
import http.server, os, re, sys

class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send_head(self):
        match = re.fullmatch(r"bytes=(\\d+)-(\\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if match is None or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start = int(match[1])
        end = min(int(match[2] or size - 1), size - 1)
        handle = open(path, "rb")
        handle.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(handle.read(end - start + 1))
        handle.close()
        return None

os.chdir(sys.argv[1])
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler).serve_forever()
"""


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A loopback HTTP server over a temporary folder, in its own process.

    Not a thread of the test process: GDAL reads COGs over HTTP while holding the GIL
    (rasterio.open), and a server thread in the same interpreter could never answer.
    """
    root = tmp_path / "www"
    root.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-c", RANGE_SERVER, str(root), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield root, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_index_urls_resolves_relative_hrefs(
    database_url: str,
    http_root: tuple[Path, str],
    s2_item_file: tuple[Path, dict],
    fixtures_dir: Path,
) -> None:
    root, base = http_root
    _, item = s2_item_file
    expected_s2 = index_item(item, chip_size=64).num_rows
    # The quality COG beside the item, referenced by a relative href.
    scl = Path(item["assets"]["scl"]["href"])
    (root / "s2").mkdir()
    (root / "s2" / scl.name).write_bytes(scl.read_bytes())
    item["assets"]["scl"]["href"] = f"./{scl.name}"
    (root / "s2" / "item.json").write_text(json.dumps(item))
    lines = _naip_lines(fixtures_dir, 3)
    (root / "naip.ndjson").write_text("\n".join(lines))
    result = run_cli(
        ["index", "--chip-size", "64", "--json", f"{base}/s2/item.json", f"{base}/naip.ndjson"],
        database_url=database_url,
    )
    assert result.exit_code == 0, result.output
    assert _chip_count(database_url, item["id"]) == expected_s2
    assert _chip_count(database_url) == expected_s2 + _expected_chips(lines, 64)
    with connect(database_url) as conn:
        href = conn.execute(
            "SELECT pgstac.get_item(%s)->'assets'->'scl'->>'href'", (item["id"],)
        ).fetchone()[0]
    assert href == f"{base}/s2/{scl.name}"


def test_url_errors_are_one_line(database_url: str, http_root: tuple[Path, str]) -> None:
    _, base = http_root
    result = run_cli(["index", f"{base}/missing.json"], database_url=database_url)
    assert "missing.json" in error_line(result)


def test_bad_options_are_usage_errors(database_url: str, tmp_path: Path) -> None:
    result = run_cli(["index", "--quality", "fog", str(tmp_path)], database_url=database_url)
    assert result.exit_code == 2 and "--quality" in result.stderr
    result = run_cli(["index", "--max-nodata", "2", str(tmp_path)], database_url=database_url)
    assert result.exit_code == 2 and "--max-nodata" in result.stderr


@pytest.mark.timeout(240)
def test_concurrent_cli_processes(database_url: str, fixtures_dir: Path, tmp_path: Path) -> None:
    """4 processes index different items, 2 more the same items, all at once."""
    lines = _naip_lines(fixtures_dir, 24)
    files = []
    for i in range(4):
        path = tmp_path / f"part{i}.ndjson"
        path.write_text("\n".join(lines[i::4]) + "\n")
        files.append(path)
    shared = tmp_path / "shared.ndjson"
    shared.write_text("\n".join(lines[:8]) + "\n")
    env = {**os.environ, "STACCHIP_DATABASE_URL": database_url}
    command = [
        sys.executable,
        "-m",
        "stacchip_db.cli",
        "-q",
        "index",
        "--quality",
        "none",
        "--chip-size",
        "512",
    ]
    procs = [
        subprocess.Popen([*command, str(f)], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
        for f in [*files, shared, shared]
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=200)
        assert proc.returncode == 0, stderr
    expected = _expected_chips(lines, 512)
    with connect(database_url) as conn:
        rows, keys, items = conn.execute(
            "SELECT count(*), count(DISTINCT (item_id, chip_index_x, chip_index_y)), "
            "count(DISTINCT item_id) FROM stacchip.chips"
        ).fetchone()
        assert conn.execute("SELECT count(*) FROM pgstac.items").fetchone()[0] == 24
    assert (rows, keys, items) == (expected, expected, 24)


# -- bulk load ----------------------------------------------------------------------------------


def test_empty_table_is_bulk_loaded_then_batched(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    lines = _naip_lines(fixtures_dir, 12)
    first, second = tmp_path / "first.ndjson", tmp_path / "second.ndjson"
    first.write_text("\n".join(lines[:8]) + "\n")
    second.write_text("\n".join(lines[6:]) + "\n")
    args = ["index", "--quality", "none", "--chip-size", "1024", "--json"]
    bulk = run_cli([*args, str(first)], database_url=database_url)
    assert bulk.exit_code == 0, bulk.output
    assert "stacchip.chips is empty: bulk load" in bulk.stderr
    summary = json.loads(bulk.stdout)
    assert summary["bulk"] is True and summary["items"] == 8
    assert summary["chips"] == _expected_chips(lines[:8], 1024) == _chip_count(database_url)
    assert {"index", "upsert", "copy", "rebuild"} <= set(summary["timings"])
    batched = run_cli([*args, str(second)], database_url=database_url)  # not empty any more
    assert batched.exit_code == 0, batched.output
    assert "bulk load" not in batched.stderr and json.loads(batched.stdout)["bulk"] is False
    assert _chip_count(database_url) == _expected_chips(lines, 1024)


def test_no_bulk_into_an_empty_table(database_url: str, fixtures_dir: Path, tmp_path: Path) -> None:
    lines = _naip_lines(fixtures_dir, 3)
    path = tmp_path / "items.ndjson"
    path.write_text("\n".join(lines) + "\n")
    result = run_cli(
        ["index", "--quality", "none", "--chip-size", "1024", "--no-bulk", "--json", str(path)],
        database_url=database_url,
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bulk"] is False and "bulk load" not in result.stderr
    assert _chip_count(database_url) == _expected_chips(lines, 1024)


def test_bulk_over_existing_rows_with_duplicates_and_a_bad_item(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    lines = _naip_lines(fixtures_dir, 5)
    path = tmp_path / "items.ndjson"
    path.write_text("\n".join(lines) + "\n")
    common = ["index", "--quality", "none", "--chip-size", "1024"]
    assert run_cli([*common, "--no-bulk", str(path)], database_url=database_url).exit_code == 0
    # Again in bulk: the same items (one twice, the later copy with another date), one bad.
    later = json.loads(lines[1])
    later["properties"]["datetime"] = "2030-01-01T00:00:00Z"
    bad = json.loads(lines[4])
    bad["id"] = "no-crs"
    for key in ("proj:epsg", "proj:code", "proj:wkt2", "proj:projjson"):
        bad["properties"].pop(key, None)
    again = tmp_path / "again.ndjson"
    again.write_text("\n".join([*lines, json.dumps(later), json.dumps(bad)]) + "\n")
    result = run_cli([*common, "--bulk", "--json", str(again)], database_url=database_url)
    assert "no-crs" in error_line(result) and "no CRS" in error_line(result)
    summary = json.loads(result.stdout)
    assert (summary["bulk"], summary["items"], summary["duplicates"], summary["failed"]) == (
        True, 5, 1, 1
    )
    assert summary["chips"] == _expected_chips(lines, 1024) == _chip_count(database_url)
    with connect(database_url) as conn:
        dates = conn.execute(
            "SELECT DISTINCT datetime::date::text FROM stacchip.chips WHERE item_id = %s",
            (later["id"],),
        ).fetchall()
        items = conn.execute("SELECT count(*) FROM pgstac.items").fetchone()[0]
    assert dates == [("2030-01-01",)] and items == 5  # the last copy won; no-crs not stored


def test_index_help_documents_the_bulk_lock() -> None:
    result = run_cli(["index", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--bulk / --no-bulk" in text and "ACCESS EXCLUSIVE" in text
    assert "all or nothing" in text.lower() and "empty" in text


def test_index_command_does_not_import_the_heavy_modules(tmp_path: Path) -> None:
    """`stacchip-db index` (and the root group) import no geopandas, matplotlib, torch."""
    code = (
        "import sys\n"
        "from stacchip_db.cli import main\n"
        "main.get_command(None, 'index')\n"
        "import stacchip_db.cli.index, stacchip_db.db.store, stacchip_db.db.writer\n"
        "import stacchip_db.db.bulk, stacchip_db.index\n"
        "import stacchip_db.indexing, stacchip_db.item_sources\n"
        "heavy = ['geopandas', 'pandas', 'matplotlib', 'torch', 'stacchip_db.processors']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
