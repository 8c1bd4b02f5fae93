"""The Batch entrypoints (`stacchip-sentinel-2`, …): environment in, `ingest` run, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import psycopg
import pytest

from stacchip_db.batch import array_job_shard
from stacchip_db.demo import s2_sample_rows, write_sample_source
from stacchip_db.errors import ConfigError
from stacchip_db.processors import processors

ENTRYPOINTS = ["sentinel-2", "landsat", "naip", "linz", "sentinel-1", "modis"]
BIN = Path(sys.executable).parent


def run_entrypoint(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STACCHIP_")}
    clean.pop("AWS_BATCH_JOB_ARRAY_INDEX", None)
    clean.update(env)
    return subprocess.run(
        [str(BIN / f"stacchip-{name}")], env=clean, capture_output=True, text=True, timeout=300
    )


def test_entrypoints_are_installed():
    for name in ENTRYPOINTS:
        assert (BIN / f"stacchip-{name}").exists(), name


def test_sentinel_2_array_job_into_a_bucket(database_url, stac_api, s3_server, tmp_path):
    bucket = s3_server.new_bucket("batch")
    source = write_sample_source(tmp_path / "mgrs.geojson", s2_sample_rows(3))
    boto3.client("s3").upload_file(str(source), bucket, "mgrs.geojson")
    result = run_entrypoint(
        "sentinel-2",
        {
            "AWS_BATCH_JOB_ARRAY_INDEX": "2",
            "STACCHIP_MGRS_SOURCE": f"s3://{bucket}/mgrs.geojson",
            "STACCHIP_BUCKET": bucket,
            "STACCHIP_DATABASE_URL": database_url,
            "STACCHIP_STAC_API": stac_api.url,
        },
    )
    assert result.returncode == 0, result.stderr
    assert "sentinel-2 job 2: succeeded, 8/8 scenes stored" in result.stderr
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="sentinel-2-l2a/")
    assert sum(o["Key"].endswith("stac_item.json") for o in listed["Contents"]) == 8
    with psycopg.connect(database_url) as conn:
        job = conn.execute(
            "SELECT processor, job_index, sample_source, target, status FROM stacchip.jobs"
        ).fetchall()
    assert job == [("sentinel-2", 2, f"s3://{bucket}/mgrs.geojson", f"s3://{bucket}", "succeeded")]


@pytest.mark.parametrize(
    "missing",
    [
        "AWS_BATCH_JOB_ARRAY_INDEX",
        "STACCHIP_MGRS_SOURCE",
        "STACCHIP_BUCKET",
        "STACCHIP_DATABASE_URL",
    ],
)
def test_a_missing_variable_is_named(missing, tmp_path):
    env = {
        "AWS_BATCH_JOB_ARRAY_INDEX": "0",
        "STACCHIP_MGRS_SOURCE": str(tmp_path / "mgrs.geojson"),
        "STACCHIP_BUCKET": "bucket",
        "STACCHIP_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
    }
    del env[missing]
    result = run_entrypoint("sentinel-2", env)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"Error: environment variable {missing} is not set; set it in the job definition"
    )


def test_naip_reads_the_sample_source_variable():
    result = run_entrypoint("naip", {"AWS_BATCH_JOB_ARRAY_INDEX": "0"})
    assert result.returncode == 1
    assert "STACCHIP_SAMPLE_SOURCE is not set" in result.stderr


def test_processors_not_written_yet_say_so():
    available = processors()
    for name in ENTRYPOINTS:
        if name in available:
            continue
        result = run_entrypoint(name, {"AWS_BATCH_JOB_ARRAY_INDEX": "0"})
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"processor {name} is not available" in lines[0], lines


def test_bad_index_is_one_line(tmp_path):
    result = run_entrypoint("sentinel-2", {"AWS_BATCH_JOB_ARRAY_INDEX": "first"})
    assert result.returncode == 1
    assert "AWS_BATCH_JOB_ARRAY_INDEX='first' is not a whole number" in result.stderr


def test_array_job_shard_comes_from_the_environment():
    assert array_job_shard(None, {}) is None
    job = {"AWS_BATCH_JOB_ARRAY_INDEX": "3"}
    assert array_job_shard(None, {**job, "AWS_BATCH_JOB_ARRAY_SIZE": "8"}) == (3, 8)
    assert array_job_shard(4, {**job, "AWS_BATCH_JOB_ARRAY_SIZE": "8"}) == (3, 4)
    with pytest.raises(ConfigError, match="AWS_BATCH_JOB_ARRAY_SIZE"):
        array_job_shard(None, job)
    with pytest.raises(ConfigError, match="'x' / shard count 2 are not integers"):
        array_job_shard(2, {"AWS_BATCH_JOB_ARRAY_INDEX": "x"})


def test_summary_is_json_friendly():
    # The recorded summary is the --json output: plain JSON types only.
    from stacchip_db.processors.base import JobSummary, SceneReport

    summary = JobSummary(
        "naip",
        0,
        "s",
        "t",
        "u",
        "succeeded",
        {"name": 1},
        [SceneReport("a", "naip", "latest", None, None)],
    )
    assert json.loads(summary.to_json())["scenes"][0]["id"] == "a"
