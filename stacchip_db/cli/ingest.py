"""`stacchip-db ingest <processor>`: one subcommand per registered processor.

Options every processor shares are defined here once; a processor adds its own through
`Processor.cli_options`. The command only parses and prints: the job is `run_job`'s.
"""

from __future__ import annotations

from typing import Any

import click

from stacchip_db.cli.options import max_chips_option, with_database
from stacchip_db.db import Database
from stacchip_db.grid import CHIP_SIZE
from stacchip_db.processors import processors
from stacchip_db.processors.base import JobFailed, JobRequest, JobSummary, Processor, run_job
from stacchip_db.storage import check_target

COMMON = (
    "index",
    "sample_source",
    "target",
    "stac_api",
    "collection",
    "chip_size",
    "max_chips",
    "sign",
    "dry_run",
    "as_json",
)


@click.group()
def ingest() -> None:
    """Fill the database from STAC APIs: one job = one row of the sample source."""


def _print_plan(summary: JobSummary) -> None:
    sample = ", ".join(f"{k}={v}" for k, v in summary.sample.items() if k != "geometry")
    click.echo(f"{summary.processor} job {summary.job_index}: sample {sample or '-'}")
    click.echo(f"  location {summary.sample.get('geometry', '')}")
    if not summary.scenes:
        click.echo("  no scenes to ingest")
    for scene in summary.scenes:
        cloud = "-" if scene.cloud_cover is None else f"{scene.cloud_cover:.1f} %"
        click.echo(f"  {scene.label:<8} {scene.id}  {scene.datetime}  cloud {cloud}")


def _command(processor: Processor) -> click.Command:
    def run(db: Database, **kwargs: Any) -> None:
        request = JobRequest(
            index=kwargs["index"],
            sample_source=kwargs["sample_source"] or "",
            target=check_target(kwargs["target"]),
            stac_api=kwargs["stac_api"],
            collection=kwargs["collection"],
            chip_size=kwargs["chip_size"],
            sign=kwargs["sign"],
            # not given: JobRequest's default bound (grid.MAX_CHIPS)
            **({} if kwargs["max_chips"] is None else {"max_chips": kwargs["max_chips"]}),
            dry_run=kwargs["dry_run"],
            options={k: v for k, v in kwargs.items() if k not in COMMON},
        )
        try:
            summary = run_job(processor, request, None if request.dry_run else db)
        except JobFailed as failed:
            if kwargs["as_json"]:
                click.echo(failed.summary.to_json())
            raise
        if kwargs["as_json"]:
            click.echo(summary.to_json())
        elif request.dry_run:
            _print_plan(summary)
        if not request.dry_run:
            click.echo(summary.describe(), err=True)

    command = with_database(run)
    for option in reversed(processor.cli_options):
        command = option(command)
    options = [
        click.option(
            "--index",
            type=click.IntRange(min=0),
            required=True,
            help="Job index: the row of the sample source (0-based).",
        ),
        click.option(
            "--sample-source",
            required=processor.uses_sample_source,
            metavar="PATH|URL",
            help="Layer with one row per job (.fgb/.gpkg/.geojson; path, https://, s3://).",
        ),
        click.option(
            "--target",
            required=True,
            metavar="DIR|s3://BUCKET[/PREFIX]",
            help="Where the assets and stac_item.json files are copied.",
        ),
        click.option(
            "--stac-api",
            default=processor.default_stac_api,
            show_default=True,
            metavar="URL",
            help="STAC API to search.",
        ),
        click.option(
            "--collection",
            default=processor.default_collection,
            show_default=True,
            help="STAC collection to search.",
        ),
        click.option(
            "--chip-size",
            type=click.IntRange(min=1),
            default=CHIP_SIZE,
            show_default=True,
            help="Chip size in pixels of the finest grid.",
        ),
        max_chips_option,
        click.option(
            "--sign/--no-sign",
            default=None,
            help="Sign Planetary Computer blob hrefs where they are read (default: on, "
            "unless $STACCHIP_SIGN=0); --no-sign if you have your own access.",
        ),
        click.option(
            "--dry-run",
            is_flag=True,
            help="Print the plan (sample, scenes, cloud cover); copy and write nothing.",
        ),
        click.option(
            "--json", "as_json", is_flag=True, help="Print the job summary as JSON on stdout."
        ),
    ]
    for option in reversed(options):
        command = option(command)
    doc = (processor.__doc__ or processor.name).strip().splitlines()[0]
    return click.command(name=processor.name, help=doc)(command)


for _processor in processors().values():
    ingest.add_command(_command(_processor))
