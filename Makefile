# `make test`, `make bench` and `make aot` each create .venv here and install what they need
# (`make gpu-check` uses an environment of its own, see below).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# A pinned torch first: with no torch present, an unpinned one may be a multi-GB CUDA
# build. pyproject keeps the open range (torch>=2.4) for real users.
TORCH_PIN ?= torch==2.13.0

.PHONY: test bench aot build lint fmt clean gpu-check

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
	$(PY) -m pytest tests

bench: build
	$(PY) -m benchmarks

# Compiles every Triton kernel variant for sm_80 and sm_90 with no GPU and checks registers,
# spills and the main loops' instruction counts (benchmarks/README.md). Results are cached
# by kernel source and tool version, so a second run only compiles what changed.
aot: $(STAMP)
	$(PY) -m benchmarks.static.aot --cache-dir $(VENV)/aot-cache

# On a CUDA machine: an environment of its own (GPU_VENV) with a CUDA build of torch, never
# the TORCH_PIN above (the base interpreter's torch if it has CUDA, else `pip install torch`,
# from the index in $$TORCH_CUDA_INDEX when set); then the tests without the Triton
# interpreter, the benchmarks on CUDA, and a dated section appended to benchmarks/RESULTS.md.
# The steps are in benchmarks/gpu_check.py (GPU_CHECK_ARGS=--dry-run prints them).
GPU_VENV ?= .venv-gpu
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --python $(PYTHON) --venv $(GPU_VENV) $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check gft_kernels integration benchmarks tests
	$(PY) -m ruff format --check gft_kernels integration benchmarks tests

# Fixes what ruff can fix and formats the tree (make lint only checks).
fmt: $(STAMP)
	$(PY) -m ruff check --fix gft_kernels integration benchmarks tests
	$(PY) -m ruff format gft_kernels integration benchmarks tests

clean:
	rm -rf $(VENV) $(GPU_VENV) build *.egg-info benchmarks/out
