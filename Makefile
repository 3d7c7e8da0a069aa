# Two commands set up everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The main job on embedded defaults: MNIST, 5 epochs. Data: CNN_JOB_DATA_URI if set, else the
# ../shared/datasets copy beside a checkout when there is one (machines without internet),
# else the public mirrors, downloaded once into ~/.cache/cnn-job.
DATASET ?= mnist
SHARED_DATA := $(if $(wildcard ../shared/datasets/mnist),../shared/datasets)
export CNN_JOB_DATA_URI ?= $(SHARED_DATA)

train: $(STAMP)
	$(BIN)/cnn-job train $(DATASET)

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) .pytest_cache
