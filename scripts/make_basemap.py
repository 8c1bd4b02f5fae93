"""Write `stacchip_db/basemap/ne_110m_countries.geojson`, the outline under `stacchip-db map`.

Source: Natural Earth 1:110m Cultural Vectors, Admin 0 - Countries (public domain,
https://www.naturalearthdata.com/about/terms-of-use/), as pyogrio ships it offline in its wheel
(`pyogrio/tests/fixtures/naturalearth_lowres`, the former geopandas `naturalearth_lowres`).
Run once (`.venv/bin/python scripts/make_basemap.py`); the output is committed, so nothing is
downloaded or read from pyogrio at run time. Only the outlines are kept (no attributes),
coordinates rounded to 0.01 degree (about 1 km, far below the 1:110m detail).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyogrio
import shapely

SOURCE = (
    Path(pyogrio.__file__).parent / "tests/fixtures/naturalearth_lowres/naturalearth_lowres.shp"
)
TARGET = Path(__file__).resolve().parents[1] / "stacchip_db/basemap/ne_110m_countries.geojson"


def main() -> None:
    frame = pyogrio.read_dataframe(SOURCE)
    geometries = shapely.set_precision(frame.geometry.to_crs(4326).values, 0.01)
    features = [
        {"type": "Feature", "properties": {},
         "geometry": json.loads(shapely.to_geojson(g, indent=None))}
        for g in geometries if g is not None and not g.is_empty
    ]
    document = {
        "type": "FeatureCollection",
        "source": "Natural Earth 1:110m Admin 0 - Countries, public domain "
        "(naturalearthdata.com), via pyogrio's naturalearth_lowres; scripts/make_basemap.py",
        "features": features,
    }
    TARGET.write_text(json.dumps(document, separators=(",", ":")))
    print(f"wrote {TARGET} ({TARGET.stat().st_size:,} bytes, {len(features)} countries)")


if __name__ == "__main__":
    main()
