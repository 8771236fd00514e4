# Two commands do everything on a fresh machine (Python 3.11 or 3.12):
#   make run    set up .venv if needed, then run the default experiment
#   make test   set up .venv if needed, then lint (ruff, mypy) and run the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedlora-installed

.PHONY: run test test-fast lint setup clean-runs

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-dev.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/fedlora $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check fedlora strategies tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q -m "slow or not slow" --durations=25 $(ARGS)

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow" $(ARGS)
