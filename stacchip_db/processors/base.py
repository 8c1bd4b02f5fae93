"""What every processor does, written once: plan -> copy -> index -> store, and the job log.

A processor (one small module per sensor) only states its rules: default STAC API and
collection, which assets to keep, the quality rule, and `plan()` — which scenes to take for a
sample. `run_job` does the rest for all of them:

1. read the sample (row `index` of the sample source) and search the STAC API (`plan`);
2. for each chosen scene: keep the processor's assets, copy them to
   `{target}/{collection}/{item_id}/{file name}` (skipping copies already there), rewrite the
   hrefs, write `{collection}/{item_id}/stac_item.json` beside them;
3. index the item (`index_item` with the processor's quality rule, reading the copied band) and
   store item + chips in one transaction (`store_item`).

Idempotent and resumable: copies of the right size are skipped, `store_item` upserts the item
and replaces its chips, and the job's row in `stacchip.jobs` (key processor, sample source,
job index) is updated, not duplicated: running -> succeeded | failed, with the scenes, the
time per phase and the error. A crash at any point leaves a state the next run completes.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import click
import psycopg
import pystac
from pystac.utils import is_absolute_href
from pystac_client import Client

from stacchip_db import storage
from stacchip_db.db import Database, translate_errors
from stacchip_db.db.items import check_ids
from stacchip_db.db.store import store_item
from stacchip_db.errors import DatabaseUnavailable, StacchipError, item_failure_line
from stacchip_db.grid import CHIP_SIZE, MAX_CHIPS
from stacchip_db.index import MAX_NODATA, index_item
from stacchip_db.quality import QualityRule, profile_rule
from stacchip_db.samples import Sample, read_sample
from stacchip_db.sensors import Profile
from stacchip_db.signing import signing_as
from stacchip_db.stac_api import open_api
from stacchip_db.text import first_line

log = logging.getLogger(__name__)

ITEM_FILE = "stac_item.json"
"""Name of the rewritten item beside its copied assets (the original stacchip's layout)."""
COPY_THREADS = 8
"""Assets of one scene copied at once (S3 and HTTP copies wait on the network, not the CPU)."""
PHASES = ("search", "copy", "index", "store")
"""Timed phases of a job; `index` includes reading the quality band."""


class ProcessorError(StacchipError):
    """A scene or its assets do not fit the processor's rules."""


class ScenesFailed(StacchipError):
    """Some scenes of a job could not be ingested; the others were (each scene's `error`)."""


class JobFailed(StacchipError):
    """A job stopped on an error; `summary` is what it did before (as recorded)."""

    def __init__(self, summary: JobSummary) -> None:
        super().__init__(f"{summary.processor} job {summary.job_index} failed: {summary.error}")
        self.summary = summary


# -- what a processor states ------------------------------------------------------------------


YEARS = range(2018, 2024)
"""The years the original processors drew scenes from (2018-2023)."""

QUARTERS = (("01-01", "03-31"), ("04-01", "06-30"), ("07-01", "09-30"), ("10-01", "12-31"))
"""(first day, last day) of each calendar quarter, as `MM-DD` for STAC datetime intervals."""

MAX_CLOUD_COVER = 75.0
"""Default cloud limit in percent (eo:cloud_cover); the original compared it with 0.75."""

max_cloud_cover_option = click.option(
    "--max-cloud-cover",
    type=click.FloatRange(0, 100),
    default=MAX_CLOUD_COVER,
    show_default=True,
    help="Skip a quarter's least cloudy scene above this eo:cloud_cover (percent).",
)
"""The cloud limit option of the processors that pick the least cloudy scene per quarter."""


@dataclass(frozen=True)
class JobRequest:
    """One job: which sample, from where, into where. `options` are the processor's own."""

    index: int
    sample_source: str
    target: str
    stac_api: str
    collection: str
    chip_size: int = CHIP_SIZE
    max_chips: int | None = MAX_CHIPS
    """Bound on the chips of one scene (`grid.chip_grid`); None: no bound."""
    sign: bool | None = None
    dry_run: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scene:
    """A scene the plan chose, and why (`label`: "2019 Q2", "latest", …)."""

    item: pystac.Item
    label: str

    @property
    def cloud_cover(self) -> float | None:
        value = self.item.properties.get("eo:cloud_cover")
        return None if value is None else float(value)


@dataclass(frozen=True)
class PlanContext:
    """What `Processor.plan` gets: the request, the sample row and an open STAC API client."""

    request: JobRequest
    sample: Sample | None
    """None for a processor that does not read a sample source (`uses_sample_source`)."""
    client: Client | None
    """None for a processor that does not search a STAC API (`searches_stac_api`)."""

    @property
    def options(self) -> dict[str, Any]:
        return self.request.options


class Processor:
    """Rules of one sensor. Subclasses set the class attributes and implement `plan`.

    A subclass that sets `profile` (its catalog's layout in the sensor registry) gets its
    `assets` and `quality` rule from it, unless it sets them itself.

    `cli_options` are click option decorators for the processor's own options; their values
    reach `plan` as `context.options[name]`.
    """

    name: ClassVar[str]
    default_stac_api: ClassVar[str]
    default_collection: ClassVar[str]
    profile: ClassVar[Profile]
    assets: ClassVar[tuple[str, ...]]
    quality: ClassVar[QualityRule]
    max_nodata: ClassVar[float] = MAX_NODATA
    requester_pays: ClassVar[bool] = False
    """Whether the source bucket charges the requester (S3 sources only)."""
    sample_source_env: ClassVar[str] = "STACCHIP_SAMPLE_SOURCE"
    """Environment variable the Batch entrypoint reads the sample source from."""
    uses_sample_source: ClassVar[bool] = True
    """False when the job index alone picks the work (LINZ: a prefix of its source bucket)."""
    searches_stac_api: ClassVar[bool] = True
    """False when `plan` reads its items elsewhere (LINZ: JSON beside each object in S3)."""
    cli_options: ClassVar[tuple[Callable[[Any], Any], ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        profile = cls.__dict__.get("profile")
        if profile is not None:  # the registry's facts, not a copy of them in each processor
            if "assets" not in cls.__dict__:
                cls.assets = profile.layout.assets
            if "quality" not in cls.__dict__:
                cls.quality = profile_rule(profile)

    def plan(self, context: PlanContext) -> list[Scene]:
        """The scenes to ingest for `context.sample`, in order."""
        raise NotImplementedError

    def assets_for(self, item: pystac.Item) -> tuple[str, ...]:
        """The asset keys to keep of `item` (Landsat: L1 and L2 scenes keep different ones)."""
        return self.assets

    def quality_rule(self, item: dict[str, Any]) -> QualityRule:
        """The rule indexing the stored `item` (Sentinel-1: nodata value read from the item)."""
        return self.quality

    def job_source(self, request: JobRequest) -> str:
        """What the job reads, recorded in `stacchip.jobs.sample_source` (part of its key)."""
        return request.sample_source

    def prepare(self, item: dict[str, Any], folder: str, report: SceneReport) -> dict[str, Any]:
        """Put the scene's assets into `folder` and return the item to store, its hrefs
        pointing there. Default: copy every asset unchanged. Processors that change pixels
        (re-encode, reproject, resample) override it; see `processors.derived`.
        """
        _copy_assets(self, item, folder, report)
        return item

    def source_href(self, item: pystac.Item, key: str) -> str:
        """Where to copy asset `key` from (Landsat: `alternate.s3.href`)."""
        asset = item.assets[key]
        # An absolute local path stays a path (pystac would resolve it against the API's URL).
        if is_absolute_href(asset.href):
            return asset.href
        return asset.get_absolute_href() or asset.href


# -- the job record ---------------------------------------------------------------------------


@dataclass
class SceneReport:
    """What happened to one scene (an entry of `stacchip.jobs.scenes`)."""

    id: str
    collection: str
    label: str
    datetime: str | None
    cloud_cover: float | None
    status: str = "planned"
    chips: int | None = None
    copied_bytes: int = 0
    copied_objects: int = 0
    skipped_objects: int = 0
    href: str | None = None
    error: str | None = None
    """Why the scene failed (status `failed`): one line naming the item."""


@dataclass
class JobSummary:
    """The job as recorded in `stacchip.jobs` and printed by `--json`."""

    processor: str
    job_index: int
    sample_source: str
    target: str
    stac_api: str
    status: str
    sample: dict[str, Any]
    scenes: list[SceneReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str)

    @property
    def chips(self) -> int:
        return sum(scene.chips or 0 for scene in self.scenes)

    def describe(self) -> str:
        """One line for stderr."""
        stored = sum(scene.status == "stored" for scene in self.scenes)
        times = ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items())
        text = (
            f"{self.processor} job {self.job_index}: {self.status}, {stored}/{len(self.scenes)} "
            f"scenes stored, {self.chips} chips ({times})"
        )
        return f"{text}: {self.error}" if self.error else text


def _record_start(db: Database, summary: JobSummary) -> None:
    with db.connect(autocommit=True) as conn, translate_errors("recording the job start"):
        conn.execute(
            """
            INSERT INTO stacchip.jobs
                (processor, sample_source, job_index, target, status, host, started_at)
            VALUES (%s, %s, %s, %s, 'running', %s, now())
            ON CONFLICT (processor, sample_source, job_index) DO UPDATE SET
                target = EXCLUDED.target, status = 'running', host = EXCLUDED.host,
                attempts = jobs.attempts + 1, started_at = now(), finished_at = NULL,
                error = NULL
            """,
            (
                summary.processor,
                summary.sample_source,
                summary.job_index,
                summary.target,
                socket.gethostname(),
            ),
        )


def _record_finish(db: Database, summary: JobSummary) -> None:
    scenes = json.dumps([asdict(scene) for scene in summary.scenes], default=str)
    with db.connect(autocommit=True) as conn, translate_errors("recording the job result"):
        conn.execute(
            """
            UPDATE stacchip.jobs SET status = %s, scenes = %s::jsonb, timings = %s::jsonb,
                error = %s, finished_at = now()
            WHERE processor = %s AND sample_source = %s AND job_index = %s
            """,
            (
                summary.status,
                scenes,
                json.dumps(summary.timings),
                summary.error,
                summary.processor,
                summary.sample_source,
                summary.job_index,
            ),
        )


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start


# -- the run ----------------------------------------------------------------------------------


def run_job(processor: Processor, request: JobRequest, db: Database | None) -> JobSummary:
    """Run one job; returns its summary. The first error is recorded, then raised (a
    `StacchipError` as `JobFailed`, carrying the summary).

    With `request.dry_run` (and then `db` may be None) only the plan is made. Planetary
    Computer hrefs are signed where they are read (`signing`); `request.sign` False turns
    that off for the job, None leaves it to `$STACCHIP_SIGN`.
    """
    with signing_as(request.sign):
        return _run_job(processor, request, db)


def _run_job(processor: Processor, request: JobRequest, db: Database | None) -> JobSummary:
    summary = JobSummary(
        processor=processor.name,
        job_index=request.index,
        sample_source=processor.job_source(request),
        target=request.target,
        stac_api=request.stac_api,
        status="planned" if request.dry_run else "running",
        sample={},
    )
    if not request.dry_run:
        if db is None:
            raise ValueError("run_job needs a database unless it is a dry run")
        _record_start(db, summary)
    try:
        scenes = _plan(processor, request, summary)
        if request.dry_run:
            return summary
        failed: list[SceneReport] = []
        for number, scene in enumerate(scenes, 1):
            report = summary.scenes[number - 1]
            try:
                _ingest_scene(processor, request, scene, report, summary.timings, db)  # type: ignore[arg-type]
            except DatabaseUnavailable:  # every later scene would fail the same way
                raise
            except Exception as exc:  # one bad scene, whatever it raises, spares the others
                report.status = "failed"
                report.error = item_failure_line(exc, report.id)
                failed.append(report)
                log.warning(
                    "%s job %d: scene %d/%d %s (%s) failed, the job goes on: %s",
                    processor.name, request.index, number, len(scenes), report.id,
                    report.label, report.error,
                )  # fmt: skip
                continue
            log.info(
                "%s job %d: scene %d/%d %s (%s) stored, %d chips, %d objects copied, %d present",
                processor.name,
                request.index,
                number,
                len(scenes),
                report.id,
                report.label,
                report.chips or 0,
                report.copied_objects,
                report.skipped_objects,
            )
        if failed:
            raise ScenesFailed(
                f"{len(failed)} of {len(scenes)} scenes failed (the others are stored): "
                f"{failed[0].error}" + (" …" if len(failed) > 1 else "")
            )
        summary.status = "succeeded"
    except BaseException as exc:
        if request.dry_run:
            raise
        summary.status = "failed"
        summary.error = first_line(exc)
        _record_finish(db, summary)  # type: ignore[arg-type]
        if isinstance(exc, StacchipError):
            raise JobFailed(summary) from exc
        raise
    _record_finish(db, summary)  # type: ignore[arg-type]
    return summary


def _plan(processor: Processor, request: JobRequest, summary: JobSummary) -> list[Scene]:
    with _timed(summary.timings, "search"):
        sample = None
        if processor.uses_sample_source:
            sample = read_sample(request.sample_source, request.index)
            summary.sample = {"geometry": sample.geometry.wkt[:200], **sample.attributes}
        client = None
        if processor.searches_stac_api:
            client = open_api(request.stac_api)
        scenes = processor.plan(PlanContext(request=request, sample=sample, client=client))
    for scene in scenes:
        summary.scenes.append(
            SceneReport(
                id=scene.item.id,
                collection=scene.item.collection_id or request.collection,
                label=scene.label,
                datetime=scene.item.properties.get("datetime"),
                cloud_cover=scene.cloud_cover,
            )
        )
    log.info(
        "%s job %d: %d scenes planned: %s",
        processor.name,
        request.index,
        len(scenes),
        ", ".join(f"{s.label} {s.item.id}" for s in scenes) or "none",
    )
    return scenes


def scene_item(processor: Processor, scene: Scene, request: JobRequest) -> dict[str, Any]:
    """The item dict to copy and store: only the processor's assets, absolute source hrefs."""
    item = scene.item
    keys = processor.assets_for(item)
    missing = [key for key in keys if key not in item.assets]
    if missing:
        raise ProcessorError(
            f"item {item.id} has no asset {', '.join(repr(k) for k in missing)} that the "
            f"{processor.name} processor needs (it has {', '.join(sorted(item.assets))})"
        )
    data = item.to_dict(include_self_link=False, transform_hrefs=False)
    data["collection"] = item.collection_id or request.collection
    data["assets"] = {key: dict(data["assets"][key]) for key in keys}
    for key in keys:
        data["assets"][key]["href"] = processor.source_href(item, key)
    # Links to the source API's catalog mean nothing next to the copies.
    data["links"] = [
        link
        for link in data.get("links", [])
        if link.get("rel") not in ("self", "root", "parent", "collection")
    ]
    return data


def asset_path(folder: str, href: str) -> str:
    """Where an asset is copied: `{folder}/{file name of href}`, the name checked to be one
    segment (`paths.check_name`), so no href of a remote API can write outside `folder`."""
    return storage.under(folder, storage.file_name(href), what="asset file name")


def _ingest_scene(
    processor: Processor,
    request: JobRequest,
    scene: Scene,
    report: SceneReport,
    timings: dict[str, float],
    db: Database,
) -> None:
    item = scene_item(processor, scene, request)
    check_ids(item["collection"], item["id"])  # folder names: refused before any copy
    folder = storage.under(request.target, item["collection"], item["id"])
    with _timed(timings, "copy"):
        item = processor.prepare(item, folder, report)
        item_href = storage.under(folder, ITEM_FILE)
        storage.write_text(item_href, json.dumps(item, indent=2))
        report.href = item_href
    with _timed(timings, "index"):
        chips = index_item(
            item,
            quality=processor.quality_rule(item),
            chip_size=request.chip_size,
            max_nodata=processor.max_nodata,
            max_chips=request.max_chips,
        )
    with _timed(timings, "store"), db.connect(autocommit=True) as conn:
        store_item(conn, item, chips, chip_size=request.chip_size)
        _fill_layers(conn, item)
    report.chips = chips.num_rows
    report.status = "stored"


def _fill_layers(conn: psycopg.Connection, item: dict[str, Any]) -> None:
    """The scene's class fractions in every raster layer (`layers.fill_fractions`), a step
    after storing; a failure is a warning (`stacchip-db layer refresh` computes them later)."""
    from stacchip_db.layers import fill_fractions

    try:
        for summary in fill_fractions(conn, items=[(item["collection"], item["id"])]):
            log.info("%s", summary.describe())
    except StacchipError as exc:
        log.warning("class fractions of %s not computed: %s", item["id"], exc)


def _copy_assets(
    processor: Processor, item: dict[str, Any], folder: str, report: SceneReport
) -> None:
    """Copy every asset into `folder` (in parallel) and point its href at the copy."""
    jobs = {
        key: (asset["href"], asset_path(folder, asset["href"]))
        for key, asset in item["assets"].items()
    }
    with ThreadPoolExecutor(max_workers=min(COPY_THREADS, len(jobs) or 1)) as pool:
        results = dict(
            zip(
                jobs,
                pool.map(
                    lambda pair: storage.copy_object(
                        pair[0], pair[1], requester_pays=processor.requester_pays
                    ),
                    jobs.values(),
                ),
                strict=True,
            )
        )
    for key, result in results.items():
        item["assets"][key]["href"] = result.destination
        if result.copied:
            report.copied_objects += 1
            report.copied_bytes += result.size
        else:
            report.skipped_objects += 1
