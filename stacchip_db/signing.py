"""Planetary Computer href signing: a SAS token appended to blob hrefs where pixels are read.

Planetary Computer serves its files from Azure blob storage
(`https://{account}.blob.core.windows.net/{container}/…`), readable only with a SAS token in
the query string. Items keep their plain hrefs (tokens expire within the hour); every place
that opens a raster or copies an object passes the href through `sign_href` first, so items
indexed by any route can be read by prechip, stats, preview, map, `ChipDataset` and index's
quality band read alike.

The tokens come from the `planetary-computer` package (`planetary_computer.sas.get_token`):
one token per storage account and container, cached per process until a minute before it
expires, from the SAS endpoint in its settings (`PC_SDK_SAS_URL`, default Planetary
Computer's) with `PC_SDK_SUBSCRIPTION_KEY` when set. Worker processes (prechip's, a
DataLoader's) each fetch their own token once per container, or inherit the parent's when
forked after it signed.

Signing is on unless turned off: `sign=False` where a function takes it, else the
environment variable `STACCHIP_SIGN=0` (which worker processes inherit), e.g. for users who
reach the blobs with their own credentials or through a mirror.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qs, urlsplit

from stacchip_db.errors import ConfigError, StacchipError
from stacchip_db.text import first_line

SIGN_ENV = "STACCHIP_SIGN"
"""`0`/`false`/`no`/`off` turns signing off for this process and the processes it starts."""

BLOB_DOMAIN = ".blob.core.windows.net"
PUBLIC_ACCOUNTS = frozenset({"ai4edatasetspublicassets"})
"""Planetary Computer accounts that are public (thumbnails): never signed, as the SDK does."""

SAS_PARAMETERS = frozenset({"sig", "se", "st", "sp"})
"""Query parameters of a SAS token: an href with one of them is signed already."""

TOKEN_RETRIES = 3
TOKEN_BACKOFF_S = 0.5
"""Bounded retries of a token request (429/5xx): the SDK's default of 10 waits minutes."""

FAILURE_TTL_S = 30.0
"""A container whose token request failed is not asked again for this long: the reader's
threads and the chips after them fail at once with the same error."""

_VSICURL = "/vsicurl/"
_failures: dict[tuple[str, str], tuple[float, SigningError]] = {}
_FALSE = frozenset({"0", "false", "no", "off"})
_TRUE = frozenset({"", "1", "true", "yes", "on"})
_lock = threading.Lock()
"""One token request at a time per process: the SDK's cache has no lock of its own, and 32
reader threads opening their first asset at once would each ask for the same token."""


class SigningError(StacchipError):
    """No SAS token could be had for a Planetary Computer href."""


def signing_enabled(sign: bool | None = None) -> bool:
    """`sign` when given, else whether `$STACCHIP_SIGN` leaves signing on (the default)."""
    if sign is not None:
        return sign
    value = os.environ.get(SIGN_ENV, "").strip().lower()
    if value in _FALSE:
        return False
    if value in _TRUE:
        return True
    raise ConfigError(f"{SIGN_ENV}={value!r} is not a yes/no value; set it to 1 or 0")


def set_signing(enabled: bool) -> None:
    """Turn signing on or off for this process and the worker processes it starts later."""
    os.environ[SIGN_ENV] = "1" if enabled else "0"


@contextmanager
def signing_as(enabled: bool | None) -> Iterator[None]:
    """Signing on or off (None: as it is) inside the block and in processes started there."""
    if enabled is None:
        yield
        return
    before = os.environ.get(SIGN_ENV)
    set_signing(enabled)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SIGN_ENV, None)
        else:
            os.environ[SIGN_ENV] = before


def blob_container(href: str) -> tuple[str, str] | None:
    """(account, container) of an unsigned Planetary Computer blob href, else None."""
    url = href.removeprefix(_VSICURL)
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host.endswith(BLOB_DOMAIN):
        return None
    account = host.split(".", 1)[0]
    container = parts.path.lstrip("/").split("/", 1)[0]
    if account in PUBLIC_ACCOUNTS or not container:
        return None
    if SAS_PARAMETERS & set(parse_qs(parts.query)):
        return None
    return account, container


def sign_href(href: str, *, sign: bool | None = None) -> str:
    """`href` with a SAS token appended when it is an unsigned Planetary Computer blob href.

    Every other href (local, `s3://`, other hosts, signed already) comes back unchanged, as
    does every href when signing is off (`sign=False`, or `$STACCHIP_SIGN=0` when `sign` is
    None). Raises SigningError naming the account and container when the token service fails.
    """
    where = blob_container(href)
    if where is None or not signing_enabled(sign):
        return href
    token = _token(*where)
    separator = "&" if urlsplit(href.removeprefix(_VSICURL)).query else "?"
    return f"{href}{separator}{token}"


def forget_tokens() -> None:
    """Drop this process's tokens, remembered failures and the package's settings (read
    again from `PC_SDK_*` on the next token request), e.g. after a new subscription key."""
    from planetary_computer.sas import TOKEN_CACHE
    from planetary_computer.settings import Settings

    with _lock:
        TOKEN_CACHE.clear()
        _failures.clear()
        Settings.get.cache_clear()


def _token(account: str, container: str) -> str:
    # Imported here: only processes that read Planetary Computer blobs pay for pydantic.
    import requests
    from planetary_computer.sas import get_token
    from planetary_computer.settings import Settings

    with _lock:
        failed = _failures.get((account, container))
        if failed is not None and time.monotonic() - failed[0] < FAILURE_TTL_S:
            raise failed[1]
        try:
            return get_token(
                account,
                container,
                retry_total=TOKEN_RETRIES,
                retry_backoff_factor=TOKEN_BACKOFF_S,
            ).token
        except (requests.RequestException, ValueError, TypeError) as exc:
            # ValueError covers a body that is not JSON and pydantic's validation error.
            detail = first_line(exc)
            error = SigningError(
                f"cannot get a Planetary Computer SAS token for account {account!r}, container "
                f"{container!r} from {Settings.get().sas_url} ({type(exc).__name__}: "
                f"{detail[:200]}); retry later, check PC_SDK_SAS_URL and "
                f"PC_SDK_SUBSCRIPTION_KEY, or set {SIGN_ENV}=0 if you have your own access to "
                "these blobs"
            )
            error.__cause__ = exc
            _failures[(account, container)] = (time.monotonic(), error)
            raise error from exc


def _reset_lock_in_child() -> None:
    # A fork while another thread held the lock would leave the child's copy held forever.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)
