# Developer and CI entry points. `make test` is the documented test command (README, .ci/run).

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
# Re-run pip only when the dependency spec changes: keeps `make test` instant after the first run.
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv test lint demo bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install -e '.[test]'
	touch $(STAMP)

test: venv
	$(VENV_PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

demo: venv
	$(VENV_PY) scripts/demo.py

bench: venv
	$(VENV_PY) bench/store_bench.py
