"""Every shell command in the README's and docs/*.md's fenced blocks (```bash, ```sh, ```shell,
```console) either runs here, exactly as written, and exits 0, or is listed in SKIPPED below with
the reason it cannot run on a CPU machine without internet. A command added to the docs is run;
if it cannot run here, add one line to SKIPPED: the command as the block spells it (comments
cut, a `\\` continuation joined, runs of spaces as one), and why.

How a command runs (the one rule, also in docs/architecture.md):
- In a fresh folder W, by `bash -e -o pipefail -c`, with this checkout's venv first on PATH (an
  activated venv: `cnn-job`, `torchrun`, `python3`).
- Data paths are not rewritten. W sits as a checkout does: `../shared/datasets` beside it is the
  real datasets folder, as is the user's own `./datasets` in it, and `examples/` is the
  checkout's. CNN_JOB_DATA_URI names the same folder (the public mirrors are out of reach here),
  CNN_JOB_LIMIT_TRAIN=1280 keeps a training run to seconds (not for a sweep, whose file says its
  trials' size and refuses a variable that would change it), and W&B is off (WANDB_MODE=disabled).
- The user's own files a command names (`digit.png`, `scan.jpg`, `my-images-idx3-ubyte.gz`, ...)
  are in W, made from MNIST's test split. A command that reads runs/ and does not train finds in
  W the runs that the docs' training commands leave (`runs/mnist/checkpoints`,
  `runs/cifar10/checkpoints`, `runs/sweeps/mnist-lr`), made once by one-epoch runs of those
  commands and the README's sweep; a command that trains (`cnn-job train`,
  `torchrun ... train`, `cnn-job sweep run`) starts without them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
VENV_BIN = Path(sys.executable).parent

# Why a command cannot run here, one reason per kind of place it needs.
CLUSTER = "needs a Kubernetes cluster (tests/test_deploy.py checks the manifests)"
GPU = "needs NVIDIA GPUs (`make gpu-check` on a GPU machine: docs/gpu-check.md)"
IMAGE = "builds or runs the container image (`make image-test` runs the image tests)"
REGISTRY = "pushes to, signs in or verifies against a registry (docs/image.md)"
AWS = ("reads or writes an AWS or cluster S3 bucket (tests/test_storage.py runs the same "
       "commands against a loopback S3 server)")
NODES = "needs two machines that reach each other (tests/test_multinode.py runs two nodes here)"
WANDB = "needs a W&B account and its network (tests/test_tracking.py runs W&B offline)"
CIFAR_EPOCHS = ("epochs of CIFAR-10 on CPU, each evaluated on its 10,000 test images: minutes "
                "on 2 cores even on 1,280 training images; the one-epoch runs this test makes "
                "run the same code, and `make bench` times the full run")
SWEEP_TRIALS = ("runs trials of examples/mnist-lr.yaml: this test runs that sweep whole once, as "
                "`cnn-job sweep run examples/mnist-lr.yaml --parallel 2` (trained_runs), for the "
                "report commands that read it")

SKIPPED = {
    # README.md
    "make train": "makes the venv and downloads MNIST from the public mirrors: no internet here",
    "make test": "is this test suite",
    "cnn-job train cifar10": CIFAR_EPOCHS,
    "cnn-job train cifar10 --net fast": CIFAR_EPOCHS,
    "torchrun --nproc-per-node 2 -m job train cifar10": CIFAR_EPOCHS + ", twice",
    "cnn-job evaluate s3://my-bucket/runs/c10 --data-uri s3://my-bucket/datasets --json "
    "report.json": AWS,
    "cnn-job export s3://my-bucket/runs/c10 --format torch-export --output "
    "s3://my-bucket/models/c10.pt2": AWS,
    "cnn-job data push cifar10 s3://my-bucket/datasets --from ./datasets": AWS,
    "cnn-job data pull cifar10 s3://my-bucket/datasets": AWS,
    "cnn-job train cifar10 --data-uri s3://my-bucket/datasets --checkpoint-uri "
    "s3://my-bucket/runs/c10": AWS,
    "export AWS_ENDPOINT_URL=http://minio.minio.svc:9000 AWS_ACCESS_KEY_ID=... "
    "AWS_SECRET_ACCESS_KEY=...": AWS,
    "cnn-job train cifar10 --data-uri s3://datasets --checkpoint-uri s3://runs/c10": AWS,
    "export AWS_ENDPOINT_URL=https://<account-id>.r2.cloudflarestorage.com "
    "AWS_DEFAULT_REGION=auto": AWS,
    "export WANDB_API_KEY=...": WANDB,
    "cnn-job train cifar10 --wandb-project my-project --run-name c10-baseline":
        f"{WANDB}; five {CIFAR_EPOCHS}",
    "make image": IMAGE,
    "make image PIP_CA=/etc/ssl/certs/ca-certificates.crt": IMAGE,
    "make docker-run": f"{IMAGE}; {GPU}",
    'make docker-run ARGS="train mnist --epochs 1"': f"{IMAGE}; {GPU}",
    "docker run --rm --gpus all --shm-size=8g -v cnn-job-cache:/cache -v "
    "cnn-job-runs:/work/runs cnn-job train cifar10": f"{IMAGE}; {GPU}",
    "docker run --rm -v cnn-job-runs:/work/runs -e WANDB_API_KEY --entrypoint wandb cnn-job "
    "sync /work/runs/wandb/offline-run-...": f"{IMAGE}; {WANDB}",
    "kubectl create secret generic cnn-job-credentials "
    "--from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=... "
    "--from-literal=WANDB_API_KEY=...": CLUSTER,
    "kubectl apply -f k8s/": CLUSTER,
    "kubectl apply -f k8s/jobset/": CLUSTER,
    "cnn-job launch --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK --master-addr "
    "node0.example --master-port 29500 train cifar10 --checkpoint-uri s3://b/runs/c10": NODES,
    "cnn-job launch --nnodes 1:2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint "
    "node0.example:29400 --rdzv-id c10 --max-restarts 3 train cifar10": NODES,
    "docker run --gpus all cnn-job launch --nproc-per-node 8 train cifar10": f"{IMAGE}; {GPU}",
    # docs/gpu-check.md
    "make gpu-check": GPU,
    "make gpu-check GPU_CHECK_DATA=/data/datasets": GPU,
    "python3 bench/gpu_visit.py pack --part-mib 60":
        "packs the datasets for a GPU machine into the checkout's .gpu-visit/ (xz of "
        "CIFAR-10's 268 MB tar: minutes of CPU)",
    "python3 bench/gpu_visit.py arrive --probe": f"runs on the GPU machine; {GPU}",
    "PYTHONUNBUFFERED=1 python3 bench/gpu_visit.py run --out results": GPU,
    "python3 bench/gpu_visit.py run --training-only --out results": GPU,
    # docs/image.md
    "podman image inspect --format '{{json .Config.Labels}}' cnn-job | python3 -m json.tool":
        IMAGE,
    "podman run --rm --network=none cnn-job --version": IMAGE,
    "podman run --rm --network=none cnn-job --version --json": IMAGE,
    "make sbom IMAGE=cnn-job && python3 -m json.tool sbom/sbom.cdx.json | head": IMAGE,
    "docker push registry.example.com/cnn-job:0.1.0": REGISTRY,
    "DIGEST=$(docker inspect --format '{{index .RepoDigests 0}}' "
    "registry.example.com/cnn-job:0.1.0)": REGISTRY,
    'cosign sign --yes "$DIGEST"': REGISTRY,
    'cosign attest --yes --type cyclonedx --predicate sbom/sbom.cdx.json "$DIGEST"': REGISTRY,
    "cosign verify --certificate-identity-regexp '...' --certificate-oidc-issuer '...' "
    '"$DIGEST"': REGISTRY,
    'cosign verify-attestation --type cyclonedx ... "$DIGEST"': REGISTRY,
    "make image IMAGE_ENGINE=podman IMAGE=cnn-job:dev": IMAGE,
    # docs/recipes.md
    "cnn-job train cifar10 --net fast --seed 0 --data-uri ../shared/datasets --device cpu "
    "--checkpoint-uri runs/fast-s0 --summary-json fast-s0.json": CIFAR_EPOCHS,
    "cnn-job evaluate runs/fast-s0 --no-tta --json -": "evaluates the run the line above makes",
    # docs/sweeps.md
    "cnn-job sweep run examples/mnist-lr.yaml --trial 3": SWEEP_TRIALS,
    "JOB_COMPLETION_INDEX=3 cnn-job sweep run examples/mnist-lr.yaml": SWEEP_TRIALS,
    "cnn-job sweep run examples/mnist-lr.yaml --parallel 2": SWEEP_TRIALS,
    "cnn-job sweep run examples/mnist-asha.yaml --parallel 1":
        "nine MNIST trials, 21 epochs in all: minutes on CPU (tests/test_sweep.py runs its rules)",
    "cnn-job sweep run mnist-full.yaml --parallel 1": "nine MNIST trials, 36 epochs in all",
    "cnn-job sweep report runs/sweeps/mnist-asha --json | python3 -c 'import json, sys; rows = "
    "json.load(sys.stdin); print(sum(r[\"epochs\"] for r in rows))'":
        "reads the results of the mnist-asha sweep above, which is not run",
    "cnn-job sweep report s3://my-bucket/sweeps/mnist-lr --json": AWS,
}


# ----------------------------------------------------------------------------------------------
# the commands, as the docs spell them


def _cut_comment(line: str) -> str:
    """`line` without a shell comment: a # that starts a word outside quotes."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def commands_in(text: str) -> list[tuple[int, str]]:
    """(line number, command) of each shell command in `text`'s fenced shell blocks."""
    found, block, start, pending = [], None, 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```\s*(\S*)", line)
        if fence:
            block = (fence.group(1) or "none") if block is None else None
            continue
        if block not in SHELL_BLOCKS:
            continue
        if block == "console":  # a prompt starts a command; the rest is its output
            if not line.startswith("$ ") and not pending:
                continue
            line = line.removeprefix("$ ")
        if not pending:
            start = number
        line = _cut_comment(line).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        command = " ".join((pending + line).split())
        pending = ""
        if command:
            found.append((start, command))
    return found


def documented_commands() -> list[tuple[str, str]]:
    return [(f"{path.relative_to(REPO)}:{number}", command)
            for path in DOCS for number, command in commands_in(path.read_text())]


COMMANDS = documented_commands()


def test_every_skipped_command_is_still_in_the_docs():
    stale = set(SKIPPED) - {command for _, command in COMMANDS}
    assert not stale, f"SKIPPED lists commands the docs no longer have: {sorted(stale)}"


def test_the_extraction_reads_continuations_comments_and_prompts():
    text = ("```bash\n# a comment line\ncnn-job train mnist \\\n  --epochs 3   # three\n"
            "echo '# kept' \"a # b\"\n```\n```python\nprint('not shell')\n```\n"
            "```console\n$ cnn-job --version\ncnn-job 0.1.0\n```\n")
    assert commands_in(text) == [(3, "cnn-job train mnist --epochs 3"),
                                 (5, "echo '# kept' \"a # b\""), (11, "cnn-job --version")]


# ----------------------------------------------------------------------------------------------
# the folder a command runs in


TRAINS = re.compile(r"^(\S+=\S+ )*(cnn-job (train|sweep run)|torchrun .* train|make train)\b")


@pytest.fixture(scope="module")
def user_files(tmp_path_factory, data_dir) -> Path:
    """The user's own files the docs' commands name, made from MNIST's test split."""
    from PIL import Image

    from job.data import read_idx

    folder = tmp_path_factory.mktemp("user-files")
    images = read_idx(data_dir / "mnist" / "t10k-images-idx3-ubyte.gz").numpy()
    for index, name in enumerate(("digit.png", "scan.jpg", "cat.png")):
        Image.fromarray(images[index]).save(folder / name)
    for name in ("images-idx3", "labels-idx1"):
        shutil.copy(data_dir / "mnist" / f"t10k-{name}-ubyte.gz", folder / f"my-{name}-ubyte.gz")
    return folder


def command_env(data_dir: Path, command: str = "") -> dict:
    small = {} if "cnn-job sweep" in command else {"CNN_JOB_LIMIT_TRAIN": "1280"}
    return {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
            "CNN_JOB_DATA_URI": str(data_dir), **small, "WANDB_MODE": "disabled"}


def checkout_like(root: Path, data_dir: Path) -> Path:
    """root/work, with ../shared/datasets and ./datasets the real datasets and examples/ the
    checkout's."""
    (root / "shared").mkdir(parents=True)
    (root / "shared" / "datasets").symlink_to(data_dir)
    work = root / "work"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples")
    (work / "datasets").symlink_to(data_dir)
    return work


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, data_dir) -> Path:
    """runs/ as the docs' training commands leave it, from one-epoch runs of them."""
    root = tmp_path_factory.mktemp("trained")
    work = checkout_like(root, data_dir)
    for dataset in ("mnist", "cifar10"):
        result = run_cli("train", dataset, "--epochs", "1", env=command_env(data_dir), cwd=work,
                         timeout=600)
        assert result.returncode == 0, result.stderr
    sweep = run_cli("sweep", "run", "examples/mnist-lr.yaml", "--parallel", "2",
                    env=command_env(data_dir, "cnn-job sweep"), cwd=work, timeout=600)
    assert sweep.returncode == 0, sweep.stderr
    return work / "runs"


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_runs(where, command, tmp_path, data_dir, user_files, request):
    if command in SKIPPED:
        pytest.skip(f"{command}: {SKIPPED[command]}")
    work = checkout_like(tmp_path, data_dir)
    for file in user_files.iterdir():
        shutil.copy(file, work / file.name)
    if "runs/" in command and not TRAINS.match(command):
        shutil.copytree(request.getfixturevalue("trained_runs"), work / "runs", symlinks=True)
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=work,
                            env={**{k: v for k, v in os.environ.items() if k != "CNN_JOB_LIMIT_TRAIN"},
                                 **command_env(data_dir, command)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"{where}: `{command}` exited {result.returncode}:\n{result.stdout[-2000:]}\n"
        f"{result.stderr[-2000:]}\nIf it cannot run on this machine, list it in SKIPPED with "
        "the reason.")
