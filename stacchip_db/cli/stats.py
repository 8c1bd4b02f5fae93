"""`stacchip-db stats`: per-band statistics of selected chips or of written cubes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import click

from stacchip_db.cli.options import with_database
from stacchip_db.cli.prechip import band_options, chip_source_options, select
from stacchip_db.cli.progress import progress_bar
from stacchip_db.db import Database
from stacchip_db.errors import ConfigError
from stacchip_db.selection import ChipFilter, Sampling
from stacchip_db.text import plural

if TYPE_CHECKING:
    from stacchip_db.bandstats import StatsResult


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.6g}"


def stats_table(groups: dict) -> str:
    """A plain-text table: platform, band, count, mean, std, min, max."""
    header = ("platform", "band", "count", "mean", "std", "min", "max")
    lines = [header]
    for name, stats in groups.items():
        for row in stats.rows():
            lines.append(
                (
                    name,
                    row["band"],
                    str(row["count"]),
                    *(_number(row[k]) for k in ("mean", "std", "min", "max")),
                )
            )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                  enumerate(zip(line, widths, strict=True))).rstrip()
        for line in lines
    )  # fmt: skip


@click.command()
@chip_source_options
@click.option(
    "--cubes",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Statistics of the npz cubes prechip wrote here, instead of a selection.",
)
@band_options
@click.option(
    "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
    help="Worker processes reading chips.",
)  # fmt: skip
@click.option("--threads", type=click.IntRange(min=1), help="Concurrent reads per item.")
@click.option(
    "--yaml",
    "yaml_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the means and stds as YAML in the layout of Clay's metadata.yaml.",
)
@click.pass_context
def stats(
    ctx: click.Context,
    query: str | None,
    statement_timeout: float,
    chip_filter: ChipFilter,
    sampling: Sampling | None,
    cubes: Path | None,
    bands: list[str] | None,
    platform: str | None,
    jobs: int,
    threads: int | None,
    yaml_path: Path | None,
) -> None:
    """Per-band count, mean, std, min and max, nodata excluded.

    Exit status 3 when some chips could not be read (they are left out).
    """
    from stacchip_db.bandstats import cube_stats, to_clay_yaml

    if cubes is not None and (query is not None or chip_filter != ChipFilter() or sampling):
        raise ConfigError("pass either --cubes DIR or a chip selection, not both")
    if cubes is not None:
        result = cube_stats(cubes, bands=bands, platform=platform)
    else:
        result = with_database(_selection_stats)(
            query=query,
            statement_timeout=statement_timeout,
            chip_filter=chip_filter,
            sampling=sampling,
            bands=bands,
            platform=platform,
            jobs=jobs,
            threads=threads,
        )
    click.echo(stats_table(result.groups))
    summary = plural(result.chips, "chip")
    if result.failed:
        summary += f"; {plural(result.failed, 'chip')} could not be read and were left out"
    click.echo(summary)
    if yaml_path is not None:
        yaml_path.write_text(to_clay_yaml(result.groups))
        click.echo(f"wrote {yaml_path}")
    if result.failed:
        ctx.exit(3)


def _selection_stats(
    db: Database,
    query: str | None,
    statement_timeout: float,
    chip_filter: ChipFilter,
    sampling: Sampling | None,
    bands: list[str] | None,
    platform: str | None,
    jobs: int,
    threads: int | None,
) -> StatsResult:
    from stacchip_db.bandstats import selection_stats

    selection = select(db, query, statement_timeout, chip_filter, sampling)
    with progress_bar("stats", unit="chips") as progress:
        progress.start(len(selection))
        return selection_stats(
            selection,
            bands=bands,
            platform=platform,
            jobs=jobs,
            lanes=threads,
            progress=progress.advance,
        )
