"""storage: copies between local paths, a real S3 server (moto) and a loopback HTTP server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

from stacchip_db import storage
from stacchip_db.storage import ObjectMissing, StorageError, copy_object

DATA = bytes(range(256)) * 4096  # 1 MiB


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/truncated.bin":  # promises more than it sends, then hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.end_headers()
            self.wfile.write(DATA[:1000])
            self.wfile.flush()
            self.connection.close()
            return
        super().do_GET()

    def do_HEAD(self) -> None:
        if self.path == "/truncated.bin":
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.end_headers()
            return
        super().do_HEAD()


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_local_copy_skips_an_identical_size_and_leaves_no_temp_file(tmp_path):
    source = tmp_path / "a.tif"
    source.write_bytes(DATA)
    destination = tmp_path / "out" / "deep" / "a.tif"
    first = copy_object(str(source), str(destination))
    assert first.copied and first.size == len(DATA) and destination.read_bytes() == DATA
    second = copy_object(str(source), str(destination))
    assert not second.copied
    destination.write_bytes(b"short")  # a different size is copied again
    assert copy_object(str(source), str(destination)).copied
    assert destination.read_bytes() == DATA
    assert [p.name for p in destination.parent.iterdir()] == ["a.tif"]


def test_missing_source_is_one_line(tmp_path):
    with pytest.raises(ObjectMissing) as info:
        copy_object(str(tmp_path / "gone.tif"), str(tmp_path / "x.tif"))
    assert "gone.tif does not exist" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "x.tif").exists()


def test_s3_round_trip_and_server_side_copy_from_requester_pays(s3_server, tmp_path):
    source_bucket = s3_server.new_bucket("pays", requester_pays=True)
    target_bucket = s3_server.new_bucket("target")
    local = tmp_path / "a.tif"
    local.write_bytes(DATA)
    up = copy_object(str(local), f"s3://{source_bucket}/scenes/a.tif")
    assert up.copied
    s3_copy = copy_object(
        f"s3://{source_bucket}/scenes/a.tif", f"s3://{target_bucket}/p/a.tif", requester_pays=True
    )
    assert s3_copy.copied and s3_copy.size == len(DATA)
    assert not copy_object(
        f"s3://{source_bucket}/scenes/a.tif", f"s3://{target_bucket}/p/a.tif", requester_pays=True
    ).copied
    body = boto3.client("s3").get_object(Bucket=target_bucket, Key="p/a.tif")["Body"].read()
    assert body == DATA
    down = tmp_path / "down" / "a.tif"
    assert copy_object(f"s3://{target_bucket}/p/a.tif", str(down)).copied
    assert down.read_bytes() == DATA
    with pytest.raises(ObjectMissing):
        copy_object(f"s3://{target_bucket}/p/none.tif", str(tmp_path / "n.tif"))


def test_http_sources_are_streamed_to_files_and_buckets(s3_server, http_dir, tmp_path):
    root, url = http_dir
    (root / "a.tif").write_bytes(DATA)
    destination = tmp_path / "a.tif"
    assert copy_object(f"{url}/a.tif", str(destination)).copied
    assert destination.read_bytes() == DATA
    assert not copy_object(f"{url}/a.tif", str(destination)).copied
    bucket = s3_server.new_bucket("web")
    assert copy_object(f"{url}/a.tif", f"s3://{bucket}/a.tif").copied
    assert storage.object_size(f"s3://{bucket}/a.tif") == len(DATA)
    with pytest.raises(ObjectMissing):
        copy_object(f"{url}/none.tif", str(tmp_path / "none.tif"))


def test_a_broken_download_never_looks_complete(http_dir, tmp_path):
    _, url = http_dir
    destination = tmp_path / "t" / "truncated.bin"
    with pytest.raises(StorageError):
        copy_object(f"{url}/truncated.bin", str(destination))
    assert list(destination.parent.iterdir()) == []


def test_write_and_read_text(s3_server, tmp_path):
    bucket = s3_server.new_bucket("text")
    for url in (str(tmp_path / "x" / "item.json"), f"s3://{bucket}/x/item.json"):
        storage.write_text(url, '{"id": "a"}')
        assert storage.read_text(url) == '{"id": "a"}'


def test_write_atomically_makes_whole_objects_or_none(s3_server, tmp_path):
    bucket = s3_server.new_bucket("whole")
    for destination in (tmp_path / "d" / "x.bin", f"s3://{bucket}/d/x.bin"):
        storage.write_atomically(destination, lambda path: path.write_bytes(DATA))
        assert storage.object_size(str(destination)) == len(DATA)

    def breaks(path: Path) -> None:
        path.write_bytes(DATA[:10])
        raise RuntimeError("stopped half-way")

    for destination in (tmp_path / "e" / "y.bin", f"s3://{bucket}/e/y.bin"):
        with pytest.raises(RuntimeError):
            storage.write_atomically(destination, breaks)
        assert storage.object_size(str(destination)) is None
    assert list((tmp_path / "e").iterdir()) == []  # no partial file or folder stays
    # boto3 wraps a failed upload in an error of its own: still one line naming the object
    missing = f"s3://{bucket}-missing/x.bin"
    with pytest.raises(StorageError, match=f"bucket of {missing} does not exist"):
        storage.write_atomically(missing, lambda path: path.write_bytes(DATA))
    with pytest.raises(StorageError, match="does not exist"):
        copy_object(str(tmp_path / "d" / "x.bin"), missing)


def test_names_and_targets():
    assert storage.join("s3://b/prefix/", "c", "i") == "s3://b/prefix/c/i"
    assert storage.file_name("https://a.blob.core.windows.net/c/x/B04.tif?sv=1&sig=2") == "B04.tif"
    assert (
        storage.s3_url_from_https("https://sentinel-cogs.s3.us-west-2.amazonaws.com/k/B04.tif")
        == "s3://sentinel-cogs/k/B04.tif"
    )
    assert storage.s3_url_from_https("https://example.com/B04.tif") == "https://example.com/B04.tif"
    with pytest.raises(StorageError, match="use a local directory or s3://"):
        storage.check_target("https://example.com/out")
    assert storage.check_target("s3://bucket/prefix/") == "s3://bucket/prefix"
