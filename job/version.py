"""Which build this is: the job's version, the commit it was built from, the versions of Python,
torch, CUDA and cuDNN under it, and the GPUs it sees. `cnn-job --version` prints these facts; a
run's summary and W&B config, and what an export of a checkpoint carries, take theirs from here."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

DISTRIBUTION = "cnn-job"  # pyproject.toml's [project] name


def job_version() -> str | None:
    """The installed cnn-job's version (pyproject.toml's); None when the code runs from a
    checkout that was never installed (PYTHONPATH=., as `make gpu-check` does)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit the code was built from: GIT_COMMIT, which the image's build sets; else the
    checkout's HEAD; None outside a checkout."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def cudnn_version() -> str | None:
    """cuDNN's version as a.b.c (torch reports 9.26.0 as 92600, 8.9.7 as 8907); None without
    cuDNN (a CPU build of torch)."""
    if not torch.backends.cudnn.is_available():
        return None
    number = torch.backends.cudnn.version()
    if number is None:
        return None
    major_unit = 10000 if number >= 90000 else 1000
    major, rest = divmod(number, major_unit)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


def versions() -> dict:
    """The software a run ran on: what its summary and its W&B config record."""
    return {
        "cnn_job": job_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # the CUDA torch was built against; None on a CPU build
        "cudnn": cudnn_version(),
    }


def build_facts() -> dict:
    """`cnn-job --version`: the build and its software, and the GPUs this process sees."""
    gpus = ([torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {**versions(), "git_commit": git_commit(), "gpu_visible": bool(gpus), "gpus": gpus}


def describe(facts: dict) -> str:
    """build_facts() as the lines `cnn-job --version` prints."""
    def known(value) -> str:
        return "unknown" if value is None else str(value)

    cuda = (f"CUDA {facts['cuda']}, cuDNN {known(facts['cudnn'])}" if facts["cuda"]
            else "CPU build (no CUDA)")
    gpus = ", ".join(facts["gpus"]) if facts["gpus"] else "none visible"
    return "\n".join([
        f"cnn-job {known(facts['cnn_job'])}",
        f"commit  {known(facts['git_commit'])}",
        f"python  {facts['python']}",
        f"torch   {facts['torch']} ({cuda})",
        f"GPU     {gpus}",
    ])
