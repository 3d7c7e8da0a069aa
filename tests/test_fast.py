"""--net fast (airbench94): its parts against their definitions, and the job's guarantees for it.

Runs train on a small CIFAR-10 archive cut from ../shared/datasets' real one (512 training and
100 test images), so that a whole run with test-time augmentation takes seconds on CPU."""

import io
import json
import pickle
import tarfile

import pytest
import torch
import torch.nn.functional as F

from job.checkpoint import FORMAT
from job.config import TrainConfig
from job.datasets import preset
from job.errors import JobError
from job.evaluation import tta_logits
from job.optim import SGD
from job.recipes import load
from job.recipes.augment import MIRROR_AND_SHIFTS, reflect
from job.recipes.fast import (
    AUGMENTATION,
    DEFAULTS,
    MOMENTUM,
    FastNet,
    FastTraining,
    Lookahead,
    dirac_init,
    fast_sgd,
    whitening_filters,
)
from job.train import train
from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error
from tests.trained_runs import assert_same_logits, onnx_logits, write_cifar_batch

TRAIN_IMAGES, TEST_IMAGES = 512, 100


def cifar_subset(cifar10, tmp_path_factory, train_images: int, test_images: int):
    """A folder laid out like ../shared/datasets holding a cifar-10-python.tar.gz of the first
    `train_images` training and `test_images` test images of the real one."""
    root = tmp_path_factory.mktemp("small-cifar")
    (root / "cifar10").mkdir()
    work = tmp_path_factory.mktemp("batches")
    per_batch = train_images // 5
    with tarfile.open(root / "cifar10" / "cifar-10-python.tar.gz", "w:gz") as tar:
        for index in range(5):
            part = slice(index * per_batch, (index + 1) * per_batch + (train_images % 5) * (index == 4))
            path = write_cifar_batch(cifar10.train_images[part], cifar10.train_labels[part],
                                     work / f"data_batch_{index + 1}")
            tar.add(path, f"cifar-10-batches-py/data_batch_{index + 1}")
        path = write_cifar_batch(cifar10.test_images[:test_images], cifar10.test_labels[:test_images],
                                 work / "test_batch")
        tar.add(path, "cifar-10-batches-py/test_batch")
        meta = pickle.dumps({"label_names": list(preset("cifar10").class_names)})
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    return root


@pytest.fixture(scope="module")
def small_cifar(cifar10, tmp_path_factory):
    """512 training and 100 test images: a whole run with TTA takes seconds on CPU."""
    return cifar_subset(cifar10, tmp_path_factory, TRAIN_IMAGES, TEST_IMAGES)


def fast_config(tmp_path, data, **overrides) -> TrainConfig:
    settings = dict(dataset="cifar10", net="fast", data_uri=str(data), device="cpu",
                    checkpoint_uri=str(tmp_path / "ckpt"), cache_dir=tmp_path / "cache",
                    batch_size=64, epochs=4)
    settings.update(overrides)
    return TrainConfig(**settings)


def normalised(images: torch.Tensor) -> torch.Tensor:
    p = preset("cifar10")
    mean, std = torch.tensor(p.mean).view(1, 3, 1, 1), torch.tensor(p.std).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255 - mean) / std


# ----------------------------------------------------------------------------------------------
# the net


def test_whitening_filters_whiten_the_patches(cifar10):
    images = normalised(cifar10.train_images[:2000])
    filters = whitening_filters(images)
    assert filters.shape == (24, 3, 2, 2)
    assert torch.equal(filters[12:], -filters[:12])  # the negations, for GELU's sake
    # The covariance of the 12 whitened values at every 2×2 patch position is the identity, but
    # for the 5e-4 added to each eigenvalue: eigenvalue / (eigenvalue + 5e-4) on the diagonal.
    def whitened_covariance(filters):
        whitened = F.conv2d(images.double(), filters[:12].double()).permute(0, 2, 3, 1).reshape(-1, 12)
        return whitened.T @ whitened / len(whitened)

    exact = whitened_covariance(whitening_filters(images, eps=0.0))
    assert (exact - torch.eye(12, dtype=torch.float64)).abs().max() < 1e-4
    covariance = whitened_covariance(filters)
    off_diagonal = covariance - torch.diag(covariance.diagonal())
    assert off_diagonal.abs().max() < 1e-4
    eigenvalues = covariance.diagonal() * 5e-4 / (1 - covariance.diagonal())
    assert torch.all(eigenvalues[:-1] >= eigenvalues[1:])  # largest first
    assert covariance.diagonal()[:6].min() > 0.99  # the 6 strongest directions: white
    # The raw patches are far from white (neighbouring pixels and colours correlate).
    raw = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    assert (raw.T @ raw / len(raw) - torch.eye(12, dtype=torch.float64)).abs().max() > 0.5
    # Deterministic: the same images give the same filters, bit for bit.
    assert torch.equal(whitening_filters(images), filters)


def test_dirac_init_makes_a_square_conv_the_identity():
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
    dirac_init(conv.weight)
    x = torch.randn(2, 16, 9, 9)
    assert torch.equal(conv(x), x)
    wider = torch.nn.Conv2d(8, 24, 3, padding=1, bias=False)
    dirac_init(wider.weight)
    assert torch.equal(wider(x[:, :8])[:, :8], x[:, :8])  # the first in_channels filters only
    net = FastNet()
    convs = [m for m in net.blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape[:2]) for c in convs] == [(64, 24), (64, 64), (256, 64), (256, 256),
                                                         (256, 256), (256, 256)]
    assert all(torch.equal(c(torch.ones(1, c.in_channels, 5, 5))[:, : c.in_channels],
                           torch.ones(1, c.in_channels, 5, 5)) for c in convs)


def test_fast_net_shape_and_frozen_parts():
    net = load("cifar10", "fast").build_model()
    assert sum(p.numel() for p in net.parameters()) == 1_972_792  # the published ~1.97 M
    assert net(torch.zeros(3, 3, 32, 32)).shape == (3, 10)
    frozen = {name for name, p in net.named_parameters() if not p.requires_grad}
    assert "whiten.weight" in frozen and all(n.endswith(".weight") for n in frozen)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 6 and all(m.eps == 1e-12 and m.momentum == 0.4 for m in norms)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)


def test_a_net_without_a_recipe_is_refused_in_one_line():
    with pytest.raises(JobError, match=r"^--net turbo has no recipe for cifar10: train it with --net "
                                       r"seed or fast or muon; --net is one of seed, fast, muon$"):
        TrainConfig(dataset="cifar10", net="turbo")


def test_each_net_brings_its_defaults_and_options_override_them():
    seed, fast = TrainConfig(dataset="cifar10"), TrainConfig(dataset="cifar10", net="fast")
    assert (seed.epochs, seed.batch_size, seed.lr, seed.lr_schedule, seed.augment, seed.tta) == (
        5, 64, 1e-3, "linear", False, False)
    assert (fast.epochs, fast.batch_size, fast.lr, fast.lr_schedule, fast.augment, fast.tta) == (
        10, 1024, DEFAULTS["lr"], "triangle", True, True)
    # airbench94's 11.5 per 1024 images, divided by the scale of Nesterov's steps
    assert DEFAULTS["lr"] == 11.5 / (1024 * (1 + 1 / (1 - MOMENTUM)))
    given = TrainConfig(dataset="cifar10", net="fast", epochs=3, augment=False, tta=False)
    assert (given.epochs, given.augment, given.tta, given.batch_size) == (3, False, False, 1024)


# ----------------------------------------------------------------------------------------------
# augmentation


def test_alternating_flip_and_reflected_crops(cifar10):
    images, labels = cifar10.train_images[:500], cifar10.train_labels[:500]
    recipe = load("cifar10", "fast")
    batches = recipe.train_batches(images, labels, torch.device("cpu"), 100, augment=True, seed=3)
    flips = [AUGMENTATION.flips(batches, epoch) for epoch in range(4)]
    assert 200 < int(flips[0].sum()) < 300  # a random half in epoch 0
    assert torch.equal(flips[1], 1 - flips[0]) and torch.equal(flips[2], flips[0])
    assert torch.equal(flips[3], flips[1])
    # The flip travels with the image through the epoch's permutation.
    for epoch in (0, 1):
        crops = AUGMENTATION.draw(batches, epoch)
        assert torch.equal(crops[2], flips[epoch][batches.permutation(epoch)])
        assert crops[:2].min() >= 0 and crops[:2].max() <= 4
    # Offsets (2, 2) without a flip are the image itself; (0, 0) reflects the top-left border.
    one = images[:1]
    centre = AUGMENTATION.apply(one, torch.tensor([[2], [2], [0]]))
    assert torch.equal(centre, one)
    mirrored = AUGMENTATION.apply(one, torch.tensor([[2], [2], [1]]))
    assert torch.equal(mirrored, one.flip(2))
    corner = AUGMENTATION.apply(one, torch.tensor([[0], [0], [0]]))
    padded = F.pad(one.permute(0, 3, 1, 2).float(), (2, 2, 2, 2), mode="reflect")
    assert torch.equal(corner, padded[..., :32, :32].permute(0, 2, 3, 1).to(torch.uint8))
    assert reflect(torch.tensor([-2, -1, 0, 31, 32, 33]), 32).tolist() == [2, 1, 0, 31, 30, 29]
    # The last partial batch is dropped: 500 images in batches of 100 × 2 processes serve 400.
    two = recipe.train_batches(images, labels, torch.device("cpu"), 100, augment=True, rank=1,
                               world_size=2, seed=0)
    assert (two.remaining(0), two.steps(0), two.per_rank) == (400, 2, 200)


# ----------------------------------------------------------------------------------------------
# test-time augmentation


def test_tta_views_and_weights():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    views = MIRROR_AND_SHIFTS.views(images)
    weights = MIRROR_AND_SHIFTS.weights
    assert len(views) == len(weights) == 6 and sum(weights) == 1.0
    assert weights == (0.25, 0.25, 0.125, 0.125, 0.125, 0.125)
    assert load("cifar10", "fast").tta is MIRROR_AND_SHIFTS
    identity, mirror, up_left, up_left_mirror, down_right, down_right_mirror = views
    assert torch.equal(identity, images) and torch.equal(mirror, images.flip(-1))
    # Shifted by one pixel, the border reflected: up-left takes (y+1, x+1), down-right (y-1, x-1).
    assert torch.equal(up_left[..., :4, :4], images[..., 1:, 1:])
    assert torch.equal(up_left[..., 4, :4], images[..., 3, 1:])  # row 5 reflects to row 3
    assert torch.equal(down_right[..., 1:, 1:], images[..., :4, :4])
    assert torch.equal(down_right[..., 0, 1:], images[..., 1, :4])  # row -1 reflects to row 1
    assert torch.equal(up_left_mirror, up_left.flip(-1))
    assert torch.equal(down_right_mirror, down_right.flip(-1))

    def model(x):  # a stand-in whose logits are easy to compute by hand: per-image pixel sums
        return x.flatten(1)[:, :4]

    expected = sum(w * model(v) for w, v in zip(weights, views))
    assert torch.allclose(tta_logits(model, images, MIRROR_AND_SHIFTS), expected)


# ----------------------------------------------------------------------------------------------
# the optimizer


def test_the_lookahead_in_a_checkpoint_is_the_recipes_to_declare_and_check():
    net = FastNet()
    training = FastTraining(fast_sgd(net, 0.1, 64), None, Lookahead(net))
    state = training.state_dict()
    assert "lookahead" in state and "lookahead" in training.STATE and "lookahead" not in FORMAT
    training.check(state)  # fits
    with pytest.raises(ValueError, match=r"malformed checkpoint \('lookahead' is a list\)"):
        training.check({**state, "lookahead": [1.0]})
    with pytest.raises(ValueError, match="its lookahead copy does not fit the net"):
        training.check({key: value for key, value in state.items() if key != "lookahead"})


def test_lookahead_update_against_a_hand_computation():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    lookahead = Lookahead(net)
    ema_before = {k: v.clone() for k, v in lookahead.ema.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.add_(2.0)
    live = {k: v.clone() for k, v in net.state_dict().items()}
    progress = 0.6
    decay = 0.95**5 * progress**3
    assert lookahead.decay_at(progress) == pytest.approx(decay)
    lookahead.after_step(4, progress)  # not a multiple of 5: nothing moves
    assert all(torch.equal(net.state_dict()[k], live[k]) for k in live)
    lookahead.after_step(5, progress)
    for name, before in ema_before.items():
        by_hand = decay * before + (1 - decay) * live[name]
        assert torch.allclose(lookahead.ema[name], by_hand, atol=1e-6), name
        assert torch.equal(net.state_dict()[name], lookahead.ema[name])  # live reset to the EMA
    assert "1.num_batches_tracked" not in lookahead.ema  # counters are not averaged
    with torch.no_grad():
        net[0].weight.add_(5.0)
    lookahead.finish()  # decay 1: the EMA stays, the live net becomes it
    assert torch.equal(net[0].weight, lookahead.ema["0.weight"])


def test_sgd_matches_torch_sgd_with_nesterov_and_weight_decay():
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    theirs.load_state_dict(ours.state_dict())
    sgd = SGD([{"name": "all", "params": ours.parameters(), "lr_scale": 2.0, "weight_decay": 0.3}],
              lr=0.05, momentum=MOMENTUM)
    reference = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.85, nesterov=True,
                                weight_decay=0.3)
    for _ in range(4):
        x = torch.randn(8, 4)
        for net, opt in ((ours, sgd), (theirs, reference)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    sgd.set_lr_scale("all", 0.0)  # frozen: neither updated nor decayed
    sgd.set_lr(0.05)
    before = [p.clone() for p in ours.parameters()]
    ours(torch.randn(8, 4)).sum().backward()
    sgd.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), before))


def test_fast_sgd_groups_and_decay():
    net = load("cifar10", "fast").build_model()
    sgd = fast_sgd(net, DEFAULTS["lr"], 1024)
    names = [g["name"] for g in sgd.groups]
    assert names == ["bn_biases", "whitening_bias", "weights"]
    groups = {g["name"]: g for g in sgd.groups}
    assert len(groups["bn_biases"]["params"]) == 6 and groups["bn_biases"]["lr_scale"] == 64
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert sum(p.numel() for p in sgd.params) == trainable
    # Decoupled: the decay per step (rate × weight_decay) is the same ~2.0e-3 for every group.
    decays = [DEFAULTS["lr"] * g["lr_scale"] * g["weight_decay"] for g in sgd.groups]
    assert all(d == pytest.approx(0.0153 * 1024 / (1024 * (1 + 1 / 0.15))) for d in decays)
    assert decays[0] == pytest.approx(1.996e-3, rel=1e-3)


# ----------------------------------------------------------------------------------------------
# runs: resume, refused changes, export


def read(path) -> dict:
    return torch.load(path, weights_only=True)


def test_a_fast_run_resumed_inside_an_epoch_ends_bit_exact(tmp_path, small_cifar):
    """Stopped in epoch 2 (whitening bias still training, lookahead mid-cycle), resumed, and on
    through the bias freeze at epoch 4: the same weights, lookahead copy and optimizer state."""
    straight = train(fast_config(tmp_path / "a", small_cifar, checkpoint_every_steps=3,
                                 keep_checkpoints=100))
    assert straight["steps"] == 32  # 512 images in batches of 64, 4 epochs
    folder = tmp_path / "a" / "ckpt"
    resumed_folder = tmp_path / "b" / "ckpt"
    resumed_folder.mkdir(parents=True)
    (resumed_folder / "step-000000012.pt").write_bytes((folder / "step-000000012.pt").read_bytes())
    (resumed_folder / "latest").write_text("step-000000012.pt\n")
    middle = read(resumed_folder / "step-000000012.pt")
    assert (middle["epoch"], middle["epoch_step"]) == (1, 4) and "lookahead" in middle
    assert [g["lr_scale"] for g in middle["optimizer"]["param_groups"]] == [64, 1, 1]

    resumed = train(fast_config(tmp_path / "b", small_cifar))
    end, again = read(straight["checkpoint"]), read(resumed["checkpoint"])
    assert [g["lr_scale"] for g in end["optimizer"]["param_groups"]] == [64, 0, 1]  # frozen
    for key in ("model", "lookahead"):
        assert end[key].keys() == again[key].keys()
        for name, tensor in end[key].items():
            assert torch.equal(tensor, again[key][name]), (key, name)
    for index, state in end["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], again["optimizer"]["state"][index]["momentum_buffer"])
    assert resumed["history"] == straight["history"]
    # The whitening bias trained in epochs 1-3; in epoch 4 (steps 25-32) SGD leaves it, so once the
    # lookahead at step 25 has set it to the EMA's, it stays. Its filters never moved.
    fourth = read(folder / "step-000000027.pt")
    assert torch.equal(fourth["model"]["whiten.bias"], end["model"]["whiten.bias"])
    assert not torch.equal(middle["model"]["whiten.bias"], end["model"]["whiten.bias"])
    assert torch.equal(middle["model"]["whiten.weight"], end["model"]["whiten.weight"])
    # The final weights are the lookahead's.
    assert all(torch.equal(end["model"][name], end["lookahead"][name]) for name in end["lookahead"])


def test_a_net_change_on_resume_is_refused_in_one_line(tmp_path, small_cifar):
    folder = tmp_path / "ckpt"
    train(fast_config(tmp_path, small_cifar, net="seed", epochs=1, batch_size=None, augment=None,
                      tta=None, lr=None, lr_schedule=None))
    command = ["train", "cifar10", "--net", "fast", "--data-uri", str(small_cifar),
               "--checkpoint-uri", str(folder), "--cache-dir", str(tmp_path / "cache"),
               "--device", "cpu", "--epochs", "2", "--batch-size", "64"]
    assert_one_line_error(run_cli(*command), "--net fast differs from the run", "(--net seed)")
    # A checkpoint from before --net existed is a seed run's.
    latest = folder / (folder / "latest").read_text().strip()
    state = read(latest)
    del state["config"]["net"]
    torch.save(state, latest)
    assert_one_line_error(run_cli(*command), "--net fast differs from the run", "(--net seed)")


def test_onnx_export_of_a_fast_run_carries_tta_and_matches_pytorch(tmp_path, small_cifar, cifar10):
    """Also: TTA's 6 forward passes an image are for the run's final weights, the ones it
    reports; the earlier epochs evaluate the net alone (airbench's way). `evaluate` (as `predict`
    and `export`) of a checkpoint defaults to how training evaluated those weights."""
    import onnx

    summary = train(fast_config(tmp_path, small_cifar, epochs=2, batch_size=128))
    first, last = summary["history"]
    assert (first["tta"], last["tta"]) == (False, True) and summary["tta"] is True
    result = run_cli("export", str(tmp_path / "ckpt"), "--format", "onnx", "--output",
                     str(tmp_path / "net.onnx"))
    assert result.returncode == 0, result.stderr
    model = onnx.load(str(tmp_path / "net.onnx"))
    metadata = json.loads({p.key: p.value for p in model.metadata_props}["cnn_job"])
    assert metadata["net"] == "fast" and metadata["test_time_augmentation"] is True
    assert metadata["tta_weights"] == list(MIRROR_AND_SHIFTS.weights)
    assert metadata["val_acc"] == summary["final_val_acc"] and metadata["val_acc_with_tta"] is True
    assert f"val_acc {summary['final_val_acc']:.2%} (with TTA)" in result.stdout
    plain_file = run_cli("export", str(tmp_path / "ckpt"), "--format", "onnx", "--output",
                         str(tmp_path / "plain.onnx"), "--no-tta")
    assert plain_file.returncode == 0, plain_file.stderr  # it does not claim TTA's accuracy
    assert (f"val_acc - (training's {summary['final_val_acc']:.2%} was with TTA; this file's "
            f"logits are without it: `cnn-job evaluate {tmp_path / 'ckpt'} --no-tta` scores them)"
            in plain_file.stdout.replace("\n", "")), plain_file.stdout

    net = load("cifar10", "fast").build_model().eval()
    net.load_state_dict(read(summary["checkpoint"])["model"])
    images = normalised(cifar10.test_images[:64]).contiguous()
    with torch.no_grad():
        expected = tta_logits(net, images, MIRROR_AND_SHIFTS)
    assert_same_logits(onnx_logits(tmp_path / "net.onnx", images), expected)
    # the batch is dynamic
    assert_same_logits(onnx_logits(tmp_path / "net.onnx", images[:1]), expected[:1])

    # Evaluate defaults to what training reported (with TTA); --no-tta is the plain net.
    report = run_cli("evaluate", str(tmp_path / "ckpt"), "--data-uri", str(small_cifar),
                     "--cache-dir", str(tmp_path / "cache"), "--json", "-")
    assert report.returncode == 0, report.stderr
    with_tta = json.loads(report.stdout)
    assert with_tta["tta"] is True and with_tta["accuracy"] == summary["final_val_acc"]
    plain = run_cli("evaluate", str(tmp_path / "ckpt"), "--data-uri", str(small_cifar),
                    "--cache-dir", str(tmp_path / "cache"), "--json", "-", "--no-tta")
    assert plain.returncode == 0 and json.loads(plain.stdout)["tta"] is False
    # The first epoch's checkpoint: training evaluated it without TTA, and so does evaluate.
    report = run_cli("evaluate", str(tmp_path / "ckpt" / f"step-{first['step']:09d}.pt"),
                     "--data-uri", str(small_cifar), "--cache-dir", str(tmp_path / "cache"),
                     "--json", "-")
    assert report.returncode == 0, report.stderr
    earlier = json.loads(report.stdout)
    assert earlier["tta"] is False and earlier["accuracy"] == first["val_acc"]
    assert earlier["training_val_acc"] == first["val_acc"]
    assert earlier["training_val_acc_with_tta"] is False


def test_a_fast_run_under_launch_stops_on_sigterm_and_resumes_in_one_process(tmp_path, cifar10,
                                                                             tmp_path_factory):
    """DDP: two workers under `cnn-job launch` (global batch 2 × 16), SIGTERM mid-epoch → 75 with
    a checkpoint; one process at batch 64 continues at that image, and every image of the epoch
    is trained once. The final weights are the lookahead's, the whitening filters unmoved. 2,048
    images: 64 steps an epoch, so the stop (voted every 10 steps) lands well inside it."""
    import os
    import subprocess
    from collections import Counter

    from tests.conftest import CNN_JOB
    from tests.test_resume import served, stop_under_launch

    images = 2048
    data = cifar_subset(cifar10, tmp_path_factory, images, 100)
    folder, record = tmp_path / "ckpt", tmp_path / "indices"
    args = ["train", "cifar10", "--net", "fast", "--data-uri", str(data), "--checkpoint-uri",
            str(folder), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--epochs", "1",
            "--no-tta", "--checkpoint-every-steps", "2", "--wandb-mode", "disabled"]
    env = {**os.environ, "CNN_JOB_RECORD_INDICES": f"{record}-first"}
    stopped = stop_under_launch(args, 16, folder, env)
    position = stopped["epoch_position"]
    assert 0 < position < images and "lookahead" in stopped

    env["CNN_JOB_RECORD_INDICES"] = f"{record}-then"
    resumed = subprocess.run([str(CNN_JOB), *args, "--batch-size", "64", "--summary-json",
                              str(tmp_path / "s.json")],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"continuing epoch 1 at image {position} of its order" in resumed.stdout.replace("\n", " ")
    before, after = served(tmp_path / "indices-first"), served(tmp_path / "indices-then")
    assert len(before) == position
    counts = Counter(before + after)  # no partial global batch to drop: 2,048 = 64 × 32 = 32 × 64
    assert sorted(counts) == list(range(images)) and set(counts.values()) == {1}
    end = read(json.loads((tmp_path / "s.json").read_text())["checkpoint"])
    assert all(torch.equal(end["model"][name], end["lookahead"][name]) for name in end["lookahead"])
    assert torch.equal(end["model"]["whiten.weight"], stopped["model"]["whiten.weight"])
