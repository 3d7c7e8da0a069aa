"""W&B, offline (no network here): run a short training, then read back what W&B recorded."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from job.tracking import BackgroundTracker, NullTracker, resolve_mode, start, strip_userinfo
from tests.conftest import CNN_JOB, SECRET, archive_sha256, process_tree, run_cli
from tests.wandb_records import offline_runs

WANDB_SECRET = "wandbkey-" + "7" * 31  # a 40-character stand-in API key that must not leak


@pytest.fixture
def wandb_env(tmp_path):
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_API_KEY": WANDB_SECRET,
            "WANDB_PROJECT": "cnn-job-tests", "AWS_SECRET_ACCESS_KEY": SECRET}


def train_offline(tmp_path, data_dir, wandb_env, epochs, *extra):
    result = run_cli("train", "mnist", "--data-uri", str(data_dir), "--limit-train", "1280",
                     "--epochs", str(epochs), "--device", "cpu", "--checkpoint-uri",
                     str(tmp_path / "ckpt"), "--summary-json", str(tmp_path / "s.json"),
                     "--run-name", "tracking-test", *extra, env=wandb_env)
    assert result.returncode == 0, result.stderr
    return result, json.loads((tmp_path / "s.json").read_text())


def test_what_a_run_records_and_a_resume_continues_it(tmp_path, data_dir, wandb_env):
    train_offline(tmp_path, data_dir, wandb_env, 1)
    result, summary = train_offline(tmp_path, data_dir, wandb_env, 2)
    first, second = offline_runs(tmp_path)

    # One run, not two: the resumed job continues the id stored in the checkpoint.
    assert first.run_id == second.run_id == summary["wandb_run_id"]
    checkpoint = torch.load(summary["checkpoint"], weights_only=True)
    assert checkpoint["wandb_run_id"] == first.run_id

    # Config: every setting, provenance, world size, device, versions.
    assert first.config["dataset"] == "mnist" and first.config["epochs"] == 1
    assert first.config["batch_size"] == 64 and first.config["world_size"] == 1
    assert first.config["device"] == "cpu" and first.config["precision"] == "fp32"
    assert first.config["data_sha256"]["t10k-labels-idx1-ubyte.gz"] == archive_sha256(
        data_dir, "mnist", "t10k-labels-idx1-ubyte.gz")
    assert first.config["versions"]["torch"] == torch.__version__

    # Per step: train loss, lr, images/s every --log-every-steps (10), on one step axis.
    steps = [row for run in (first, second) for row in run.history if "train/loss" in row]
    assert [row["_step"] for row in steps] == [10, 20, 30, 40]
    assert all(row["train/lr"] > 0 and row["train/images_per_second"] > 0 for row in steps)
    assert steps[0]["train/lr"] > steps[-1]["train/lr"]  # linear decay
    assert min(row["_step"] for row in second.history) > max(row["_step"] for row in first.history)

    # Per epoch: weighted train loss, val loss/accuracy, per-class accuracy, confusion matrix,
    # misclassified images with their labels.
    epochs = [row for run in (first, second) for row in run.history if "val/acc" in row]
    assert [row["_step"] for row in epochs] == [20, 40]
    assert [row["val/acc"] for row in epochs] == [h["val_acc"] for h in summary["history"]]
    assert [row["train/epoch_loss"] for row in epochs] == [h["train_loss"] for h in summary["history"]]
    assert all(0 <= epochs[-1][f"val/acc/{digit}"] <= 1 for digit in range(10))
    last = epochs[-1]
    assert last["val/confusion_matrix_table/_type"] == "table-file"
    table = json.loads((second.folder / "files" / last["val/confusion_matrix_table/path"]).read_text())
    counts = {(actual, predicted): n for actual, predicted, n in table["data"]}
    assert sum(counts.values()) == 10000
    assert sum(counts[(d, d)] for d in map(str, range(10))) / 10000 == last["val/acc"]
    assert last["val/misclassified/_type"] == "images/separated"
    assert last["val/misclassified/count"] == 16
    assert all(caption.startswith("true ") and ", predicted " in caption
               for caption in last["val/misclassified/captions"])

    # Summary equal to --summary-json; checkpoints as model artifacts with aliases.
    for key in ("final_val_acc", "final_val_loss", "final_train_loss", "epochs", "checkpoint",
                "train_images_per_second"):
        assert second.summary[key] == summary[key], key
    models = [a for run in (first, second) for a in run.artifacts if a.type == "model"]
    assert len(models) == 2 and all(a.name == f"model-{first.run_id}" for a in models)
    assert set(models[0].aliases) == {"latest", "best"}
    assert set(models[1].aliases) == ({"latest", "best"}
                                      if epochs[1]["val/acc"] >= epochs[0]["val/acc"] else {"latest"})
    references = [entry.ref for entry in models[-1].manifest.contents]
    assert references == [f"file://{summary['checkpoint']}"]

    # No credential from the environment anywhere in what W&B wrote.
    for path in tmp_path.joinpath("wandb").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data and WANDB_SECRET.encode() not in data, path
    assert WANDB_SECRET not in result.stdout + result.stderr


def test_without_key_or_mode_it_runs_offline_and_says_how_to_sync(tmp_path, data_dir):
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "", "WANDB_DIR": str(tmp_path),
           "HOME": str(tmp_path)}  # no ~/.netrc either
    result = run_cli("train", "mnist", "--data-uri", str(data_dir), "--limit-train", "640",
                     "--epochs", "1", "--device", "cpu", "--checkpoint-uri", str(tmp_path / "c"),
                     env=env)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "W&B" in line]
    assert line.startswith("W&B is offline (no WANDB_API_KEY): sync it later with `wandb sync ")
    (run,) = offline_runs(tmp_path)
    assert str(run.folder) in line


def train_where_a_user_starts(tmp_path, data_dir, *extra):
    """A short offline run started in an empty folder, with no WANDB_DIR set: W&B's run folder
    goes beside the run's, and the starting folder gets nothing but runs/."""
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli("train", "mnist", "--data-uri", str(data_dir), "--limit-train", "256",
                     "--epochs", "1", "--device", "cpu", *extra,
                     env={"WANDB_MODE": "offline", "WANDB_DIR": ""}, cwd=work)
    assert result.returncode == 0, result.stderr
    assert [path.name for path in work.iterdir()] == ["runs"]
    (run,) = offline_runs(work / "runs" / "mnist")
    assert run.summary["final_val_acc"] > 0 and run.artifacts
    return work / "runs" / "mnist", result


def test_wandb_run_folders_go_beside_the_checkpoints(tmp_path, data_dir):
    run_folder, _ = train_where_a_user_starts(tmp_path, data_dir)
    assert sorted(path.name for path in run_folder.iterdir()) == ["checkpoints", "wandb"]


def test_with_s3_checkpoints_wandb_runs_go_under_runs_dataset_and_the_job_names_the_uri(
        tmp_path, data_dir, s3):
    uri = f"s3://{s3.bucket}/mnist-run"
    run_folder, result = train_where_a_user_starts(tmp_path, data_dir, "--checkpoint-uri", uri,
                                                   "--s3-endpoint-url", s3.endpoint)
    assert [path.name for path in run_folder.iterdir()] == ["wandb"]
    model, next_command = result.stdout.splitlines()[-2:]
    assert re.fullmatch(rf"model: {uri}/step-\d{{9}}\.pt \(val_acc \d+\.\d\d%\)", model), model
    assert next_command == f"next: cnn-job evaluate {uri} --s3-endpoint-url {s3.endpoint}"


def test_wandb_outage_never_stops_training(tmp_path, data_dir):
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": WANDB_SECRET, "WANDB_DIR": str(tmp_path),
           "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_INIT_TIMEOUT": "5"}
    result = run_cli("train", "mnist", "--data-uri", str(data_dir), "--limit-train", "640",
                     "--epochs", "1", "--device", "cpu", "--checkpoint-uri", str(tmp_path / "c"),
                     "--summary-json", str(tmp_path / "s.json"), env=env)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: W&B")]
    assert len(warnings) == 1 and "training goes on without it" in warnings[0]
    assert json.loads((tmp_path / "s.json").read_text())["final_val_acc"] > 0.5


def test_mode_resolution_and_the_no_op(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode(None) == ("offline", True)
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert resolve_mode(None) == ("online", False)
    assert resolve_mode("disabled") == ("disabled", False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode(None) == ("offline", False)
    kwargs = dict(mode="offline", project=None, run_name=None, run_id=None, config={},
                  class_names=(), say=print)
    assert isinstance(start(enabled=False, **kwargs), NullTracker)  # ranks other than 0
    assert isinstance(start(enabled=True, **{**kwargs, "mode": "disabled"}), NullTracker)


def test_uris_lose_their_credentials():
    assert strip_userinfo("https://user:pw@mirror.example/data") == "https://mirror.example/data"
    assert strip_userinfo("s3://bucket/prefix") == "s3://bucket/prefix"
    assert strip_userinfo(5) == 5


def test_training_does_not_wait_for_wandb_to_start(monkeypatch, tmp_path):
    """W&B starts on its own thread: calls made while it is still starting return at once and
    reach the run in order once it is up; close() waits for it. (W&B is held up here until the
    test has made its calls, so no timing is involved.)"""
    import wandb

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    released, lines = threading.Event(), []

    def held_init():
        released.wait(timeout=120)
        return wandb.init(project="p", id="held0001", mode="offline",
                          settings=wandb.Settings(console="off", silent=True))

    tracker = BackgroundTracker("held0001", held_init, (), lines.append, for_want_of_key=False)
    for step in (1, 2, 3):
        tracker.log({"train/loss": 1.0 / step}, step)
    assert tracker.run_id == "held0001" and tracker.thread.is_alive() and not released.is_set()
    released.set()
    tracker.close({"final_val_acc": 0.5})
    assert not tracker.thread.is_alive() and lines == []
    # close() returns once W&B's service has exited, so every file of the run is closed:
    # finish() alone left the history unwritten now and then on a loaded machine.
    descendants = []
    for pid in process_tree(os.getpid())[1:]:
        with contextlib.suppress(OSError):  # one that ended meanwhile
            descendants.append(Path(f"/proc/{pid}/comm").read_text().strip())
    assert "wandb-core" not in descendants
    (run,) = offline_runs(tmp_path)
    assert run.run_id == "held0001"
    assert [(row["_step"], row["train/loss"]) for row in run.history] == [(1, 1.0), (2, 0.5),
                                                                           (3, 1 / 3)]
    assert run.summary["final_val_acc"] == 0.5


def test_a_wandb_that_fails_to_start_drops_the_calls_with_one_warning(tmp_path):
    def failing_init():
        raise ConnectionError("no route to the W&B server\nsecond line")

    lines = []
    tracker = BackgroundTracker("fail0001", failing_init, (), lines.append, for_want_of_key=False)
    tracker.log({"train/loss": 1.0}, 1)
    tracker.close({"final_val_acc": 0.5})
    assert lines == ["warning: W&B did not start (ConnectionError: no route to the W&B server); "
                     "training goes on without it"]


def test_after_a_stop_signal_the_job_waits_for_wandb_only_so_long(tmp_path):
    """A W&B that is still starting (held here, as a slow or absent server holds it) gets
    `wait_s` at close, then the job goes on: one warning, and nothing more from W&B's thread
    when it comes to later."""
    held, lines = threading.Event(), []

    def slow_init():
        held.wait(300)
        raise ConnectionError("the W&B server did not answer")

    tracker = BackgroundTracker("slow0001", slow_init, (), lines.append, for_want_of_key=False)
    tracker.log({"train/loss": 1.0}, 1)
    tracker.close({"final_val_acc": 0.5}, wait_s=0.2)
    assert tracker.thread.is_alive()  # still held: close did not wait for it
    assert lines == ["warning: W&B did not finish within 0.2 s: its server never answered, so "
                     "the run's metrics were not recorded (the checkpoint and summary are "
                     "written)"]
    held.set()
    tracker.thread.join(60)
    assert not tracker.thread.is_alive() and len(lines) == 1


# ----------------------------------------------------------------------------------------------
# a W&B server that is down or hangs: the job's exit is bounded all the same

EXIT_BOUND_S = 20  # docs/operations.md: well inside Kubernetes' 30 s grace period


@pytest.fixture(params=["refusing", "silent"])
def hanging_wandb_server(request):
    """The base URL of a W&B server that is down (a loopback port that refuses connections) or
    hangs (one that accepts them and never answers, kept open until the test ends)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))  # bound, and so not anyone else's, but refusing unless listening
    held = []
    if request.param == "silent":
        server.listen(64)

        def accept_and_never_answer():
            while True:
                try:
                    held.append(server.accept()[0])
                except OSError:  # closed at the end of the test
                    return

        threading.Thread(target=accept_and_never_answer, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for connection in held:
        connection.close()


class Job:
    """`cnn-job train` with its output through a pipe, as `cnn-job sweep run` or `| tee` reads
    it: the job has ended for such a reader only when every holder of the pipe has closed it."""

    def __init__(self, data_dir, folder: Path, env: dict, *train_args: str) -> None:
        self.checkpoints, self.lines, self.ended = folder / "ckpt", [], threading.Event()
        self.process = subprocess.Popen(
            [str(CNN_JOB), "train", "mnist", "--data-uri", str(data_dir), "--device", "cpu",
             "--checkpoint-uri", str(self.checkpoints), "--wandb-mode", "online", *train_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **env, "WANDB_DIR": str(folder), "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
        self.ended.set()

    def wait_for(self, done, what: str) -> float:
        """When `done()` became true (polled; the job's output so far on failure)."""
        deadline = time.monotonic() + 240
        while not done():
            assert not self.ended.is_set() and time.monotonic() < deadline, (what, self.output())
            time.sleep(0.05)
        return time.monotonic()

    def line_at(self, fragment: str) -> float:
        self.wait_for(lambda: any(fragment in line for _, line in self.lines), fragment)
        return next(at for at, line in self.lines if fragment in line)

    def seconds_to_end(self, since: float) -> float:
        """Seconds from `since` until the output's end and the process's exit, at most
        EXIT_BOUND_S (then the test fails, and the job is killed)."""
        ended = self.ended.wait(max(0.0, since + EXIT_BOUND_S - time.monotonic()))
        try:
            self.process.wait(timeout=1 if ended else 0.001)
        except subprocess.TimeoutExpired:
            pass
        if not ended or self.process.poll() is None:
            self.process.kill()
            raise AssertionError(f"still going {EXIT_BOUND_S} s on (output ended: {ended}):\n"
                                 + self.output())
        return time.monotonic() - since

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wandb_lines(self) -> list[str]:
        return [line for _, line in self.lines if "W&B" in line]


def test_a_stop_or_a_finish_ends_the_job_within_20_s_whatever_the_wandb_server_does(
        tmp_path, data_dir, hanging_wandb_server):
    """W&B online against a server that is down or never answers (W&B would retry for 90 s and
    more): a job stopped by SIGTERM mid-epoch, and a job that finishes, both end (the process
    and its output) within 20 s, with their status, checkpoint and one line about W&B. Both
    run at once, to keep the test short."""
    env = {"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": hanging_wandb_server,  # well-formed
           "WANDB_INIT_TIMEOUT": ""}  # W&B's own: 90 s
    stopped = Job(data_dir, tmp_path / "stopped", env, "--limit-train", "6400", "--epochs", "3",
                  "--checkpoint-every-steps", "5")
    finished = Job(data_dir, tmp_path / "finished", env, "--limit-train", "640", "--epochs", "1")
    try:
        stopped.wait_for((stopped.checkpoints / "latest").exists, "a checkpoint")
        signalled = time.monotonic()
        stopped.process.send_signal(signal.SIGTERM)
        stop_s = stopped.seconds_to_end(signalled)
        finish_s = finished.seconds_to_end(finished.line_at("epoch 1/1  train_loss"))
    finally:
        for job in (stopped, finished):
            job.process.kill()
            job.process.wait()
    print(f"{hanging_wandb_server}: stopped job ended {stop_s:.1f} s after SIGTERM, finished "
          f"job {finish_s:.1f} s after training")
    assert stopped.process.returncode == 75, stopped.output()
    assert "preempted by SIGTERM" in stopped.output()
    assert (stopped.checkpoints / "latest").exists()
    assert finished.process.returncode == 0, finished.output()
    assert "model: " in finished.output()
    for job in (stopped, finished):
        assert job.wandb_lines() == [
            "warning: W&B did not finish within 10 s: its server never answered, so the run's "
            "metrics were not recorded (the checkpoint and summary are written)"], job.output()
        assert "Traceback" not in job.output()


def test_wandb_folders_that_cannot_be_written_move_to_the_temporary_folder(tmp_path, data_dir):
    # As under a read-only root: W&B's default folders cannot be made (a file stands in the way,
    # which stops root too). Its staging and service log go to TMPDIR instead, and none of its
    # service's own log lines reaches the job's console.
    blocked = tmp_path / "read-only"
    blocked.write_text("")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "TMPDIR": str(tmp_path / "tmp"),
           **{name: str(blocked / name) for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR",
                                                      "WANDB_CONFIG_DIR")}}
    (tmp_path / "tmp").mkdir()
    result = run_cli("train", "mnist", "--data-uri", str(data_dir), "--limit-train", "640",
                     "--epochs", "1", "--device", "cpu", "--checkpoint-uri", str(tmp_path / "c"),
                     env=env)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "W&B" not in output and not re.search(r"^\d{4}/\d\d/\d\d .* INFO ", output, re.M), output
    (run,) = offline_runs(tmp_path)
    assert run.artifacts and run.summary["final_val_acc"] > 0.5
    assert (tmp_path / "tmp" / "wandb" / "wandb_data_dir").is_dir()
