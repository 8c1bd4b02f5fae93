"""A loopback HTTP file server that adds a fixed delay to every request (for bench_prechip).

Serves the files of one directory with HEAD and single-range GET (`Range: bytes=a-b`, `a-`,
`-n`), HTTP/1.1 keep-alive, one thread per connection, and sleeps `--delay-ms` before
answering each request: what reading COGs from object storage looks like to GDAL's /vsicurl/,
where round trips, not bandwidth, bound the throughput.

    python bench/latency_proxy.py --dir bench/out/prechip --port 8765 --delay-ms 20
"""

from __future__ import annotations

import argparse
import os
import re
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def make_handler(root: Path, delay_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: no TCP handshake per request

        def log_message(self, format: str, *args: object) -> None:  # quiet
            return

        def _resolve(self) -> Path | None:
            path = (root / self.path.split("?", 1)[0].lstrip("/")).resolve()
            return path if path.is_file() and root in path.parents else None

        def _empty(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self) -> None:
            time.sleep(delay_s)
            path = self._resolve()
            if path is None:
                self._empty(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(path.stat().st_size))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_GET(self) -> None:
            time.sleep(delay_s)
            path = self._resolve()
            if path is None:
                self._empty(404)
                return
            size = path.stat().st_size
            start, end, status = 0, size - 1, 200
            header = self.headers.get("Range")
            if header:
                match = _RANGE.match(header.strip())
                if match is None or match.group(1) == match.group(2) == "":
                    self._empty(416)  # multi-range is not supported: GDAL then asks singly
                    return
                first, last = match.groups()
                if first == "":
                    start = max(0, size - int(last))
                else:
                    start = int(first)
                    end = min(size - 1, int(last)) if last else size - 1
                if start >= size:
                    self._empty(416)
                    return
                status = 206
            length = end - start + 1
            self.send_response(status)
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            fd = os.open(path, os.O_RDONLY)
            try:
                self.wfile.write(os.pread(fd, length, start))
            finally:
                os.close(fd)

    return Handler


def serve(root: Path, port: int, delay_ms: float) -> ThreadingHTTPServer:
    """A started-on-`serve_forever` server for `root` on 127.0.0.1:`port`."""
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(root.resolve(), delay_ms / 1e3))
    server.daemon_threads = True
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    args = parser.parse_args()
    server = serve(args.dir, args.port, args.delay_ms)
    print(f"serving {args.dir} on http://127.0.0.1:{args.port} (+{args.delay_ms:g} ms)", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
