# One entry point. `make demo` installs and runs the main job; `make test` installs and runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0: on the project's CPU machines pip takes the local CPU build; on a Linux GPU
# machine the same pin from PyPI is the CUDA build. Override for another index if needed.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/mnist1d.yaml
PORT ?= 3000
export BENTOML_DO_NOT_TRACK := True

.PHONY: install demo pipeline serve test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

## the main job: the whole pipeline on MNIST-1D, then the service on localhost:$(PORT)
demo: pipeline serve

pipeline: install
	$(BIN)/modeconn pipeline --config $(CONFIG)

serve: install
	$(BIN)/python -m bentoml serve modeconn.serving.service:ModeConnService --port $(PORT)

## the whole test suite (lint first: it takes a second)
test: install lint
	$(BIN)/python -m pytest -q -rA -p no:cacheprovider -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check modeconn models training serving tests benchmarks examples

bench: install
	$(BIN)/python benchmarks/ensemble_inference.py
	$(BIN)/python benchmarks/training_steps.py

clean:
	rm -rf $(VENV) runs
