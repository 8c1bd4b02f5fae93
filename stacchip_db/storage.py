"""Copy and write objects: local paths, `s3://bucket/key` and `https://` URLs.

The processors copy scene assets into the target store and write `stac_item.json` beside them.
What this module guarantees, whatever the pair of schemes:

- a copy whose destination already exists with the source's size is skipped (re-runs and
  resumed jobs cost one HEAD/stat per asset, not a transfer);
- a half-finished copy never looks complete: local files are written in a temporary folder
  beside them and renamed; S3 objects only become visible when the PUT / multipart upload /
  server-side copy completes, so they are written in place. `write_atomically` is the one way
  to make a file-backed object whole or not at all, locally or on S3: the processors' copies
  and derived COGs, prechip's cubes and manifests, the chip lists all go through it;
- S3 to S3 is a server-side copy (boto3's managed copy: multipart above its threshold), with
  `RequestPayer=requester` when the source bucket is requester-pays;
- HTTP sources are streamed in chunks (to a file, or as a multipart upload), never held whole
  in memory.

boto3 finds its endpoint and credentials the usual way (`AWS_ENDPOINT_URL`, profiles, roles),
so the same code talks to AWS and to a loopback S3 server in tests.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
import requests
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from stacchip_db.errors import StacchipError
from stacchip_db.paths import check_name
from stacchip_db.signing import sign_href
from stacchip_db.text import first_line

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 * 1024 * 1024
"""Read size when streaming an HTTP source."""
HTTP_TIMEOUT_S = (10, 120)
"""(connect, read) timeouts of HTTP sources."""


class StorageError(StacchipError):
    """An object could not be read, copied or written."""


class ObjectMissing(StorageError):
    """The source object does not exist."""


@dataclass(frozen=True)
class CopyResult:
    """What `copy_object` did: `copied` False when an identical-size copy was already there."""

    source: str
    destination: str
    size: int
    copied: bool


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def split_s3(url: str) -> tuple[str, str]:
    """`s3://bucket/key` -> `(bucket, key)`; the key may be empty (a bucket or prefix)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{url!r} is not an s3://bucket/key URL")
    return parsed.netloc, parsed.path.lstrip("/")


def join(base: str, *parts: str) -> str:
    """`base` (a directory or `s3://bucket[/prefix]`) joined with `parts` by `/`."""
    if is_s3(base) or is_http(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def under(root: str, *names: str, what: str = "name") -> str:
    """`root` (a directory or `s3://bucket[/prefix]`) joined with `names`, each of which must
    be ONE safe segment (`paths.check_name`): what is built from ids stays under `root`."""
    return join(root, *(check_name(name, what) for name in names))


_S3_HTTPS = re.compile(
    r"^https://(?P<bucket>[a-z0-9][a-z0-9.-]+)\.s3(?:[.-](?P<region>[a-z0-9-]+))?"
    r"\.amazonaws\.com/(?P<key>[^?]+)$"
)


def s3_url_from_https(href: str) -> str:
    """`https://bucket.s3.region.amazonaws.com/key` as `s3://bucket/key`; other hrefs unchanged.

    An S3 source copied to an S3 target is then a server-side copy instead of a download.
    """
    match = _S3_HTTPS.match(href)
    return f"s3://{match['bucket']}/{match['key']}" if match else href


def file_name(href: str) -> str:
    """The last path segment of a local path or URL, without a query string (signed URLs)."""
    path = urlparse(href).path if (is_s3(href) or is_http(href)) else href
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if not name:
        raise StorageError(f"{href!r} has no file name to copy it under")
    return name


# -- S3 clients -------------------------------------------------------------------------------

_clients: dict[tuple[str | None, int], Any] = {}
_clients_lock = threading.Lock()


def s3_client() -> Any:
    """A boto3 S3 client for this thread and the current `AWS_ENDPOINT_URL` (cached)."""
    key = (os.environ.get("AWS_ENDPOINT_URL"), threading.get_ident())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            session = boto3.session.Session()
            client = session.client(
                "s3", config=BotoConfig(retries={"max_attempts": 5, "mode": "standard"})
            )
            _clients[key] = client
        return client


def _requester(requester_pays: bool) -> dict[str, str]:
    return {"RequestPayer": "requester"} if requester_pays else {}


_S3_FAILURES = (ClientError, BotoCoreError, S3UploadFailedError)
"""What boto3 raises when a request fails; its managed uploads wrap the cause in
S3UploadFailedError, which is neither of the others."""


def _s3_error(exc: Exception, url: str, action: str) -> StorageError:
    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
        exc = exc.__context__  # the error S3 answered, which says what went wrong
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return ObjectMissing(f"{url} does not exist; check the source item's href")
        if code in ("NoSuchBucket",):
            return StorageError(f"bucket of {url} does not exist; create it or fix the URL")
        if code in ("403", "AccessDenied"):
            return StorageError(
                f"access denied to {url} while trying to {action}: check the AWS credentials "
                "(and whether the bucket is requester-pays)"
            )
    return StorageError(f"cannot {action} {url}: {first_line(exc)}")


# -- size of an object ------------------------------------------------------------------------


def object_size(url: str, *, requester_pays: bool = False) -> int | None:
    """Size in bytes of the object at `url`, or None when it does not exist."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            head = s3_client().head_object(Bucket=bucket, Key=key, **_requester(requester_pays))
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise _s3_error(exc, url, "look up") from exc
        except BotoCoreError as exc:
            raise _s3_error(exc, url, "look up") from exc
        return int(head["ContentLength"])
    if is_http(url):
        try:
            response = requests.head(sign_href(url), allow_redirects=True, timeout=HTTP_TIMEOUT_S)
        except requests.RequestException as exc:
            raise StorageError(f"cannot reach {url}: {exc}") from exc
        if response.status_code == 404:
            return None
        if not response.ok:
            raise StorageError(f"HEAD {url} answered HTTP {response.status_code}")
        length = response.headers.get("Content-Length")
        return int(length) if length is not None else None
    path = Path(url)
    return path.stat().st_size if path.is_file() else None


# -- copying ----------------------------------------------------------------------------------


def copy_object(source: str, destination: str, *, requester_pays: bool = False) -> CopyResult:
    """Copy `source` to `destination` unless a copy of the same size is already there.

    `requester_pays` applies to an S3 source. Raises `ObjectMissing` when the source does not
    exist and `StorageError` for any other failure, naming the object.
    """
    size = object_size(source, requester_pays=requester_pays)
    if size is None:
        raise ObjectMissing(f"source object {source} does not exist; check the item's href")
    if object_size(destination) == size:
        log.debug("skip %s: %s already has %d bytes", source, destination, size)
        return CopyResult(source, destination, size, copied=False)
    log.debug("copy %s -> %s (%d bytes)", source, destination, size)
    if is_s3(destination):
        _copy_to_s3(source, destination, requester_pays)
    else:
        _copy_to_file(source, Path(destination), requester_pays)
    return CopyResult(source, destination, size, copied=True)


def _copy_to_s3(source: str, destination: str, requester_pays: bool) -> None:
    bucket, key = split_s3(destination)
    client = s3_client()
    try:
        if is_s3(source):
            src_bucket, src_key = split_s3(source)
            client.copy(
                {"Bucket": src_bucket, "Key": src_key},
                bucket,
                key,
                ExtraArgs=_requester(requester_pays),
            )
        elif is_http(source):
            with _http_stream(source) as response:
                client.upload_fileobj(response.raw, bucket, key)
        else:
            client.upload_file(str(source), bucket, key)
    except _S3_FAILURES as exc:
        raise _s3_error(exc, destination, f"copy {source} to") from exc


def _copy_to_file(source: str, destination: Path, requester_pays: bool) -> None:
    def fill(tmp: Path) -> None:
        if is_s3(source):
            bucket, key = split_s3(source)
            try:
                s3_client().download_file(
                    bucket, key, str(tmp), ExtraArgs=_requester(requester_pays)
                )
            except (ClientError, BotoCoreError) as exc:
                raise _s3_error(exc, source, "download") from exc
        elif is_http(source):
            with _http_stream(source) as response, tmp.open("wb") as out:
                for chunk in response.iter_content(CHUNK_BYTES):
                    out.write(chunk)
        else:
            shutil.copyfile(source, tmp)

    write_atomically(destination, fill)


@contextmanager
def _http_stream(url: str) -> Iterator[requests.Response]:
    """A streaming GET of `url`; HTTP and connection failures raise StorageError."""
    try:
        response = requests.get(sign_href(url), stream=True, timeout=HTTP_TIMEOUT_S)
    except requests.RequestException as exc:
        raise StorageError(f"cannot reach {url}: {exc}") from exc
    with response:
        if response.status_code == 404:
            raise ObjectMissing(f"source object {url} does not exist (HTTP 404)")
        if not response.ok:
            raise StorageError(f"GET {url} answered HTTP {response.status_code}")
        response.raw.decode_content = True
        try:
            yield response
        except requests.RequestException as exc:  # the stream broke off mid-body
            raise StorageError(f"reading {url} failed part-way: {exc}") from exc


PARTIAL_SUFFIX = ".partial"
"""Suffix of the hidden folder an object is written in before it is renamed into place."""


def write_atomically(destination: str | Path, fill: Callable[[Path], object]) -> None:
    """Make the object `destination` with `fill(path)`, whole or not at all.

    `destination` is a local path, or an `s3://` URL (a str). `fill` writes the local file
    `path`, named as `destination` is, in a private temporary folder: beside a local
    destination, so that renaming it over the destination is atomic (readers see the old
    object or the new one, never part of one), else in the system's temporary folder, whence it
    is uploaded (an S3 object appears only when its upload completes). Whatever happens (an
    error, a stop signal) the folder and what `fill` left in it go. Errors of `fill` and of the
    local file system (OSError) pass through; a failed upload is a StorageError naming
    `destination`.
    """
    url = destination if isinstance(destination, str) and is_s3(destination) else None
    if url is not None:
        name = file_name(url)
        staging = Path(tempfile.mkdtemp(prefix="stacchip-", suffix=PARTIAL_SUFFIX))
    else:
        target = Path(destination)
        name = target.name
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{name}.", suffix=PARTIAL_SUFFIX, dir=target.parent)
        )
    try:
        local = staging / name
        fill(local)
        if url is not None:
            _upload(local, url)
        else:
            os.replace(local, target)  # same file system: atomic
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _upload(local: Path, url: str) -> None:
    bucket, key = split_s3(url)
    try:
        s3_client().upload_file(str(local), bucket, key)  # multipart above boto3's threshold
    except _S3_FAILURES as exc:
        raise _s3_error(exc, url, "write") from exc


# -- small objects ----------------------------------------------------------------------------


def write_text(url: str, text: str, *, content_type: str = "application/json") -> None:
    """Write a small text object (e.g. `stac_item.json`), atomically."""
    data = text.encode()
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc, url, "write") from exc
        return
    if is_http(url):
        raise StorageError(f"cannot write to {url}: targets are local directories or s3:// URLs")
    write_atomically(Path(url), lambda tmp: tmp.write_bytes(data))


def read_text(url: str, *, requester_pays: bool = False) -> str:
    """Read a small text object (a STAC item JSON) from a path, `s3://` or `https://` URL."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key, **_requester(requester_pays))
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc, url, "read") from exc
        return body["Body"].read().decode()
    if is_http(url):
        with _http_stream(url) as response:
            return response.text
    try:
        return Path(url).read_text()
    except FileNotFoundError as exc:
        raise ObjectMissing(f"{url} does not exist") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {url}: {exc.strerror}") from exc


def check_target(target: str) -> str:
    """Validate a target store (a local directory or `s3://bucket[/prefix]`); return it."""
    if is_http(target):
        raise StorageError(
            f"target {target!r} is an HTTP URL; use a local directory or s3://bucket[/prefix]"
        )
    if is_s3(target):
        split_s3(target)
        return target.rstrip("/")
    return str(Path(target).expanduser().absolute())
