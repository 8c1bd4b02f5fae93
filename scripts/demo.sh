#!/usr/bin/env bash
# The main job on the embedded database, offline: start it, migrate it, check it.
# Uses $STACCHIP_HOME (default ~/.local/share/stacchip-db) unless a server URL is set.
set -euo pipefail
cd "$(dirname "$0")/.."
sdb=.venv/bin/stacchip-db
if [ -z "${STACCHIP_DATABASE_URL:-}" ]; then
    $sdb db start
fi
$sdb db init
$sdb db doctor
echo
echo "demo: the database is ready. Connect with:  psql \"\$($sdb db url)\""
