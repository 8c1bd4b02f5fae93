#!/usr/bin/env bash
# The main job on the embedded database, offline: start and migrate it, ingest Sentinel-2 and
# NAIP scenes from a loopback STAC API, then sample, export, describe and picture the chips.
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

# What users do with a full database: choose chips with SQL, export them, look at them.
out="$STACCHIP_DEMO_OUTPUT"
selection=(--collection sentinel-2-l2a --max-cloud 0.5 -n 64 --seed 7)
echo
echo "demo: a seeded sample (64 Sentinel-2 chips with at most 50 % cloud), first rows:"
$sdb sample "${selection[@]}" --format csv -o "$out/sample.csv"
head -n 4 "$out/sample.csv"
echo
echo "demo: the same sample as npz cubes of 32 chips (Clay format):"
rm -rf "$out/cubes"
$sdb prechip "${selection[@]}" --cube-size 32 --out "$out/cubes"
echo
echo "demo: band statistics of the cubes:"
$sdb stats --cubes "$out/cubes/sentinel-2-l2a" --platform sentinel-2-l2a \
    --yaml "$out/band_stats.yaml"
$sdb preview "${selection[@]}" --out "$out/preview.png"
$sdb map --collection sentinel-2-l2a --out "$out/map.png"

echo
echo "demo: done. What it made:"
echo "  database          psql \"\$($sdb db url)\"   (STACCHIP_HOME=$STACCHIP_HOME)"
echo "  copied scenes     $out/target/{collection}/{item_id}/"
echo "  sample            $out/sample.csv"
echo "  npz cubes         $out/cubes/sentinel-2-l2a/cube_*.npz (+ manifest)"
echo "  band statistics   $out/band_stats.yaml"
echo "  pictures          $out/preview.png, $out/map.png"
