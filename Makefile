# Two entry points: `make demo` (set up, then generate from the bundled model) and `make test` (set up with
# the test extras, then the suite). The demo installs only the package, so it is ready in about a minute.
PYTHON ?= python3
# bash for $$'...' quoting: the demo prompt ends in a newline.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
# `qwen3moe-jax aot` needs jax's CUDA plugin, which, once installed, logs CUDA's absence to stderr at every
# `import jax`: it gets a venv of its own, which tests/tools/test_aot.py runs the command in.
AOT_VENV := .venv-aot

# llama.cpp (llama-cpp-python, the parity tests' reference) is compiled from source. Left to itself its build
# tunes for the building CPU (-march=native: AVX-512, AMX...), and the result dies with SIGILL on a machine
# without them; pip's wheel cache, keyed by version only, would then hand that build to later installs. So it
# is built once with portable x86-64 flags (AVX2/FMA/F16C, nothing newer), without pip's cache, into a folder
# named by the version, the machine and the flags (the wheel calls llama.cpp through ctypes, so it fits any
# Python 3), and installed from there: a later run reuses only a wheel built exactly so. WHEELS moves it.
LLAMA_CPP_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml | head -1)
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
WHEELS ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/qwen3moe-jax/wheels
LLAMA_CPP_WHEELS := $(WHEELS)/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(shell uname -m)-$(shell \
	echo '$(LLAMA_CPP_CMAKE_ARGS)' | sha256sum | cut -c1-12)
ifeq ($(LLAMA_CPP_VERSION),)
$(error pyproject.toml pins no llama-cpp-python==VERSION for the Makefile to build)
endif

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# Built into a scratch folder and renamed when complete, so an interrupted build is never taken for a wheel.
$(LLAMA_CPP_WHEELS)/.complete: | $(BIN)/python
	@echo "Compiling llama.cpp (llama-cpp-python $(LLAMA_CPP_VERSION), portable CPU flags) for the parity tests:"
	@echo "about 7 minutes on 2 cores, once per machine; the wheel is kept in $(LLAMA_CPP_WHEELS)"
	rm -rf $(LLAMA_CPP_WHEELS).partial && mkdir -p $(LLAMA_CPP_WHEELS).partial
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" FORCE_CMAKE=1 $(BIN)/pip wheel --no-cache-dir --no-deps \
		--no-binary llama-cpp-python --wheel-dir $(LLAMA_CPP_WHEELS).partial "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	touch $(LLAMA_CPP_WHEELS).partial/.complete
	rm -rf $(LLAMA_CPP_WHEELS) && mv $(LLAMA_CPP_WHEELS).partial $(LLAMA_CPP_WHEELS)

# llama-cpp-python goes in first, from the portable wheel (the file itself, so pip cannot pick another build);
# the test extra then finds it installed at the pinned version.
$(VENV)/.installed-test: pyproject.toml $(LLAMA_CPP_WHEELS)/.complete | $(BIN)/python
	@echo "Installing the package with its test extras (torch, transformers, llama.cpp's wheel): a few minutes"
	$(BIN)/pip install --no-cache-dir $(LLAMA_CPP_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(BIN)/pip install -e '.[test]'
	touch $@

$(AOT_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(AOT_VENV)
	$(AOT_VENV)/bin/pip install --quiet --upgrade pip
	$(AOT_VENV)/bin/pip install --quiet -e '.[aot]'
	touch $@

demo: $(VENV)/.installed-core
	$(BIN)/qwen3moe-jax generate --prompt $$'def fibonacci(n):\n' --max-new-tokens 64 --repeat-penalty 1.2

test: $(VENV)/.installed-test $(AOT_VENV)/.installed
	$(BIN)/ruff check qwen3moe_jax scripts tests
	QWEN3MOE_JAX_AOT_PYTHON=$(CURDIR)/$(AOT_VENV)/bin/python $(BIN)/python tests/run_each.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check qwen3moe_jax scripts tests

clean:
	rm -rf $(VENV) $(AOT_VENV) .pytest_cache .ruff_cache
