"""AWS Batch entrypoints: `stacchip-sentinel-2`, `stacchip-naip`, … (the original's names).

Each reads the original stacchip environment variables and runs `stacchip-db ingest <name>`:

| variable | meaning |
| --- | --- |
| `AWS_BATCH_JOB_ARRAY_INDEX` | the job index (row of the sample source); set by Batch array jobs |
| `STACCHIP_MGRS_SOURCE` (sentinel-2), `STACCHIP_SAMPLE_SOURCE` (the others) | samples |
| `STACCHIP_BUCKET` | target: a bucket name (`s3://NAME`), an `s3://` URL, or a local directory |
| `STACCHIP_DATABASE_URL` | the database (a PostgreSQL server; Batch has no embedded one) |

linz and modis read no sample source (the index picks a survey prefix / a tile).
Optional: `STACCHIP_STAC_API` overrides the processor's default API. A missing variable is a
one-line error naming it (exit 1); so is a processor that this stacchip-db does not have yet.

`array_job_shard` reads an array job's index and size (`AWS_BATCH_JOB_ARRAY_SIZE`) for
`stacchip-db prechip`, which writes that part of the cubes; this module is the one place
that reads Batch's variables.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping

import click

from stacchip_db.config import DATABASE_URL_ENV
from stacchip_db.errors import ConfigError, StacchipError

INDEX_ENV = "AWS_BATCH_JOB_ARRAY_INDEX"
ARRAY_SIZE_ENV = "AWS_BATCH_JOB_ARRAY_SIZE"
BUCKET_ENV = "STACCHIP_BUCKET"
STAC_API_ENV = "STACCHIP_STAC_API"


def _required(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise ConfigError(f"environment variable {name} is not set; set it in the job definition")
    return value


def target_from_bucket(value: str) -> str:
    """`STACCHIP_BUCKET` as a target: a bare bucket name means `s3://NAME`."""
    if value.startswith(("s3://", "/", ".")):
        return value
    return f"s3://{value}"


def array_job_shard(
    shard_count: int | None = None, environ: Mapping[str, str] | None = None
) -> tuple[int, int] | None:
    """`(index, count)` of this array job: `AWS_BATCH_JOB_ARRAY_INDEX`, and `shard_count` or
    else `AWS_BATCH_JOB_ARRAY_SIZE`; None outside an array job. The caller checks the range
    (`prechip.Shard.checked`)."""
    environ = os.environ if environ is None else environ
    index_text = environ.get(INDEX_ENV)
    if index_text is None:
        return None
    count_text = shard_count if shard_count is not None else environ.get(ARRAY_SIZE_ENV)
    if count_text is None:
        raise ConfigError(
            f"{INDEX_ENV} is set but the number of shards is not: pass `shard_count` N "
            f"or set {ARRAY_SIZE_ENV}"
        )
    try:
        return int(index_text), int(count_text)
    except ValueError as e:
        raise ConfigError(
            f"{INDEX_ENV}={index_text!r} / shard count {count_text!r} are not integers"
        ) from e


def batch_args(processor_name: str) -> list[str]:
    """The `stacchip-db` arguments for this Batch job, from the environment."""
    from stacchip_db.processors import get_processor

    processor = get_processor(processor_name)
    index_text = _required(INDEX_ENV)
    try:
        index = int(index_text)
    except ValueError as exc:
        raise ConfigError(f"{INDEX_ENV}={index_text!r} is not a whole number") from exc
    source = _required(processor.sample_source_env) if processor.uses_sample_source else None
    target = target_from_bucket(_required(BUCKET_ENV))
    _required(DATABASE_URL_ENV)  # read by the CLI itself; checked here to name it
    args = ["ingest", processor_name, "--index", str(index), "--target", target]
    if source is not None:
        args += ["--sample-source", source]
    if os.environ.get(STAC_API_ENV):
        args += ["--stac-api", os.environ[STAC_API_ENV]]
    return args


def run_batch(processor_name: str) -> None:
    """Run the processor's job for this array index; exits with the command's code."""
    from stacchip_db.cli import main

    try:
        args = batch_args(processor_name)
    except StacchipError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    main(args, prog_name=f"stacchip-{processor_name}")


def _entrypoint(processor_name: str) -> Callable[[], None]:
    def entrypoint() -> None:
        run_batch(processor_name)

    entrypoint.__name__ = processor_name.replace("-", "_")
    entrypoint.__doc__ = f"Batch entrypoint of the {processor_name} processor."
    return entrypoint


sentinel_2 = _entrypoint("sentinel-2")
landsat = _entrypoint("landsat")
naip = _entrypoint("naip")
linz = _entrypoint("linz")
sentinel_1 = _entrypoint("sentinel-1")
modis = _entrypoint("modis")
