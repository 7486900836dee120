# The two commands in the README, and the ones around them.
#
#   make run     set up .venv if needed, then `saga demo` (SQLite + in-process queue)
#   make test    set up .venv if needed, then the whole test suite
#   make lint    ruff check, ruff format --check, mypy: the hooks of .pre-commit-config.yaml
#   make hooks   run those checks before every commit (git's pre-commit hook)
#   make bench   the benchmark in bench/ (needs PostgreSQL)
#   make screenshots  the console's pages from the browser test, in artifacts/screenshots/
#   make dist    the wheel and the sdist, in dist/ (docs/deploying.md)
#
# Set-up needs only python3 (3.11 or newer) and npm (for the console's htmx; installed
# when run as root on Debian). It is redone when pyproject.toml, the build hook or the
# npm lock changes: the stamp file records the last successful install.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HTMX := static/vendor/htmx.min.js
LINKS := console/templates console/static
PYTEST_ARGS ?= -n 2

.PHONY: run test lint hooks bench setup clean screenshots dist npm

run: setup
	$(BIN)/saga demo

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

# One list of checks: .pre-commit-config.yaml, run here on every file.
lint: setup
	$(BIN)/pre-commit run --all-files --show-diff-on-failure

hooks: setup
	$(BIN)/pre-commit install

bench: setup
	$(BIN)/python bench/baselines.py

setup: $(STAMP) $(HTMX) $(LINKS)

dist: setup
	rm -rf dist
	$(BIN)/python -m build --outdir dist

screenshots: setup
	@command -v chromium >/dev/null || { echo "make: needs Debian's chromium: apt-get install chromium"; exit 1; }
	$(BIN)/pytest -p no:cacheprovider tests/console/test_console_browser.py -k watch_it_complete
	@echo "screenshots: artifacts/screenshots/"

# The console's htmx (the npm package pinned in package-lock.json, in static/vendor/,
# git-ignored; never a CDN) and the links that put templates/ and static/ inside the
# console package come from the build hook, hatch_build.py, which the editable
# install runs. Missing ones (deleted by hand) are made by installing again.
$(HTMX) $(LINKS) &: | $(STAMP) npm
	$(BIN)/python -m pip install --quiet --no-deps -e .

npm:
	@command -v npm >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "make: installing npm (for the console's htmx)"; \
			apt-get update -qq && apt-get install -y -qq npm; \
		else \
			echo "make: npm is needed for the console's htmx: sudo apt-get install npm"; exit 1; \
		fi; }

$(STAMP): pyproject.toml hatch_build.py package.json package-lock.json | npm
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "make: this project needs Python 3.11 or newer as $(PYTHON)"; exit 1; }
	@test -x $(BIN)/python || $(MAKE) --no-print-directory venv
	@# Left by installs from before the build moved to hatchling: it would report the old version.
	rm -rf saga_engine.egg-info
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Debian ships venv's pip bootstrap in a separate package (python3-venv). On a
# fresh machine, install it when we may (root with apt), else say what to run.
.PHONY: venv
venv:
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "make: installing python3-venv (Debian keeps venv's pip bootstrap there)"; \
			apt-get update -qq && apt-get install -y -qq python3-venv; \
		else \
			echo "make: $(PYTHON) cannot create virtual environments; install python3-venv:"; \
			echo "      sudo apt-get install python3-venv"; exit 1; \
		fi; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache saga.db saga.db-wal saga.db-shm \
		node_modules static/vendor dist $(LINKS)
