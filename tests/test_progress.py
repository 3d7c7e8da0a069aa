"""What an operator reads off a terminal: plain progress lines at the documented cadence, and
tables printed whole."""

import re

import job.progress
from job.progress import EpochProgress
from tests.conftest import run_cli

LINE = re.compile(r"^epoch (\d+)/(\d+) +([\d.]+)%  ([\d,]+)/([\d,]+) images  (loss [\d.]+  )?"
                  r"[\d,]+ img/s  elapsed \d+:\d\d:\d\d  eta (\d+:\d\d:\d\d|--)$")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lines_every_interval_at_log_steps_and_at_the_epoch_end(monkeypatch, capsys):
    clock = FakeClock()
    monkeypatch.setattr(job.progress.time, "monotonic", clock)
    monkeypatch.setenv("CNN_JOB_PROGRESS_INTERVAL_S", "10")
    # 20 steps of 50 images on each of 2 ranks, a log step every 2 steps, 3 s a step
    with EpochProgress("epoch 1/3", 1000, enabled=True, world_size=2) as progress:
        for step in range(1, 21):
            clock.now += 3
            progress.advance(50, f"loss {1 / step:.4f}" if step % 2 == 0 else None)
    lines = capsys.readouterr().out.splitlines()
    # log steps at 6 s, 12 s, ... : a line at the first one 10 s after the previous line
    assert [LINE.match(line)[4] for line in lines] == ["400", "800", "1,200", "1,600", "2,000"]
    assert lines[0] == ("epoch 1/3   20.0%  400/2,000 images  loss 0.2500  33 img/s  "
                        "elapsed 0:00:12  eta 0:00:48")
    assert lines[-1].startswith("epoch 1/3  100.0%  2,000/2,000 images  loss 0.0500")
    assert lines[-1].endswith("elapsed 0:01:00  eta 0:00:00")


def test_interval_zero_is_every_log_step_and_a_resumed_epoch_counts_from_its_position(
        monkeypatch, capsys):
    monkeypatch.setenv("CNN_JOB_PROGRESS_INTERVAL_S", "0")
    with EpochProgress("epoch 2/2", 100, enabled=True, done_images=40) as progress:
        for step in range(6):
            progress.advance(10, "loss 0.5" if step % 3 == 2 else None)
    lines = capsys.readouterr().out.splitlines()
    assert [LINE.match(line)[4] for line in lines] == ["70", "100"]
    # other ranks print nothing
    with EpochProgress("epoch 2/2", 100, enabled=False) as progress:
        progress.advance(100, "loss 0.5")
    assert capsys.readouterr().out == ""


def test_piped_training_prints_progress_lines_at_log_steps(tmp_path, data_dir):
    # 640 images, batch 64: 10 steps an epoch; a log step every 4 (4, 8) and the epoch's end
    result = run_cli("train", "mnist", "--data-uri", str(data_dir), "--checkpoint-uri",
                     str(tmp_path / "c"), "--limit-train", "640", "--epochs", "2",
                     "--log-every-steps", "4", "--device", "cpu",
                     env={"CNN_JOB_PROGRESS_INTERVAL_S": "0"})
    assert result.returncode == 0, result.stderr
    progress = [LINE.match(line) for line in result.stdout.splitlines()
                if line.startswith("epoch ") and "train_loss" not in line]
    assert all(progress), result.stdout
    # epoch 2 counts on: the global steps 12 and 16 fall at its images 128 and 384
    assert [(m[1], m[4]) for m in progress] == [
        ("1", "256"), ("1", "512"), ("1", "640"), ("2", "128"), ("2", "384"), ("2", "640")]
    assert all(m[6] for m in progress)  # every line carries the latest loss
    assert result.stdout.count("train_loss") == 2  # and each epoch still ends with its metrics
