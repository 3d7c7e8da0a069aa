"""The loop itself, in process: weighting, accuracy, determinism, checkpoints, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from job.batches import DeviceBatches
from job.checkpoint import CheckpointManager
from job.config import TrainConfig
from job.datasets import preset
from job.errors import JobError
from job.recipes import load
from job.train import train
from tests.conftest import archive_sha256


def config(tmp_path, data_dir, **overrides) -> TrainConfig:
    settings = dict(
        dataset="mnist", data_uri=str(data_dir), checkpoint_uri=str(tmp_path / "ckpt"),
        cache_dir=tmp_path / "cache", epochs=1, limit_train=1000, device="cpu",
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def checkpoint_files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_epoch_loss_is_weighted_by_batch_size(tmp_path, data_dir, mnist):
    # 100 images in batches of 64 and 36. With a vanishing learning rate the weights stay put,
    # so the epoch loss can be recomputed from the initial model batch by batch.
    cfg = config(tmp_path, data_dir, limit_train=100, lr=1e-12, seed=5)
    summary = train(cfg)
    torch.manual_seed(5)
    model = load("mnist", "seed").build_model().to(memory_format=torch.channels_last)
    batches = DeviceBatches(mnist.train_images[:100], mnist.train_labels[:100], preset("mnist"),
                            torch.device("cpu"), 64, shuffle=True, seed=5)
    losses, sizes = [], []
    with torch.no_grad():
        for images, labels in batches.epoch(0):
            losses.append(F.cross_entropy(model(images), labels).item())
            sizes.append(len(labels))
    assert sizes == [64, 36]
    weighted = sum(loss * size for loss, size in zip(losses, sizes)) / sum(sizes)
    assert summary["final_train_loss"] == pytest.approx(weighted, rel=1e-5)
    # ... and it is neither the plain mean of batch losses nor the last batch's.
    assert abs(weighted - sum(losses) / 2) > 1e-4
    assert summary["final_train_loss"] != pytest.approx(sum(losses) / 2, rel=1e-5)
    assert summary["final_train_loss"] != pytest.approx(losses[-1], rel=1e-5)


def test_short_training_learns(tmp_path, data_dir):
    summary = train(config(tmp_path, data_dir, limit_train=6000, summary_json=tmp_path / "s.json"))
    assert summary["final_val_acc"] >= 0.90  # ~94% after 94 steps; chance is 10%
    written = json.loads((tmp_path / "s.json").read_text())
    for key in ("dataset", "epochs", "world_size", "final_val_acc", "final_val_loss",
                "final_train_loss", "train_seconds", "train_images_per_second", "checkpoint"):
        assert written[key] == summary[key]
    assert written["world_size"] == 1 and written["epochs"] == 1
    assert written["train_images_per_second"] == pytest.approx(6000 / written["train_seconds"])
    # Start-up, phase by phase from the process's start: they add up to the first step.
    phases = written["startup_s"]
    assert list(phases) == ["interpreter_and_imports", "device_init", "claim_outputs", "read_data",
                            "model_build", "data_to_device", "recipe_start", "resume",
                            "tracker_start", "until_the_loop"]
    assert all(seconds >= 0 for seconds in phases.values())
    assert sum(phases.values()) == pytest.approx(written["seconds_to_first_step"], abs=1e-6)
    assert phases["interpreter_and_imports"] > 0.1  # this process's start: pytest's, here
    # Eager on the CPU: the first two steps, each timed on its own.
    assert set(written["first_steps_s"]) == {"first_eager_step_s", "second_eager_step_s"}


def test_cifar10_short_training_learns(tmp_path, data_dir):
    summary = train(config(tmp_path, data_dir, dataset="cifar10", limit_train=5000, epochs=2,
                           augment=True))
    assert summary["final_val_acc"] >= 0.25  # ~35%; chance is 10%


def test_two_runs_with_one_seed_are_identical(tmp_path, data_dir):
    first = train(config(tmp_path / "a", data_dir, seed=7))
    second = train(config(tmp_path / "b", data_dir, seed=7))
    other = train(config(tmp_path / "c", data_dir, seed=8))
    assert first["final_train_loss"] == second["final_train_loss"]
    assert first["final_val_loss"] == second["final_val_loss"]
    assert other["final_train_loss"] != first["final_train_loss"]
    weights = [torch.load(s["checkpoint"], weights_only=True)["model"] for s in (first, second)]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_checkpoint_is_a_plain_dict_loadable_with_weights_only(tmp_path, data_dir):
    summary = train(config(tmp_path, data_dir))
    state = torch.load(summary["checkpoint"], weights_only=True)
    assert {"model", "optimizer", "epoch", "step", "config", "rng", "metrics"} <= state.keys()
    assert state["epoch"] == 1 and state["step"] == 16  # ceil(1000 / 64)
    assert state["config"]["dataset"] == "mnist"
    model = load("mnist", "seed").build_model()
    model.load_state_dict(state["model"])
    assert state["data_sha256"]["t10k-labels-idx1-ubyte.gz"] == archive_sha256(
        data_dir, "mnist", "t10k-labels-idx1-ubyte.gz")


def test_resume_trains_only_the_missing_epochs_and_matches_an_uninterrupted_run(tmp_path, data_dir):
    # A constant learning rate: a decaying schedule's horizon moves when --epochs grows.
    constant = dict(lr_schedule="constant")
    train(config(tmp_path / "split", data_dir, epochs=2, **constant))
    resumed = train(config(tmp_path / "split", data_dir, epochs=3, **constant))
    straight = train(config(tmp_path / "straight", data_dir, epochs=3, **constant))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["steps"] == straight["steps"] == 48
    # Only epoch 3 ran in the second call: its images are one epoch's worth.
    assert resumed["train_images_per_second"] * resumed["train_seconds"] == pytest.approx(1000)
    assert resumed["history"] == straight["history"]
    a = torch.load(resumed["checkpoint"], weights_only=True)["model"]
    b = torch.load(straight["checkpoint"], weights_only=True)["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_linear_schedule_decays_to_zero():
    from job.optim import lr_at

    cfg = TrainConfig(dataset="mnist", lr=1e-3)
    assert cfg.lr_schedule == "linear"
    assert [lr_at("linear", 1e-3, step / 100) for step in (0, 50, 100)] == [1e-3, 5e-4, 0.0]
    assert lr_at("cosine", 1e-3, 0.5) == pytest.approx(5e-4) and lr_at("cosine", 1e-3, 1.0) == 0
    assert lr_at("constant", 1e-3, 0.99) == 1e-3


def test_resume_never_starts_over_and_finished_runs_do_not_retrain(tmp_path, data_dir):
    first = train(config(tmp_path, data_dir, epochs=1))
    again = train(config(tmp_path, data_dir, epochs=1))
    assert again["train_seconds"] == 0 and again["final_val_acc"] == first["final_val_acc"]
    fresh = train(config(tmp_path, data_dir, epochs=1, resume="never", overwrite=True))
    assert fresh["train_seconds"] > 0 and fresh["steps"] == 16


def test_retention_keeps_the_newest_checkpoints(tmp_path, data_dir):
    train(config(tmp_path, data_dir, epochs=4, keep_checkpoints=2))
    assert checkpoint_files(tmp_path / "ckpt") == ["latest", "step-000000048.pt", "step-000000064.pt"]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step-000000064.pt"


def test_resume_falls_back_past_a_corrupt_newest_checkpoint(tmp_path, data_dir, capsys):
    train(config(tmp_path, data_dir, epochs=1))
    folder = tmp_path / "ckpt"
    # A crash that left a truncated newest file behind, and a temp file from a torn write.
    good = (folder / "step-000000016.pt").read_bytes()
    (folder / "step-000000099.pt").write_bytes(good[: len(good) // 3])
    (folder / "latest").write_text("step-000000099.pt\n")
    (folder / ".step-000000100.pt.abc.partial").write_bytes(good[:100])
    manager = CheckpointManager(str(folder), log=print)
    state, location = manager.load_latest()
    assert location.endswith("step-000000016.pt") and state["step"] == 16
    assert "step-000000099.pt is unreadable" in capsys.readouterr().out
    summary = train(config(tmp_path, data_dir, epochs=2))
    assert [h["step"] for h in summary["history"]] == [16, 32]


def test_checkpoint_of_another_dataset_is_refused(tmp_path, data_dir):
    train(config(tmp_path, data_dir))
    with pytest.raises(JobError, match="is a mnist checkpoint; pass another --checkpoint-uri"):
        train(config(tmp_path, data_dir, dataset="cifar10", limit_train=100))


def test_killed_run_resumes_from_its_last_complete_epoch(tmp_path, data_dir):
    """SIGKILL mid-run (no chance to clean up), then the same command continues."""
    def command(epochs):
        return [sys.executable, "-m", "job", "train", "mnist", "--data-uri", str(data_dir),
                "--checkpoint-uri", str(tmp_path / "ckpt"), "--limit-train", "3000",
                "--epochs", str(epochs), "--device", "cpu", "--summary-json", str(tmp_path / "s.json")]

    process = subprocess.Popen(command(30), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "ckpt" / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    names = checkpoint_files(tmp_path / "ckpt")
    completed = [n for n in names if n.startswith("step-")]
    assert completed and not (tmp_path / "s.json").exists()
    last_epoch = torch.load(tmp_path / "ckpt" / completed[-1], weights_only=True)["epoch"]
    result = subprocess.run(command(last_epoch + 1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {tmp_path / 'ckpt' / completed[-1]}" in result.stdout.replace("\n", "")
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["epochs"] == last_epoch + 1
    assert [h["epoch"] for h in summary["history"]] == list(range(1, last_epoch + 2))
