"""The progress bar of long commands (index, prechip, stats): on stderr, silent under -q.

The library reports progress through callbacks (`progress(n)` as work is done, and a plan
callback once the total is known); `progress_bar` hands the command a `Progress` whose
`start` and `advance` are those callbacks, and closes the bar however the command ends.

    with progress_bar("prechip", unit="chips") as progress:
        export_cubes(..., progress=progress.advance, on_plan=progress.start)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from stacchip_db.cli.options import quiet


class Progress:
    """A click progress bar on stderr, shown from `start(total)` on (not for a total of 0).

    With a `unit`, the bar shows the position and the rate (`12.5 chips/s`).
    """

    def __init__(self, label: str, *, unit: str | None = None, hidden: bool = False) -> None:
        self.label = label
        self.unit = unit
        self.hidden = hidden
        self.bar: Any = None
        self.done = 0
        self.started = time.perf_counter()

    def start(self, total: int) -> None:
        if self.hidden or total == 0:
            return
        extra: dict[str, Any] = {}
        if self.unit is not None:
            extra = {"show_pos": True, "item_show_func": lambda _: self._rate()}
        self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, **extra)
        self.bar.__enter__()

    def _rate(self) -> str:
        elapsed = time.perf_counter() - self.started
        return f"{self.done / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n, current_item=self.done)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@contextmanager
def progress_bar(
    label: str, *, unit: str | None = None, hidden: bool = False
) -> Iterator[Progress]:
    """A `Progress` for the block, finished (its line ended) however the block ends; hidden
    under `stacchip-db -q` or when `hidden` (output that must stay clean, as `--json`)."""
    progress = Progress(label, unit=unit, hidden=hidden or quiet())
    try:
        yield progress
    finally:
        progress.finish()
