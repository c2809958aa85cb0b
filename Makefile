# One entry point for newcomers and CI.  `make test` and `make demo` create .venv on first use
# (the first install compiles llama-cpp-python from source: about 6 minutes on 2 cores).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install test demo bench clean

install: $(STAMP)

# llama.cpp is compiled for any x86-64 with AVX2, not with -march=native: a native build on a CPU
# that reports AMX dies with SIGILL in a VM that does not grant AMX state (seen on this project's CI
# machines). --no-cache-dir: a wheel cached from an earlier native build must not be reused.
# Extra flags an operator exports (CMAKE_ARGS=-DGGML_CUDA=on for a GPU) are passed on after ours.
LLAMA_PIN        := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
endif
LLAMA_STAMP       = $(VENV)/.llama-$(subst ==,-,$(LLAMA_PIN))

$(LLAMA_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	test -n "$(LLAMA_PIN)" || { echo "pyproject.toml must pin llama-cpp-python with =="; exit 1; }
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $(CMAKE_ARGS)" $(BIN)/python -m pip install --quiet --no-cache-dir '$(LLAMA_PIN)'
	touch $@

$(STAMP): pyproject.toml $(LLAMA_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/jee1 demo

bench: $(STAMP)
	$(BIN)/python benchmarks/convert_bench.py
	$(BIN)/python benchmarks/runtime_bench.py
	$(BIN)/python benchmarks/eval_bench.py
	$(BIN)/python benchmarks/bridge_bench.py
	$(BIN)/python benchmarks/speculative_bench.py
	$(BIN)/python benchmarks/safety_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
