# One target a chore; CI runs the same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `run` needs caretaker alone; tests, linters and the type checker need the dev extras too.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed

.PHONY: install run test unit e2e lint typecheck format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

# The dev install includes the runtime one, so it satisfies `run` as well.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP) $(RUN_STAMP)

install: $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/caretaker run

test: install lint typecheck
	$(BIN)/pytest

unit: install
	$(BIN)/pytest -m 'not e2e'

e2e: install
	$(BIN)/pytest -m e2e

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python bench/webhook_batch.py
	$(BIN)/python bench/check_round.py
	$(BIN)/python bench/analysis.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache celerybeat-schedule*
