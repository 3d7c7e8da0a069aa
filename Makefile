# Two commands set up everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install checkov train test bench gpu-check clean image image-test docker-run

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# checkov, which tests/test_deploy.py runs on k8s/ and the Dockerfile, pins boto3 and others at
# versions the job's lock cannot share: it gets a venv of its own, from its own lock (~1 min).
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

checkov: $(CHECKOV_STAMP)

$(CHECKOV_STAMP): requirements/checkov.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q -r requirements/checkov.txt
	touch $(CHECKOV_STAMP)

# The main job on embedded defaults: MNIST, 5 epochs. Data: CNN_JOB_DATA_URI if set, else the
# ../shared/datasets copy beside a checkout when there is one (machines without internet),
# else the public mirrors, downloaded once into ~/.cache/cnn-job. Checkpoints and W&B's run folder
# go to runs/$(DATASET)/ (git-ignored: `make test` after it sees the checkout as before).
DATASET ?= mnist
SHARED_DATA := $(if $(wildcard ../shared/datasets/mnist),../shared/datasets)
export CNN_JOB_DATA_URI ?= $(SHARED_DATA)

train: $(STAMP)
	$(BIN)/cnn-job train $(DATASET)

# Test files run on TEST_WORKERS processes (each file's tests on one, in order: module fixtures
# are made once); the tests wait on files and process states, not on time, so load does not
# change their outcome. TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 2
test: $(STAMP) $(CHECKOV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# BENCH_ARGS: e.g. "--nets fast" for --net fast's speed and its two full accuracy runs.
# BASELINE=<rev>: instead, the seed nets' training epochs by <rev>'s code and by this checkout's,
# alternated in one sitting with the seed-style reference (bench/bench.py's doc; ~6 min on 2 cores).
BASELINE ?=
bench: $(STAMP)
	$(BIN)/python bench/bench.py $(if $(BASELINE),--baseline $(BASELINE)) $(BENCH_ARGS)

# On a machine with an NVIDIA GPU, even an air-gapped one: its own python3 with PyTorch, run from
# this checkout (no venv, no pip, no boto3, no wandb). See bench/gpu_check.py.
GPU_CHECK_DATA ?= ../shared/datasets
gpu-check:
	PYTHONPATH=. python3 bench/gpu_check.py --data $(GPU_CHECK_DATA)

# ----------------------------------------------------------------------------------------------
# The image (see Dockerfile): docker or podman, whichever answers here (IMAGE_ENGINE=podman picks).
# Behind a proxy that re-signs TLS: make image PIP_CA=/path/ca.pem (a build secret, never stored
# in the image). Where python:3.11-slim-bookworm cannot be pulled, PYTHON_IMAGE= names another
# base with python3 and its venv module (tests/test_image.py builds one with debootstrap).
IMAGE ?= cnn-job
IMAGE_ENGINE ?= $(firstword $(foreach engine,docker podman,\
	$(if $(shell $(engine) info >/dev/null 2>&1 && echo up),$(engine))))
PYTHON_IMAGE ?= python:3.11-slim-bookworm
PIP_CA ?=
, := ,# a comma inside $(if ...)

image:
	@test -n "$(IMAGE_ENGINE)" || { echo "make image: neither docker nor podman answers here" >&2; exit 2; }
	$(if $(filter docker,$(IMAGE_ENGINE)),DOCKER_BUILDKIT=1) $(IMAGE_ENGINE) build \
		--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE) --build-arg GIT_COMMIT=$$(git rev-parse HEAD 2>/dev/null) \
		$(if $(PIP_CA),--secret id=pip_ca$(,)src=$(abspath $(PIP_CA))) -t $(IMAGE) .

# The checks of tests/test_image.py against the built image, in a real OCI runtime: each one
# builds or reuses the image and skips with one line where no engine can run it.
image-test: $(STAMP)
	$(BIN)/python -m pytest -m image tests/test_image.py

# Train in the image on every GPU. Settings and credentials from .env (NAME=value lines; an
# empty file will do); archives cached and checkpoints (and W&B's offline runs) kept in named
# volumes, so a second run resumes. Another command: make docker-run ARGS="train mnist --epochs 1".
docker-run:
	docker run --rm --gpus all --shm-size=8g --env-file .env \
		-v cnn-job-cache:/cache -v cnn-job-runs:/work/runs $(IMAGE) $(ARGS)

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .pytest_cache
