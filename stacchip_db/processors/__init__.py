"""Processors: one small module of rules per sensor, all run by `base.run_job`.

Adding a processor: write `processors/<sensor>.py` with a `Processor` subclass (name, default
STAC API and collection, assets, quality rule, `plan`), decorate it with `@register`, and add
the module's name to `BUILTIN`. The `ingest` CLI group, the Batch entrypoints and the job log
pick it up from the registry.
"""

from __future__ import annotations

import importlib

from stacchip_db.errors import StacchipError
from stacchip_db.processors.base import Processor

BUILTIN = ("sentinel2", "naip", "landsat", "linz", "sentinel1", "modis")
"""Modules under `stacchip_db.processors` that register a processor when imported."""

PROCESSORS: dict[str, Processor] = {}
"""Registered processors by CLI name (`sentinel-2`, `naip`, …)."""


class ProcessorNotAvailable(StacchipError):
    """No processor of that name is registered (not written yet, or misspelt)."""


def register(cls: type[Processor]) -> type[Processor]:
    """Class decorator: make a processor available as `stacchip-db ingest <cls.name>`."""
    PROCESSORS[cls.name] = cls()
    return cls


def processors() -> dict[str, Processor]:
    """Every registered processor, importing the built-in modules on first use."""
    for module in BUILTIN:
        importlib.import_module(f"{__name__}.{module}")
    return PROCESSORS


def get_processor(name: str) -> Processor:
    """The processor called `name`; a one-line error when there is none."""
    known = processors()
    if name not in known:
        raise ProcessorNotAvailable(
            f"processor {name} is not available in this stacchip-db yet (available: "
            f"{', '.join(sorted(known))})"
        )
    return known[name]
