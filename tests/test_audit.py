"""The split audit: a planted overlap is found, a buffered split passes, selections are checked."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from stacchip_db.audit import AuditError, audit_selections, audit_split
from stacchip_db.selection import ChipFilter
from tests.conftest import run_cli


def _two_blocks(conn: psycopg.Connection) -> int:
    """bx such that the 1° blocks (bx, 0) and (bx + 1, 0) are in different splits."""
    for bx in range(200):
        a, b = (
            conn.execute(
                "SELECT stacchip.chip_split(ST_MakeEnvelope(%s, 0.4, %s, 0.6, 4326))",
                (x + 0.4, x + 0.6),
            ).fetchone()[0]
            for x in (bx, bx + 1)
        )
        if a != b:
            return bx
    raise AssertionError("no two neighbouring blocks in different splits")


def _chip(conn: psycopg.Connection, item: str, x: int, box: tuple[float, ...]) -> None:
    conn.execute(
        "INSERT INTO stacchip.chips (collection, item_id, chip_size, chip_index_x, "
        "chip_index_y, datetime, cloud_fraction, nodata_fraction, geometry) VALUES "
        "('planted', %s, 16, %s, 0, '2021-05-01Z', 0, 0, ST_MakeEnvelope(%s, %s, %s, %s, 4326))",
        (item, x, *box),
    )


@pytest.fixture
def planted(database_url: str) -> tuple[str, int]:
    """Chips of 0.1° in two neighbouring blocks of different splits, and one chip straddling
    their edge that overlaps a chip of the other block by 0.05° x 0.1°."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT stacchip.chip_partition('planted')")
        bx = _two_blocks(conn)
        for x in range(6):
            _chip(conn, "west", x, (bx + 0.4 + 0.1 * x, 0.3, bx + 0.5 + 0.1 * x, 0.4))
            _chip(conn, "east", x, (bx + 1.1 + 0.1 * x, 0.3, bx + 1.2 + 0.1 * x, 0.4))
        # centre on the edge: block bx + 1; overlaps west's last chip (bx + 0.9 .. bx + 1.0)
        _chip(conn, "edge", 0, (bx + 0.95, 0.3, bx + 1.05, 0.4))
    return database_url, bx


def test_audit_finds_a_planted_overlap_and_passes_a_buffered_split(
    planted: tuple[str, int],
) -> None:
    url, _ = planted
    with psycopg.connect(url) as conn:
        leaky = audit_split(conn, ChipFilter())
        clean = audit_split(conn, ChipFilter(split_buffer=0.0))
    overlap, places, twice = leaky.findings
    assert (overlap.kind, overlap.found) == ("overlap", 1)
    assert overlap.area_km2 == pytest.approx(0.05 * 0.1 * 111.32 * 110.57, rel=0.01)
    assert (places.found, twice.found) == (0, 0) and leaky.leak
    assert not clean.leak and [f.found for f in clean.findings] == [0, 0, 0]
    with pytest.raises(AuditError, match="`split` is 'val'"):
        audit_split(conn, ChipFilter(split="val"))


def test_audit_command_lines_json_and_exit_status(planted: tuple[str, int]) -> None:
    url, _ = planted
    leaky = run_cli(["audit"], database_url=url)
    assert leaky.exit_code == 1, leaky.output
    lines = leaky.output.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("LEAK overlap: 1 pair of chips in different splits overlap (")
    assert lines[1] == "ok   locations: 0 locations with chips in more than one split"
    assert lines[2] == "ok   duplicates: 0 chips selected more than once"
    clean = run_cli(["audit", "--split-buffer", "0", "--json"], database_url=url)
    assert clean.exit_code == 0, clean.output
    report = json.loads(clean.output)
    assert report["leak"] is False and report["findings"]["overlap"]["found"] == 0
    assert report["audited"]["split_buffer"] == 0.0


def test_audit_of_given_selections(planted: tuple[str, int], tmp_path: Path) -> None:
    url, _ = planted
    train, val = tmp_path / "train.csv", tmp_path / "val.parquet"
    for split, path, fmt in (("train", train, "csv"), ("val", val, "parquet")):
        result = run_cli(["chips", "--split", split, "--format", fmt, "-o", str(path)],
                         database_url=url)  # fmt: skip
        assert result.exit_code == 0, result.output
    # The files of the default split: the planted overlap is there (edge chip vs west chip)
    # unless the two blocks are train and test.
    both = audit_selections(url, {"train": train, "val": val})
    assert not both.findings[1].leak and not both.findings[2].leak
    # A query giving a chip of the other selection: a duplicate, its place in two splits.
    twice = "SELECT * FROM stacchip.chips WHERE item_id IN ('west', 'east', 'edge')"
    report = audit_selections(url, {"train": twice, "test": twice})
    overlap, places, duplicates = report.findings
    assert duplicates.found == 13 and places.found == 13
    assert overlap.found == 2  # the edge chip and its west neighbour, each way across splits
    result = run_cli(["audit", "--train", str(train), "--test", twice], database_url=url)
    assert result.exit_code == 1 and "LEAK duplicates" in result.output
    mixed = run_cli(["audit", "--train", str(train), "--split-buffer", "0"], database_url=url)
    assert mixed.exit_code == 2 and "not both" in mixed.output
    with pytest.raises(AuditError, match="at least two splits"):
        audit_selections(url, {"train": train})
