# Two entry points: `make demo` (set up, then generate) and `make test` (set up, then the suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/qwen3moe-jax generate --preset small --prompt 'def fibonacci(n):' --max-new-tokens 48

test: setup
	$(BIN)/ruff check qwen3moe_jax scripts tests
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check qwen3moe_jax scripts tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
