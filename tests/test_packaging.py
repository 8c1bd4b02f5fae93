"""A wheel carries what `db init` needs, and `db init` works from it outside the source tree."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO


def _build_wheel(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(REPO)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = out.glob("stacchip_db-*.whl")
    return wheel


def test_wheel_ships_migrations_and_sql_and_init_works_from_it(
    tmp_path: Path, empty_database_url: str
) -> None:
    wheel = _build_wheel(tmp_path / "dist")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "stacchip_db/alembic/env.py" in names
    for revision in (REPO / "alembic" / "versions").glob("*.py"):
        assert f"stacchip_db/alembic/versions/{revision.name}" in names
    assert "stacchip_db/basemap/ne_110m_countries.geojson" in names  # the map's outline
    for sql in (REPO / "sql").glob("*.sql"):
        assert f"stacchip_db/sql/{sql.name}" in names

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
         str(wheel)],
        check=True, capture_output=True, text=True,
    )
    script = (
        "import json, sys\n"
        "from stacchip_db.db import init_database\n"
        "from stacchip_db.resources import resource_dir\n"
        "state = init_database(sys.argv[1])\n"
        "print(json.dumps({'sql': str(resource_dir('sql')), 'current': state.current,"
        " 'problems': state.problems}))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, empty_database_url],
        cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["sql"].startswith(str(site)), result
    assert result["current"], result["problems"]
