"""The split audit: proof (or not) that no ground is shared between training splits.

Two ways to name the splits (`stacchip-db audit`):

- **a split setup** (`audit_split`): the spatial-block split of the chips passing a
  `ChipFilter` (its `block_size`, `split_fractions` and `split_buffer`); one call of
  `stacchip.audit_split` (`sql/040_locations.sql`), which does the work in the server: a scan
  of the matching chips for those that cross a block edge (only they can overlap a chip of
  another block), one GiST probe per such chip, and a GROUP BY over places that spills to disk
  past `work_mem`. Nothing per chip comes to the client: memory is bounded whatever the size.
- **given selections** (`audit_selections`): each split a SQL query (run as the restricted
  login, as every user query) or a file `sample`/`chips` wrote (CSV, GeoJSON, GeoParquet; a
  prechip manifest too), streamed into a temporary table of chip keys in batches.

Findings, one per kind (`FINDINGS`): `overlap` (pairs of chips of different splits whose
footprints share area, and that area in km² on the WGS 84 spheroid), `locations` (places,
`stacchip.chips.location`, with chips in more than one split), `duplicates` (chips selected
more than once, within or across splits). Any of them found is a leak (`AuditReport.leak`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from stacchip_db.db import connect
from stacchip_db.db.locks import READ_LOCK_TIMEOUT_S, lock_waits, set_lock_timeout
from stacchip_db.db.user_sql import (
    KEY_COLUMNS,
    check_timeout,
    key_batches,
    login_url,
    user_query,
)
from stacchip_db.errors import StacchipError
from stacchip_db.selection import SPLITS, ChipFilter, function_call
from stacchip_db.text import plural

FINDINGS = ("overlap", "locations", "duplicates")
BATCH_ROWS = 10_000
"""Chip keys sent to the server per COPY batch (files and queries are streamed)."""


class AuditError(StacchipError):
    """The audit cannot run as asked (a split given twice, an unreadable selection)."""


@dataclass(frozen=True)
class Finding:
    """One kind of leak and how much of it was found."""

    kind: str
    found: int
    area_km2: float | None = None

    @property
    def leak(self) -> bool:
        return self.found > 0

    def line(self) -> str:
        """`LEAK overlap: …` or `ok   locations: …`: one line for people."""
        if self.kind == "overlap":
            text = (
                f"{plural(self.found, 'pair')} of chips in different splits overlap "
                f"({self.area_km2 or 0.0:,.3f} km²)"
            )
        elif self.kind == "locations":
            text = f"{plural(self.found, 'location')} with chips in more than one split"
        else:
            text = f"{plural(self.found, 'chip')} selected more than once"
        return f"{'LEAK' if self.leak else 'ok  '} {self.kind}: {text}"


@dataclass
class AuditReport:
    """The findings of one audit, in `FINDINGS` order, and what was audited."""

    findings: list[Finding]
    audited: dict[str, Any] = field(default_factory=dict)

    @property
    def leak(self) -> bool:
        return any(f.leak for f in self.findings)

    def lines(self) -> list[str]:
        return [f.line() for f in self.findings]

    def as_dict(self) -> dict[str, Any]:
        return {
            "leak": self.leak,
            "audited": self.audited,
            "findings": {
                f.kind: {"found": f.found}
                | ({"area_km2": f.area_km2} if f.kind == "overlap" else {})
                for f in self.findings
            },
        }


def _report(rows: list[tuple[str, int, float | None]], audited: dict[str, Any]) -> AuditReport:
    found = {kind: (int(n), area) for kind, n, area in rows}
    return AuditReport(
        [Finding(kind, found[kind][0], found[kind][1]) for kind in FINDINGS], audited
    )


def audit_split(conn: psycopg.Connection, chip_filter: ChipFilter) -> AuditReport:
    """Audit the block split of the chips passing `chip_filter` (its `block_size`,
    `split_fractions`, `split_buffer`); `chip_filter.split` must be unset (every split is
    audited). A lock wait that runs out raises `TableLocked`."""
    if chip_filter.split is not None:
        raise AuditError(
            f"`split` is {chip_filter.split!r}: the audit checks every split of the setup; "
            "leave it unset"
        )
    head = {
        "block_size": float(chip_filter.block_size),
        "split_fractions": [float(v) for v in chip_filter.split_fractions],
    }
    call, params = function_call("audit_split", chip_filter, head)
    query = sql.SQL("SELECT finding, found, area_km2 FROM {}").format(call)
    with lock_waits(conn, "auditing the split"), conn.transaction():
        set_lock_timeout(conn, READ_LOCK_TIMEOUT_S)
        rows = conn.execute(query, params, prepare=False).fetchall()
    audited = {
        "block_size": chip_filter.block_size,
        "split_fractions": list(chip_filter.split_fractions),
        "split_buffer": chip_filter.split_buffer,
    }
    return _report(rows, audited)


# -- given selections ---------------------------------------------------------------------------


def _file_keys(path: Path) -> Iterator[list[tuple[Any, ...]]]:
    """Batches of chip keys from a file `sample`, `chips` or `prechip` wrote."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
            batches = parquet.iter_batches(batch_size=BATCH_ROWS, columns=list(KEY_COLUMNS))
            for batch in batches:
                columns = [batch.column(name).to_pylist() for name in KEY_COLUMNS]
                yield list(zip(*columns, strict=True))
        except (OSError, KeyError, ValueError) as e:
            raise AuditError(f"{path}: not a GeoParquet file of chips ({e})") from e
        return
    if suffix in (".json", ".geojson"):
        try:
            features = json.loads(path.read_text()).get("features", [])
            rows = [tuple(f["properties"][name] for name in KEY_COLUMNS) for f in features]
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise AuditError(f"{path}: not a GeoJSON FeatureCollection of chips ({e})") from e
        for start in range(0, len(rows), BATCH_ROWS):
            yield rows[start : start + BATCH_ROWS]
        return
    try:
        with path.open(newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            missing = [c for c in KEY_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise AuditError(
                    f"{path}: no column {', '.join(missing)}; give a CSV, GeoJSON or GeoParquet "
                    "file written by `sample` or `chips` (not the table format)"
                )
            batch: list[tuple[Any, ...]] = []
            for row in reader:
                batch.append(tuple(row[name] for name in KEY_COLUMNS))
                if len(batch) == BATCH_ROWS:
                    yield batch
                    batch = []
            if batch:
                yield batch
    except OSError as e:
        raise AuditError(f"{path}: cannot be read ({e.strerror})") from e


_CREATE = """
CREATE TEMP TABLE stacchip_audit (
    split text NOT NULL, collection text NOT NULL, item_id text NOT NULL, chip_size int NOT NULL,
    chip_index_x int NOT NULL, chip_index_y int NOT NULL
) ON COMMIT DROP
"""

_KEY_JOIN = (
    "c.collection = a.collection AND c.item_id = a.item_id AND c.chip_size = a.chip_size "
    "AND c.chip_index_x = a.chip_index_x AND c.chip_index_y = a.chip_index_y"
)

_FINDINGS_SQL = f"""
SELECT 'overlap', count(*),
       coalesce(sum(ST_Area(ST_Intersection(ca.geometry, cb.geometry)::geography)), 0) / 1e6
FROM stacchip_audit AS a
JOIN stacchip.chips AS ca ON {_KEY_JOIN.replace("c.", "ca.")}
JOIN stacchip.chips AS cb ON ST_Intersects(cb.geometry, ca.geometry)
JOIN stacchip_audit AS b ON {_KEY_JOIN.replace("c.", "cb.").replace("a.", "b.")}
WHERE b.split > a.split
  AND (ca.collection, ca.item_id, ca.chip_size, ca.chip_index_x, ca.chip_index_y)
      <> (cb.collection, cb.item_id, cb.chip_size, cb.chip_index_x, cb.chip_index_y)
  AND ST_Relate(ca.geometry, cb.geometry, '2********')
UNION ALL
SELECT 'locations', count(*), NULL FROM (
    SELECT c.location FROM stacchip_audit AS a JOIN stacchip.chips AS c ON {_KEY_JOIN}
    GROUP BY c.location HAVING count(DISTINCT a.split) > 1
) AS spread
UNION ALL
SELECT 'duplicates', count(*), NULL FROM (
    SELECT 1 FROM stacchip_audit AS a
    GROUP BY collection, item_id, chip_size, chip_index_x, chip_index_y HAVING count(*) > 1
) AS twice
"""


def audit_selections(
    database_url: str,
    selections: Mapping[str, str | Path],
    *,
    statement_timeout_s: float = 300.0,
    query_database_url: str | None = None,
) -> AuditReport:
    """Audit the chips of given selections: `selections[split]` (two or more of `train`,
    `val`, `test`) is a SQL query returning the chip key columns (run as the restricted login,
    under `statement_timeout_s`, on the snapshot the audit reads) or the path of a file
    `sample` or `chips` wrote. Keys are streamed into a temporary table in batches.

    Raises AuditError for a split that is not `SPLITS`, fewer than two selections, a file that
    is not a chip list or chips that are not in `stacchip.chips`; QueryError for a query the
    database refuses.
    """
    unknown = [s for s in selections if s not in SPLITS]
    if unknown:
        raise AuditError(f"`selections`: {unknown[0]!r} is not a split ({', '.join(SPLITS)})")
    if len(selections) < 2:
        raise AuditError("`selections`: give at least two splits to audit against each other")
    check_timeout(statement_timeout_s)
    counts: dict[str, int] = {}
    with connect(database_url) as conn:
        login = None
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with lock_waits(conn, "auditing the selections"), conn.transaction():
            set_lock_timeout(conn, READ_LOCK_TIMEOUT_S)
            snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
            conn.execute(_CREATE)
            for split, source in selections.items():
                if isinstance(source, Path):
                    batches = _file_keys(source)
                else:
                    login = login or query_database_url or login_url(conn, database_url)
                    batches = _query_keys(
                        login, source, statement_timeout_s, snapshot,
                        explicit_login=query_database_url is not None,
                    )  # fmt: skip
                counts[split] = _copy_keys(conn, split, batches)
            conn.execute(
                "CREATE INDEX ON stacchip_audit "
                "(collection, item_id, chip_size, chip_index_x, chip_index_y)"
            )
            conn.execute("ANALYZE stacchip_audit")
            (unknown_chips,) = conn.execute(
                f"SELECT count(*) FROM stacchip_audit AS a WHERE NOT EXISTS "
                f"(SELECT 1 FROM stacchip.chips AS c WHERE {_KEY_JOIN})"
            ).fetchone()
            if unknown_chips:
                raise AuditError(
                    f"{plural(unknown_chips, 'selected chip')} not in stacchip.chips: "
                    "select chips of this database"
                )
            rows = conn.execute(_FINDINGS_SQL).fetchall()
    return _report(rows, {"chips": counts})


def _query_keys(
    login: str, query: str, timeout_s: float, snapshot: str, *, explicit_login: bool
) -> Iterator[list[tuple[Any, ...]]]:
    statement = sql.SQL(query.strip().rstrip(";"))  # type: ignore[arg-type]
    with user_query(
        login, statement, None, timeout_s=timeout_s, snapshot=snapshot,
        explicit_login=explicit_login,
    ) as result:  # fmt: skip
        yield from key_batches(result)


def _copy_keys(
    conn: psycopg.Connection, split: str, batches: Iterator[list[tuple[Any, ...]]]
) -> int:
    count = 0
    with conn.cursor().copy(
        "COPY stacchip_audit (split, collection, item_id, chip_size, chip_index_x, chip_index_y) "
        "FROM STDIN"
    ) as copy:
        for batch in batches:
            for row in batch:
                copy.write_row((split, *row))
            count += len(batch)
    return count
