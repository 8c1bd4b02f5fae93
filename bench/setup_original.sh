#!/usr/bin/env bash
# Create a separate virtualenv holding the original stacchip 0.1.38, for bench/bench_index.py.
#
# Why a separate venv: stacchip 0.1.38 pins numpy<2 and needs an older pyarrow/pystac than
# stacchip-db, so the two cannot share one environment. Idempotent: re-running only checks
# that the import works.
set -euo pipefail

VENV="${STACCHIP_ORIG_VENV:-/work/venvs/stacchip-orig}"
PYTHON="${PYTHON:-python3.11}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import stacchip.indexer" 2>/dev/null; then
    echo "original stacchip already installed in $VENV"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# pystac 1.10 keeps proj:epsg (the original indexer reads item.properties["proj:epsg"]);
# pyarrow<18 still builds with numpy<2, which stacchip pins.
"$VENV/bin/python" -m pip install --quiet \
    "stacchip==0.1.38" "numpy<2" "pyarrow<18" "pystac==1.10.*"
"$VENV/bin/python" -c "import stacchip.indexer; print('original stacchip installed in $VENV')"
