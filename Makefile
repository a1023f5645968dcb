# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint format demo clean

setup: $(STAMP)

# Reinstalls only when the pinned set or the package metadata changes.
$(STAMP): requirements-cpu.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -c constraints.txt -r requirements-cpu.txt
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps -e .
	# torchvision here is a CUDA build: let it import on CPU (only the official-processor test and the
	# qwen-vl-utils baseline use it; the swim package does not)
	$(BIN)/python tools/install_tv_shim.py
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check swim tests benchmarks
	$(BIN)/ruff format --check swim tests benchmarks

format: setup
	$(BIN)/ruff format swim tests benchmarks
	$(BIN)/ruff check --fix swim tests benchmarks

test: setup lint
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/swim demo --config recipes/demo.yaml --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
