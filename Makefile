# Quick start: `make demo` (runs the main job) and `make test` (runs the test suite).
# Both install what they need first: torch (if absent), then this package with its extension.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of torch 2.13 is what the development machines carry on disk; any torch >= 2.4 works.
TORCH ?= torch==2.13.0
STAMP := build/.installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cpp csrc/cuda/*.h kernels/*.cu kernels/*.cuh kernels/*.h)

.PHONY: install demo test bench info clean

$(STAMP): $(SOURCES)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)" || $(PIP) install torch
	$(PIP) install -q setuptools wheel ninja
	$(PIP) install --no-build-isolation -e ".[test,bench,triton]"
	@mkdir -p build && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m fastproto.cli demo

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

bench: $(STAMP)
	$(PYTHON) bench/metrics.py --out bench/RESULTS.md

info: $(STAMP)
	$(PYTHON) -m fastproto.cli info

clean:
	rm -rf build fastproto/_C*.so *.egg-info
