"""Searching a STAC API: pystac-client with bounded retries, and one-line errors.

Retries only where they help: connection errors, timeouts, HTTP 429 and 5xx, with exponential
backoff (urllib3's `Retry`, which also honours `Retry-After`) and a bound. Logic errors (4xx
other than 429, bad JSON) are not retried. A search that finds nothing returns an empty list,
never an `IndexError`; callers log and skip.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pystac
import requests
from pystac_client import Client
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from pystac_client.warnings import DoesNotConformTo
from urllib3.util.retry import Retry

from stacchip_db.errors import StacchipError

log = logging.getLogger(__name__)

RETRY_STATUSES = (429, 500, 502, 503, 504)
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF_S = 0.5
"""Waits 0.5, 1, 2, 4 … seconds between attempts (urllib3 caps a wait at 120 s)."""
DEFAULT_TIMEOUT_S = (10.0, 60.0)
"""(connect, read) timeout of one request."""


class StacApiError(StacchipError):
    """The STAC API could not be reached or refused a search, after retries."""


def retry_policy(retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF_S) -> Retry:
    """urllib3 retry policy for STAC API calls (GET and POST: searches are read-only)."""
    return Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=backoff,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=None,  # POST /search is safe to repeat
        raise_on_status=False,  # the last answer reaches pystac-client, which reports it
        respect_retry_after_header=True,
    )


def open_api(
    url: str,
    *,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF_S,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT_S,
    modifier: Callable[[Any], Any] | None = None,
) -> Client:
    """A pystac-client `Client` for the API at `url`, retrying as described above.

    `modifier` is pystac-client's hook run on every item it returns. Hrefs are not signed
    here: Planetary Computer tokens expire, so they are appended where pixels are read
    (`stacchip_db.signing`).
    """
    stac_io = StacApiIO(max_retries=retry_policy(retries, backoff), timeout=timeout)
    with _errors(f"STAC API {url}"):
        return Client.open(url, stac_io=stac_io, modifier=modifier)


def search(client: Client, *, max_items: int, **params: Any) -> list[pystac.Item]:
    """Items of one search (at most `max_items`), in the API's order; [] when there are none.

    `params` are `Client.search` keywords: collections, intersects, datetime, query, sortby…
    """
    where = f"search of STAC API {client.self_href}"
    with _errors(where), warnings.catch_warnings():
        # pystac-client warns when an API omits the sort conformance class although it sorts
        # (stac-fastapi-pgstac); an API that cannot sort answers with an error instead.
        warnings.simplefilter("ignore", DoesNotConformTo)
        # pystac's storage-extension migration warns about every non-S3 href it cannot parse.
        warnings.filterwarnings("ignore", "Could not parse bucket/account", UserWarning)
        items = []
        # Parsed one by one (what `.items()` does, without stopping at the first bad one): an
        # item the API serves in the wrong shape is skipped with a warning, not the job's end.
        for data in client.search(max_items=max_items, **params).items_as_dicts():
            try:
                items.append(pystac.Item.from_dict(data, root=client, preserve_dict=False))
            except Exception as exc:  # pystac raises whatever the malformed JSON leads to
                log.warning(
                    "%s: item %s is not a STAC item (%s: %s); skipped",
                    where, data.get("id") if isinstance(data, dict) else data,
                    type(exc).__name__, exc,
                )  # fmt: skip
    if not items:
        log.info("no items for %s", _describe(params))
    return items


def search_one(client: Client, **params: Any) -> pystac.Item | None:
    """The first item of a search (sort it with `sortby`), or None when it finds nothing."""
    items = search(client, max_items=1, **params)
    return items[0] if items else None


def _describe(params: dict[str, Any]) -> str:
    shown = {k: v for k, v in params.items() if k != "intersects"}
    if "intersects" in params:
        shown["intersects"] = getattr(params["intersects"], "geom_type", "geometry")
    return ", ".join(f"{k}={v}" for k, v in shown.items())


@contextmanager
def _errors(where: str) -> Iterator[None]:
    """Turn request/API failures (after retries) into one-line `StacApiError`s."""
    try:
        yield
    except APIError as exc:
        if isinstance(exc.__cause__ or exc.__context__, requests.RequestException):
            _raise_unreachable(where, exc.__cause__ or exc.__context__, exc)
        status_code = getattr(exc, "status_code", None)
        status = f"HTTP {status_code}: " if status_code else ""
        lines = str(exc).strip().splitlines()
        detail = lines[0][:300] if lines else type(exc).__name__
        raise StacApiError(
            f"{where} failed after retries ({status}{detail}); check `stac_api` and the search "
            "parameters, or re-run the job later"
        ) from exc
    except requests.RequestException as exc:
        _raise_unreachable(where, exc, exc)


def _raise_unreachable(where: str, cause: BaseException, exc: BaseException) -> None:
    lines = str(cause).strip().splitlines()
    detail = lines[0][:300] if lines else ""
    raise StacApiError(
        f"{where} unreachable after retries ({type(cause).__name__}: {detail}); check "
        "--stac-api or re-run the job later"
    ) from exc
