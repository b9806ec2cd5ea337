# `make test`, `make bench` and `make aot` each create .venv here and install what they need
# (`make gpu-check` uses the interpreter it is given and installs nothing, see below).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# A pinned torch first: with no torch present, an unpinned one may be a multi-GB CUDA
# build. pyproject keeps the open range (torch>=2.4) for real users.
TORCH_PIN ?= torch==2.13.0

.PHONY: test bench aot build lint fmt clean gpu-check gpu-wheels

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,bench,hf,trl,verl,dev]"
	touch $(STAMP)

build: $(STAMP)
	$(PY) -m gft_kernels.backends.build

# The benchmark smoke run (figures not asserted) goes first so that pytest's summary is
# the last thing the log shows.
test: build
	$(PY) -m benchmarks --quick --out $(VENV)/bench-smoke
	$(PY) -m benchmarks.training --quick --out $(VENV)/training-smoke
	$(PY) -m pytest tests

bench: build
	$(PY) -m benchmarks

# Compiles every Triton kernel variant for sm_80 and sm_90 with no GPU and checks registers,
# spills and the main loops' instruction counts (benchmarks/README.md). Results are cached
# by kernel source and tool version, so a second run only compiles what changed.
# Then every sm_90 variant again with the oldest supported Triton (pyproject's floor, the
# compiler of the H200 machine our GPU checks run on), installed beside the environment's
# own: no variant may fail to compile or spill there either.
TRITON_FLOOR_PIN ?= triton==3.6.0
TRITON_FLOOR_DIR := $(VENV)/triton-floor
TRITON_FLOOR_STAMP := $(TRITON_FLOOR_DIR)/.installed-stamp

$(TRITON_FLOOR_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps --upgrade --target $(TRITON_FLOOR_DIR) "$(TRITON_FLOOR_PIN)"
	touch $(TRITON_FLOOR_STAMP)

aot: $(STAMP) $(TRITON_FLOOR_STAMP)
	$(PY) -m benchmarks.static.aot --cache-dir $(VENV)/aot-cache
	PYTHONPATH=$(TRITON_FLOOR_DIR) $(PY) -m benchmarks.static.aot --arch 90 --cache-dir $(VENV)/aot-cache
	$(PY) -m benchmarks.static.aot --modules benchmarks.static.peers --report-only --no-rows --cache-dir $(VENV)/aot-cache

# On a CUDA machine, offline: the interpreter's own torch and Triton, the checkout from
# PYTHONPATH, optional peers from a folder of wheels (GPU_CHECK_ARGS="--wheels DIR", the
# folder `make gpu-wheels` fills on a machine with an index); then the Triton tests without
# the interpreter, compute-sanitizer, the GPU benchmarks (about 8 minutes in all) and a
# dated section appended to benchmarks/RESULTS.md. The steps are in benchmarks/gpu_check.py
# (GPU_CHECK_ARGS=--dry-run prints them and checks that each resolves offline).
GPU_CHECK_ARGS ?=
GPU_WHEELS ?= .gpu-wheels
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --python $(PYTHON) $(GPU_CHECK_ARGS)

# The peers' pure-Python wheels (no dependencies: the GPU machine has torch and Triton).
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --dest $(GPU_WHEELS) liger-kernel cut-cross-entropy

lint: $(STAMP)
	$(PY) -m ruff check gft_kernels integration benchmarks tests
	$(PY) -m ruff format --check gft_kernels integration benchmarks tests

# Fixes what ruff can fix and formats the tree (make lint only checks).
fmt: $(STAMP)
	$(PY) -m ruff check --fix gft_kernels integration benchmarks tests
	$(PY) -m ruff format gft_kernels integration benchmarks tests

clean:
	rm -rf $(VENV) $(GPU_WHEELS) build *.egg-info benchmarks/out
