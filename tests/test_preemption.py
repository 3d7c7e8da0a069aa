"""SIGTERM mid-epoch: finish the step, checkpoint, exit 75; the resumed run ends bit for bit
where an uninterrupted one does (CPU, fixed seed), in one process and under torchrun."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from job.preemption import ABORTED_EXIT_CODE, PREEMPTED_EXIT_CODE
from job.train import RECORD_INDICES_ENV
from tests.conftest import CNN_JOB

TORCHRUN = Path(sys.executable).parent / "torchrun"


def train_command(data_dir, checkpoint_uri, *extra):
    return ["--data-uri", str(data_dir), "--checkpoint-uri", checkpoint_uri, "--device", "cpu",
            "--epochs", "2", "--limit-train", "3200", *extra]


def read_checkpoint(s3, uri_or_path) -> dict:
    if str(uri_or_path).startswith("s3://"):
        bucket, _, key = str(uri_or_path)[5:].partition("/")
        pointer = s3.client.get_object(Bucket=bucket, Key=f"{key}/latest")["Body"].read().decode()
        data = s3.client.get_object(Bucket=bucket, Key=f"{key}/{pointer.strip()}")["Body"].read()
    else:
        folder = Path(uri_or_path)
        data = (folder / (folder / "latest").read_text().strip()).read_bytes()
    return torch.load(io.BytesIO(data), weights_only=True)


def interrupt_after_first_checkpoint(command, wait_for, signum=signal.SIGTERM):
    """Start `command`, send `signum` as soon as `wait_for()` is true, return the result."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not wait_for() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signum)
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for (key, left), right in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].values()):
        assert torch.equal(left["exp_avg"], right["exp_avg"]), key


def cifar_command(*args):
    return [str(CNN_JOB), "train", "cifar10", "--augment", *args]


def test_sigterm_mid_epoch_then_resume_matches_an_uninterrupted_run(s3, data_dir, tmp_path):
    # CIFAR-10 with augmentation: data order, crops and flips must all line up after resume.
    straight_uri, split_uri = f"s3://{s3.bucket}/straight", f"s3://{s3.bucket}/split"
    straight = subprocess.run(cifar_command(*train_command(data_dir, straight_uri)),
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr

    def first_checkpoint_written():
        return "Contents" in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="split/latest")

    code, out, err = interrupt_after_first_checkpoint(
        cifar_command(*train_command(data_dir, split_uri, "--checkpoint-every-steps", "10")),
        first_checkpoint_written,
    )
    assert code == PREEMPTED_EXIT_CODE, err
    assert "preempted by SIGTERM" in out and "run the same command to resume" in out
    interrupted = read_checkpoint(s3, split_uri)
    assert interrupted["epoch"] == 0 and 0 < interrupted["epoch_step"] < 50  # mid-epoch 1

    resumed = subprocess.run(
        cifar_command(*train_command(data_dir, split_uri, "--checkpoint-every-steps", "10")),
        capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"epoch 1, step {interrupted['epoch_step']} of it" in resumed.stdout.replace("\n", " ")
    final, expected = read_checkpoint(s3, split_uri), read_checkpoint(s3, straight_uri)
    assert_same_weights(final, expected)
    assert [h["val_acc"] for h in final["metrics"]] == [h["val_acc"] for h in expected["metrics"]]


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_resumes_exactly(data_dir, tmp_path):
    def torchrun(folder, *extra):
        return [str(TORCHRUN), "--nproc-per-node", "2", "--standalone", "-m", "job", "train",
                "mnist", *train_command(data_dir, str(folder), *extra)]

    straight = subprocess.run(torchrun(tmp_path / "straight"), capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    split = tmp_path / "split"
    code, out, _ = interrupt_after_first_checkpoint(
        torchrun(split, "--checkpoint-every-steps", "10"), (split / "latest").exists)
    interrupted = read_checkpoint(None, split)
    assert 0 < interrupted["epoch_step"] < 25 and interrupted["epoch"] == 0, code
    assert interrupted["step"] % 10 == 0  # the ranks agreed on a step where the flag is read
    assert out.count("preempted by SIGTERM") == 1  # rank 0 alone reports it

    resumed = subprocess.run(torchrun(split, "--checkpoint-every-steps", "10"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_weights(read_checkpoint(None, split), read_checkpoint(None, tmp_path / "straight"))


def test_sigint_behaves_like_sigterm(data_dir, tmp_path):
    folder = tmp_path / "ckpt"
    command = [str(CNN_JOB), "train", "mnist",
               *train_command(data_dir, str(folder), "--checkpoint-every-steps", "5")]
    code, out, err = interrupt_after_first_checkpoint(command, (folder / "latest").exists,
                                                      signal.SIGINT)
    assert code == PREEMPTED_EXIT_CODE, err
    assert "preempted by SIGINT" in out
    assert read_checkpoint(None, folder)["epoch_step"] > 0


def test_a_second_sigint_while_the_checkpoint_is_written_aborts_with_one_line(
        s3, relay, data_dir, tmp_path):
    # The stop's checkpoint upload is held by a relay in front of the bucket, so the second
    # Ctrl-C lands while it is under way, as an impatient user's would. A whole MNIST epoch
    # (no --limit-train) keeps the epoch's own checkpoint far away.
    held = relay(s3.endpoint, hold_put="/run/step-")
    record = tmp_path / "indices"
    process = subprocess.Popen(
        [str(CNN_JOB), "train", "mnist", "--data-uri", str(data_dir), "--device", "cpu",
         "--checkpoint-uri", f"s3://{s3.bucket}/run", "--epochs", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "AWS_ENDPOINT_URL": held.url, RECORD_INDICES_ENV: str(record)})

    def wait_until(condition, what):
        deadline = time.monotonic() + 300
        while not condition():
            assert process.poll() is None and time.monotonic() < deadline, (
                f"no {what}: {process.communicate()}")
            time.sleep(0.01)

    wait_until(Path(f"{record}.rank0").exists, "training step")  # inside the loop
    process.send_signal(signal.SIGINT)
    wait_until(held.holding.is_set, "checkpoint upload")  # the first one's stop is under way
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=20)  # at once: the held upload is not waited for

    assert process.returncode == ABORTED_EXIT_CODE, err
    assert err.splitlines()[-1].startswith("error: a second Ctrl-C: stopped at once"), err
    assert "Traceback" not in err
    listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="run/").get("Contents", [])
    assert not [o["Key"] for o in listed if "/step-" in o["Key"]]  # nothing half-written
