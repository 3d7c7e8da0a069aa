"""What a run reports when it ends, and the provenance that makes the result traceable: the
data's sha256, device, precision, versions and the git commit of the code that trained it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from job.storage import atomic_write_bytes


def git_commit() -> str | None:
    if os.environ.get("GIT_COMMIT"):  # set by the container build
        return os.environ["GIT_COMMIT"]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def provenance(world_size: int, device: torch.device, bf16: bool, data_sha256: dict) -> dict:
    """Where and how the run trained: part of the W&B config and of the summary."""
    return {
        "world_size": world_size, "device": str(device), "precision": "bf16" if bf16 else "fp32",
        "data_sha256": data_sha256, "git_commit": git_commit(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }


def build_summary(dataset: str, run, train_seconds: float, trained_images: int,
                  checkpoint: str | None, preempted_by: str | None, wandb_run_id: str | None,
                  environment: dict) -> dict:
    """The run's result: final metrics of the last completed epoch, timings, where the final
    checkpoint is, and the provenance. `run` is the loop's RunState."""
    final = run.history[-1] if run.history else {}
    return {
        "dataset": dataset,
        "epochs": run.epoch,
        "world_size": environment["world_size"],
        "final_val_acc": final.get("val_acc"),
        "final_val_loss": final.get("val_loss"),
        "final_train_loss": final.get("train_loss"),
        "train_seconds": train_seconds,
        "train_images_per_second": trained_images / train_seconds if train_seconds else None,
        "checkpoint": checkpoint,
        "preempted_by": preempted_by,
        "steps": run.step,
        "history": run.history,
        "wandb_run_id": wandb_run_id,
        **environment,
    }


def write_summary(path: Path, summary: dict) -> None:
    atomic_write_bytes(path, (json.dumps(summary, indent=2) + "\n").encode())
