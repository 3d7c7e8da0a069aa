"""MNIST's --net fast (job/recipes/fast_mnist.py): its parts, and every job guarantee for it:
exact resume inside its one epoch, DDP under `cnn-job launch` with SIGTERM → 75 and a resume
in one process, evaluate / predict / export with ONNX parity, W&B's records.

Runs on the real MNIST from ../shared/datasets, cut with --limit-train, on CPU. Its accuracy in
a whole epoch (≥ 99.0%, mean of 2 seeds) is `make bench`'s to measure, not a timed test's."""

import os

import pytest
import torch

from job import recipes
from job.config import TrainConfig
from job.recipes import load
from job.recipes.augment import SHIFTS
from job.recipes.fast_mnist import BETAS, DEFAULTS, FastMnistNet
from job.train import train
from tests.test_resume import resume_in_one_process, stop_under_launch
from tests.trained_runs import (
    assert_same_logits,
    evaluated,
    exported_net,
    onnx_logits,
    predicted_classes,
)


def config(tmp_path, data_dir, **overrides) -> TrainConfig:
    settings = dict(dataset="mnist", net="fast", data_uri=str(data_dir), device="cpu",
                    checkpoint_uri=str(tmp_path / "ckpt"), cache_dir=tmp_path / "cache",
                    limit_train=2048, wandb_mode="disabled")
    return TrainConfig(**{**settings, **overrides})


def read(path) -> dict:
    return torch.load(path, weights_only=True)


def normalised(images: torch.Tensor) -> torch.Tensor:
    p = load("mnist", "fast").dataset
    return (images.permute(0, 3, 1, 2).float() / 255 - p.mean[0]) / p.std[0]


def test_the_recipe_its_net_and_its_defaults():
    cfg = TrainConfig(dataset="mnist", net="fast")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.lr_schedule, cfg.augment, cfg.tta) == (
        1, 256, 0.01, "triangle", False, False) == tuple(DEFAULTS.values())
    recipe = load("mnist", "fast")
    net = recipe.build_model()
    assert isinstance(net, FastMnistNet) and sum(p.numel() for p in net.parameters()) == 29_434
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.bias) for c in convs] == [
        (1, 16, 5, None), (16, 32, 3, None), (32, 64, 3, None)]
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    training = recipe.start(net, recipe.train_batches(
        torch.zeros(512, 28, 28, 1, dtype=torch.uint8), torch.zeros(512, dtype=torch.long),
        torch.device("cpu"), 256, augment=False, seed=0), 0.01)
    assert training.optimizer.betas == BETAS == (0.7, 0.9)
    # Test-time augmentation, if asked for, shifts digits but never mirrors them.
    images = torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    views = recipe.tta.views(images)
    assert recipe.tta is SHIFTS and len(views) == 3 and sum(SHIFTS.weights) == 1.0
    assert not any(torch.equal(view, images.flip(-1)) for view in views)


def test_augment_is_refused_for_digits_in_one_line():
    from job.errors import JobError

    with pytest.raises(JobError, match="--augment applies random crops and flips meant for CIFAR-10"):
        TrainConfig(dataset="mnist", net="fast", augment=True)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir):
    """One whole (short) epoch, a checkpoint every 2 steps, all of them kept."""
    folder = tmp_path_factory.mktemp("fast-mnist")
    summary = train(config(folder, data_dir, checkpoint_every_steps=2, keep_checkpoints=100))
    return folder, summary


def test_a_run_resumed_inside_its_epoch_ends_bit_exact(tmp_path, data_dir, straight_run):
    folder, straight = straight_run
    assert straight["steps"] == 8 and straight["epochs"] == 1  # 2,048 images in batches of 256
    assert straight["net"] == "fast" and straight["final_val_acc"] > 0.5
    middle = folder / "ckpt" / "step-000000004.pt"
    resumed_folder = tmp_path / "ckpt"
    resumed_folder.mkdir()
    (resumed_folder / middle.name).write_bytes(middle.read_bytes())
    (resumed_folder / "latest").write_text(f"{middle.name}\n")
    assert read(middle)["epoch_step"] == 4

    resumed = train(config(tmp_path, data_dir))
    end, again = read(straight["checkpoint"]), read(resumed["checkpoint"])
    for name, tensor in end["model"].items():  # BatchNorm's running statistics too
        assert torch.equal(tensor, again["model"][name]), name
    for index, state in end["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], again["optimizer"]["state"][index][key]), (index, key)
    assert tuple(end["optimizer"]["param_groups"][0]["betas"]) == (0.7, 0.9)
    assert resumed["history"] == straight["history"]


def test_evaluate_predict_and_onnx_export_agree_with_training(tmp_path, data_dir, mnist,
                                                               straight_run):
    folder, summary = straight_run
    checkpoints = str(folder / "ckpt")
    report = evaluated(checkpoints, data_dir, tmp_path / "cache")
    assert report["accuracy"] == summary["final_val_acc"] and report["tta"] is False

    net = exported_net(checkpoints, tmp_path / "net.onnx", "mnist", "fast")
    images = normalised(mnist.test_images[:64]).contiguous()
    with torch.no_grad():
        expected = net(images)
    assert_same_logits(onnx_logits(tmp_path / "net.onnx", images), expected)
    assert predicted_classes(checkpoints, mnist.test_images[:4], tmp_path / "pngs") == (
        expected[:4].argmax(1).tolist())


def test_under_launch_sigterm_stops_with_75_and_one_process_resumes_with_wandb(tmp_path, data_dir):
    """DDP: two workers (global batch 2 × 32), SIGTERM mid-epoch → 75 with a checkpoint; one
    process at batch 128 continues at that image, every image of the epoch trained once, and
    W&B (offline) records the resumed run's curves and summary: checkpoints every 2 steps, 3
    kept, so retention deletes some before W&B's thread references them, and W&B goes on."""
    from tests.wandb_records import offline_runs

    folder, record = tmp_path / "ckpt", tmp_path / "indices"
    args = ["train", "mnist", "--net", "fast", "--data-uri", str(data_dir), "--checkpoint-uri",
            str(folder), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
            "--limit-train", "4096", "--checkpoint-every-steps", "2"]
    env = {**os.environ, "CNN_JOB_RECORD_INDICES": f"{record}-first", "WANDB_MODE": "disabled"}
    position = stop_under_launch(args, 32, folder, env)["epoch_position"]
    assert 0 < position < 4096

    summary = resume_in_one_process(args, 128, position, 4096, tmp_path, env)
    (run,) = offline_runs(tmp_path / "wandb")
    assert run.config["net"] == "fast" and run.summary["final_val_acc"] == summary["final_val_acc"]
    assert any("val/acc" in row for row in run.history)
    assert recipes.saved_net(read(summary["checkpoint"])["config"]) == "fast"
