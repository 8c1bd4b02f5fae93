"""docker-compose.yml publishes nothing beyond this machine unless asked to."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO

# Compose's `${VAR:-default}` / `${VAR-default}` / `${VAR}`, as with the variable unset.
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")


def _as_unset(text: str) -> str:
    return _VARIABLE.sub(lambda m: m.group("default") or "", text)


def test_published_ports_bind_to_loopback_by_default() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    published = {
        name: [_as_unset(str(port)) for port in service.get("ports", [])]
        for name, service in compose["services"].items()
    }
    assert published["database"] and published["stac-api"]  # the two that are published
    for name, ports in published.items():
        for port in ports:
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
