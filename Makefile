# Two commands for a fresh machine; both install what they need first (scripts/setup.sh).
.PHONY: setup test demo lint bench lock clean

setup:
	./scripts/setup.sh

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest

# The offline demo on an embedded database of its own under demo-output/home (left running:
# `STACCHIP_HOME=demo-output/home .venv/bin/stacchip-db db stop` stops it).
demo: setup
	.venv/bin/stacchip-db demo --out demo-output

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# The quick benchmarks behind README's "Measured speed", on the default durable configuration
# (each script's docstring says what it measures; bench_queries.py fills 10 M chips: run it
# on its own, `.venv/bin/python bench/bench_queries.py`).
bench: setup
	.venv/bin/python bench/bench_startup.py --repeat 3
	.venv/bin/python bench/bench_index.py
	.venv/bin/python bench/bench_store.py
	.venv/bin/python bench/bench_bulk_index.py
	.venv/bin/python bench/bench_prechip.py
	.venv/bin/python bench/bench_ingest.py

# Refresh constraints.txt (the exact versions CI installs) from pyproject.toml's ranges.
lock:
	./scripts/lock.sh

# Stop the demo's database and remove what builds, tests, the demo and benchmarks left.
clean:
	-STACCHIP_HOME="$(CURDIR)/demo-output/home" .venv/bin/stacchip-db db stop 2>/dev/null
	rm -rf demo-output bench/out build dist .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
