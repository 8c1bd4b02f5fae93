"""Planetary Computer on loopback: its SAS token API and blob storage that insists on tokens.

`sas_token_server` speaks the token API the `planetary-computer` package calls,
`GET /api/sas/v1/token/{account}/{container}` -> `{"token": …, "msft:expiry": …}`, and records
each request; `PC_SDK_SAS_URL` points the package at it. Its token is new for every test, so
GDAL's /vsicurl/ cache cannot carry reads over from another test.

`blob_server` stands in for `{account}.blob.core.windows.net`: an HTTP proxy on loopback that
GDAL (`GDAL_HTTP_PROXY`) and requests (`HTTP_PROXY`) send their blob requests to, so the hrefs
stay real Planetary Computer blob URLs and no name is resolved. Like Azure it answers 403
`AuthenticationFailed` to a request without the token's signature, and serves byte ranges.
It runs in a process of its own: GDAL holds the GIL in some calls that reach the network
(sidecar lookups after an open), which would stall a server thread of the test process.
The hrefs use `http://`: the proxy speaks plain HTTP (an `https://` href would need a TLS
tunnel); what the code recognises is the blob host, whatever the scheme.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

TOKEN_PATH = "/api/sas/v1/token"


def _serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class SasTokenServer:
    url: str
    """The SAS endpoint, as `PC_SDK_SAS_URL` holds it."""
    token: str
    requests: list[tuple[str, str]] = field(default_factory=list)
    """(account, container) of each token request, in order."""
    fail_status: int | None = None
    """Answer every request with this HTTP status instead of a token."""

    @property
    def signature(self) -> str:
        return parse_qs(self.token)["sig"][0]


@pytest.fixture
def sas_token_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[SasTokenServer]:
    from stacchip_db.signing import forget_tokens

    expiry = datetime.now(UTC) + timedelta(hours=1)
    token = (
        f"st={datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}&se={expiry:%Y-%m-%dT%H:%M:%SZ}"
        f"&sp=rl&sv=2024-05-04&sr=c&sig={secrets.token_hex(16)}"
    )
    state = SasTokenServer("", token)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            match = re.fullmatch(rf"{TOKEN_PATH}/([^/]+)/([^/?]+)", self.path)
            if match is None:
                return self._send(404, {"detail": "Not Found"})
            state.requests.append((match[1], match[2]))
            if state.fail_status is not None:
                return self._send(state.fail_status, {"detail": "token service unavailable"})
            self._send(200, {"msft:expiry": expiry.isoformat(), "token": state.token})

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = _serve(Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}{TOKEN_PATH}"
    monkeypatch.setenv("PC_SDK_SAS_URL", state.url)
    forget_tokens()  # the package reads its settings once per process; tokens are cached
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        forget_tokens()


@dataclass
class BlobServer:
    proxy: str
    """host:port of the proxy."""
    root: Path
    """Blob `http://{host}/{path}` is served from `root/{host}/{path}`; `root/log` lists the
    requests."""

    def publish(self, item: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
        """`item` (synthetic, local files) with each file served at the blob href that
        `source`, the real item, gives that asset (as `http://`)."""
        out = json.loads(json.dumps(item))
        for key, asset in out["assets"].items():
            local = Path(asset["href"])
            if not local.is_file():
                continue
            href = "http://" + source["assets"][key]["href"].split("://", 1)[1].split("?", 1)[0]
            served = self.root / href.removeprefix("http://")
            served.parent.mkdir(parents=True, exist_ok=True)
            if not served.exists():
                served.symlink_to(local)
            asset["href"] = href
        return out

    @property
    def log(self) -> list[tuple[str, str, int]]:
        """(method, blob URL without query, status) of each request so far."""
        path = self.root / "log"
        if not path.exists():
            return []
        rows = [line.split("\t") for line in path.read_text().splitlines()]
        return [(method, url, int(status)) for method, url, status in rows]

    def refused(self) -> list[tuple[str, str, int]]:
        return [entry for entry in self.log if entry[2] == 403]

    def served(self) -> list[tuple[str, str, int]]:
        return [entry for entry in self.log if entry[2] in (200, 206)]


def serve_blobs(root: Path, signature: str) -> None:
    """Serve `root` as blob storage behind a proxy on loopback; print the port, run forever."""
    log = (root / "log").open("a", buffering=1)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, *, body: bool) -> None:
            parts = urlsplit(self.path)  # a proxy gets absolute URLs
            url = f"{parts.scheme}://{parts.netloc}{parts.path}"
            path = root / f"{parts.netloc}{parts.path}"
            if parse_qs(parts.query).get("sig") != [signature]:
                status, data = 403, b"<Error><Code>AuthenticationFailed</Code></Error>"
            elif not parts.netloc or not path.is_file():
                status, data = 404, b"<Error><Code>BlobNotFound</Code></Error>"
            else:
                status, data = 200, path.read_bytes()
            with lock:
                log.write(f"{self.command}\t{url}\t{status}\n")
            size = len(data)
            ranges = self.headers.get("Range")
            if status == 200 and ranges:
                # Azure serves one range per request; so does this stand-in.
                first, _, last = ranges.removeprefix("bytes=").split(",")[0].partition("-")
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                data = data[start : end + 1]
            else:
                self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


@pytest.fixture
def blob_server(
    sas_token_server: SasTokenServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[BlobServer]:
    root = tmp_path / "blobs"
    root.mkdir()
    process = subprocess.Popen(
        [sys.executable, __file__, str(root), sas_token_server.signature],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        state = BlobServer(f"127.0.0.1:{port}", root)
        monkeypatch.setenv("GDAL_HTTP_PROXY", state.proxy)
        monkeypatch.setenv("HTTP_PROXY", f"http://{state.proxy}")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        yield state
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    serve_blobs(Path(sys.argv[1]), sys.argv[2])
