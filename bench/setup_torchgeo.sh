#!/usr/bin/env bash
# Create a separate virtualenv holding TorchGeo and PyTorch, for bench/bench_loader.py.
#
# Why a separate venv: torch and torchgeo are not dependencies of stacchip-db (the project's
# venv and its tests stay without torch), and they are large (~5.5 GB with their CUDA
# libraries). The venv gets stacchip-db's own source on PYTHONPATH when the benchmark runs it,
# plus the few runtime packages ChipDataset needs in a DataLoader worker. Idempotent:
# re-running only checks that the imports work.
set -euo pipefail

VENV="${STACCHIP_TORCHGEO_VENV:-/work/venvs/torchgeo}"
PYTHON="${PYTHON:-python3.11}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"

check() {
    "$VENV/bin/python" -c "import torch, torchgeo, stacchip_db.dataset; \
print('torch', torch.__version__, 'torchgeo', torchgeo.__version__, 'in $VENV')"
}

if [ -x "$VENV/bin/python" ] && PYTHONPATH="$REPO" check 2>/dev/null; then
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet \
    "torch==2.14.1" "torchvision==0.29.1" torchgeo requests
# stacchip-db itself with its runtime dependencies (not editable: the benchmark puts the
# source tree first on PYTHONPATH, so the checkout under test is what runs).
"$VENV/bin/python" -m pip install --quiet "$REPO"
PYTHONPATH="$REPO" check
