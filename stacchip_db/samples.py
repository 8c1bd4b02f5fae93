"""The sample source: one row per job (an MGRS tile, a location), read with geopandas.

Any layer `geopandas.read_file` opens: a local path, `https://` or `s3://` (GDAL's /vsicurl/
and /vsis3/ through pyogrio), as FlatGeobuf, GeoPackage or GeoJSON. The job index picks the
row. Geometries are returned in EPSG:4326, the CRS STAC searches use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import geopandas as gpd
import shapely
from shapely.geometry.base import BaseGeometry

from stacchip_db.errors import StacchipError
from stacchip_db.text import first_line

log = logging.getLogger(__name__)


class SampleSourceError(StacchipError):
    """The sample source cannot be read, or has no row for the job index."""


@dataclass(frozen=True)
class Sample:
    """Row `index` of the sample source: its geometry (EPSG:4326) and its attributes."""

    index: int
    geometry: BaseGeometry
    attributes: dict[str, Any]

    def attribute(self, name: str, source: str) -> Any:
        """A column's value; a one-line error naming the column when the source lacks it."""
        if name not in self.attributes or self.attributes[name] is None:
            raise SampleSourceError(
                f"sample source {source} has no {name!r} value in row {self.index} (columns: "
                f"{', '.join(sorted(self.attributes)) or 'none'}); use a source with that column"
            )
        return self.attributes[name]


def read_sample(source: str, index: int) -> Sample:
    """Row `index` (0-based) of the layer at `source`."""
    if index < 0:
        raise SampleSourceError(f"job index {index} is negative; use 0 or more")
    try:
        frame = gpd.read_file(source)
    except Exception as exc:  # pyogrio/fiona/GDAL raise many types for unreadable sources
        detail = first_line(exc)[:300]
        raise SampleSourceError(
            f"cannot read sample source {source}: {detail}; give a path or URL of a layer "
            "geopandas can open (.fgb, .gpkg, .geojson)"
        ) from exc
    if index >= len(frame):
        raise SampleSourceError(
            f"job index {index} is out of range: sample source {source} has {len(frame)} rows "
            f"(indexes 0-{len(frame) - 1}); use a smaller `index`"
        )
    if frame.crs is not None and frame.crs.to_epsg() != 4326:
        frame = frame.to_crs(4326)
    row = frame.iloc[index]
    geometry = row.geometry
    if geometry is None or shapely.is_empty(geometry):
        raise SampleSourceError(
            f"row {index} of sample source {source} has no geometry; fix the source"
        )
    attributes = {k: _plain(v) for k, v in row.items() if k != frame.geometry.name}
    log.debug("sample %d of %s: %s", index, source, attributes)
    return Sample(index=index, geometry=geometry, attributes=attributes)


def _plain(value: Any) -> Any:
    """numpy scalars to Python values, so attributes serialise to JSON."""
    return value.item() if hasattr(value, "item") else value
