# Two commands for a fresh machine; both install what they need first (scripts/setup.sh).
.PHONY: setup test demo lint bench clean

setup:
	./scripts/setup.sh

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest

demo: setup
	./scripts/demo.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
