# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install demo test test-all test-gpu lint bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the whole factory on its embedded defaults (CPU, no network, ./.factory/).
demo: $(STAMP)
	$(BIN)/factory demo

## Lint, then the default (fast) test suite.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

## Every test, slow ones included.
test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

## The CUDA checks (marked gpu; skipped where CUDA is absent).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu -s

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf .factory build *.egg-info
