"""One typed settings object for a training run, and the per-dataset presets.

Defaults live here and only here: the CLI reads them from `TrainConfig`'s fields.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from job.errors import JobError

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
LR_SCHEDULES = ("constant", "linear", "cosine")


def preset(dataset: str) -> DatasetPreset:
    try:
        return PRESETS[dataset]
    except KeyError:
        raise JobError(
            f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}"
        ) from None


# ----------------------------------------------------------------------------------------------
# a run's settings


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnn-job"


@dataclass
class TrainConfig:
    """Everything that decides a training run. Each field is one CLI option (`--epochs`, ...)
    and one environment variable (`CNN_JOB_EPOCHS`, ...)."""

    dataset: str
    epochs: int = 5
    batch_size: int = 64  # per process; under DDP the global batch is this times world size
    lr: float = 1e-3  # Adam's (peak) learning rate
    lr_schedule: str = "linear"  # linear (decay to 0 over the run) | cosine | constant (the seed)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    data_uri: str | None = None  # None: the public mirrors
    cache_dir: Path = field(default_factory=default_cache_dir)
    checkpoint_uri: str | None = None  # None: runs/<dataset>/checkpoints; a folder or s3://
    s3_endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS
    checkpoint_every_steps: int = 0  # 0: at the end of every epoch only
    resume: str = "auto"  # auto | never
    keep_checkpoints: int = 3  # newest checkpoints kept; older ones go once a newer one is safe
    limit_train: int | None = None  # train on the first N images only
    augment: bool = False  # random crop (4 px padding) + horizontal flip; CIFAR-10 only
    eval_batch_size: int = 1000  # evaluation only; does not change the results
    log_every_steps: int = 10  # train loss, lr and images/s to W&B (and the bar) every N steps
    wandb_project: str | None = None  # None: WANDB_PROJECT, else "cnn-job"
    wandb_mode: str | None = None  # online | offline | disabled; None: WANDB_MODE, else by key
    run_name: str | None = None  # W&B run name; None: W&B picks one
    summary_json: Path | None = None

    def __post_init__(self) -> None:
        preset(self.dataset)
        if self.checkpoint_uri is None:
            self.checkpoint_uri = str(Path("runs") / self.dataset / "checkpoints")
        self.cache_dir = Path(self.cache_dir).expanduser()
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.eval_batch_size >= 1, "--eval-batch-size must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (self.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
            (self.precision in ("auto", "fp32", "bf16"), "--precision must be auto, fp32 or bf16"),
            (self.resume in ("auto", "never"), "--resume must be auto or never"),
            (self.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be {', '.join(LR_SCHEDULES)}"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
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

    def to_dict(self) -> dict:
        """Plain values only, so a checkpoint holding it loads with weights_only=True."""
        return {
            key: str(value) if isinstance(value, Path) else value
            for key, value in dataclasses.asdict(self).items()
        }
