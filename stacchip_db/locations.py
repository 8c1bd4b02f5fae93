"""Chip locations: how many places the selected chips cover, and how many dates each has.

A location is a place on a pixel grid (`stacchip.chips.location`, alembic 0008): chips with the
same CRS, pixel size, chip size and top-left corner share it whatever their item or date
(`grid.grid_locations` computes the key). `summarise_locations` is `stacchip-db locations`:
one call of `stacchip.location_dates` (`sql/040_locations.sql`) with the selection filters,
so a filter means what it means for `chips`. Samples of places are `Sampling(by_location=True)`
(`selection.py`); the split audit is `audit.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from stacchip_db.db.locks import READ_LOCK_TIMEOUT_S, lock_waits, set_lock_timeout
from stacchip_db.selection import ChipFilter, function_call
from stacchip_db.text import plural


@dataclass
class LocationSummary:
    """The places of a selection: how many, their chips, and how many have each number of
    dates (`dates[d]` = places with chips of exactly d distinct datetimes)."""

    locations: int = 0
    chips: int = 0
    dates: dict[int, int] = field(default_factory=dict)
    chips_by_dates: dict[int, int] = field(default_factory=dict)

    def with_at_least(self, dates: int) -> int:
        """Places with chips of at least `dates` distinct dates (a time series of that length)."""
        return sum(n for d, n in self.dates.items() if d >= dates)

    def describe(self) -> list[str]:
        """Lines for people: the totals, then places per number of dates."""
        if not self.locations:
            return ["no locations: no chip passes the filters"]
        most = max(self.dates)
        lines = [
            f"{plural(self.locations, 'location')} with {plural(self.chips, 'chip')}; dates per "
            f"location: {min(self.dates)} to {most}, median {self.median_dates()}"
        ]
        for d in sorted(self.dates):
            lines.append(
                f"  {plural(d, 'date')}: {plural(self.dates[d], 'location')} "
                f"({plural(self.chips_by_dates[d], 'chip')}); at least {d}: "
                f"{self.with_at_least(d)}"
            )
        return lines

    def median_dates(self) -> int:
        """The number of dates of the median place (lower median)."""
        seen = 0
        for d in sorted(self.dates):
            seen += self.dates[d]
            if 2 * seen >= self.locations:
                return d
        return 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "locations": self.locations,
            "chips": self.chips,
            "median_dates": self.median_dates(),
            "dates": [
                {
                    "dates": d,
                    "locations": self.dates[d],
                    "chips": self.chips_by_dates[d],
                    "locations_with_at_least": self.with_at_least(d),
                }
                for d in sorted(self.dates)
            ],
        }


def summarise_locations(conn: psycopg.Connection, chip_filter: ChipFilter) -> LocationSummary:
    """The places of the chips passing `chip_filter` and their dates (one query, in the
    server: nothing per chip comes to the client). A lock wait that runs out raises
    `TableLocked`."""
    call, params = function_call("location_dates", chip_filter)
    query = sql.SQL("SELECT date_count, location_count, chip_count FROM {}").format(call)
    summary = LocationSummary()
    with lock_waits(conn, "summarising locations"), conn.transaction():
        set_lock_timeout(conn, READ_LOCK_TIMEOUT_S)
        for dates, locations, chips in conn.execute(query, params, prepare=False):
            summary.dates[int(dates)] = int(locations)
            summary.chips_by_dates[int(dates)] = int(chips)
            summary.locations += int(locations)
            summary.chips += int(chips)
    return summary
