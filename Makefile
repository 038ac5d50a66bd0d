# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean bench services

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first (it lies on local disk); never a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m workers.demo

lint: $(STAMP)
	$(BIN)/ruff check fedq workers tests
	$(BIN)/ruff format --check fedq workers tests
	$(BIN)/mypy fedq

services:
	bash .ci/services

test: lint services
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/fedq bench codecs --shapes gpt2

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
