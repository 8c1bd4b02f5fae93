"""stac_api: retries against the real loopback STAC API, empty searches."""

from __future__ import annotations

import pytest

from stacchip_db.stac_api import StacApiError, open_api, search, search_one


def test_5xx_and_429_are_retried_then_the_search_succeeds(stac_api):
    client = open_api(stac_api.url, backoff=0.01)
    stac_api.faults.fail_next(2, status=503)
    stac_api.faults.fail_next(1, status=429)
    item = search_one(
        client,
        collections=["sentinel-2-l2a"],
        datetime="2019-01-01/2019-03-31",
        query={"grid:code": {"eq": "MGRS-20HNJ"}},
        sortby=[{"field": "properties.eo:cloud_cover", "direction": "asc"}],
    )
    assert item is not None and item.properties["eo:cloud_cover"] == 1.0  # 35 % nodata one
    statuses = [s for _, path, s in stac_api.faults.requests if path == "/search"]
    assert statuses == [503, 503, 429, None]


def test_retries_are_bounded(stac_api):
    client = open_api(stac_api.url, retries=2, backoff=0.01)
    stac_api.faults.fail_next(5, status=502)
    with pytest.raises(StacApiError) as info:
        search(client, max_items=1, collections=["naip"])
    assert "failed after retries" in str(info.value) and "\n" not in str(info.value)
    assert len([p for _, p, _ in stac_api.faults.requests if p == "/search"]) == 3


def test_client_errors_are_not_retried(stac_api):
    client = open_api(stac_api.url, backoff=0.01)
    stac_api.faults.fail_next(1, status=400)
    with pytest.raises(StacApiError):
        search(client, max_items=1, collections=["naip"])
    assert len([p for _, p, _ in stac_api.faults.requests if p == "/search"]) == 1


def test_numeric_sort_and_empty_result(stac_api):
    client = open_api(stac_api.url)
    clouds = [
        i.properties["eo:cloud_cover"]
        for i in search(
            client,
            max_items=4,
            collections=["sentinel-2-l2a"],
            datetime="2019-01-01/2019-03-31",
            sortby=[{"field": "properties.eo:cloud_cover", "direction": "asc"}],
        )
    ]
    assert clouds == sorted(clouds) and 16.8 in clouds  # 16.8 after 8.0: numeric, not text
    assert search(client, max_items=1, collections=["naip"], datetime="1990-01-01/1990-12-31") == []
    assert search_one(client, collections=["naip"], datetime="1990-01-01/1990-12-31") is None
