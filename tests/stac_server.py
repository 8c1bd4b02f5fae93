"""A real STAC API on loopback: stac-fastapi-pgstac over a pgstac database of fixture items.

Session-scoped: the COGs are generated once (stacchip_db.synthetic, via stacchip_db.demo), the
catalog database is created on the test server and loaded once, and uvicorn serves it from a
background thread. `stac_api.faults` (a `FaultInjector` around the API) injects HTTP errors
(cleared after every test); `expected_s2_choice` computes what the sentinel-2 rule must pick.

Catalog: collection `sentinel-2-l2a` (the variants of `stacchip_db.demo.s2_variants`), `naip`
(the fixture NAIP item in each of `NAIP_YEARS`), and `sentinel-2-broken`, two scenes of which
the second's `scl` asset does not exist (2019 Q1 and Q2).
"""

from __future__ import annotations

import copy
import json
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stacchip_db.demo import (
    NAIP_COLLECTION_FIXTURE,
    NAIP_YEARS,
    S2_COLLECTION_FIXTURE,
    S2_TILE,
    StacApiServer,
    Variant,
    collection_document,
    load_catalog,
    naip_item,
    s2_item,
    s2_variants,
    synthesize_assets,
)

BROKEN_COLLECTION = "sentinel-2-broken"


class FaultInjector:
    """ASGI middleware: answer the next N matching requests with an HTTP error status.

    Used to show that STAC API calls are retried (`fail_next(2, 500)` -> two 500s, then the
    real answer). `requests` records every (method, path) seen.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._faults: deque[tuple[str, int]] = deque()
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str, int | None]] = []

    def fail_next(self, count: int, status: int = 500, path: str = "/search") -> None:
        with self._lock:
            self._faults.extend([(path, status)] * count)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.requests.clear()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            status = None
            with self._lock:
                if self._faults and scope["path"].startswith(self._faults[0][0]):
                    status = self._faults.popleft()[1]
                self.requests.append((scope["method"], scope["path"], status))
            if status is not None:
                body = json.dumps({"code": "InjectedFault", "description": "injected"}).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def expected_s2_choice(
    items: Iterable[dict[str, Any]],
    year: int,
    quarter: int,
    *,
    tile: str = S2_TILE,
    max_cloud: float = 75.0,
) -> str | None:
    """The id the sentinel-2 rule must pick for a quarter, computed from the catalog's items."""
    months = range(3 * (quarter - 1) + 1, 3 * quarter + 1)
    candidates = [
        item
        for item in items
        if item["properties"]["datetime"].startswith(str(year))
        and int(item["properties"]["datetime"][5:7]) in months
        and item["properties"]["grid:code"] == f"MGRS-{tile}"
        and item["properties"]["s2:nodata_pixel_percentage"] <= 20
    ]
    if not candidates:
        return None
    best = min(candidates, key=lambda i: i["properties"]["eo:cloud_cover"])
    return best["id"] if best["properties"]["eo:cloud_cover"] <= max_cloud else None


@dataclass
class StacCatalog:
    """The served catalog: its URL, items by collection, the base items and the fault switch."""

    server: StacApiServer
    items: dict[str, list[dict[str, Any]]]
    bases: dict[str, Any]
    assets_dir: Path

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def faults(self) -> Any:
        return self.server.app


def _broken_items(base: dict[str, Any]) -> list[dict[str, Any]]:
    from datetime import date

    good = s2_item(base, Variant(date(2019, 2, 10), 3.0), BROKEN_COLLECTION)
    bad = s2_item(base, Variant(date(2019, 5, 10), 4.0), BROKEN_COLLECTION)
    bad = copy.deepcopy(bad)
    bad["assets"]["scl"]["href"] = str(Path(bad["assets"]["scl"]["href"]).with_name("gone.tif"))
    return [good, bad]


@pytest.fixture(scope="session")
def stac_catalog(pg_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StacCatalog]:
    assets_dir = tmp_path_factory.mktemp("catalog")
    bases = synthesize_assets(assets_dir)
    items = {
        "sentinel-2-l2a": [s2_item(bases["s2"], v, "sentinel-2-l2a") for v in s2_variants()],
        "naip": [naip_item(bases["naip"], year) for year in NAIP_YEARS],
        BROKEN_COLLECTION: _broken_items(bases["s2"]),
    }
    name = pg_server.new_name("stac_source")
    url = pg_server.create(name)
    load_catalog(
        url,
        [
            collection_document(S2_COLLECTION_FIXTURE, "sentinel-2-l2a"),
            collection_document(NAIP_COLLECTION_FIXTURE, "naip"),
            collection_document(S2_COLLECTION_FIXTURE, BROKEN_COLLECTION),
        ],
        [item for group in items.values() for item in group],
    )
    server = StacApiServer(url, wrap=FaultInjector).start()
    try:
        yield StacCatalog(server=server, items=items, bases=bases, assets_dir=assets_dir)
    finally:
        server.stop()
        pg_server.drop(name)


@pytest.fixture
def stac_api(stac_catalog: StacCatalog) -> Iterator[StacCatalog]:
    """The session's catalog, with no faults pending (and none left behind)."""
    stac_catalog.faults.clear()
    yield stac_catalog
    stac_catalog.faults.clear()
