#!/usr/bin/env bash
# Set up a fresh machine for stacchip-db, idempotently:
#   1. PostgreSQL server binaries and PostGIS (Debian/Ubuntu packages) when missing;
#   2. a virtualenv in .venv with the package and its test extras at the exact versions of
#      constraints.txt (re-installed only when pyproject.toml or constraints.txt changed).
# Used by `make test`, `make demo` and CI; safe to run any number of times.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        log "need root to run: $*"; exit 1; fi
}

newest_major() { ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -n 1; }

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

major=$(newest_major)
if [ -z "$major" ] || [ ! -x "/usr/lib/postgresql/$major/bin/initdb" ]; then
    log "installing the PostgreSQL server"
    apt_install postgresql postgresql-contrib
    major=$(newest_major)
fi
if [ ! -f "/usr/share/postgresql/$major/extension/postgis.control" ]; then
    log "installing PostGIS for PostgreSQL $major"
    apt_install "postgresql-$major-postgis-3"
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "$python" -m venv .venv
fi
stamp=.venv/.stacchip-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing stacchip-db and its test extras into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
    echo "$want" > "$stamp"
fi
log "ready: PostgreSQL $major with PostGIS, .venv with stacchip-db"
