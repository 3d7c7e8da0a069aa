"""Two processes under torchrun on CPU: Gloo, disjoint shards, rank 0 alone writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.wandb_records import offline_runs

TORCHRUN = Path(sys.executable).parent / "torchrun"


def test_two_process_ddp_run(tmp_path, data_dir):
    result = subprocess.run(
        [str(TORCHRUN), "--nproc-per-node", "2", "--standalone", "-m", "job", "train", "mnist",
         "--data-uri", str(data_dir), "--limit-train", "2001", "--epochs", "2", "--device", "cpu",
         "--checkpoint-uri", str(tmp_path / "ckpt"), "--summary-json", str(tmp_path / "s.json")],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["world_size"] == 2
    # 2001 images: 1000 per rank (one sits out), ceil(1000 / 64) = 16 steps an epoch.
    assert summary["steps"] == 32
    assert summary["train_images_per_second"] * summary["train_seconds"] == pytest.approx(4000)
    assert summary["final_val_acc"] > 0.8
    # Only rank 0 prints and writes: one line per epoch, one checkpoint per epoch.
    assert result.stdout.count("epoch 2/2  train_loss") == 1
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "latest", "step-000000016.pt", "step-000000032.pt"]
    # The saved weights are the plain model's (no DDP "module." prefix).
    state = torch.load(tmp_path / "ckpt" / "step-000000032.pt", weights_only=True)
    assert state["world_size"] == 2 and "features.0.0.weight" in state["model"]
    # One W&B run, from rank 0; the other rank logs nothing.
    (run,) = offline_runs(tmp_path)
    assert run.run_id == summary["wandb_run_id"] and run.config["world_size"] == 2
