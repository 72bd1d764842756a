# `make demo` and `make test` set up .venv themselves on a machine with only Python 3 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs bench bench-install uci clean

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned resolve of `torch>=2.2` would pull a CUDA build.
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/varlin demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory docs

# The documentation site in site/: strict (any warning, such as a broken link or cross-reference,
# fails), then every public name of every public module must be in the API reference.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/python scripts/check_docs.py site

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench-install: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-bench.txt

bench: bench-install
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
