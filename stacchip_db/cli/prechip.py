"""`stacchip-db prechip`: export selected chips as npz cubes; the chip-source options it shares
with `stats`, `preview` and `map`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from stacchip_db.cli.options import sign_option, with_database
from stacchip_db.cli.progress import progress_bar
from stacchip_db.cli.selection_options import selection_options, warn_empty
from stacchip_db.dataset import STATEMENT_TIMEOUT_S, ChipSelection, load_selection
from stacchip_db.db import Database
from stacchip_db.errors import ConfigError
from stacchip_db.selection import ChipFilter, Sampling, build_selection
from stacchip_db.sensors import SENSORS

if TYPE_CHECKING:
    from stacchip_db.prechip import Shard

log = logging.getLogger(__name__)

EXIT_CHIPS_FAILED = 3
"""Exit status of an export that finished but left out chips it could not read."""


def chip_source_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Where a command's chips come from: `--query SQL` (with `--statement-timeout`), or the
    shared filter and sample options. The command receives `query`, `statement_timeout`,
    `chip_filter` and `sampling`; `select` turns them into a `ChipSelection`. Commands that
    take chips read their pixels, so `--sign/--no-sign` comes with them."""

    query = click.option(
        "--query",
        metavar="SQL",
        help="A SELECT returning at least collection, item_id, chip_size, chip_index_x, "
        "chip_index_y; run read-only as a login that may only read. Instead of the filter and "
        "sample options.",
    )
    timeout = click.option(
        "--statement-timeout",
        type=click.FloatRange(min=0.001),
        default=STATEMENT_TIMEOUT_S,
        show_default=True,
        metavar="SECONDS",
        help="Time limit of the query selecting the chips, its execution and every fetch "
        "(kept by the client; the query cannot change it).",
    )
    return query(timeout(selection_options()(sign_option(func))))


def select(
    db: Database,
    query: str | None,
    statement_timeout: float,
    chip_filter: ChipFilter,
    sampling: Sampling | None,
) -> ChipSelection:
    """The chips the command's options select (read-only, with the statement timeout); a
    warning on stderr says why when there are none."""
    started = time.perf_counter()
    log.info("selecting chips…")  # loading a large selection takes a while: say so
    built = None
    if query is not None:
        if chip_filter != ChipFilter() or sampling is not None:
            raise ConfigError(
                "pass either --query SQL or filter/sample options, not both (put the filters "
                "into the query's WHERE clause)"
            )
        selection = load_selection(
            db.url, query, statement_timeout_s=statement_timeout, query_database_url=db.query_url
        )
    else:
        built = build_selection(chip_filter, sampling)
        selection = load_selection(
            db.url, built.query, built.params, statement_timeout_s=statement_timeout,
            query_database_url=db.query_url,
        )  # fmt: skip
    log.info(
        "selected %d chips of %d items in %.1f s",
        len(selection), len(selection.items), time.perf_counter() - started,
    )  # fmt: skip
    if not selection.rows:
        with db.connect() as conn:
            warn_empty(conn, built)
    return selection


def band_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """`--bands` and `--platform`: which bands, in which order."""
    bands = click.option(
        "--bands",
        callback=lambda _ctx, _param, value: (
            [b.strip() for b in value.split(",") if b.strip()] if value else None
        ),
        metavar="B1,B2,…",
        help="Bands in cube order (default: the platform's).",
    )
    platform = click.option(
        "--platform",
        type=click.Choice(list(SENSORS)),
        help="Band order of this platform (default: from the collection id).",
    )
    return bands(platform(func))


def _shard_of(shard: str | None, shard_count: int | None) -> Shard | None:
    """The part to write: `--shard I/N`, else the AWS Batch array job's (N from
    `--shard-count` or the job's size: `batch.array_job_shard`); None for all of it."""
    from stacchip_db.batch import INDEX_ENV, array_job_shard
    from stacchip_db.prechip import Shard

    if shard is not None:
        try:
            index, count = (int(v) for v in shard.split("/"))
        except ValueError as e:
            raise ConfigError(f"--shard {shard!r} is not I/N (e.g. 0/4)") from e
        return Shard.checked(index, count, f"--shard {shard}")
    job = array_job_shard(shard_count)
    return None if job is None else Shard.checked(*job, INDEX_ENV)


@click.command()
@chip_source_options
@click.option("--out", required=True, metavar="DIR|s3://…", help="Where the cubes go.")
@click.option(
    "--cube-size",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Chips per cube.",
)
@band_options
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes reading chips.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="Concurrent reads per item (default: 1 for local files, 32 for remote ones).",
)
@click.option("--shard", metavar="I/N", help="Write only part I of N (0-based), by cube.")
@click.option(
    "--shard-count",
    type=click.IntRange(min=1),
    help="N when the part comes from AWS_BATCH_JOB_ARRAY_INDEX (default: "
    "AWS_BATCH_JOB_ARRAY_SIZE).",
)
@click.option("--keep-partial", is_flag=True, help="Also write the last, partial cube.")
@click.option("--compress", is_flag=True, help="Deflate the npz files (smaller, slower).")
@with_database
def prechip(
    db: Database,
    query: str | None,
    statement_timeout: float,
    chip_filter: ChipFilter,
    sampling: Sampling | None,
    out: str,
    cube_size: int,
    bands: list[str] | None,
    platform: str | None,
    jobs: int,
    threads: int | None,
    shard: str | None,
    shard_count: int | None,
    keep_partial: bool,
    compress: bool,
) -> None:
    """Export the selected chips as npz cubes (Clay format) with a manifest.

    Exit status 3 when some chips could not be read (they are named on stderr and left out).
    """
    from stacchip_db.prechip import export_cubes

    part = _shard_of(shard, shard_count)
    selection = select(db, query, statement_timeout, chip_filter, sampling)
    with progress_bar("prechip", unit="chips") as progress:
        summary = export_cubes(
            selection,
            out,
            cube_size=cube_size,
            bands=bands,
            platform=platform,
            jobs=jobs,
            lanes=threads,
            shard_index=part.index if part else None,
            shard_count=part.count if part else None,
            keep_partial=keep_partial,
            compress=compress,
            progress=progress.advance,
            on_plan=progress.start,
        )
    where = f" (shard {part.index}/{part.count})" if part else ""
    click.echo(f"{summary.describe()}{where}; output in {out}")
    if summary.failed:
        click.get_current_context().exit(EXIT_CHIPS_FAILED)
