# Two commands matter: `make run` and `make test`. Both build their own venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= examples/bridge.yaml
# Without MoEngage credentials in the environment, `make run` is the sandbox.
SANDBOX := $(if $(MOENGAGE_API_KEY),,--sandbox)

.PHONY: run test lint typecheck pytest mappings-test bench install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	mkdir -p var
	$(BIN)/bridge serve --config $(CONFIG) $(SANDBOX)

lint: $(STAMP)
	$(BIN)/ruff check bridge tests bench
	$(BIN)/ruff format --check bridge tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

mappings-test: $(STAMP)
	$(BIN)/bridge mappings test --mappings-dir mappings

pytest: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider

test: lint typecheck mappings-test pytest

# ARGS passes options through, e.g. `make bench ARGS="--quick"` or `ARGS=--update-docs`.
bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
