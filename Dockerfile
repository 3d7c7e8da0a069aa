# syntax=docker/dockerfile:1
#
# make image                      (docker or podman, whichever the machine has; see the Makefile)
# make image PIP_CA=/path/ca.pem  (behind a TLS-intercepting proxy: the CA bundle is a build secret)
# docker run --gpus all --shm-size=8g -v cnn-job-cache:/cache -v cnn-job-runs:/work/runs cnn-job train cifar10
#
# Base: the slim Debian Python image plus PyPI's CUDA build of torch, rather than an official
# pytorch/pytorch CUDA image. PyPI's torch wheel brings its own CUDA runtime, cuDNN and NCCL as
# nvidia-* wheels, so the host needs only the NVIDIA driver (CUDA 13: driver >= 580) and the
# NVIDIA container toolkit. All of it, CUDA libraries included, comes from one pinned lock
# (requirements/constraints.txt, which CI installs from too, with torch's CPU build); no conda,
# and no CUDA toolkit beside the one torch was built against. For bit-identical rebuilds, also pin the
# base by digest: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
#
# Buildable by BuildKit and by buildah 1.28 (Debian bookworm's podman 4.3): no COPY --link, no
# heredocs.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# checkov (tests/test_deploy.py) passes on this file but for two checks that do not apply:
# checkov:skip=CKV_DOCKER_2:A batch job has no health to probe; it exits with its status, which is what runs it watches
# checkov:skip=CKV_DOCKER_7:FROM ${PYTHON_IMAGE} is the ARG above, a version tag; checkov does not read ARGs

# ----------------------------------------------------------------------------------------------
# deps: a virtual environment in /opt/venv holding the locked run-time dependencies

FROM ${PYTHON_IMAGE} AS deps

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src

# Left out of the image, on purpose: triton (1 GB) is the compiler behind torch.compile's
# Inductor, which the job never uses (--compile is auto|off|cuda-graph); torch imports without
# it. `pip check` below accepts exactly this omission and nothing else (tests/test_image.py too).
ARG OMITTED="triton"

# Dependencies first, from the lock alone: this (large) layer is rebuilt only when the lock
# changes. --no-deps: the lock is complete, so nothing is resolved, and an omitted package stays
# out. --require-hashes: every file's sha256 must be one the lock lists for its pin, so the image
# holds the bytes the lock was made from, whatever an index or a proxy serves. The wheels are
# downloaded into a folder in the pip cache mount and installed from there: a changed lock
# downloads only what changed (pip's own HTTP cache would need the index's Cache-Control
# headers, which some proxies strip). Behind a proxy that re-signs TLS, its CA bundle comes in as
# a build secret, seen by this step only and never stored in a layer. OMITTED's entries (a pin
# and its hash lines) are cut from the lock with awk.
COPY requirements/constraints.txt requirements/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=pip_ca,required=false \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && awk -v omitted=" $OMITTED " \
       '/^[^ #]/ { split($0, pin, "=="); skip = index(omitted, " " pin[1] " ") } !skip' \
       requirements/constraints.txt > /tmp/runtime.txt \
    && /opt/venv/bin/pip download --no-deps --require-hashes --dest /root/.cache/pip/wheels \
       -r /tmp/runtime.txt \
    && /opt/venv/bin/pip install --no-deps --require-hashes --no-index \
       --find-links /root/.cache/pip/wheels -r /tmp/runtime.txt \
    && printf '^No broken requirements found\\.$\n' > /tmp/accepted \
    && printf '^[^ ]+ [^ ]+ requires %s, which is not installed\\.$\n' $OMITTED >> /tmp/accepted \
    && { /opt/venv/bin/pip check > /tmp/check.txt || true; } \
    && ! grep -v -E -f /tmp/accepted /tmp/check.txt \
    && rm /tmp/runtime.txt /tmp/accepted /tmp/check.txt

# ----------------------------------------------------------------------------------------------
# wheel: the job itself, built with the locked setuptools (no download). Only the small wheel
# goes on to the runtime stage, so editing job/ rebuilds no dependency layer.

FROM deps AS wheel

COPY pyproject.toml README.md LICENSE ./
COPY job/ job/
RUN /opt/venv/bin/pip wheel --no-deps --no-build-isolation --no-cache-dir --wheel-dir /wheels .

# ----------------------------------------------------------------------------------------------
# runtime: the deps stage itself (its venv layer is the image's: no 5 GB copy, which took two
# minutes), a non-root user, the job's wheel, its licence, volumes for what the job writes. /src
# keeps the lock: what the venv holds, less OMITTED.

FROM deps AS runtime

# Labels that say what this is; those that change with each build are set at the end.
ARG PYTHON_IMAGE
LABEL org.opencontainers.image.title="cnn-job" \
      org.opencontainers.image.description="Trains the seed CNNs on MNIST or CIFAR-10, on one GPU or many (DDP)." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# The filesystem contract (Kubernetes manifests rely on it): UID 10001 in group 0, numeric so
# that runAsNonRoot can check it. Everything the job writes goes to
#   /work/runs  checkpoints (the default --checkpoint-uri) and W&B's run folders: a volume
#   /cache      downloaded and parsed datasets (CNN_JOB_CACHE_DIR): a volume
#   /tmp        scratch, and W&B's staging, cache and settings
# The writable folders belong to group 0 with the owner's rights (g=u), OpenShift's convention,
# so that an arbitrary UID in group 0 (--user 123456:0) can write them too.
RUN useradd --no-log-init --uid 10001 --gid 0 --create-home --home-dir /home/cnn cnn \
    && mkdir -p /cache /work/runs \
    && chown -R 10001:0 /cache /work /home/cnn \
    && chmod -R g=u /cache /work /home/cnn

COPY --from=wheel /wheels/ /tmp/wheels/
RUN /opt/venv/bin/pip install --no-deps --no-cache-dir /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels
COPY LICENSE /usr/share/licenses/cnn-job/LICENSE

# Bytecode: pip compiled every module at install time, and it stays in the image (start-up
# needs it: under a read-only root no .pyc can be written at run time, and torch's modules
# compiled afresh on each start would cost seconds). HOME is set for any UID (one without a
# passwd entry gets "/" otherwise); the XDG and W&B folders point into /tmp, which stays
# writable under readOnlyRootFilesystem (an emptyDir), so W&B never writes under HOME.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/home/cnn \
    CNN_JOB_CACHE_DIR=/cache \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    WANDB_DIR=/work/runs \
    WANDB_CACHE_DIR=/tmp/wandb/cache \
    WANDB_CONFIG_DIR=/tmp/wandb/config \
    WANDB_DATA_DIR=/tmp/wandb/data \
    WANDB_ARTIFACT_DIR=/tmp/wandb/artifacts

USER 10001
WORKDIR /work
VOLUME /cache /work/runs

# ----------------------------------------------------------------------------------------------
# sbom: a CycloneDX document of the venv, made by cyclonedx-py from a throw-away venv of its own
# in this stage only, with the texts of the licences each package declares; requirements/sbom.py
# adds each installed wheel's sha256 (checked against the lock's) and writes the third-party
# licences beside it, one line a package. Only those two files go on.

FROM runtime AS sbom

# A build stage's user (it reads root's pip cache); the image's last USER is 10001.
# hadolint ignore=DL3002,DL3066
USER root
WORKDIR /sbom
COPY pyproject.toml LICENSE README.md requirements/sbom.py ./
COPY --from=wheel /wheels/ /sbom/wheels/
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=pip_ca,required=false \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && /opt/venv/bin/python -m venv /opt/sbom-tool \
    && /opt/sbom-tool/bin/pip install --no-cache-dir cyclonedx-bom==7.5.0 \
    && /opt/sbom-tool/bin/cyclonedx-py environment --pyproject pyproject.toml --sv 1.6 --of JSON \
       --gather-license-texts --output-reproducible -o raw.json /opt/venv \
    && /opt/sbom-tool/bin/python sbom.py raw.json /src/requirements/constraints.txt \
       sbom.cdx.json third-party-licenses.txt /root/.cache/pip/wheels /sbom/wheels

# ----------------------------------------------------------------------------------------------
# the image: runtime, with the SBOM and the licence list under /usr/share/doc/cnn-job

FROM runtime

COPY --from=sbom /sbom/sbom.cdx.json /sbom/third-party-licenses.txt /usr/share/doc/cnn-job/
USER 10001

# Recorded in W&B runs, summaries and `cnn-job --version`: make image passes the commit, the
# job's version and the build's time (last, so that a new commit rebuilds nothing above). The
# RUN checks that the job starts and names its build; it also comes before ENV and LABEL because
# buildah 1.28 (podman 4.3) keys its layer cache on build args only through a RUN: without one,
# a new commit's build would keep the last one's GIT_COMMIT and labels.
ARG GIT_COMMIT=""
ARG VERSION=""
ARG CREATED=""
ARG SOURCE=""
RUN cnn-job --version
ENV GIT_COMMIT=${GIT_COMMIT}
LABEL org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}"

# Exec form: cnn-job is PID 1 and gets `docker stop`'s SIGTERM itself: it finishes the step,
# checkpoints and exits 75 (give it time: `docker stop -t 120`).
ENTRYPOINT ["cnn-job"]
CMD ["train", "cifar10"]
