"""What each index of stacchip.chips costs a store: re-store one 1,764-chip item with every
chip changed, with all indexes, without each one in turn, and with the primary key alone.

    .venv/bin/python bench/bench_store_index_costs.py [--reps 15]

Uses the same throwaway cluster as bench_store.py (or STACCHIP_BENCH_DATABASE_URL).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_store import (  # noqa: E402
    FIXTURES,
    S2_ITEM,
    add_durability_option,
    admin_url,
    chip_versions,
    configuration,
    drop_database,
    fresh_database,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    add_durability_option(parser)
    args = parser.parse_args()

    from stacchip_db.db import connect
    from stacchip_db.db.store import store_item
    from stacchip_db.index import index_item

    item = json.loads((FIXTURES / S2_ITEM).read_text())
    # max_nodata=1: keep the whole 42 x 42 grid (the scene covers part of its tile), so the
    # workload stays the 1,764-chip item the goals name.
    chips = index_item(item, quality="none", max_nodata=1.0)
    versions = chip_versions(chips)

    def changed_restore_ms(conn) -> float:
        times = []
        for rep in range(args.reps):
            start = time.perf_counter()
            store_item(conn, item, versions[rep % 2], chip_size=256)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    print(f"configuration: {configuration(args.durable)}")
    with admin_url(args.durable) as admin:
        name = f"stacchip_bench_index_costs_{os.getpid()}"
        url = fresh_database(admin, name)
        try:
            with connect(url, autocommit=True) as conn:
                store_item(conn, item, versions[1], chip_size=256)
                indexes = conn.execute(
                    "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'stacchip' "
                    "AND tablename = 'chips' AND indexname <> 'chips_pkey' ORDER BY 1"
                ).fetchall()
                print(f"{chips.num_rows} chips, every row changed each time; medians of "
                      f"{args.reps}")
                print(f"  all indexes                          {changed_restore_ms(conn):6.1f} ms")
                for index_name, definition in indexes:
                    conn.execute(f"DROP INDEX stacchip.{index_name}")
                    print(f"  without {index_name:<29}{changed_restore_ms(conn):6.1f} ms")
                    conn.execute(definition)
                for index_name, _ in indexes:
                    conn.execute(f"DROP INDEX stacchip.{index_name}")
                print(f"  primary key only                     {changed_restore_ms(conn):6.1f} ms")
        finally:
            drop_database(admin, name)


if __name__ == "__main__":
    main()
