# Two entry points: `make demo` (set up, then generate from the bundled model) and `make test` (set up with
# the test extras, then the suite). The demo installs only the package, so it is ready in about a minute.
PYTHON ?= python3
# bash for $$'...' quoting: the demo prompt ends in a newline.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed-core
	$(BIN)/qwen3moe-jax generate --prompt $$'def fibonacci(n):\n' --max-new-tokens 64 --repeat-penalty 1.2

test: $(VENV)/.installed-test
	$(BIN)/ruff check qwen3moe_jax scripts tests
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check qwen3moe_jax scripts tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
