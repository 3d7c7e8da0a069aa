"""--net muon (airbench94 with Muon): its optimiser against its definition, and every job
guarantee for it: a short run's accuracy, exact resume inside an epoch, DDP under `cnn-job
launch` with SIGTERM → 75 and a resume in one process with W&B's records, evaluate / predict /
export with ONNX parity, and a checkpoint of one recipe refused by another in one line.

Runs train on test_fast's small CIFAR-10 archive (512 training and 100 test images cut from
../shared/datasets' real one), on CPU. Its accuracy in a whole run (2 seeds) is `make bench`'s
to measure, not a timed test's."""

import math
import os

import pytest
import torch

from job import recipes
from job.batches import DeviceBatches
from job.config import TrainConfig
from job.errors import JobError
from job.evaluation import tta_logits
from job.recipes import load
from job.recipes.fast import AUGMENTATION, TTA_VIEWS, FastNet
from job.recipes.muon import (
    BIAS_LR,
    DEFAULTS,
    HEAD_LR,
    MUON_MOMENTUM,
    WEIGHT_DECAY_PER_IMAGE,
    Muon,
    MuonAndSGD,
    orthogonalised,
)
from job.train import train
from tests import test_fast
from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error
from tests.test_fast import cifar_subset, normalised, read
from tests.test_resume import resume_in_one_process, stop_under_launch
from tests.trained_runs import (
    assert_same_logits,
    evaluated,
    exported_net,
    onnx_logits,
    predicted_classes,
)

small_cifar = test_fast.small_cifar  # 512 training and 100 test images, once per module


def muon_config(tmp_path, data, **overrides) -> TrainConfig:
    settings = dict(dataset="cifar10", net="muon", data_uri=str(data), device="cpu",
                    checkpoint_uri=str(tmp_path / "ckpt"), cache_dir=tmp_path / "cache",
                    batch_size=64, epochs=4, wandb_mode="disabled")
    return TrainConfig(**{**settings, **overrides})


# ----------------------------------------------------------------------------------------------
# the parts


def test_the_recipe_its_defaults_and_its_optimiser_groups():
    cfg = TrainConfig(dataset="cifar10", net="muon")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.lr_schedule, cfg.augment, cfg.tta) == (
        8, 2000, 0.24, "linear", True, True) == tuple(DEFAULTS.values())
    assert "muon (cifar10): airbench94 with Muon" in recipes.net_help()
    with pytest.raises(JobError, match="--net muon has no recipe for mnist: train it with --net"):
        TrainConfig(dataset="mnist", net="muon")

    recipe = load("cifar10", "muon")
    net = recipe.build_model()
    assert isinstance(net, FastNet) and recipe.tta is TTA_VIEWS
    batches = recipe.train_batches(torch.zeros(4000, 32, 32, 3, dtype=torch.uint8),
                                   torch.zeros(4000, dtype=torch.long), torch.device("cpu"), 1000,
                                   augment=True, seed=0, world_size=2)
    assert isinstance(batches, DeviceBatches) and batches.augmentation is AUGMENTATION
    assert batches.whole_batches
    optimizer = recipe.start(net, batches, 0.24).optimizer
    assert isinstance(optimizer, MuonAndSGD)
    # Muon takes every trained conv filter (the whitening filters are frozen), SGD the rest.
    convs = [m.weight for m in net.blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [id(p) for p in optimizer.muon.params] == [id(p) for p in convs] and len(convs) == 6
    groups = optimizer.sgd.state_dict()["param_groups"]
    assert [g["name"] for g in groups] == ["bn_biases", "whitening_bias", "head"]
    assert [g["lr"] for g in groups] == pytest.approx([BIAS_LR, BIAS_LR, HEAD_LR])
    assert HEAD_LR == pytest.approx(0.67 * 81 / 65536)  # airbench94_muon's 0.67 on fast's head
    # At the peak each group's weights decay by 2e-6 per image of the global batch (2 × 1000).
    for group in groups:
        assert group["lr"] * group["weight_decay"] == pytest.approx(WEIGHT_DECAY_PER_IMAGE * 2000)
    trained = {id(p) for p in net.parameters() if p.requires_grad}
    assert trained == {id(p) for p in optimizer.muon.params + optimizer.sgd.params}


def test_orthogonalised_gives_about_the_polar_factor():
    """Newton–Schulz's quintic moves every singular value into about 0.5-1.5 (not to 1: its
    coefficients trade that for speed) and keeps the singular vectors: U S' Vᵀ, close to U Vᵀ."""
    generator = torch.Generator().manual_seed(0)
    for shape in ((3, 64, 216), (2, 300, 40)):  # wide, and tall (iterated on its transpose)
        matrices = torch.randn(shape, generator=generator)
        result = orthogonalised(matrices)
        assert result.shape == matrices.shape and result.dtype == torch.float32
        singular = torch.linalg.svdvals(result)
        assert singular.min() > 0.5 and singular.max() < 1.5
        u, _, vh = torch.linalg.svd(matrices, full_matrices=False)
        polar = u @ vh
        cosine = (result * polar).sum((-2, -1)) / (result.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
        assert cosine.min() > 0.95
        # A batch is each matrix on its own.
        assert torch.allclose(result[1], orthogonalised(matrices[1:2])[0], atol=1e-6)


def hand_muon_step(weights, grads, buffers, lr):
    """Muon by its definition, one parameter at a time."""
    for w, g, b in zip(weights, grads, buffers):
        b.mul_(MUON_MOMENTUM).add_(g)
        direction = g + MUON_MOMENTUM * b
        w.mul_(math.sqrt(len(w)) / w.norm())
        w.sub_(lr * orthogonalised(direction.reshape(1, len(w), -1))[0].view_as(w))


def test_muon_steps_against_its_definition_and_resumes_exactly():
    generator = torch.Generator().manual_seed(1)
    shapes = [(8, 4, 3, 3), (8, 4, 3, 3), (16, 8, 1, 1)]  # two of one matrix shape: one batch
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    weights = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    muon = Muon(params, lr=0.2)
    for step in range(3):
        grads = [torch.randn(s, generator=generator) for s in shapes]
        muon.zero_grad()
        for p, g in zip(params, grads):
            p.grad.copy_(g)  # a view of the flat gradient buffer
        muon.set_lr(0.2 - 0.05 * step)
        muon.step()
        hand_muon_step(weights, grads, buffers, 0.2 - 0.05 * step)
        for p, w in zip(params, weights):
            assert torch.allclose(p.detach(), w, atol=1e-5), step
    for state, buffer in zip(muon.state_dict()["state"].values(), buffers):
        assert torch.allclose(state["momentum_buffer"], buffer, atol=1e-6)

    # A copy restored from its state_dict takes the next step bit for bit.
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again = Muon(copies, lr=0.1)
    saved = muon.state_dict()
    again.load_state_dict({"state": {i: {k: v.clone() for k, v in s.items()}
                                     for i, s in saved["state"].items()},
                           "param_groups": saved["param_groups"]})
    grads = [torch.randn(s, generator=generator) for s in shapes]
    for optimizer, tensors in ((muon, params), (again, copies)):
        optimizer.zero_grad()
        for p, g in zip(tensors, grads):
            p.grad.copy_(g)
        optimizer.set_lr(0.05)
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(params, copies))
    with pytest.raises(ValueError, match="its Muon state does not fit the net"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4, 3, 3))], lr=0.1).check(saved)


# ----------------------------------------------------------------------------------------------
# runs


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, small_cifar):
    """4 epochs of 8 steps (512 images, batch 64), a checkpoint every 3 steps, all kept."""
    folder = tmp_path_factory.mktemp("muon")
    summary = train(muon_config(folder, small_cifar, checkpoint_every_steps=3, keep_checkpoints=100))
    return folder, summary


def test_a_short_run_learns(straight_run):
    _, summary = straight_run
    assert summary["net"] == "muon" and summary["tta"] is True and summary["steps"] == 32
    first, last = summary["history"][0], summary["history"][-1]
    assert last["train_loss"] < first["train_loss"]
    assert summary["final_val_acc"] >= 0.3  # 100 test images, 10 classes


def test_a_run_resumed_inside_an_epoch_ends_bit_exact(tmp_path, small_cifar, straight_run):
    """Stopped in epoch 2 (whitening bias still training), resumed, and on through the bias's
    freeze at epoch 4: the same weights, Muon's and SGD's momentum and the same history."""
    folder, straight = straight_run
    resumed_folder = tmp_path / "ckpt"
    resumed_folder.mkdir()
    middle = folder / "ckpt" / "step-000000012.pt"
    (resumed_folder / middle.name).write_bytes(middle.read_bytes())
    (resumed_folder / "latest").write_text(f"{middle.name}\n")
    state = read(middle)
    assert (state["epoch"], state["epoch_step"]) == (1, 4)
    scales = [g["lr_scale"] for g in state["optimizer"]["sgd"]["param_groups"]]
    assert scales == pytest.approx([BIAS_LR / 0.24, BIAS_LR / 0.24, HEAD_LR / 0.24])

    resumed = train(muon_config(tmp_path, small_cifar))
    end, again = read(straight["checkpoint"]), read(resumed["checkpoint"])
    assert end["optimizer"]["sgd"]["param_groups"][1]["lr_scale"] == 0  # the bias frozen
    for name, tensor in end["model"].items():  # BatchNorm's running statistics too
        assert torch.equal(tensor, again["model"][name]), name
    for part in ("muon", "sgd"):
        for index, saved in end["optimizer"][part]["state"].items():
            assert torch.equal(saved["momentum_buffer"],
                               again["optimizer"][part]["state"][index]["momentum_buffer"]), part
    assert resumed["history"] == straight["history"]
    assert torch.equal(state["model"]["whiten.weight"], end["model"]["whiten.weight"])


def test_evaluate_predict_and_onnx_export_agree_with_training(tmp_path, small_cifar, cifar10,
                                                              straight_run):
    """Training reported its final weights with TTA; evaluate, predict and the ONNX file do the
    same by default."""
    folder, summary = straight_run
    checkpoints = str(folder / "ckpt")
    report = evaluated(checkpoints, small_cifar, tmp_path / "cache")
    assert report["tta"] is True and report["accuracy"] == summary["final_val_acc"]

    net = exported_net(checkpoints, tmp_path / "net.onnx", "cifar10", "muon")
    images = normalised(cifar10.test_images[:64]).contiguous()
    with torch.no_grad():
        expected = tta_logits(net, images, TTA_VIEWS)
    assert_same_logits(onnx_logits(tmp_path / "net.onnx", images), expected)
    assert predicted_classes(checkpoints, cifar10.test_images[:4], tmp_path / "pngs") == (
        expected[:4].argmax(1).tolist())


def test_a_fast_resume_of_a_muon_run_is_refused_in_one_line(tmp_path, small_cifar, straight_run):
    folder, _ = straight_run
    copy = tmp_path / "ckpt"
    copy.mkdir()
    name = (folder / "ckpt" / "latest").read_text().strip()
    (copy / name).write_bytes((folder / "ckpt" / name).read_bytes())
    (copy / "latest").write_text(f"{name}\n")
    command = ["train", "cifar10", "--net", "fast", "--data-uri", str(small_cifar),
               "--checkpoint-uri", str(copy), "--cache-dir", str(tmp_path / "cache"),
               "--device", "cpu", "--epochs", "5", "--batch-size", "64"]
    assert_one_line_error(run_cli(*command), "--net fast differs from the run", "(--net muon)")


def test_under_launch_sigterm_stops_with_75_and_one_process_resumes_with_wandb(
        tmp_path, cifar10, tmp_path_factory):
    """DDP: two workers under `cnn-job launch` (global batch 2 × 16), each orthogonalising the
    same all-reduced gradients; SIGTERM mid-epoch → 75 with a checkpoint; one process at batch 64
    continues at that image, every image of the epoch trained once, and W&B (offline) records
    the resumed run. 2,048 images: 64 steps an epoch, so the stop (voted every 10 steps) lands
    well inside it."""
    from tests.wandb_records import offline_runs

    images = 2048
    data = cifar_subset(cifar10, tmp_path_factory, images, 100)
    folder, record = tmp_path / "ckpt", tmp_path / "indices"
    args = ["train", "cifar10", "--net", "muon", "--data-uri", str(data), "--checkpoint-uri",
            str(folder), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--epochs", "1",
            "--no-tta", "--checkpoint-every-steps", "2"]
    env = {**os.environ, "CNN_JOB_RECORD_INDICES": f"{record}-first", "WANDB_MODE": "disabled"}
    stopped = stop_under_launch(args, 16, folder, env)
    position = stopped["epoch_position"]
    assert 0 < position < images and set(stopped["optimizer"]) == {"muon", "sgd"}

    summary = resume_in_one_process(args, 64, position, images, tmp_path, env)
    (run,) = offline_runs(tmp_path / "wandb")
    assert run.config["net"] == "muon" and run.summary["final_val_acc"] == summary["final_val_acc"]
    assert any("val/acc" in row for row in run.history)
    end = read(summary["checkpoint"])
    assert recipes.saved_net(end["config"]) == "muon"
    assert torch.equal(end["model"]["whiten.weight"], stopped["model"]["whiten.weight"])
