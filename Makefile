# Two commands for a newcomer:  `make demo` (the main job) and `make test` (the test suite).
# Both create .venv, install torch and the package, and build the CUDA extension when nvcc is found.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.14.1
# loadgroup: the emulator-variant tests (tests/test_emu_checks.py) share one worker and its builds.
PYTEST_ARGS ?= -n auto --dist loadgroup
STAMP  := $(VENV)/.kvkernels-installed

.PHONY: all install build test test-gpu demo info gpu-check bench clean

all: test

# torch's CUDA build is needed to link the extension (a CPU-only torch has no libc10_cuda);
# --no-build-isolation so the extension compiles against this torch, not a fresh download.
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH)" ninja pybind11
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@

install: $(STAMP)

# Incremental rebuild of kvkernels._C after csrc/ changes (ninja recompiles only what changed).
build: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace

test: build
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-gpu: build
	$(BIN)/python -m pytest -q -m gpu $(PYTEST_ARGS)

demo: build
	$(BIN)/python -m kvkernels demo

info: build
	$(BIN)/python -m kvkernels info

# On a GPU machine: build from source, GPU tests, compute-sanitizer, ceilings, benchmarks ->
# bench/results/<date>-<gpu>.json + .md. Uses the machine's own python/torch (no venv, no registry).
gpu-check:
	bash bench/gpu_check.sh

bench: build
	$(BIN)/python -m kvkernels bench decode

clean:
	rm -rf build *.egg-info kvkernels/_C*.so kvkernels/_build_info.json
