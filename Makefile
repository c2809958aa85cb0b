# One entry point for newcomers and CI.  `make test` and `make demo` create .venv on first use
# (the first install compiles llama-cpp-python from source: about 6 minutes on 2 cores).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
