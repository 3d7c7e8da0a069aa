"""One typed settings object for a training run, and the per-dataset presets.

Defaults and help live here and only here: the CLI builds each option from a `TrainConfig` field.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.errors import JobError, strip_userinfo

# ----------------------------------------------------------------------------------------------
# datasets


@dataclass(frozen=True)
class Archive:
    """One archive file of a dataset, as the public mirrors publish it."""

    name: str
    md5: str  # of the upstream file; a user's own mirror may differ (see fetch_archives)


@dataclass(frozen=True)
class DatasetPreset:
    name: str
    archives: tuple[Archive, ...]
    mirrors: tuple[str, ...]  # base URLs holding the archives by name, tried in order
    channels: int
    image_size: int
    conv_widths: tuple[int, ...]
    mean: tuple[float, ...]  # per channel, on the 0..1 scale
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    augmentable: bool  # random crop + flip make sense (not for digits)


# Mirrors and checksums are the ones torchvision uses.
PRESETS: dict[str, DatasetPreset] = {
    "mnist": DatasetPreset(
        name="mnist",
        archives=(
            Archive("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            Archive("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcc1ac7ed4f"),
            Archive("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            Archive("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist",
            "http://yann.lecun.com/exdb/mnist",
        ),
        channels=1,
        image_size=28,
        conv_widths=(32, 64),
        mean=(0.1307,),
        std=(0.3081,),
        class_names=tuple(str(digit) for digit in range(10)),
        augmentable=False,
    ),
    "cifar10": DatasetPreset(
        name="cifar10",
        archives=(Archive("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        mirrors=("https://www.cs.toronto.edu/~kriz",),
        channels=3,
        image_size=32,
        conv_widths=(32, 64, 128),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        class_names=(
            "airplane", "automobile", "bird", "cat", "deer",
            "dog", "frog", "horse", "ship", "truck",
        ),
        augmentable=True,
    ),
}

DATASETS = tuple(PRESETS)
LR_SCHEDULES = ("constant", "linear", "cosine", "triangle")
COMPILE_MODES = ("auto", "off", "cuda-graph")  # how a training step runs: see job/step.py


def preset(dataset: str) -> DatasetPreset:
    try:
        return PRESETS[dataset]
    except KeyError:
        raise JobError(
            f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}"
        ) from None


# ----------------------------------------------------------------------------------------------
# the nets, and the defaults each brings

NETS = ("seed", "fast")
# The fast net's SGD rate, for its loss summed over the batch: airbench94's 11.5 per 1024
# images, divided by 1024 · (1 + 1 / (1 - momentum 0.85)), the scale of Nesterov's steps.
FAST_LR = 11.5 / (1024 * (1 + 1 / (1 - 0.85)))
# Settings whose default depends on --net; an option the user gives overrides it. `fast` is
# airbench94 (arXiv 2404.00498): its 9.9 epochs are rounded up to 10 (480 steps, not 476), so
# that every epoch ends in an evaluation and a checkpoint, as the job's other guarantees need.
NET_DEFAULTS: dict[str, dict[str, Any]] = {
    "seed": {"epochs": 5, "batch_size": 64, "lr": 1e-3, "lr_schedule": "linear",
             "augment": False, "tta": False},
    "fast": {"epochs": 10, "batch_size": 1024, "lr": FAST_LR, "lr_schedule": "triangle",
             "augment": True, "tta": True},
}


def net_default_text(name: str) -> str:
    """The --help default of a per-net setting: both nets' values."""
    values = {net: NET_DEFAULTS[net][name] for net in NETS}
    return ", ".join(f"{net}: {value:.7g}" if isinstance(value, float) else f"{net}: {value}"
                     for net, value in values.items())


# ----------------------------------------------------------------------------------------------
# a run's settings


def uses_bf16(precision: str, device_type: str) -> bool:
    """The precision rule of training and evaluation: bf16 autocast on CUDA for `auto`, and
    anywhere for `bf16`; fp32 otherwise."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnn-job"


def default_checkpoint_uri(dataset: str) -> str:
    return str(Path("runs") / dataset / "checkpoints")


def _with_tilde(path: Path) -> str:
    """`path` as a user would type it: the home folder as ~."""
    try:
        return str(Path("~") / path.relative_to(Path.home()))
    except ValueError:
        return str(path)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, default_text: str | None = None,
            default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A TrainConfig field that carries its CLI help: one line, and `default_text` where the
    default shown is not the field's literal default (None or computed)."""
    return field(default=default, default_factory=default_factory,
                 metadata={"help": help, "default_text": default_text})


def per_net(name: str, help: str) -> Any:
    """A setting whose default depends on --net: None (not given) until TrainConfig takes the
    net's from NET_DEFAULTS; --help shows both nets' values."""
    return setting(None, help, default_text=net_default_text(name))


@dataclass
class TrainConfig:
    """Everything that decides a training run. Each field is one CLI option (`--epochs`, ...)
    and one environment variable (`CNN_JOB_EPOCHS`, ...); its metadata holds the option's help."""

    dataset: str = setting(help=f"Which dataset and seed net: {' or '.join(DATASETS)}.")
    net: str = setting("seed", "seed (the seed CNN, Adam) or fast (airbench94: ~94% on CIFAR-10 "
                       "in 10 epochs; CIFAR-10 only). Each brings its defaults below.")
    # None: not given, so the net's (NET_DEFAULTS); an option given, even the seed's value, stays.
    epochs: int | None = per_net("epochs", "Epochs to train in all (a resume counts done ones).")
    batch_size: int | None = per_net(
        "batch_size", "Images per step per process; under DDP the global batch is this times the "
        "world size.")
    lr: float | None = per_net(
        "lr", "The peak learning rate: Adam's (seed), or SGD's for the loss summed over the batch "
        "(fast).")
    lr_schedule: str | None = per_net(
        "lr_schedule", "linear or cosine decay to 0 over the run, constant, or triangle (0.2 → 1 "
        "over 23% of the run, then → 0.07).")
    seed: int = setting(0, "Seed for init, shuffling and augmentation.")
    device: str = setting("auto", "auto (CUDA when present), cpu or cuda.")
    precision: str = setting("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16.")
    compile: str = setting(
        "auto", "auto (each training step a CUDA graph on one GPU; eager on CPU and under DDP), "
        "cuda-graph or off.")
    data_uri: str | None = setting(
        None, "Folder, s3:// or http(s) URI laid out as <dataset>/<archive>.",
        default_text="the public mirrors")
    cache_dir: Path = setting(help="Where downloaded archives are kept.", default_factory=default_cache_dir,
                              default_text=_with_tilde(default_cache_dir()))
    checkpoint_uri: str | None = setting(
        None, "Folder or s3://BUCKET/PREFIX for checkpoints.",
        default_text=default_checkpoint_uri("<dataset>"))
    s3_endpoint_url: str | None = setting(
        None, "S3-compatible endpoint (MinIO, R2, ...) for s3:// URIs.",
        default_text="AWS_ENDPOINT_URL(_S3), else AWS")
    checkpoint_every_steps: int = setting(
        0, "Also checkpoint every N steps inside epochs (0: at the end of every epoch only).")
    resume: str = setting("auto", "auto: continue from the newest checkpoint; never: start afresh.")
    overwrite: bool = setting(
        False, "With --resume never: delete the run already in --checkpoint-uri first (else refused).")
    lease_seconds: float = setting(
        30.0, "S3: the writer's lease; a job replacing a killed one waits at most this long.")
    collective_timeout_s: float = setting(
        300.0, "DDP: seconds a rank waits in a collective for the others before it fails.")
    keep_checkpoints: int = setting(
        3, "Newest checkpoints to keep; older ones go once a newer one is safe.")
    limit_train: int | None = setting(
        None, "Train on the first N training images only (smoke tests).", default_text="all")
    augment: bool | None = per_net(
        "augment", "CIFAR-10 only. seed: random crop (4 px zero padding) and flip; fast: random "
        "crop (2 px reflected) and alternating flip.")
    tta: bool | None = per_net(
        "tta", "Evaluate the final weights with test-time augmentation: 6 views (mirror, 1 px "
        "shifts), logits weighted; the other epochs' evaluations see the net alone.")
    eval_batch_size: int = setting(1000, "Images per evaluation step (does not change the results).")
    log_every_steps: int = setting(
        10, "Log train loss, lr and images/s to W&B (and the progress bar) every N steps.")
    wandb_project: str | None = setting(None, "W&B project.", default_text="WANDB_PROJECT, else cnn-job")
    wandb_mode: str | None = setting(
        None, "online, offline or disabled.",
        default_text="WANDB_MODE, else online with an API key, offline without")
    run_name: str | None = setting(None, "W&B run name.", default_text="W&B picks one")
    summary_json: Path | None = setting(None, "Write the final metrics and timings here as JSON.")

    def __post_init__(self) -> None:
        preset(self.dataset)
        self._apply_net_defaults()
        if self.checkpoint_uri is None:
            self.checkpoint_uri = default_checkpoint_uri(self.dataset)
        self.cache_dir = Path(self.cache_dir).expanduser()
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.eval_batch_size >= 1, "--eval-batch-size must be at least 1"),
            (math.isfinite(self.lr) and self.lr > 0, "--lr must be a positive finite number"),
            (self.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
            (self.precision in ("auto", "fp32", "bf16"), "--precision must be auto, fp32 or bf16"),
            (self.compile in COMPILE_MODES, f"--compile must be {', '.join(COMPILE_MODES)}"),
            (self.resume in ("auto", "never"), "--resume must be auto or never"),
            (self.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be {', '.join(LR_SCHEDULES)}"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
            (math.isfinite(self.collective_timeout_s) and self.collective_timeout_s >= 1,
             "--collective-timeout-s must be a finite number of seconds, at least 1"),
            (math.isfinite(self.lease_seconds) and self.lease_seconds >= 1,
             "--lease-seconds must be a finite number of seconds, at least 1"),
            (not self.overwrite or self.resume == "never",
             "--overwrite deletes the run in --checkpoint-uri: it goes with --resume never only"),
            (self.checkpoint_every_steps >= 0, "--checkpoint-every-steps must be 0 or more"),
            (self.log_every_steps >= 1, "--log-every-steps must be at least 1"),
            (self.wandb_mode in (None, "online", "offline", "disabled"),
             "--wandb-mode must be online, offline or disabled"),
            (self.limit_train is None or self.limit_train >= 1, "--limit-train must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise JobError(message)
        if self.augment and not preset(self.dataset).augmentable:
            raise JobError(
                f"--augment applies random crops and flips meant for CIFAR-10; "
                f"drop it for {self.dataset}"
            )

    def _apply_net_defaults(self) -> None:
        if self.net not in NETS:
            raise JobError(f"--net must be {' or '.join(NETS)}")
        if self.net == "fast" and self.dataset != "cifar10":
            raise JobError(f"--net fast is the CIFAR-10 recipe (its first layer whitens 2×2 colour "
                           f"patches); train {self.dataset} with --net seed")
        for name, value in NET_DEFAULTS[self.net].items():
            if getattr(self, name) is None:  # not given: the net's
                setattr(self, name, value)

    def to_dict(self) -> dict:
        """Plain values only, so a checkpoint holding it loads with weights_only=True; URIs
        without any user:password written into them."""
        return {
            key: strip_userinfo(str(value) if isinstance(value, Path) else value)
            for key, value in dataclasses.asdict(self).items()
        }
