# Two commands for a newcomer:  `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install torch and the package (quietly: the full output goes to a log, shown
# when a step fails). `make test` also builds the CUDA extension when nvcc is found (the suite's
# static review reads the binary); `make demo` builds it only on a machine with a GPU to run it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.14.1
# loadgroup: the emulator-variant tests (tests/test_emu_checks.py) share one worker and its builds.
PYTEST_ARGS ?= -n auto --dist loadgroup
STAMP  := $(VENV)/.kvkernels-installed
SETUP_LOG := $(VENV)/setup.log
BUILD_LOG := build/build_ext.log
# A GPU here (nvidia-smi lists one)? Without one the demo runs the PyTorch reference, and compiling
# the CUDA extension (minutes) would buy it nothing. `make demo HAVE_GPU=1` overrides.
HAVE_GPU ?= $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo 1)
# gpu-check runs the project's environment when there is one, else the machine's python3.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(abspath $(BIN)/python),python3)

.PHONY: all install build test test-gpu demo info gpu-check bench clean

all: test

# The package is installed without the extension (KVKERNELS_SKIP_CUDA=1); `build` compiles it in place.
# torch's CUDA build is needed to link it (a CPU-only torch has no libc10_cuda); --no-build-isolation
# so it compiles against this torch, not a fresh download.
$(STAMP): pyproject.toml setup.py
	@echo "make: setting up $(VENV) (torch, kvkernels and test/bench extras; about 3 minutes the first time)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@( $(BIN)/python -m pip install -q --upgrade pip setuptools wheel \
	  && $(BIN)/python -m pip install -q "$(TORCH)" ninja pybind11 \
	  && KVKERNELS_SKIP_CUDA=1 $(BIN)/python -m pip install -q --no-build-isolation -e ".[test,bench]" \
	  ) > $(SETUP_LOG) 2>&1 || { tail -n 30 $(SETUP_LOG); echo "make: set-up failed (full log: $(SETUP_LOG))"; exit 1; }
	@touch $@

install: $(STAMP)

# Incremental rebuild of kvkernels._C after csrc/ changes (ninja recompiles only what changed).
build: $(STAMP)
	@mkdir -p build
	@echo "make: building the CUDA extension kvkernels._C (about 2-3 minutes from scratch on 2 cores; log: $(BUILD_LOG))"
	@$(BIN)/python setup.py -q build_ext --inplace > $(BUILD_LOG) 2>&1 \
	  || { tail -n 40 $(BUILD_LOG); echo "make: build failed (full log: $(BUILD_LOG))"; exit 1; }
	@grep -h '^kvkernels:' $(BUILD_LOG) || true

test: build
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-gpu: build
	$(BIN)/python -m pytest -q -m gpu $(PYTEST_ARGS)

demo: $(if $(HAVE_GPU),build,install)
	@$(if $(HAVE_GPU),,echo "make: no GPU here, so the CUDA extension is not built (make build or make test build it)")
	@$(BIN)/python -m kvkernels demo

info: install
	@$(BIN)/python -m kvkernels info

# On a GPU machine: build from source, GPU tests, compute-sanitizer, ceilings, benchmarks ->
# bench/results/<date>-<gpu>.json + .md. Uses .venv's python when it exists, else the machine's
# python3 (GPU_PYTHON=... to choose); no registry needed.
gpu-check:
	PYTHON=$(GPU_PYTHON) bash bench/gpu_check.sh

bench: build
	$(BIN)/python -m kvkernels bench decode

clean:
	rm -rf build *.egg-info kvkernels/_C*.so kvkernels/_build_info.json
