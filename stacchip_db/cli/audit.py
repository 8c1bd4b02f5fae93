"""`stacchip-db audit`: does a split share ground between training, validation and test?

Exit status 1 when a leak is found (so it can guard a training pipeline's CI), 0 when clean.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from stacchip_db.cli.options import with_database
from stacchip_db.cli.selection_options import filter_options
from stacchip_db.dataset import STATEMENT_TIMEOUT_S
from stacchip_db.db import Database, translate_errors
from stacchip_db.selection import ChipFilter

EXIT_LEAK = 1
"""Exit status of an audit that found a leak."""


def _selection_option(split: str) -> click.Option:
    return click.option(
        f"--{split}", metavar="SQL|FILE",
        help=f"The {split} chips: a file written by `sample`/`chips` (CSV, GeoJSON, "
        "GeoParquet), else a SELECT returning the chip key columns.",
    )  # fmt: skip


@click.command()
@filter_options
@_selection_option("train")
@_selection_option("val")
@_selection_option("test")
@click.option(
    "--statement-timeout", type=click.FloatRange(min=0.001), default=STATEMENT_TIMEOUT_S,
    show_default=True, metavar="SECONDS", help="Time limit of each --train/--val/--test query.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON on stdout.")
@with_database
def audit(
    chip_filter: ChipFilter,
    train: str | None,
    val: str | None,
    test: str | None,
    statement_timeout: float,
    as_json: bool,
    db: Database,
) -> None:
    """Audit a split for leaks: the block split the options describe (--block-size,
    --split-buffer, --split-fractions and filters), or the given --train/--val/--test chips.

    One line per finding: chips of different splits whose footprints overlap (pairs, km²),
    locations with chips in more than one split, chips selected twice. Exit status 1 on a leak.
    """
    from stacchip_db.audit import audit_selections, audit_split

    given = {name: value for name, value in (("train", train), ("val", val), ("test", test))
             if value is not None}  # fmt: skip
    if given:
        if chip_filter != ChipFilter():
            raise click.UsageError(
                "give either the split setup (--block-size, --split-buffer, filters) or "
                "--train/--val/--test selections, not both"
            )
        sources = {
            name: Path(value) if Path(value).is_file() else value for name, value in given.items()
        }
        report = audit_selections(
            db.url, sources, statement_timeout_s=statement_timeout,
            query_database_url=db.query_url,
        )  # fmt: skip
    else:
        if chip_filter.split is not None:
            raise click.UsageError("--split: the audit checks every split; leave it out")
        with db.connect() as conn, translate_errors("auditing the split"):
            conn.read_only = True
            report = audit_split(conn, chip_filter)
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        for line in report.lines():
            click.echo(line)
    if report.leak:
        click.get_current_context().exit(EXIT_LEAK)
