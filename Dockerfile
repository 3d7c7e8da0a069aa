# syntax=docker/dockerfile:1
#
# docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t cnn-job .
# docker run --gpus all --shm-size=8g -v cnn-job-cache:/cache cnn-job train cifar10
#
# Base: the slim Debian Python image plus PyPI's CUDA build of torch, rather than an official
# pytorch/pytorch CUDA image. PyPI's torch wheel brings its own CUDA runtime, cuDNN and NCCL as
# nvidia-* wheels, so the host needs only the NVIDIA driver (CUDA 13: driver >= 580) and the
# NVIDIA container toolkit. All of it, CUDA libraries included, comes from one pinned lock
# (requirements/constraints.txt, which CI installs from too, with torch's CPU build); no conda,
# and no CUDA toolkit beside the one torch was built against. For bit-identical rebuilds, also pin the
# base by digest: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# checkov (tests/test_deploy.py) passes on this file but for two checks that do not apply:
# checkov:skip=CKV_DOCKER_2:A batch job has no health to probe; it exits with its status, which is what runs it watches
# checkov:skip=CKV_DOCKER_7:FROM ${PYTHON_IMAGE} is the ARG above, a version tag; checkov does not read ARGs

# ----------------------------------------------------------------------------------------------
# build: a virtual environment in /opt/venv holding the locked dependencies and the job

FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, from the lock alone: this (large) layer is rebuilt only when the lock changes.
COPY requirements/constraints.txt requirements/constraints.txt
RUN pip install --no-cache-dir -r requirements/constraints.txt

# The job itself, built with the locked setuptools; `pip check` fails the build on a lock that
# no longer satisfies pyproject.toml.
COPY pyproject.toml README.md ./
COPY job/ job/
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && pip check

# ----------------------------------------------------------------------------------------------
# runtime: the venv, a non-root user, a cache volume

FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="cnn-job" \
      org.opencontainers.image.description="Trains the seed CNNs on MNIST or CIFAR-10, on one GPU or many (DDP)."

# Numeric UID, so that Kubernetes' runAsNonRoot can check it. /cache holds downloaded
# archives (a volume, so that they survive the container); /work is where relative paths land:
# checkpoints default to /work/runs/<dataset>/checkpoints (mount a named volume on /work/runs
# to keep them), W&B's offline runs to /work/wandb.
RUN useradd --no-log-init --uid 10001 --user-group --create-home --home-dir /home/cnn cnn \
    && mkdir -p /cache /work/runs \
    && chown cnn:cnn /cache /work /work/runs

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CNN_JOB_CACHE_DIR=/cache

USER 10001
WORKDIR /work
VOLUME /cache

# Recorded in W&B runs and summaries: docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD)
# (last, so that a new commit rebuilds nothing above).
ARG GIT_COMMIT=""
ENV GIT_COMMIT=${GIT_COMMIT}
LABEL org.opencontainers.image.revision=${GIT_COMMIT}

# Exec form: cnn-job is PID 1 and gets `docker stop`'s SIGTERM itself: it finishes the step,
# checkpoints and exits 75 (give it time: `docker stop -t 120`).
ENTRYPOINT ["cnn-job"]
CMD ["train", "cifar10"]
