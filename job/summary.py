"""What a run reports when it ends, and the provenance that makes the result traceable: the
data's sha256, device, precision, versions and the git commit of the code that trained it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from job.errors import cannot_write
from job.storage import atomic_write_bytes
from job.version import git_commit, versions

_IMPORTED_AT = time.monotonic()


def process_seconds() -> float:
    """Seconds since this process started (the kernel's record, so the interpreter's start and
    every import count); since this module was imported where there is no /proc."""
    try:
        with open("/proc/self/stat") as stat:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic() - _IMPORTED_AT


def provenance(world_size: int, device: torch.device, bf16: bool, data_sha256: dict,
               step_mode: str = "off") -> dict:
    """Where and how the run trained: part of the W&B config and of the summary."""
    return {
        "world_size": world_size, "device": str(device), "precision": "bf16" if bf16 else "fp32",
        "compile": step_mode,
        "data_sha256": data_sha256, "git_commit": git_commit(),
        "versions": versions(),
    }


def build_summary(dataset: str, run, train_seconds: float, trained_images: int,
                  checkpoint: str | None, preempted_by: str | None, wandb_run_id: str | None,
                  environment: dict, seconds_to_first_step: float | None = None) -> dict:
    """The run's result: final metrics of the last completed epoch, timings, where the final
    checkpoint is, and the provenance. `run` is the loop's RunState. The process's timings
    (from its start: to the first step, to this summary) are this process's, also on a resume."""
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
        "seconds_to_first_step": seconds_to_first_step,
        "seconds_to_summary": process_seconds(),
        "checkpoint": checkpoint,
        "preempted_by": preempted_by,
        "steps": run.step,
        "history": run.history,
        "wandb_run_id": wandb_run_id,
        **environment,
    }


def write_summary(path: Path, summary: dict) -> None:
    """--summary-json, whole or not at all; a full or read-only filesystem is one line (the run's
    checkpoints are written by then: the same command, with room, writes it)."""
    try:
        atomic_write_bytes(path, (json.dumps(summary, indent=2) + "\n").encode())
    except OSError as error:
        raise cannot_write(f"--summary-json {path}", error, "--summary-json",
                           f"nothing was written there; the run's model is "
                           f"{summary.get('checkpoint')}",
                           "then run the same command to write it") from None
