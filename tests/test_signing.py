"""Planetary Computer signing where pixels are read: a loopback token API and blob storage
that refuses requests without the token (tests/pc_server.py), real COGs, a real database."""

from __future__ import annotations

import json
import multiprocessing
import operator
import threading
from pathlib import Path

import numpy as np
import psycopg
import pyarrow.parquet as pq
import pytest

from stacchip_db import storage
from stacchip_db.config import mask_url
from stacchip_db.dataset import ChipDataset
from stacchip_db.db.store import store_item
from stacchip_db.errors import ConfigError
from stacchip_db.index import index_item
from stacchip_db.processors.derived import open_source
from stacchip_db.reader import ChipReadError, read_item_chips
from stacchip_db.signing import (
    SIGN_ENV,
    TOKEN_RETRIES,
    SigningError,
    forget_tokens,
    sign_href,
    signing_as,
)
from stacchip_db.synthetic import synthesize_item
from tests.conftest import FIXTURES, error_line, run_cli

PC_S2 = FIXTURES / "catalogs" / "planetary-computer-sentinel-2-l2a.ndjson"
PC_LANDSAT = FIXTURES / "catalogs" / "planetary-computer-landsat-c2-l2.ndjson"
S2_CONTAINER = ("sentinel2l2a01", "sentinel2-l2")
LANDSAT_CONTAINER = ("landsateuwest", "landsat-c2")
CHIP = 64  # scale 20: the S2 scene is 549 px at 10 m, an 8 x 8 grid
BANDS = ["B04", "B03", "B02", "B08", "B11"]  # 10 m and 20 m assets
ALL = "SELECT collection, item_id, chip_size, chip_index_x, chip_index_y FROM stacchip.chips"


def first_item(path: Path) -> dict:
    return json.loads(path.read_text().splitlines()[0])


@pytest.fixture(scope="module")
def local_scenes(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[dict, dict]]:
    """(synthetic item with local COGs, the real Planetary Computer item it copies): one
    Sentinel-2 L2A and one Landsat C2 L2 scene, in two different blob containers."""
    s2, landsat = first_item(PC_S2), first_item(PC_LANDSAT)
    return [
        (synthesize_item(s2, tmp_path_factory.mktemp("s2"), [*BANDS, "SCL"], scale=20), s2),
        (
            synthesize_item(
                landsat, tmp_path_factory.mktemp("ls"), ["red", "green", "qa_pixel"], scale=20
            ),
            landsat,
        ),
    ]


@pytest.fixture
def pc_items(blob_server, local_scenes) -> list[dict]:
    """The scenes with their real blob hrefs, served by the loopback blob server."""
    return [blob_server.publish(local, real) for local, real in local_scenes]


def store_s2(database_url: str, local_scenes, pc_items) -> tuple[dict, list[tuple[int, int]]]:
    """The S2 blob item stored with the chips of its local copy (no token needed to index)."""
    local, _ = local_scenes[0]
    chips = index_item(local, chip_size=CHIP)
    with psycopg.connect(database_url, autocommit=True) as conn:
        store_item(conn, pc_items[0], chips, chip_size=CHIP)
    xs, ys = chips["chip_index_x"].to_pylist(), chips["chip_index_y"].to_pylist()
    xy = list(zip(xs, ys, strict=True))
    return local, xy


def expected_pixels(local: dict, xy: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    got = read_item_chips(local, xy, BANDS, chip_size=CHIP, dtype=np.float32)
    assert got.ok.all()
    return dict(zip(xy, got.pixels, strict=True))


def test_sign_href_appends_one_cached_token_per_container(
    sas_token_server, local_scenes, monkeypatch
) -> None:
    token = sas_token_server.token
    hrefs = [
        asset["href"]
        for _, real in local_scenes
        for asset in real["assets"].values()
        if ".blob.core.windows.net/" in asset["href"] and "ai4edatasets" not in asset["href"]
    ]
    assert len(hrefs) > 20
    for _ in range(2):
        assert [sign_href(h) for h in hrefs] == [f"{h}?{token}" for h in hrefs]
    assert sas_token_server.requests == [S2_CONTAINER, LANDSAT_CONTAINER]

    blob = hrefs[0]
    unchanged = [
        f"{blob}?{token}",  # signed already
        "https://ai4edatasetspublicassets.blob.core.windows.net/assets/pc_thumbnails/x.png",
        "https://example.com/x.tif",
        "s3://bucket/x.tif",
        "/data/x.tif",
    ]
    assert [sign_href(h) for h in unchanged] == unchanged
    assert sign_href(f"/vsicurl/{blob}") == f"/vsicurl/{blob}?{token}"
    # What the CLI prints and logs hides the signature.
    assert mask_url(f"cannot read '/vsicurl/{blob}?{token}'") == (
        f"cannot read '/vsicurl/{blob}?{token.replace(sas_token_server.signature, '***')}'"
    )
    assert sign_href(blob, sign=False) == blob
    with signing_as(False):
        assert sign_href(blob) == blob
    assert sign_href(blob) != blob  # restored after the block
    for off in ("0", "off", "false"):
        monkeypatch.setenv(SIGN_ENV, off)
        assert sign_href(blob) == blob
    assert sign_href(blob, sign=True) == f"{blob}?{token}"
    monkeypatch.setenv(SIGN_ENV, "maybe")
    with pytest.raises(ConfigError, match=SIGN_ENV):
        sign_href(blob)

    # Many reader threads opening their first asset at once ask for one token.
    monkeypatch.delenv(SIGN_ENV)
    forget_tokens()
    before = len(sas_token_server.requests)
    threads = [threading.Thread(target=sign_href, args=(blob,)) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(sas_token_server.requests) == before + 1


def test_index_reads_the_quality_band_only_signed(
    database_url, blob_server, sas_token_server, local_scenes, pc_items, tmp_path
) -> None:
    source = tmp_path / "items.ndjson"
    source.write_text("".join(json.dumps(item) + "\n" for item in pc_items))
    # Both items' quality bands are read by `auto` (PC Sentinel-2's `SCL`, Landsat's
    # `qa_pixel`): unsigned, the blob server refuses both and nothing is stored.
    refused = run_cli(
        ["index", "--no-sign", str(source), "--chip-size", str(CHIP)], database_url=database_url
    )
    assert refused.exit_code == 1, refused.output
    failed = [line for line in refused.stderr.splitlines() if line.startswith("Error: ")]
    assert len(failed) == len(pc_items), failed
    for line, item in zip(failed, pc_items, strict=True):
        assert item["id"] in line and "403" in line, line
    assert blob_server.refused() and not blob_server.served()
    assert sas_token_server.requests == []

    result = run_cli(["index", str(source), "--chip-size", str(CHIP)], database_url=database_url)
    assert result.exit_code == 0, result.output
    assert sorted(sas_token_server.requests) == sorted([S2_CONTAINER, LANDSAT_CONTAINER])
    assert {url for _, url, _ in blob_server.served()} == {
        pc_items[0]["assets"]["SCL"]["href"],
        pc_items[1]["assets"]["qa_pixel"]["href"],
    }
    with psycopg.connect(database_url) as conn:
        for (local, _), item in zip(local_scenes, pc_items, strict=True):
            stored = conn.execute(
                "SELECT chip_index_x, chip_index_y, cloud_fraction, nodata_fraction "
                "FROM stacchip.chips WHERE item_id = %s ORDER BY chip_index_y, chip_index_x",
                (item["id"],),
            ).fetchall()
            chips = index_item(local, chip_size=CHIP)
            expected = list(
                zip(
                    chips["chip_index_x"].to_pylist(),
                    chips["chip_index_y"].to_pylist(),
                    chips["cloud_fraction"].to_pylist(),
                    chips["nodata_fraction"].to_pylist(),
                    strict=True,
                )
            )
            assert [x[:2] for x in stored] == [x[:2] for x in expected]
            np.testing.assert_allclose(
                [x[2:] for x in stored], [x[2:] for x in expected], atol=1e-6
            )
            assert len(stored) > 10


def test_prechip_reads_only_signed_once_per_container_also_in_workers(
    database_url, blob_server, sas_token_server, local_scenes, pc_items, tmp_path
) -> None:
    local, xy = store_s2(database_url, local_scenes, pc_items)
    expected = expected_pixels(local, xy)
    collection = pc_items[0]["collection"]
    bands = ",".join(BANDS)

    def prechip(out: Path, *extra: str):
        args = ["prechip", "--query", ALL, "--out", str(out), "--bands", bands, *extra]
        return run_cli([*args, "--cube-size", "16", "--keep-partial"], database_url=database_url)

    def check(out: Path) -> None:
        rows = pq.read_table(out / collection / "manifest.parquet").to_pylist()
        assert len(rows) == len(xy)
        cubes: dict[int, np.ndarray] = {}
        for row in rows:
            if row["cube"] not in cubes:
                cubes[row["cube"]] = np.load(out / collection / f"cube_{row['cube']}.npz")["pixels"]
            got = cubes[row["cube"]][row["row"]]
            np.testing.assert_array_equal(got, expected[row["chip_index_x"], row["chip_index_y"]])

    result = prechip(tmp_path / "signed")
    assert result.exit_code == 0, result.output
    check(tmp_path / "signed")
    assert sas_token_server.requests == [S2_CONTAINER]  # 64 chips x 5 assets, 32 threads
    assert not blob_server.refused()

    unsigned = prechip(tmp_path / "unsigned", "--no-sign")
    assert unsigned.exit_code == 3, unsigned.output
    assert "wrote 0 chips" in unsigned.stdout and "could not be read" in unsigned.stdout
    assert blob_server.refused()
    assert sas_token_server.requests == [S2_CONTAINER]

    # Forked workers start without a token: each asks once, whatever the number of chips.
    forget_tokens()
    workers = prechip(tmp_path / "workers", "--jobs", "2")
    assert workers.exit_code == 0, workers.output
    check(tmp_path / "workers")
    assert 2 <= len(sas_token_server.requests) <= 3
    assert set(sas_token_server.requests) == {S2_CONTAINER}


def test_chip_dataset_signs_in_its_process_and_in_spawned_workers(
    database_url, blob_server, sas_token_server, local_scenes, pc_items
) -> None:
    local, xy = store_s2(database_url, local_scenes, pc_items)
    expected = expected_pixels(local, xy)
    ds = ChipDataset(ALL, database_url=database_url, bands=BANDS)
    assert len(ds) == len(xy)
    for i in range(len(ds)):
        chip = ds[i]
        np.testing.assert_array_equal(
            chip["pixels"], expected[chip["chip_index_x"], chip["chip_index_y"]]
        )
    assert sas_token_server.requests == [S2_CONTAINER]

    # A DataLoader's workers get the pickled dataset; spawned ones have no token yet.
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        chips = pool.starmap(operator.getitem, [(ds, i) for i in range(0, len(ds), 3)])
    for chip in chips:
        np.testing.assert_array_equal(
            chip["pixels"], expected[chip["chip_index_x"], chip["chip_index_y"]]
        )
    assert 2 <= len(sas_token_server.requests) <= 3
    assert not blob_server.refused()

    unsigned = ChipDataset(ALL, database_url=database_url, bands=BANDS, sign=False)
    # (No new request need reach the server: GDAL's /vsicurl/ cache may remember the 403.)
    with pytest.raises(ChipReadError, match=r"blob\.core\.windows\.net"):
        unsigned[0]


def test_failing_token_service_is_one_line_naming_the_container(
    database_url, blob_server, sas_token_server, local_scenes, pc_items, tmp_path
) -> None:
    store_s2(database_url, local_scenes, pc_items)
    sas_token_server.fail_status = 403
    out = str(tmp_path / "out")
    args = ["prechip", "--query", ALL, "--out", out, "--bands", ",".join(BANDS), "--keep-partial"]
    result = run_cli(args, database_url=database_url)
    line = error_line(result)
    assert "Planetary Computer SAS token" in line
    assert "account 'sentinel2l2a01', container 'sentinel2-l2'" in line
    assert f"{SIGN_ENV}=0" in line and "PC_SDK_SUBSCRIPTION_KEY" in line
    # 403 is not retried, and the failure is remembered: 32 reader threads asked once.
    assert sas_token_server.requests == [S2_CONTAINER]
    assert not blob_server.served()

    # A service that is down is retried a bounded number of times, then named the same way.
    forget_tokens()
    sas_token_server.requests.clear()
    sas_token_server.fail_status = 503
    with pytest.raises(SigningError, match="container 'sentinel2-l2'"):
        sign_href(pc_items[0]["assets"]["B04"]["href"])
    assert sas_token_server.requests == [S2_CONTAINER] * (1 + TOKEN_RETRIES)


def test_processor_copies_and_sources_are_signed(
    blob_server, sas_token_server, local_scenes, pc_items, tmp_path
) -> None:
    href = pc_items[0]["assets"]["B04"]["href"]
    local = Path(local_scenes[0][0]["assets"]["B04"]["href"])
    copied = storage.copy_object(href, str(tmp_path / "B04.tif"))
    assert copied.copied and copied.source == href  # reported without the token
    assert (tmp_path / "B04.tif").read_bytes() == local.read_bytes()
    with open_source(pc_items[0]["assets"]["B11"]["href"]) as dataset:
        assert dataset.read(1).shape == (dataset.height, dataset.width)
    assert sas_token_server.requests == [S2_CONTAINER]
    with signing_as(False), pytest.raises(storage.StorageError, match="HTTP 403"):
        storage.copy_object(href, str(tmp_path / "again.tif"))
