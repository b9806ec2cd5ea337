# `make test` and `make bench` each create .venv here and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# A pinned torch first: with no torch present, an unpinned one may be a multi-GB CUDA
# build. pyproject keeps the open range (torch>=2.4) for real users.
TORCH_PIN ?= torch==2.13.0

.PHONY: test bench build lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,bench,hf,trl,dev]"
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

lint: $(STAMP)
	$(PY) -m ruff check gft_kernels integration benchmarks tests
	$(PY) -m ruff format --check gft_kernels integration benchmarks tests

clean:
	rm -rf $(VENV) build *.egg-info benchmarks/out
