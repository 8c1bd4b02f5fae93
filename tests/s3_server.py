"""A real S3-protocol server on loopback: moto's server mode, session-wide.

`s3_server` starts `ThreadedMotoServer` on 127.0.0.1 and points boto3 (`AWS_ENDPOINT_URL`) and
GDAL (`AWS_S3_ENDPOINT`, path-style, plain HTTP) at it with dummy credentials, for the rest of
the session; subprocesses started by tests inherit the variables. `s3_bucket` is a fresh bucket.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from stacchip_db.demo import free_port

_buckets = itertools.count()


@dataclass
class S3Server:
    endpoint: str

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint)

    def new_bucket(self, prefix: str = "bucket", *, requester_pays: bool = False) -> str:
        name = f"{prefix}-{next(_buckets)}"
        client = self.client()
        client.create_bucket(Bucket=name)
        if requester_pays:
            client.put_bucket_request_payment(
                Bucket=name, RequestPaymentConfiguration={"Payer": "Requester"}
            )
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        # GDAL's /vsis3/ (rasterio, pyogrio) reads these.
        "AWS_S3_ENDPOINT": f"127.0.0.1:{port}",
        "AWS_VIRTUAL_HOSTING": "FALSE",
        "AWS_HTTPS": "NO",
        "AWS_NO_SIGN_REQUEST": "NO",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            patch.delenv(key, raising=False)
        try:
            yield S3Server(endpoint)
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket's name."""
    return s3_server.new_bucket()
