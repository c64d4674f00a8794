# The two commands of the README. Both set up .venv first (idempotent, offline-safe).
.PHONY: setup browser demo test lint bench

setup:
	bash scripts/setup.sh

# Debian's chromium + chromium-driver for the browser test of the MLflow UI
# (tests/test_ui_browser.py): installed as root where apt-get exists, a no-op when present.
browser:
	bash scripts/install-browser.sh

demo: setup
	.venv/bin/simtune demo

test: setup browser
	.venv/bin/ruff check src tests bench scripts
	.venv/bin/ruff format --check src tests bench scripts
	.venv/bin/python -m pytest

lint: setup
	.venv/bin/ruff check src tests bench scripts
	.venv/bin/ruff format --check src tests bench scripts

bench: setup
	.venv/bin/python bench/run_all.py