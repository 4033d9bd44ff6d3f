# Two commands: `make run` (the whole stack on embedded defaults, until Ctrl-C) and `make test` (the whole suite);
# `make lint` checks the code (ruff, then mypy; both configured in pyproject.toml).
# Each installs what it needs into a local virtual environment first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run: make PYTHON=python3 ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/crypto-agent up

# Two pytest processes: the end-to-end suites (real Prefect servers, the whole stack) run apart from the
# unit and flow tests, so no process-wide Prefect state (settings, event workers) leaks between them.
test: $(STAMP)
	./.ci/system-deps
	$(BIN)/python -m pytest -q --ignore=tests/e2e --ignore=tests/stack
	$(BIN)/python -m pytest -q tests/e2e tests/stack

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV)
