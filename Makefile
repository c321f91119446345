PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-unit lint bench serve clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q

test-unit: install
	$(BIN)/python -m pytest -q -m "not integration"

lint: install
	$(BIN)/ruff check models server bench tests
	$(BIN)/mypy models server bench

bench: install
	$(BIN)/python -m bench.alignment_overhead

serve: install
	@echo "not yet: the HTTP service lands with the server issue"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
