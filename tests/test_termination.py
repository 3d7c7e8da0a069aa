"""The command's last line in /dev/termination-log, which Kubernetes shows as the container's
termination message (`kubectl describe pod`): how a train ended (done, stopped, bad input), one
line, at most 4096 bytes, never changing the exit status. CNN_JOB_TERMINATION_LOG points it at a
file of the test's here."""

import os
import re
import signal
import subprocess

import pytest

from job import progress
from job.preemption import PREEMPTED_EXIT_CODE
from tests.conftest import CNN_JOB, run_cli
from tests.test_resume import wait_for


@pytest.fixture
def message(tmp_path):
    """The termination-log file, as the kubelet makes it (there before the container starts),
    holding what a previous command wrote: the job replaces it."""
    path = tmp_path / "termination-log"
    path.write_text("an earlier command's line")
    return path


def mnist(tmp_path, data_dir, *extra: str) -> list[str]:
    return ["train", "mnist", "--data-uri", str(data_dir), "--checkpoint-uri", str(tmp_path / "ckpt"),
            "--device", "cpu", "--epochs", "1", *extra]


def test_a_finished_train_leaves_its_accuracy_step_and_model(tmp_path, data_dir, message):
    result = run_cli(*mnist(tmp_path, data_dir, "--limit-train", "256"),
                     env={"CNN_JOB_TERMINATION_LOG": str(message)})
    assert result.returncode == 0, result.stderr[-2000:]
    line = message.read_text()
    done = re.fullmatch(r"done: val_acc (\d+\.\d\d)% at step (\d+), model (\S+)", line)
    assert done, line
    model = tmp_path / "ckpt" / (tmp_path / "ckpt" / "latest").read_text().strip()
    assert done[3] == str(model) and int(done[2]) == int(model.stem.split("-")[1]) > 0
    assert f"val_acc {done[1]}%" in result.stdout  # the accuracy the run printed


@pytest.mark.parametrize("args", [
    ["train", "mnist", "--epochs", "zero"],  # a usage error, from typer
    ["train", "mnist", "--epochs", "0"],     # a JobError, from the settings
], ids=["usage-error", "job-error"])
def test_bad_input_leaves_the_one_line_error(args, message):
    result = run_cli(*args, env={"CNN_JOB_TERMINATION_LOG": str(message)})
    assert result.returncode == 2, result.stderr
    assert message.read_text() == result.stderr.strip().splitlines()[-1]
    assert message.read_text().startswith("error: ") and "\n" not in message.read_text()


def test_a_stopped_train_says_where_it_stopped_and_to_run_it_again(tmp_path, data_dir, message):
    folder = tmp_path / "ckpt"
    process = subprocess.Popen(
        [str(CNN_JOB), *mnist(tmp_path, data_dir, "--limit-train", "3200", "--checkpoint-every-steps", "5")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CNN_JOB_TERMINATION_LOG": str(message)})
    wait_for((folder / "latest").exists, process=process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    step = int((folder / "latest").read_text().strip().removesuffix(".pt").split("-")[1])
    assert message.read_text() == f"stopped at epoch 1, step {step}: run the same command to resume"


def test_an_unwritable_or_missing_file_changes_nothing(tmp_path):
    for path in (tmp_path, tmp_path / "missing"):  # a directory; a file the kubelet did not make
        result = run_cli("train", "mnist", "--epochs", "zero", env={"CNN_JOB_TERMINATION_LOG": str(path)})
        assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_only_rank_0_writes_and_at_most_4096_bytes(message, monkeypatch):
    monkeypatch.setenv("CNN_JOB_TERMINATION_LOG", str(message))
    monkeypatch.setattr(progress, "_last_line", None)
    progress.write_termination_message()  # nothing said: nothing written
    assert message.read_text() == "an earlier command's line"
    progress.set_last_line("é" * 3000)  # 6000 bytes of 2-byte characters
    monkeypatch.setenv("RANK", "1")
    progress.write_termination_message()
    assert message.read_text() == "an earlier command's line"
    monkeypatch.setenv("RANK", "0")
    progress.write_termination_message()
    assert message.read_text() == "é" * 2048  # cut at the limit, on a character boundary


def test_a_fifo_nobody_reads_does_not_hold_up_the_exit(tmp_path):
    fifo = tmp_path / "termination-log"
    os.mkfifo(fifo)
    result = run_cli("train", "mnist", "--epochs", "zero", env={"CNN_JOB_TERMINATION_LOG": str(fifo)},
                     timeout=60)  # it used to wait forever for a reader
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
