"""A checkpoint folder is one run: resume continues it exactly, or refuses; nothing is lost.

Each test is a way an operator (or a cluster) breaks that promise: a second run into the same
folder, a resume with other settings or data, other batch or world sizes, two jobs at once,
kill -9, a run that diverges, outputs that cannot be written, credentials in URIs."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from job import recipes
from job.checkpoint import from_bytes, to_bytes
from job.config import TrainConfig
from job.errors import JobError
from job.train import train
from tests.conftest import CNN_JOB, DATA_DIR, SECRET, fill, run_cli
from tests.test_preemption import TORCHRUN, assert_same_weights, read_checkpoint


def config(tmp_path, data_dir, **overrides) -> TrainConfig:
    settings = dict(dataset="mnist", data_uri=str(data_dir), checkpoint_uri=str(tmp_path / "ckpt"),
                    cache_dir=tmp_path / "cache", epochs=1, limit_train=1000, device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


def step_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step-"))


def wait_for(condition, timeout_s: float = 120, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process ended ({process.returncode}) before the condition held")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------
# 1. --resume never into a folder that holds a (longer) run


def test_resume_never_into_a_used_folder_is_refused_and_overwrite_starts_afresh(tmp_path, data_dir):
    folder = tmp_path / "ckpt"
    train(config(tmp_path, data_dir, limit_train=4000, checkpoint_every_steps=20))
    before = {name: (folder / name).read_bytes() for name in step_files(folder)}
    second = ["train", "mnist", "--data-uri", str(data_dir), "--checkpoint-uri", str(folder),
              "--device", "cpu", "--resume", "never", "--seed", "1", "--limit-train", "2000",
              "--epochs", "1", "--checkpoint-every-steps", "10"]
    refused = run_cli(*second)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "already holds a run" in refused.stderr
    assert "--overwrite" in refused.stderr
    assert {name: (folder / name).read_bytes() for name in step_files(folder)} == before

    done = run_cli(*second, "--overwrite")
    assert done.returncode == 0, done.stderr
    # The new run's checkpoints survive retention; `latest` names one that exists.
    latest = (folder / "latest").read_text().strip()
    assert latest == "step-000000032.pt" and latest in step_files(folder)
    assert all(torch.load(folder / name, weights_only=True)["config"]["seed"] == 1
               for name in step_files(folder))
    # ... and the same command with --resume auto continues the new run, not the old one.
    again = run_cli(*[arg if arg != "never" else "auto" for arg in second])
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout and "step-000000032.pt" in again.stdout


def test_overwrite_goes_with_resume_never_only(tmp_path, data_dir):
    with pytest.raises(JobError, match=r"--overwrite .* goes with --resume never only"):
        config(tmp_path, data_dir, overwrite=True)


# ----------------------------------------------------------------------------------------------
# 2. a resume with other settings or other data


@pytest.mark.parametrize(("changed", "value", "shown"), [
    ("seed", 1, "--seed 1 differs from the run in"),
    ("limit_train", 900, "--limit-train 900 differs from the run in"),
    ("lr", 0.01, "--lr 0.01 differs from the run in"),
])
def test_a_resume_that_changes_the_run_is_refused(tmp_path, data_dir, changed, value, shown):
    train(config(tmp_path, data_dir))
    with pytest.raises(JobError) as refused:
        train(config(tmp_path, data_dir, epochs=2, **{changed: value}))
    message = str(refused.value)
    assert shown in message and "--resume never and another --checkpoint-uri" in message
    original = {"seed": 0, "limit_train": 1000, "lr": recipes.defaults("mnist", "seed")["lr"]}[changed]
    assert f"({'--' + changed.replace('_', '-')} {original})" in message


def test_a_resume_on_other_data_is_refused(tmp_path, data_dir):
    train(config(tmp_path, data_dir))
    # The same images, re-compressed: other bytes, so another sha256, as a changed mirror has.
    other = tmp_path / "other" / "mnist"
    shutil.copytree(data_dir / "mnist", other)
    labels = other / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes()), compresslevel=1, mtime=1))
    with pytest.raises(JobError, match=r"data differs from the run's in .*t10k-labels-idx1-ubyte.gz"):
        train(config(tmp_path, data_dir, epochs=2, data_uri=str(other.parent)))


def test_a_flag_that_changes_the_run_is_suggested_as_a_flag(tmp_path, data_dir):
    cifar = dict(dataset="cifar10", limit_train=300, eval_batch_size=500)
    train(config(tmp_path, data_dir, **cifar))
    with pytest.raises(JobError) as refused:
        train(config(tmp_path, data_dir, epochs=2, augment=True, **cifar))
    # a value the CLI takes: --augment is a flag (--augment True would be refused)
    assert "--augment differs from the run in" in str(refused.value)
    assert "pass --no-augment, or" in str(refused.value)


def point_latest_at(folder: Path, name: str, **config_changes) -> dict:
    """Make `name` the folder's newest checkpoint, as if the run had stopped there (the later
    ones removed), with `config_changes` to the settings it records."""
    for later in step_files(folder):
        if later > name:
            (folder / later).unlink()
    state = from_bytes((folder / name).read_bytes())
    state["config"].update(config_changes)
    (folder / name).write_bytes(to_bytes(state))
    (folder / "latest").write_text(name)
    return state


def test_a_resume_with_fewer_epochs_than_the_run_has_started_is_refused(tmp_path, data_dir):
    # 16 steps an epoch; a checkpoint every 5 steps: step 20 is inside epoch 2.
    train(config(tmp_path, data_dir, epochs=2, checkpoint_every_steps=5, keep_checkpoints=10))
    folder = tmp_path / "ckpt"
    stopped = point_latest_at(folder, "step-000000020.pt")
    assert stopped["epoch"] == 1 and stopped["epoch_position"] > 0
    with pytest.raises(JobError) as refused:
        train(config(tmp_path, data_dir, epochs=1))
    assert str(refused.value).startswith(
        f"--epochs 1 ends before the run in {folder}, which is inside epoch 2 (step 20) of the "
        "2 it planned: a resume cannot end a run before where it is, or without its last "
        "epoch's finish (TTA, the recipe's end of run); pass --epochs 2 or more")
    assert (folder / "latest").read_text() == "step-000000020.pt"  # nothing written

    # After epoch 1 of a run planned for 3: ending there is that epoch's evaluation, unless the
    # last epoch does more than the others (--tta), which these weights never had.
    point_latest_at(folder, "step-000000016.pt", epochs=3)
    with pytest.raises(JobError, match=r"which is after epoch 1 \(step 16\) of the 3 it planned"
                                       r".*pass --epochs 2 or more \(--epochs 3 as planned\)"):
        train(config(tmp_path, data_dir, epochs=1, tta=True))
    ended = train(config(tmp_path, data_dir, epochs=1))
    assert ended["steps"] == 16 and ended["final_val_acc"] == stopped["metrics"][0]["val_acc"]


# ----------------------------------------------------------------------------------------------
# resume by sample position: other batch sizes and world sizes


def mnist_args(folder, *extra):
    return ["mnist", "--data-uri", str(ROOT_DATA), "--checkpoint-uri", str(folder), "--device", "cpu",
            "--epochs", "1", "--limit-train", "3200", "--checkpoint-every-steps", "5", *extra]


ROOT_DATA = DATA_DIR


def launcher(processes: int) -> list[str]:
    if processes == 1:
        return [str(CNN_JOB), "train"]
    return [str(TORCHRUN), "--nproc-per-node", str(processes), "--standalone", "-m", "job", "train"]


def stop_under_launch(args: list[str], batch_size: int, folder: Path, env: dict) -> dict:
    """`cnn-job launch` of 2 workers running `args` at `batch_size`, SIGTERM once `folder` holds
    a checkpoint: exit 75, and the checkpoint it wrote (by 2 processes)."""
    launcher = subprocess.Popen([str(CNN_JOB), "launch", "--nproc-per-node", "2", *args,
                                 "--batch-size", str(batch_size)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for((folder / "latest").exists, process=launcher)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 75, err[-2000:]
    stopped = torch.load(folder / (folder / "latest").read_text().strip(), weights_only=True)
    assert stopped["world_size"] == 2 and stopped["epoch_position"] % (2 * batch_size) == 0
    return stopped


def served(record: Path) -> list[int]:
    """Every training index recorded by every rank, epoch 1 only."""
    indices = []
    for path in sorted(record.parent.glob(record.name + ".rank*")):
        for line in path.read_text().splitlines():
            epoch, _, numbers = line.partition(": ")
            if epoch == "0":
                indices += [int(n) for n in numbers.split()]
    return indices


def resume_in_one_process(args: list[str], batch_size: int, position: int, images: int,
                          tmp_path: Path, env: dict) -> dict:
    """After stop_under_launch (recording to tmp_path/indices-first): `args` again in one
    process at `batch_size`, W&B offline in tmp_path/wandb. It continues at image `position`,
    every one of the epoch's `images` is trained once over the two, W&B goes on. Its summary."""
    env = {**env, "CNN_JOB_RECORD_INDICES": str(tmp_path / "indices-then"),
           "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb")}
    resumed = subprocess.run([str(CNN_JOB), *args, "--batch-size", str(batch_size),
                              "--summary-json", str(tmp_path / "s.json")],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"continuing epoch 1 at image {position} of its order" in resumed.stdout.replace("\n", " ")
    counts = Counter(served(tmp_path / "indices-first") + served(tmp_path / "indices-then"))
    assert sorted(counts) == list(range(images)) and set(counts.values()) == {1}
    assert "W&B logging failed" not in resumed.stdout + resumed.stderr
    return json.loads((tmp_path / "s.json").read_text())


@pytest.mark.parametrize(("first", "then"), [
    ((1, 64), (1, 128)),  # batch 64 → 128
    ((2, 32), (1, 32)),  # 2 processes → 1
    ((1, 32), (2, 32)),  # 1 process → 2
], ids=["batch-64-to-128", "2-processes-to-1", "1-process-to-2"])
def test_a_resume_at_another_batch_or_world_size_uses_each_image_once(tmp_path, first, then):
    folder, record = tmp_path / "ckpt", tmp_path / "indices"
    env = {**os.environ, "CNN_JOB_RECORD_INDICES": str(record) + "-first"}
    process = subprocess.Popen(
        [*launcher(first[0]), *mnist_args(folder, "--batch-size", str(first[1]))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for((folder / "latest").exists, process=process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    # (torchrun itself reports its workers' 75 as 1: `cnn-job launch` keeps the 75.)
    assert process.returncode == (75 if first[0] == 1 else 1), err[-2000:]
    position = read_checkpoint(None, folder)["epoch_position"]
    assert 0 < position < 3200

    env["CNN_JOB_RECORD_INDICES"] = str(record) + "-then"
    resumed = subprocess.run([*launcher(then[0]), *mnist_args(folder, "--batch-size", str(then[1]))],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    out = resumed.stdout.replace("\n", " ")
    assert f"continuing epoch 1 at image {position} of its order" in out
    before, after = served(tmp_path / "indices-first"), served(tmp_path / "indices-then")
    assert len(before) == position  # what the checkpoint says was consumed, was
    counts = Counter(before + after)
    assert sorted(counts) == list(range(3200)) and set(counts.values()) == {1}


def test_lr_schedule_counts_images_not_steps():
    from job.optim import lr_at

    # Half the images seen is half the decay, at batch 64 or 128 alike.
    assert lr_at("linear", 1e-3, 32 * 64 / (64 * 64)) == lr_at("linear", 1e-3, 16 * 128 / (32 * 128)) == 5e-4


# ----------------------------------------------------------------------------------------------
# 3. one writer per run


def long_run(folder, *extra, env=None):
    command = [str(CNN_JOB), "train", "mnist", "--data-uri", str(ROOT_DATA), "--checkpoint-uri",
               str(folder), "--device", "cpu", "--epochs", "30", "--limit-train", "3000", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def test_a_second_job_on_a_local_run_is_refused_and_kill_9_frees_it_at_once(tmp_path):
    folder = tmp_path / "ckpt"
    holder = long_run(folder)
    try:
        wait_for(lambda: (folder / ".holder").exists(), process=holder)
        second = run_cli("train", "mnist", "--data-uri", str(ROOT_DATA), "--checkpoint-uri",
                         str(folder), "--device", "cpu", "--limit-train", "3000", "--epochs", "1")
        assert second.returncode == 2
        assert "is in use by a live job" in second.stderr
        assert f"pid {holder.pid}" in second.stderr and second.stderr.count("\n") == 1
        wait_for((folder / "latest").exists, process=holder)
    finally:
        holder.kill()
        holder.wait()
    started = time.monotonic()
    retried = run_cli("train", "mnist", "--data-uri", str(ROOT_DATA), "--checkpoint-uri", str(folder),
                      "--device", "cpu", "--limit-train", "3000", "--epochs", "1")
    assert retried.returncode == 0, retried.stderr
    assert "resumed from" in retried.stdout and "in use" not in retried.stderr
    assert time.monotonic() - started < 60


def test_moto_enforces_conditional_writes(s3):
    s3.client.put_object(Bucket=s3.bucket, Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(Exception, match="PreconditionFailed"):
        s3.client.put_object(Bucket=s3.bucket, Key="k", Body=b"2", IfNoneMatch="*")
    with pytest.raises(Exception, match="PreconditionFailed"):
        s3.client.put_object(Bucket=s3.bucket, Key="k", Body=b"3", IfMatch='"0123"')


def test_s3_lease_refuses_a_second_job_and_expires_after_kill_9(s3, tmp_path):
    uri = f"s3://{s3.bucket}/run"
    lease = ["--lease-seconds", "3", "--checkpoint-every-steps", "2"]
    holder = long_run(uri, *lease)

    def lease_object():
        return s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="run/.lease").get("KeyCount", 0)

    try:
        wait_for(lease_object, process=holder)
        second = run_cli("train", "mnist", "--data-uri", str(ROOT_DATA), "--checkpoint-uri", uri,
                         "--device", "cpu", "--limit-train", "3000", "--epochs", "1", *lease)
        assert second.returncode == 2, second.stderr
        assert "is in use by a live job" in second.stderr and second.stderr.count("\n") == 1
        # kill -9 in the middle of checkpointing: wait until a few are written.
        wait_for(lambda: read_latest_step(s3, "run") >= 6, process=holder)
    finally:
        holder.kill()
        holder.wait()
    killed_at = time.monotonic()
    retried = run_cli("train", "mnist", "--data-uri", str(ROOT_DATA), "--checkpoint-uri", uri,
                      "--device", "cpu", "--limit-train", "3000", "--epochs", "1", *lease)
    waited_s = time.monotonic() - killed_at
    assert retried.returncode == 0, retried.stderr
    assert "took over the lease" in retried.stdout and "resumed from" in retried.stdout
    assert waited_s < 3 + 30  # the lease period, plus start-up and one epoch on a loaded machine
    print(f"retried job ended {waited_s:.1f} s after kill -9 of the holder (lease 3 s)")
    assert lease_object() == 0  # released at the end


def read_latest_step(s3, prefix) -> int:
    try:
        name = s3.client.get_object(Bucket=s3.bucket, Key=f"{prefix}/latest")["Body"].read()
    except s3.client.exceptions.NoSuchKey:
        return -1
    return int(name.decode().strip()[5:14])


def test_kill_9_during_s3_checkpointing_then_resume_matches_an_uninterrupted_run(s3, tmp_path):
    common = ["--lease-seconds", "2", "--checkpoint-every-steps", "1", "--epochs", "1",
              "--limit-train", "1600", "--lr-schedule", "constant"]
    straight = run_cli("train", "mnist", "--data-uri", str(ROOT_DATA), "--checkpoint-uri",
                       f"s3://{s3.bucket}/straight", "--device", "cpu", *common)
    assert straight.returncode == 0, straight.stderr
    uri = f"s3://{s3.bucket}/split"
    process = subprocess.Popen([str(CNN_JOB), "train", "mnist", "--data-uri", str(ROOT_DATA),
                                "--checkpoint-uri", uri, "--device", "cpu", *common],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: read_latest_step(s3, "split") >= 5, process=process)
    process.kill()  # with a checkpoint written every step, most likely during an upload
    process.wait()
    resumed = run_cli("train", "mnist", "--data-uri", str(ROOT_DATA), "--checkpoint-uri", uri,
                      "--device", "cpu", *common)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert_same_weights(read_checkpoint(s3, uri), read_checkpoint(s3, f"s3://{s3.bucket}/straight"))
    assert not s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads")


# ----------------------------------------------------------------------------------------------
# divergence, outputs, credentials


def test_a_diverging_run_stops_with_exit_2_and_keeps_the_last_finite_checkpoint(tmp_path, data_dir):
    folder = tmp_path / "ckpt"
    result = run_cli("train", "mnist", "--data-uri", str(data_dir), "--checkpoint-uri", str(folder),
                     "--device", "cpu", "--limit-train", "3200", "--lr", "1e9", "--lr-schedule",
                     "constant", "--checkpoint-every-steps", "1", "--log-every-steps", "1000")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "became NaN or inf at step" in result.stderr
    step = int(result.stderr.split("at step ")[1].split(":")[0])
    latest = torch.load(folder / (folder / "latest").read_text().strip(), weights_only=True)
    assert latest["step"] < step
    assert all(torch.isfinite(t).all() for t in latest["model"].values())
    assert all(torch.isfinite(torch.tensor(latest["epoch_loss"])))


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_option_values_that_are_not_finite_are_refused(value, tmp_path):
    result = run_cli("train", "mnist", "--lr", value, "--checkpoint-uri", str(tmp_path / "c"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--lr must be a positive finite number" in result.stderr
    assert not (tmp_path / "c").exists()


def test_summary_json_must_be_a_file_checked_before_training(tmp_path, data_dir):
    (tmp_path / "a-folder").mkdir()
    for target in (tmp_path / "a-folder", Path("/dev/null")):
        result = run_cli("train", "mnist", "--data-uri", str(data_dir), "--checkpoint-uri",
                         str(tmp_path / "ckpt"), "--device", "cpu", "--limit-train", "1000",
                         "--summary-json", str(target))
        assert result.returncode == 2 and "is not a regular file" in result.stderr
        assert result.stderr.count("\n") == 1
        assert not (tmp_path / "ckpt" / "latest").exists()  # no training happened
    assert Path("/dev/null").is_char_device()


def test_a_summary_json_on_a_filesystem_full_by_the_end_is_one_line(tmp_path, data_dir, tmpfs):
    full = tmpfs(tmp_path / "full", size_mb=1)
    fill(full)  # new names still fit (the check before training passes); their bytes do not
    result = run_cli("train", "mnist", "--data-uri", str(data_dir), "--cache-dir",
                     str(tmp_path / "cache"), "--checkpoint-uri", str(tmp_path / "ckpt"),
                     "--device", "cpu", "--epochs", "1", "--limit-train", "640",
                     "--summary-json", str(full / "summary.json"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"error: cannot write --summary-json {full / 'summary.json'} (No space left on device); "
        f"nothing was written there; the run's model is {tmp_path / 'ckpt'}/step-")
    assert sorted(p.name for p in full.iterdir()) == ["filler"]  # no half-written file


def test_a_checkpoint_folder_that_fills_up_is_one_line_and_keeps_the_last_checkpoint(
        tmp_path, data_dir, tmpfs):
    folder = tmpfs(tmp_path / "ckpt", size_mb=8)  # one seed MNIST checkpoint (4.8 MB), not two
    result = run_cli("train", "mnist", "--data-uri", str(data_dir), "--cache-dir",
                     str(tmp_path / "cache"), "--checkpoint-uri", str(folder), "--device", "cpu",
                     "--epochs", "1", "--limit-train", "640", "--checkpoint-every-steps", "3")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: cannot write checkpoint {folder}/step-000000006.pt (No space left on device); "
        "the previous checkpoint step-000000003.pt is intact: free space there, or pass another "
        "--checkpoint-uri")
    assert (folder / "latest").read_text().strip() == "step-000000003.pt"
    assert not list(folder.glob("*.partial")) and not list(folder.glob(".*.partial"))
    assert read_checkpoint(None, folder)["step"] == 3  # whole, and loadable


def test_credentials_in_an_endpoint_never_reach_output_or_checkpoints(tmp_path, data_dir):
    endpoint = f"http://KEY:{SECRET}@127.0.0.1:9"  # nothing listens on the discard port
    result = run_cli("train", "mnist", "--checkpoint-uri", "s3://bucket/run", "--s3-endpoint-url",
                     endpoint, "--storage-retry-s", "0",
                     env={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    assert result.returncode == 69 and result.stderr.count("\n") == 1  # unreachable: exit 69
    assert SECRET not in result.stderr + result.stdout and "http://127.0.0.1:9" in result.stderr
    cfg = config(tmp_path, data_dir, s3_endpoint_url=endpoint,
                 data_uri=f"https://user:{SECRET}@mirror.example/data")
    stored = json.dumps(cfg.to_dict())
    assert SECRET not in stored and "http://127.0.0.1:9" in stored
    # A real checkpoint of a run given that endpoint (unused: data and checkpoints are local).
    summary = train(config(tmp_path, data_dir, s3_endpoint_url=endpoint))
    saved = torch.load(summary["checkpoint"], weights_only=True)["config"]
    assert saved["s3_endpoint_url"] == "http://127.0.0.1:9"
    assert SECRET.encode() not in Path(summary["checkpoint"]).read_bytes()


def test_stale_partial_checkpoint_files_are_removed_at_start(tmp_path, data_dir):
    folder = tmp_path / "ckpt"
    train(config(tmp_path, data_dir))
    (folder / ".step-000000020.pt.x1y2.partial").write_bytes(b"torn write of a killed job")
    train(config(tmp_path, data_dir, epochs=2))
    assert not list(folder.glob("*.partial"))

