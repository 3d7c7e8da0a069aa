# Two commands set up everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lock checkov train test bench gpu-check clean image image-test sbom docker-run

install: $(STAMP)

# The venv holds exactly the lock's files, each checked against its sha256 there (the bytes the
# image holds: torch's CUDA build runs on CPU too); then the job, editable, and its test tools,
# with the lock's pins as constraints so that none of them moves a locked package (its pins
# alone: hashes in a constraints file would ask a hash of the editable job too, which has none).
LOCK := requirements/constraints.txt

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-deps --require-hashes -r $(LOCK)
	sed -e 's/ *\\$$//' -e '/--hash=/d' $(LOCK) > $(VENV)/pins.txt
	$(BIN)/pip install -q --no-build-isolation -c $(VENV)/pins.txt -e '.[test]'
	touch $(STAMP)

# The lock: every package the job needs at run time (pyproject.toml's dependencies, theirs, and
# the image venv's pip: requirements/image.in), at one version each, with the sha256 of every
# file PyPI has for that version, for Python 3.11 on Linux x86_64 (the image's platform).
# `make lock` makes it again after a change to the dependencies, keeping each pin it can
# (UPGRADE=1: the newest versions that fit), with uv in a venv of its own.
UV_VERSION := 0.13.8
LOCK_VENV := .venv-lock

lock:
	test -x $(LOCK_VENV)/bin/uv || { $(PYTHON) -m venv $(LOCK_VENV) \
		&& $(LOCK_VENV)/bin/pip install -q uv==$(UV_VERSION); }
	$(LOCK_VENV)/bin/uv pip compile pyproject.toml requirements/image.in --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 $(if $(UPGRADE),--upgrade) \
		--custom-compile-command 'make lock' --quiet -o $(LOCK)

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

# BENCH_ARGS: e.g. "--nets cifar10/fast" for that recipe's two full accuracy runs (DATASET/NET,
# any pair of job/recipes' registry).
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
# The OCI labels' facts: the job's version from pyproject.toml, the commit, the build's time, and
# where the source lives (the checkout's origin; CI passes its repository's address).
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE_SOURCE ?= $(or $(shell git remote get-url origin 2>/dev/null),file://$(CURDIR))

image:
	@test -n "$(IMAGE_ENGINE)" || { echo "make image: neither docker nor podman answers here" >&2; exit 2; }
	$(if $(filter docker,$(IMAGE_ENGINE)),DOCKER_BUILDKIT=1) $(IMAGE_ENGINE) build \
		--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE) --build-arg GIT_COMMIT=$$(git rev-parse HEAD 2>/dev/null) \
		--build-arg VERSION=$(VERSION) --build-arg CREATED=$$(date -u +%Y-%m-%dT%H:%M:%SZ) \
		--build-arg SOURCE=$(IMAGE_SOURCE) \
		$(if $(PIP_CA),--secret id=pip_ca$(,)src=$(abspath $(PIP_CA))) -t $(IMAGE) .

# The image's SBOM (CycloneDX JSON, made during the build) and its list of third-party licences,
# copied out of the built image into SBOM_DIR (from a container created, never started).
SBOM_DIR ?= sbom
IMAGE_DOC := /usr/share/doc/cnn-job

sbom:
	@test -n "$(IMAGE_ENGINE)" || { echo "make sbom: neither docker nor podman answers here" >&2; exit 2; }
	mkdir -p $(SBOM_DIR)
	container=$$($(IMAGE_ENGINE) create $(IMAGE)) || exit 1; status=0; \
	for file in sbom.cdx.json third-party-licenses.txt; do \
		$(IMAGE_ENGINE) cp $$container:$(IMAGE_DOC)/$$file $(SBOM_DIR)/$$file || { status=1; break; }; \
	done; $(IMAGE_ENGINE) rm $$container > /dev/null; exit $$status

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
	rm -rf $(VENV) $(CHECKOV_VENV) $(LOCK_VENV) .pytest_cache
