"""The offline demo: a small STAC catalog served on loopback, and the main job run against it.

`stacchip-db demo [--out DIR]` (what `make demo` runs; needs `pip install 'stacchip-db[demo]'`)
builds the catalog, serves it with stac-fastapi-pgstac on 127.0.0.1, runs `stacchip-db ingest
sentinel-2` and `ingest naip` against it into an embedded database of its own under DIR/home, then
samples, exports, describes and pictures the chips. The tests' loopback STAC API and the
benchmarks build on the same pieces (the tests' fault injector and expected choices live in
tests/stac_server.py):

- `s2_variants` / `s2_item` / `naip_item`: variants of real STAC items shipped as package data
  (`stacchip_db/demo_data/`) with dates, cloud cover, grid codes and nodata percentages chosen so
  that "least cloudy per quarter" is testable: per quarter a winner below 10 % beside a valid
  scene above 10 % (a text sort would pick that one), a clearer scene of the wrong MGRS tile and
  a clearer one with too much nodata; 2020 Q3 only above 75 % cloud; 2021 Q4 empty;
- `synthesize_assets`: one set of small COGs (stacchip_db.synthetic) that all variants point to;
- `load_catalog`: a pgstac database (`db init`, so numeric queryables are registered) loaded
  through pypgstac's loader;
- `StacApiServer`: stac-fastapi-pgstac under uvicorn in a background thread (optionally behind
  ASGI middleware);
- `run_demo`: the demo itself.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from stacchip_db.config import DATABASE_URL_ENV, HOME_ENV, Settings
from stacchip_db.db import connect, init_database, resolve_url
from stacchip_db.db.embedded import EmbeddedCluster
from stacchip_db.errors import StacchipError
from stacchip_db.processors.sentinel2 import Sentinel2
from stacchip_db.synthetic import synthesize_item

log = logging.getLogger(__name__)

S2_FIXTURE = "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json"
NAIP_FIXTURE = "naip-planetary-computer-200.ndjson"
S2_COLLECTION_FIXTURE = "sentinel-2-l2a-collection.json"
NAIP_COLLECTION_FIXTURE = "naip-collection.json"
S2_ASSETS = Sentinel2.assets
S2_TILE = "20HNJ"
S2_SAMPLE_BOX = (-62.40, -33.10, -62.20, -32.90)
"""A small area inside the fixture scene's footprint (lon/lat box)."""
NAIP_YEARS = (2011, 2013, 2015, 2017, 2019, 2021, 2023)
SKIPPED_QUARTER = (2020, 3)
"""Only scenes above 75 % cloud: the quarter is skipped."""
EMPTY_QUARTER = (2021, 4)
"""No scenes at all: the quarter is logged and skipped."""


class DemoError(StacchipError):
    """The demo catalog could not be built or served."""


def fixtures_dir() -> Path:
    """The real STAC items the demo is built from: package data, so the wheel carries them."""
    path = Path(__file__).resolve().parent / "demo_data"
    if not (path / S2_FIXTURE).is_file():
        raise DemoError(f"the demo's STAC items are missing from {path}; reinstall stacchip-db")
    return path


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# -- the catalog's items ----------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One catalog item made from a fixture: the parts that differ from it."""

    day: date
    cloud: float
    tile: str = S2_TILE
    nodata_pct: float = 5.0


def s2_variants(years: Iterable[int] = range(2018, 2024)) -> list[Variant]:
    """The Sentinel-2 scenes of the catalog (see the module docstring)."""
    variants = []
    for year in years:
        for quarter in range(1, 5):
            if (year, quarter) == EMPTY_QUARTER:
                continue
            month = 3 * (quarter - 1) + 1
            if (year, quarter) == SKIPPED_QUARTER:
                variants += [
                    Variant(date(year, month, 10), 80.0),
                    Variant(date(year, month + 1, 10), 91.5),
                ]
                continue
            winner = 2.0 + (year * 4 + quarter) % 7  # 2..8 %, below 10: text sort loses it
            variants += [
                Variant(date(year, month + 1, 10), winner),
                Variant(date(year, month, 20), 16.8),
                Variant(date(year, month + 2, 5), 0.5, tile="20HNK"),
                Variant(date(year, month + 2, 15), 1.0, nodata_pct=35.0),
            ]
    return variants


def s2_item(base: dict[str, Any], variant: Variant, collection: str) -> dict[str, Any]:
    """The fixture item (with synthetic hrefs) as `variant`: id, date, cloud, tile, nodata."""
    item = copy.deepcopy(base)
    stamp = variant.day.strftime("%Y%m%d")
    item["id"] = f"S2A_T{variant.tile}_{stamp}T140636_L2A"
    item["collection"] = collection
    props = item["properties"]
    props["datetime"] = f"{variant.day.isoformat()}T14:11:54.463000Z"
    props["eo:cloud_cover"] = variant.cloud
    props["grid:code"] = f"MGRS-{variant.tile}"
    props["s2:nodata_pixel_percentage"] = variant.nodata_pct
    for key in ("created", "updated", "s2:product_uri", "s2:granule_id", "earthsearch:s3_path"):
        props.pop(key, None)
    item["links"] = []
    return item


def naip_item(base: dict[str, Any], year: int) -> dict[str, Any]:
    """The fixture NAIP item (with synthetic hrefs) as flown in `year`."""
    item = copy.deepcopy(base)
    old_year = str(base["properties"]["naip:year"])
    item["id"] = base["id"].replace(f"_{old_year}", f"_{year}")
    item["properties"]["naip:year"] = str(year)
    item["properties"]["datetime"] = f"{year}-{(year % 5) + 6:02d}-15T16:00:00Z"
    item["links"] = []
    return item


def synthesize_assets(out_dir: Path, *, s2_scale: int = 10, naip_scale: int = 20) -> dict[str, Any]:
    """Write the COGs once; return the two base items whose hrefs point at them.

    Keys: `s2` (the Sentinel-2 fixture, its 11 assets) and `naip` (the first NAIP item).
    """
    fixtures = fixtures_dir()
    s2 = _json(fixtures / S2_FIXTURE)
    naip = json.loads((fixtures / NAIP_FIXTURE).read_text().splitlines()[0])
    return {
        "s2": synthesize_item(s2, out_dir / "sentinel-2", S2_ASSETS, scale=s2_scale),
        "naip": synthesize_item(naip, out_dir / "naip", ["image"], scale=naip_scale),
    }


def collection_document(
    fixture: str, collection_id: str, directory: Path | None = None
) -> dict[str, Any]:
    """A fixture collection document (from `directory`, else the demo's) under another id."""
    document = _json((directory or fixtures_dir()) / fixture)
    document["id"] = collection_id
    document["links"] = []
    return document


def naip_sample_geometry(base: dict[str, Any]) -> dict[str, Any]:
    """A small polygon around the NAIP item's centre (GeoJSON)."""
    west, south, east, north = base["bbox"]
    cx, cy = (west + east) / 2, (south + north) / 2
    return _box(cx - 0.002, cy - 0.002, cx + 0.002, cy + 0.002)


def _box(west: float, south: float, east: float, north: float) -> dict[str, Any]:
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    return {"type": "Polygon", "coordinates": [ring]}


def write_sample_source(path: Path, rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> Path:
    """A GeoJSON sample source of `(geometry, properties)` rows."""
    features = [
        {"type": "Feature", "geometry": geometry, "properties": properties}
        for geometry, properties in rows
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def s2_sample_rows(count: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """`count` sample rows, all on the demo MGRS tile (jobs differ by their seeded years)."""
    return [(_box(*S2_SAMPLE_BOX), {"name": S2_TILE}) for _ in range(count)]


# -- the pgstac source database ---------------------------------------------------------------


def create_database(server_url: str, name: str) -> str:
    """Create database `name` on the server of `server_url` unless it exists; its URL."""
    with connect(server_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(server_url, dbname=name)


def load_catalog(
    url: str, collections: Iterable[dict[str, Any]], items: Iterable[dict[str, Any]]
) -> None:
    """Make `url` a pgstac catalog (db init: pgstac + numeric queryables) and upsert into it."""
    from pypgstac.db import PgstacDB
    from pypgstac.load import Loader, Methods

    init_database(url)
    pgdb = PgstacDB(dsn=url)
    try:
        loader = Loader(pgdb)
        loader.load_collections(iter(list(collections)), Methods.upsert)
        loader.load_items(iter(list(items)), Methods.upsert)
    finally:
        pool = pgdb.pool
        pgdb.disconnect()
        if pool is not None:
            pool.close()


def asyncpg_url(url: str) -> str:
    """A libpq URL or keyword string as the URL asyncpg (stac-fastapi-pgstac) accepts."""
    params = conninfo_to_dict(url)
    user = quote(str(params.get("user") or "postgres"))
    password = params.get("password")
    auth = f"{user}:{quote(str(password))}" if password else user
    host = str(params.get("host") or "127.0.0.1")
    port = str(params.get("port") or 5432)
    dbname = quote(str(params.get("dbname") or "postgres"))
    if host.startswith("/"):  # unix socket directory
        return f"postgresql://{auth}@/{dbname}?host={quote(host, safe='/')}&port={port}"
    return f"postgresql://{auth}@{host}:{port}/{dbname}"


# -- serving it -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StacApiServer:
    """stac-fastapi-pgstac over the pgstac database at `database_url`, on 127.0.0.1."""

    def __init__(
        self,
        database_url: str,
        *,
        port: int | None = None,
        wrap: Callable[[Any], Any] | None = None,
    ) -> None:
        """`wrap` is ASGI middleware put around the API (the tests' fault injector)."""
        import uvicorn
        from stac_fastapi.pgstac.app import instantiate_api
        from stac_fastapi.pgstac.config import PostgresSettings
        from stac_fastapi.pgstac.config import Settings as ApiSettings
        from stac_fastapi.pgstac.db import close_db_connection, connect_to_db

        dsn = asyncpg_url(database_url)

        class _Postgres(PostgresSettings):
            # stac-fastapi builds a TCP URL from PG* fields; ours may be a unix socket.
            @property
            def connection_string(self) -> str:
                return dsn

        postgres = _Postgres(
            pguser="-",
            pgpassword="-",
            pghost="-",
            pgport=0,
            pgdatabase="-",
            db_min_conn_size=1,
            db_max_conn_size=8,
        )

        @asynccontextmanager
        async def lifespan(app: Any) -> Any:
            await connect_to_db(app, postgres_settings=postgres)
            yield
            await close_db_connection(app)

        settings = ApiSettings(
            enabled_extensions=None,
            stac_fastapi_title="stacchip-db demo catalog",
            stac_fastapi_description="Synthetic Sentinel-2 and NAIP scenes served on loopback",
            stac_fastapi_landing_id="stacchip-demo",
            stac_fastapi_version="1.0.0",
        )
        api = instantiate_api(settings=settings, lifespan=lifespan)
        self.app = wrap(api.app) if wrap is not None else api.app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="stac-api", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._server.serve())

    def start(self, timeout: float = 30.0) -> StacApiServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise DemoError(f"the STAC API did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> StacApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the demo ---------------------------------------------------------------------------------

SOURCE_DATABASE = "stacchip_demo_source"
DEMO_EXTRA = ("stac_fastapi.pgstac", "uvicorn")
"""What `pip install 'stacchip-db[demo]'` adds: the loopback STAC API the demo serves."""
SELECTION = ["--collection", "sentinel-2-l2a", "--max-cloud", "0.5", "-n", "48", "--seed", "7"]
"""The demo's seeded sample: 48 Sentinel-2 chips with at most 50 % cloud (3 cubes of 16)."""


def check_demo_extra() -> None:
    """One line naming the install command when the demo's extra is missing."""
    missing = []
    for module in DEMO_EXTRA:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package is missing
            found = False
        if not found:
            missing.append(module.split(".")[0].replace("_", "-"))
    if missing:
        raise DemoError(f"the demo needs {', '.join(missing)}: pip install 'stacchip-db[demo]'")


def build_demo_catalog(server_url: str, out_dir: Path) -> tuple[str, dict[str, Any]]:
    """COGs under `out_dir`, catalog database beside the main one: `(catalog url, bases)`."""
    bases = synthesize_assets(out_dir / "catalog")
    items = [s2_item(bases["s2"], v, "sentinel-2-l2a") for v in s2_variants()]
    items += [naip_item(bases["naip"], year) for year in NAIP_YEARS]
    catalog_url = create_database(server_url, SOURCE_DATABASE)
    load_catalog(
        catalog_url,
        [
            collection_document(S2_COLLECTION_FIXTURE, "sentinel-2-l2a"),
            collection_document(NAIP_COLLECTION_FIXTURE, "naip"),
        ],
        items,
    )
    return catalog_url, bases


DEMO_HOMES = Path("/var/lib/stacchip-db-demo")
"""Where the demo's database lives, as root, when the server user cannot reach --out."""


def demo_home(out_dir: Path) -> Path:
    """`out_dir/home`; as root, when the server user (postgres) cannot enter `out_dir` (under
    /root, say), a home of this output folder's own under `DEMO_HOMES` instead: the demo may
    not change the permissions of folders it did not make."""
    home = out_dir / "home"
    if EmbeddedCluster(home).server_can_enter(out_dir):
        return home
    digest = hashlib.sha256(str(out_dir).encode()).hexdigest()[:12]
    return DEMO_HOMES / digest


def demo_environment(home: Path) -> dict[str, str]:
    """The environment of the demo's commands: its own embedded database, never the user's."""
    env = {k: v for k, v in os.environ.items() if k not in (DATABASE_URL_ENV, HOME_ENV)}
    env[HOME_ENV] = str(home)
    return env


def _stacchip_db(args: list[str], env: dict[str, str]) -> None:
    """Run `stacchip-db ARGS` as the user would, showing the command and its output."""
    click.echo(f"\n$ stacchip-db {' '.join(args)}")
    done = subprocess.run([sys.executable, "-m", "stacchip_db.cli", *args], env=env)
    if done.returncode != 0:
        raise DemoError(f"`stacchip-db {args[0]}` failed (exit {done.returncode}); see above")


def _print_stored(url: str) -> None:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            """
            SELECT collection, item_id, count(*), round(avg(cloud_fraction)::numeric, 3)
            FROM stacchip.chips GROUP BY 1, 2 ORDER BY 1, 2
            """
        ).fetchall()
        jobs = conn.execute(
            "SELECT processor, job_index, status, jsonb_array_length(scenes), attempts "
            "FROM stacchip.jobs ORDER BY processor, job_index"
        ).fetchall()
    click.echo("\nstored chips (collection, item, chips, mean cloud fraction):")
    for collection, item_id, count, cloud in rows:
        click.echo(f"  {collection:<16} {item_id:<40} {count:>4}  {cloud}")
    click.echo("\njobs (processor, index, status, scenes, attempts):")
    for processor, index, status, scenes, attempts in jobs:
        click.echo(f"  {processor:<12} {index:>3}  {status:<10} {scenes:>2}  {attempts}")


@dataclass(frozen=True)
class DemoResult:
    """Where the demo left everything."""

    out_dir: Path
    home: Path
    target: Path
    sample: Path
    cubes: Path
    band_stats: Path
    preview: Path
    map: Path


def run_demo(out_dir: Path) -> DemoResult:
    """The whole offline demo into `out_dir`, on an embedded database of its own.

    Serves a small catalog (synthetic COGs of real STAC items, pgstac, stac-fastapi-pgstac) on
    127.0.0.1, runs `stacchip-db ingest sentinel-2` and `ingest naip` against it, then samples,
    exports, describes and pictures the chips, each as the `stacchip-db` command a user types.
    The database lives under `out_dir/home` and is left running for the user to query; when the
    demo fails, a database it started is stopped again.
    """
    check_demo_extra()
    out_dir = out_dir.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    home = demo_home(out_dir)
    if home.parent != out_dir:
        click.echo(f"demo: the database server cannot enter {out_dir}; its home is {home}")
    env = demo_environment(home)
    cluster = EmbeddedCluster(home)
    was_running = cluster.status().running
    result = DemoResult(
        out_dir=out_dir,
        home=home,
        target=out_dir / "target",
        sample=out_dir / "sample.csv",
        cubes=out_dir / "cubes",
        band_stats=out_dir / "band_stats.yaml",
        preview=out_dir / "preview.png",
        map=out_dir / "map.png",
    )
    try:
        _stacchip_db(["db", "start"], env)
        _stacchip_db(["db", "init"], env)
        url = resolve_url(Settings(home=home))
        click.echo("\ndemo: building and serving a small STAC catalog on 127.0.0.1")
        catalog_url, bases = build_demo_catalog(url, out_dir)
        samples = out_dir / "samples"
        s2_source = write_sample_source(samples / "mgrs.geojson", s2_sample_rows(2))
        naip_source = write_sample_source(
            samples / "naip.geojson", [(naip_sample_geometry(bases["naip"]), {"name": "al"})]
        )
        with StacApiServer(catalog_url) as api:
            click.echo(f"demo: STAC API at {api.url} (pgstac database {SOURCE_DATABASE})")
            for processor, source in (("sentinel-2", s2_source), ("naip", naip_source)):
                _stacchip_db(
                    ["ingest", processor, "--index", "0", "--sample-source", str(source),
                     "--target", str(result.target), "--stac-api", api.url],
                    env,
                )  # fmt: skip
        _print_stored(url)
        _stacchip_db(["sample", *SELECTION, "--format", "csv", "-o", str(result.sample)], env)
        click.echo("".join(result.sample.read_text().splitlines(keepends=True)[:4]), nl=False)
        shutil.rmtree(result.cubes, ignore_errors=True)
        _stacchip_db(["prechip", *SELECTION, "--cube-size", "16", "--out", str(result.cubes)], env)
        _stacchip_db(
            ["stats", "--cubes", str(result.cubes / "sentinel-2-l2a"),
             "--platform", "sentinel-2-l2a", "--yaml", str(result.band_stats)],
            env,
        )  # fmt: skip
        _stacchip_db(["preview", *SELECTION, "--out", str(result.preview)], env)
        _stacchip_db(["map", "--collection", "sentinel-2-l2a", "--out", str(result.map)], env)
    except BaseException:
        if not was_running:
            cluster.stop()
        raise
    return result
