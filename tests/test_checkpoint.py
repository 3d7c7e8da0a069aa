"""Checkpoints without a training run: the format, retention, the pointer, the fallback past
unreadable files, and the rule that decides when a step is saved."""

import types

import pytest
import torch

from job.checkpoint import (
    POINTER,
    Checkpointer,
    CheckpointManager,
    RunState,
    from_bytes,
    load_checkpoint,
    to_bytes,
)
from job.config import TrainConfig
from job.datasets import preset
from job.distributed import Dist
from job.errors import JobError
from job.recipes import load
from job.recipes.base import Training
from job.tracking import NullTracker
from job.train import train
from tests.conftest import archive_sha256

CPU = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def todays_checkpoint(step: int = 16, epoch: int = 1, epoch_step: int = 0,
                      data_sha256: dict | None = None) -> dict:
    """A checkpoint exactly as the job has written them since it first shipped: the keys are
    spelled out here, not taken from the code, because users' buckets hold such files."""
    torch.manual_seed(0)
    model = load("mnist", "seed").build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.nn.functional.cross_entropy(model(torch.zeros(2, 1, 28, 28)), torch.tensor([1, 2])).backward()
    optimizer.step()
    config = TrainConfig(dataset="mnist", epochs=1, limit_train=1000, device="cpu").to_dict()
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "epoch": epoch, "epoch_step": epoch_step, "step": step,
        "epoch_loss": [0.0, 0.0],
        "metrics": [{"epoch": 1, "step": 16, "train_loss": 1.5, "val_loss": 1.2, "val_acc": 0.61}],
        "config": config, "rng": {"torch": torch.get_rng_state()},
        "data_sha256": data_sha256 or {"t10k-labels-idx1-ubyte.gz": "0" * 64}, "world_size": 1,
        "wandb_run_id": None,
    }


def write(folder, name: str, state) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(to_bytes(state) if isinstance(state, dict) else state)


def test_a_checkpoint_written_before_the_reshaping_still_resumes(tmp_path, data_dir):
    folder = tmp_path / "ckpt"
    sums = {a.name: archive_sha256(data_dir, "mnist", a.name) for a in preset("mnist").archives}
    write(folder, "step-000000016.pt", todays_checkpoint(data_sha256=sums))
    (folder / POINTER).write_text("step-000000016.pt\n")
    summary = train(TrainConfig(dataset="mnist", data_uri=str(data_dir), checkpoint_uri=str(folder),
                                cache_dir=tmp_path / "cache", epochs=2, limit_train=1000, device="cpu"))
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert summary["history"][0]["val_acc"] == 0.61  # epoch 1 came from the file, not a rerun
    assert summary["steps"] == 32


def test_retention_keeps_the_newest_and_moves_the_pointer(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep=2)
    state = todays_checkpoint()
    for step in (10, 20, 30):
        location = manager.save(state, step)
        assert location == str(tmp_path / f"step-{step:09d}.pt")
        assert manager.pointer() == f"step-{step:09d}.pt"
    assert manager.names() == ["step-000000030.pt", "step-000000020.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [POINTER, "step-000000020.pt",
                                                          "step-000000030.pt"]


def test_pointer_ignores_what_is_not_a_checkpoint_name(tmp_path):
    manager = CheckpointManager(str(tmp_path))
    assert manager.pointer() is None and manager.load_latest() is None
    (tmp_path / POINTER).write_text("../../etc/passwd\n")
    assert manager.pointer() is None


def test_fallback_past_the_pointer_to_the_newest_loadable(tmp_path):
    logged = []
    manager = CheckpointManager(str(tmp_path), keep=5, log=logged.append)
    manager.save(todays_checkpoint(step=10), 10)
    good = (tmp_path / "step-000000010.pt").read_bytes()
    write(tmp_path, "step-000000020.pt", good[: len(good) // 2])
    (tmp_path / POINTER).write_text("step-000000020.pt\n")
    state, location = manager.load_latest()
    assert state["step"] == 10 and location.endswith("step-000000010.pt")
    assert logged == [f"checkpoint {tmp_path / 'step-000000020.pt'} is unreadable "
                      f"({logged[0].split('(', 1)[1].split(')')[0]}); falling back to step-000000010.pt"]


@pytest.mark.parametrize("damage", [
    lambda s: {k: v for k, v in s.items() if k != "config"},  # no config
    lambda s: {**s, "config": {}},  # a config without a dataset
    lambda s: {**s, "step": "16"},  # a value of the wrong type
    lambda s: {**s, "model": [1, 2]},
    lambda s: [s["model"]],  # not a dict at all
    lambda s: b"not a torch file",
])
def test_every_malformed_checkpoint_is_just_unreadable(tmp_path, damage):
    logged = []
    manager = CheckpointManager(str(tmp_path), keep=5, log=logged.append)
    manager.save(todays_checkpoint(step=10), 10)
    broken = damage(todays_checkpoint(step=20))
    write(tmp_path, "step-000000020.pt", broken if isinstance(broken, bytes) else to_bytes(broken))
    (tmp_path / POINTER).write_text("step-000000020.pt\n")
    state, _ = manager.load_latest()
    assert state["step"] == 10 and "is unreadable" in logged[0]
    with pytest.raises(ValueError):
        from_bytes((tmp_path / "step-000000020.pt").read_bytes())


def test_only_unreadable_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    write(tmp_path, "step-000000020.pt", b"garbage")
    (tmp_path / POINTER).mkdir()  # a `latest` that is not a file
    with pytest.raises(JobError, match=r"no loadable checkpoint in .*pass --resume never"):
        CheckpointManager(str(tmp_path)).load_latest()


# the training batches as the checkpointer sees them: an epoch of 640 images
EPOCH_OF_640 = types.SimpleNamespace(images=range(640), remaining=lambda position: 640 - position)


def test_save_rule(tmp_path):
    cfg = TrainConfig(dataset="mnist", checkpoint_uri=str(tmp_path), checkpoint_every_steps=5)
    model = load("mnist", "seed").build_model()
    training = Training(torch.optim.Adam(model.parameters()))
    checkpointer = Checkpointer(CheckpointManager(str(tmp_path), log=lambda _: None), cfg, CPU,
                                model, training, {}, EPOCH_OF_640)
    run = RunState()
    run.begin_epoch(CPU)
    written = []
    for _ in range(10):
        run.advance(torch.tensor(2.0), 64, world_size=1)
        if checkpointer.save(run, NullTracker()):
            written.append(run.step)
    # Step 5 is due; step 10 ends the epoch, whose checkpoint follows its evaluation.
    assert written == [5]
    assert from_bytes((tmp_path / "step-000000005.pt").read_bytes())["epoch_loss"] == [640.0, 320.0]
    assert checkpointer.save(run, NullTracker(), force=True) and checkpointer.location.endswith("10.pt")
    never = Checkpointer(CheckpointManager(str(tmp_path / "n")), TrainConfig(dataset="mnist"), CPU,
                         model, training, {}, EPOCH_OF_640)
    assert not any(never.save(RunState(step=s, epoch_step=s, epoch_position=64 * s), NullTracker())
                   for s in range(1, 10))


class NeedsCode:
    """Any class: a pickle of it can only be loaded by importing and running code."""


def test_a_checkpoint_that_needs_code_is_named_in_one_whole_sentence(tmp_path):
    state = todays_checkpoint()
    state["metrics"] = NeedsCode()
    with pytest.raises(ValueError) as refused:
        from_bytes(to_bytes(state))
    assert str(refused.value) == ("it needs code to load (tests.test_checkpoint.NeedsCode is not plain "
                                  "data), and a checkpoint is never loaded by running code")


def test_a_full_disk_says_what_is_intact(tmp_path, monkeypatch):
    manager = CheckpointManager(str(tmp_path / "run"))
    manager.store.folder.mkdir(parents=True)
    original = manager.store.write

    def full(name, data):
        if name.startswith("step-000000020"):
            raise OSError(28, "No space left on device")
        original(name, data)

    monkeypatch.setattr(manager.store, "write", full)
    with pytest.raises(JobError) as first:
        manager.save(todays_checkpoint(step=20), step=20)  # the run's very first checkpoint
    assert "(No space left on device); this run has no checkpoint yet: free space" in str(first.value)
    manager.save(todays_checkpoint(step=10), step=10)
    with pytest.raises(JobError) as later:
        manager.save(todays_checkpoint(step=20), step=20)
    assert "; the previous checkpoint step-000000010.pt is intact: free space" in str(later.value)
    assert manager.pointer() == "step-000000010.pt"


def test_a_checkpoint_by_uri_is_a_file_a_folder_a_prefix_or_an_object(tmp_path, s3):
    folder = tmp_path / "run"
    write(folder, "step-000000016.pt", todays_checkpoint())
    write(folder, "step-000000032.pt", todays_checkpoint(step=32))
    (folder / POINTER).write_text("step-000000016.pt\n")
    data = (folder / "step-000000032.pt").read_bytes()
    for key in ("run/step-000000032.pt", "run/latest", "step-000000032.pt", "latest"):
        body = data if key.endswith(".pt") else b"step-000000032.pt\n"
        s3.client.put_object(Bucket=s3.bucket, Key=key, Body=body)
    cases = {
        str(folder / "step-000000032.pt"): (32, str(folder / "step-000000032.pt")),
        str(folder): (16, str(folder / "step-000000016.pt")),  # the one `latest` names
        f"file://{folder}/": (16, str(folder / "step-000000016.pt")),
        f"s3://{s3.bucket}/run/step-000000032.pt": (32, f"s3://{s3.bucket}/run/step-000000032.pt"),
        f"s3://{s3.bucket}/run/": (32, f"s3://{s3.bucket}/run/step-000000032.pt"),
        f"s3://{s3.bucket}": (32, f"s3://{s3.bucket}/step-000000032.pt"),  # a bucket's top level
    }
    for uri, (step, location) in cases.items():
        loaded = load_checkpoint(uri)
        assert (loaded.state["step"], loaded.location, loaded.preset.name) == (step, location, "mnist")
    (tmp_path / "empty").mkdir()
    for uri, message in (
        (str(tmp_path / "none.pt"), f"{tmp_path / 'none.pt'} does not exist: pass a checkpoint file"),
        (str(tmp_path / "empty"), f"no checkpoints in {tmp_path / 'empty'}: pass a checkpoint file"),
        (f"s3://{s3.bucket}/run/step-000000048.pt",
         f"s3://{s3.bucket}/run/step-000000048.pt does not exist in S3; check the URI"),
        ("ftp://h/run", "CHECKPOINT ftp://h/run: ftp:// is not supported; use a folder or s3://"),
    ):
        with pytest.raises(JobError) as error:
            load_checkpoint(uri)
        assert str(error.value).startswith(message)


def test_a_fast_resume_at_another_batch_size_says_which_images_it_leaves_out(tmp_path):
    # The fast recipe serves whole batches only: resumed at batch 384 from image 512 of 2000,
    # it trains 1408 more (3 batches of 384 end at 1920) and leaves 80 of the order out.
    images = torch.zeros(2000, 32, 32, 3, dtype=torch.uint8)
    batches = load("cifar10", "fast").train_batches(images, torch.zeros(2000, dtype=torch.long),
                                                    CPU.device, 384, augment=True, seed=0)
    batches.record_to = str(tmp_path / "indices")
    said = []
    cfg = TrainConfig(dataset="cifar10", net="fast", batch_size=384, checkpoint_uri=str(tmp_path))
    checkpointer = Checkpointer(CheckpointManager(str(tmp_path), log=said.append), cfg, CPU,
                                None, None, {}, batches)
    checkpointer._say_what_changed({"config": {"batch_size": 512, "epochs": 10}, "world_size": 1},
                                   RunState(epoch_step=1, step=1, epoch_position=512))
    assert said == ["batch 384 × 1 processes (the run had 512 × 1): continuing epoch 1 at image "
                    "512 of its order with 1408 images more; 80 images at the end of that order "
                    "are left out of it (the recipe serves only whole batches)"]
    for _ in batches.epoch(0, 512):
        pass
    served = (tmp_path / "indices.rank0").read_text().split()
    assert len([i for i in served if not i.endswith(":")]) == 1408  # what the line said
