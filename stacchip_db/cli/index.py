"""`stacchip-db index` and `stacchip-db export-index`: STAC items in, chip index in and out.

`index` wraps `stacchip_db.indexing.index_items` (reading, indexing and storing items: options
in, summary out); `export-index` wraps `stacchip_db.export.export_index`. The library is
imported inside the commands so that `stacchip-db --help` and the other commands start fast.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from stacchip_db.cli import in_cli_words
from stacchip_db.cli.options import (
    CliContext,
    max_chips_option,
    pass_cli,
    sign_option,
    with_database,
)
from stacchip_db.cli.progress import progress_bar
from stacchip_db.db.connection import Database
from stacchip_db.text import plural

QUALITY_RULES = ("auto", "s2", "landsat", "modis", "none")
"""`--quality` choices: the rules of `stacchip_db.quality` (kept here to import it lazily)."""


def _expand(
    _ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    """The sources, folders expanded; one that does not exist is a usage error (exit 2) and
    nothing is read."""
    from stacchip_db.item_sources import SourceError, expand_sources

    try:
        return expand_sources(value)
    except SourceError as e:
        raise click.BadParameter(in_cli_words(str(e)), param_hint="PATH_OR_URL") from e


@click.command("index")
@click.argument("sources", nargs=-1, required=True, metavar="PATH_OR_URL...", callback=_expand)
@click.option("--collection", help="Collection id for items that have none.")
@click.option(
    "--quality",
    type=click.Choice(QUALITY_RULES),
    default="auto",
    show_default=True,
    help="Cloud/nodata rule; auto picks it from the item's sensor and catalog (SCL, qa_pixel, "
    "…) and says which it used per collection.",
)
@click.option(
    "--quality-asset", metavar="KEY",
    help="Asset key of the quality band, for catalogs whose layout auto does not know.",
)
@click.option(
    "--chip-size", type=click.IntRange(min=1), default=256, show_default=True,
    help="Chip size in pixels of the item's finest grid.",
)
@click.option(
    "--max-nodata", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
    help="Chips with a larger nodata fraction are not stored.",
)
@max_chips_option
@click.option(
    "--strict", is_flag=True,
    help="Fail items whose collection does not exist instead of creating a minimal one.",
)
@click.option(
    "--on-conflict", type=click.Choice(["upsert", "ignore", "insert"]), default="upsert",
    show_default=True,
    help="Items already stored: replace them, keep them, or fail.",
)
@click.option(
    "--writers", type=click.IntRange(1, 16), default=1, show_default=True,
    help="Database connections writing batches at once (the database's inserts are the "
    "bottleneck of large runs).",
)
@click.option(
    "--bulk/--no-bulk", default=None,
    help="Bulk load: index every item first, then load all chips in ONE transaction that "
    "builds each collection's partition of stacchip.chips apart and attaches it (much faster "
    "for large loads; other collections are neither rebuilt nor locked). Writers of those "
    "collections wait until it commits; a collection that already has chips is rebuilt and "
    "swapped in under a short ACCESS EXCLUSIVE lock at the end. All or nothing. Default: bulk "
    "when stacchip.chips is empty at the start or the first item's collection has no chips yet, "
    "else batched transactions (--no-bulk forces those).",
)
@sign_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@with_database
@pass_cli
@click.pass_context
def index(
    ctx: click.Context,
    cli: CliContext,
    sources: tuple[str, ...],
    collection: str | None,
    quality: str,
    quality_asset: str | None,
    chip_size: int,
    max_nodata: float,
    max_chips: int | None,
    strict: bool,
    on_conflict: str,
    writers: int,
    bulk: bool | None,
    as_json: bool,
    db: Database,
) -> None:
    """Index STAC items (JSON or ndjson files, folders of them, URLs) into chips in the database.

    A folder is read whole: every .json, .geojson and ndjson file under it (hidden ones left
    out). A path that does not exist is a usage error (exit 2) and nothing is indexed.

    Each item is upserted into pgstac and its chip rows replaced, many items per transaction.
    Bad items are reported with their id and skipped; the exit code is then 1.

    Into an empty stacchip.chips (or with --bulk) all items are indexed first, then loaded in
    one transaction that builds each collection's partition apart and attaches it: bad items
    are still reported and skipped, but the load itself is all or nothing.
    """
    from stacchip_db.grid import MAX_CHIPS
    from stacchip_db.indexing import IndexPlan, index_items

    with progress_bar("indexing items", hidden=as_json) as progress:

        def on_plan(plan: IndexPlan) -> None:
            if plan.automatic and plan.bulk and not cli.quiet:
                click.echo(
                    f"{plan.why}: bulk load (partitions built apart, indexes "
                    "built once; all or nothing; --no-bulk to avoid)",
                    err=True,
                )
            progress.start(plan.items)

        summary = index_items(
            sources,
            db,
            collection=collection,
            quality=quality,
            quality_asset=quality_asset,
            chip_size=chip_size,
            max_nodata=max_nodata,
            max_chips=MAX_CHIPS if max_chips is None else max_chips,
            strict=strict,
            on_conflict=on_conflict,
            writers=writers,
            bulk=bulk,
            progress=progress.advance,
            on_plan=on_plan,
        )
    # the library's words (Python parameters) as the CLI says them (its flags)
    summary.failed = [
        dataclasses.replace(f, message=in_cli_words(f.message)) for f in summary.failed
    ]
    summary.warnings = [in_cli_words(message) for message in summary.warnings]
    for failure in summary.failed:
        click.echo(f"Error: {failure.message}", err=True)
    for message in summary.warnings:
        click.echo(f"Warning: {message}", err=True)
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
    elif not cli.quiet:
        click.echo(summary.describe())
    if summary.failed:
        ctx.exit(1)


# -- export-index -----------------------------------------------------------------------------


@click.command("export-index")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--collection", "collections", multiple=True,
    help="Export only this collection (repeatable); default: all.",
)
@click.option(
    "--chip-size", type=click.IntRange(min=1), default=256, show_default=True,
    help="Export the chips indexed at this size.",
)
@with_database
def export_index(
    out_dir: Path, collections: tuple[str, ...], chip_size: int, db: Database
) -> None:
    """Write the chip index as the original stacchip's GeoParquet files.

    One file per item: OUT_DIR/{collection}/{item_id}/index_{item_id}.parquet, with columns
    chipid, date, chip_index_x, chip_index_y, cloud_cover_percentage, nodata_percentage and
    geometry (readable with geopandas.read_parquet).
    """
    from stacchip_db.export import export_index as write_index

    with db.connect() as conn:
        result = write_index(conn, out_dir, collections=collections or None, chip_size=chip_size)
    text = f"exported {result.chips:,} chips of {plural(result.files, 'item')} to {out_dir}"
    if result.skipped:  # each was named by a warning as it was skipped
        text += (
            f"; {plural(len(result.skipped), 'item')} skipped: their collection or id cannot be "
            "a folder name"
        )
    click.echo(text)
