# Two commands set up everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test bench gpu-check clean docker-build docker-run

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
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# BENCH_ARGS: e.g. "--nets fast" for --net fast's speed and its two full accuracy runs
bench: $(STAMP)
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

# On a machine with an NVIDIA GPU, even an air-gapped one: its own python3 with PyTorch, run from
# this checkout (no venv, no pip, no boto3, no wandb). See bench/gpu_check.py.
GPU_CHECK_DATA ?= ../shared/datasets
gpu-check:
	PYTHONPATH=. python3 bench/gpu_check.py --data $(GPU_CHECK_DATA)

IMAGE ?= cnn-job

# The CUDA image (see Dockerfile); GIT_COMMIT lands in W&B runs and summaries.
docker-build:
	docker build --build-arg GIT_COMMIT=$$(git rev-parse HEAD 2>/dev/null) -t $(IMAGE) .

# Train in the image on every GPU. Settings and credentials from .env (NAME=value lines; an
# empty file will do); archives cached and checkpoints kept in named volumes, so a second run
# resumes. Another command: make docker-run ARGS="train mnist --epochs 1".
docker-run:
	docker run --rm --gpus all --shm-size=8g --env-file .env \
		-v cnn-job-cache:/cache -v cnn-job-runs:/work/runs $(IMAGE) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
