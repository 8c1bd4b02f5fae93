"""`stacchip-db preview` and `stacchip-db map`: look at a selection before training on it."""

from __future__ import annotations

from pathlib import Path

import click

from stacchip_db.cli.options import with_database
from stacchip_db.cli.prechip import EXIT_CHIPS_FAILED, chip_source_options, select
from stacchip_db.db import Database
from stacchip_db.selection import ChipFilter, Sampling
from stacchip_db.sensors import SENSORS
from stacchip_db.text import plural


@click.command()
@chip_source_options
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("preview.png"),
    show_default=True,
    help="The PNG file to write.",
)
@click.option(
    "--max-chips",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Draw at most this many of the selected chips (in the query's order).",
)
@click.option(
    "--platform", type=click.Choice(list(SENSORS)), help="Default: from the collection."
)
@click.option(
    "--rgb",
    callback=lambda _ctx, _param, value: value.split(",") if value else None,
    metavar="R,G,B",
    help="Bands shown as red, green, blue (default: the platform's).",
)
@with_database
def preview(
    db: Database,
    query: str | None,
    statement_timeout: float,
    chip_filter: ChipFilter,
    sampling: Sampling | None,
    out: Path,
    max_chips: int,
    platform: str | None,
    rgb: list[str] | None,
) -> None:
    """A PNG grid of the selected chips in RGB (2-98 % stretch), titled with chip ids.

    Exit status 3 when some chips could not be read (they are named on stderr, drawn blank).
    """
    from stacchip_db.pictures import preview_png

    if rgb is not None and len(rgb) != 3:
        raise click.BadParameter(f"{','.join(rgb)!r} is not three bands", param_hint="--rgb")
    selection = select(db, query, statement_timeout, chip_filter, sampling)
    drawn = preview_png(selection, out, platform=platform, rgb=rgb, max_chips=max_chips)
    line = f"drew {drawn.drawn} of {len(selection)} selected chips into {out}"
    if drawn.failures:
        line += f"; {plural(len(drawn.failures), 'chip')} could not be read (blank tiles)"
    click.echo(line)
    if drawn.failures:
        click.get_current_context().exit(EXIT_CHIPS_FAILED)


@click.command("map")
@chip_source_options
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("map.png"),
    show_default=True, help="The PNG file to write.",
)  # fmt: skip
@with_database
def map_(
    db: Database,
    query: str | None,
    statement_timeout: float,
    chip_filter: ChipFilter,
    sampling: Sampling | None,
    out: Path,
) -> None:
    """A PNG map of the selected chips' footprints (by cloud fraction) over their items'."""
    from stacchip_db.pictures import map_png

    selection = select(db, query, statement_timeout, chip_filter, sampling)
    drawn = map_png(selection, out)
    items = len(selection.items)
    click.echo(f"mapped {drawn} chips of {items} item{'s' * (items != 1)} into {out}")
