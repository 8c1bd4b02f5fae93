#!/usr/bin/env bash
# The main job on the embedded database, offline: start it, migrate it, check it.
# Uses $STACCHIP_HOME (default ~/.local/share/stacchip-db) unless a server URL is set.
set -euo pipefail
cd "$(dirname "$0")/.."
# The demo keeps its own embedded database and files under ./demo-output unless told otherwise.
export STACCHIP_HOME="${STACCHIP_HOME:-$PWD/demo-output/home}"
export STACCHIP_DEMO_OUTPUT="${STACCHIP_DEMO_OUTPUT:-$PWD/demo-output}"
sdb=.venv/bin/stacchip-db
if [ -z "${STACCHIP_DATABASE_URL:-}" ]; then
    $sdb db start
fi
$sdb db init
$sdb db doctor
# Serve a small demo catalog (synthetic COGs, pgstac, stac-fastapi-pgstac) on loopback and run
# `stacchip-db ingest sentinel-2` and `stacchip-db ingest naip` against it.
.venv/bin/python -m stacchip_db.demo
echo
echo "demo: the database is ready. Connect with:  psql \"\$($sdb db url)\""
