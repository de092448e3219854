# The two commands of the README. Both create .venv when it is missing and install fxslim into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install bench-install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fxslim.demo

# every test, slow ones included, and the 15 slowest named (where to look when the suite grows)
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

# while editing: all but the tests marked slow (large torchvision models, recipes, fresh interpreters)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

# peers for the benchmarks in tools/ (Torch-Pruning, tensorly-torch); not needed by fxslim or its tests
bench-install: $(STAMP)
	$(BIN)/pip install -q -e '.[test,bench]'

lint: $(STAMP)
	$(BIN)/ruff check fxslim passes tests tools
