"""One typed settings object for a training run.

Defaults and help live here and only here: the CLI builds each option from a `TrainConfig` field.
The settings a recipe decides (epochs, batch size, lr, ...) default to its DEFAULTS
(job/recipes/); what each dataset is lives in job/datasets.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from job import recipes, trainer_status
from job.datasets import DATASETS, preset
from job.errors import JobError, strip_userinfo
from job.progress import progress_interval_s
from job.storage import DEFAULT_STORAGE_RETRY_S, check_storage_retry_s, uri_kind
from job.tracking import init_timeout_s

# The settings that are choices: typer lists each one's values in --help and refuses any other
# (an option's or its CNN_JOB_* variable's) in one line; TrainConfig checks the same values
# when it is built otherwise (a sweep file, bench/).
Dataset = Literal[DATASETS]  # the presets (job/datasets.py)
Net = Literal[recipes.NETS]  # the registry's --net names (job/recipes/__init__.py)
LrSchedule = Literal["constant", "linear", "cosine", "triangle"]  # see job/optim.py's lr_at
CompileMode = Literal["auto", "off", "cuda-graph"]  # how a training step runs: see job/step.py
Precision = Literal["auto", "fp32", "bf16"]
Device = Literal["auto", "cpu", "cuda"]
Resume = Literal["auto", "never"]
WandbMode = Literal["online", "offline", "disabled"]
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch's 64-bit generator takes


# ----------------------------------------------------------------------------------------------
# a run's settings


def choices(hint: Any) -> tuple:
    """The values a Literal type takes, also under `| None`; () for any other type."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return next((values for arg in typing.get_args(hint) if (values := choices(arg))), ())


def check_seed(seed: int, option: str = "--seed") -> None:
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise JobError(f"{option} {seed} does not fit in 64 bits; use a whole number from "
                       f"{low} to {high}")


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


# The settings whose default is the recipe's (its DEFAULTS): their help.
PER_RECIPE_HELP = {
    "epochs": "Epochs to train in all (a resume counts done ones).",
    "batch_size": "Images per step per process; under DDP the global batch is this times the "
                  "world size.",
    "lr": "The peak learning rate of the recipe's optimiser (fast on CIFAR-10: SGD's for the loss "
          "summed over the batch; muon: Muon's, for the conv filters).",
    "lr_schedule": "linear or cosine decay to 0 over the run, constant, or triangle (0.2 → 1 over "
                   "23% of the run, then → 0.07).",
    "augment": "CIFAR-10 only: the recipe's random crops and flips (seed: 4 px zero padding and a "
               "flip; fast: 2 px reflected and the alternating flip).",
    "tta": "Evaluate the final weights with the recipe's test-time augmentation (its views' "
           "logits weighted: mirror and 1 px shifts; digits shifts only); the other epochs' "
           "evaluations see the net alone.",
}


def per_recipe(name: str) -> Any:
    """A setting whose default is the recipe's: None (not given) until TrainConfig takes the
    recipe's DEFAULTS; --help shows every recipe's value."""
    return setting(None, PER_RECIPE_HELP[name], default_text=recipes.default_text(name))


@dataclass
class TrainConfig:
    """Everything that decides a training run. Each field is one CLI option (`--epochs`, ...)
    and one environment variable (`CNN_JOB_EPOCHS`, ...); its metadata holds the option's help."""

    dataset: Dataset = setting(help=f"Which dataset: {' or '.join(DATASETS)}.")
    net: Net = setting("seed", "The recipe (it brings the defaults below): "
                       + recipes.net_help() + ".")
    # None: not given, so the recipe's DEFAULTS; an option given, even the default's value, stays.
    epochs: int | None = per_recipe("epochs")
    batch_size: int | None = per_recipe("batch_size")
    lr: float | None = per_recipe("lr")
    lr_schedule: LrSchedule | None = per_recipe("lr_schedule")
    augment: bool | None = per_recipe("augment")
    tta: bool | None = per_recipe("tta")
    seed: int = setting(0, "Seed for init, shuffling and augmentation.")
    device: Device = setting("auto", "auto (CUDA when present), cpu or cuda.")
    precision: Precision = setting("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16.")
    compile: CompileMode = setting(
        "auto", "auto (each training step a CUDA graph on one GPU; eager on CPU and under DDP), "
        "cuda-graph or off.")
    data_uri: str | None = setting(
        None, "Folder, s3:// or http(s) URI laid out as <dataset>/<archive>.",
        default_text="the public mirrors")
    cache_dir: Path | None = setting(None, "Where downloaded archives are kept.",
                                     default_text=_with_tilde(default_cache_dir()))
    checkpoint_uri: str | None = setting(
        None, "Folder or s3://BUCKET/PREFIX for checkpoints.",
        default_text=default_checkpoint_uri("<dataset>"))
    s3_endpoint_url: str | None = setting(
        None, "S3-compatible endpoint (MinIO, R2, ...) for s3:// URIs.",
        default_text="AWS_ENDPOINT_URL(_S3), else AWS")
    checkpoint_every_steps: int = setting(
        0, "Also checkpoint every N steps inside epochs (0: at the end of every epoch only).")
    resume: Resume = setting("auto", "auto: continue from the newest checkpoint; never: start afresh.")
    overwrite: bool = setting(
        False, "With --resume never: delete the run already in --checkpoint-uri first (else refused).")
    lease_seconds: float = setting(
        30.0, "S3: the writer's lease; a job replacing a killed one waits at most this long.")
    storage_retry_s: float = setting(
        DEFAULT_STORAGE_RETRY_S, "S3 and HTTP(S) mirrors: how long an unreachable, silent, "
        "throttling or failing endpoint is retried before the job exits 69 (checkpoints intact; "
        "the same command resumes); one request waits at most a third of it (3-60 s).")
    collective_timeout_s: float = setting(
        300.0, "DDP: seconds a rank waits in a collective for the others before it fails.")
    keep_checkpoints: int = setting(
        3, "Newest checkpoints to keep; older ones go once a newer one is safe.")
    limit_train: int | None = setting(
        None, "Train on the first N training images only (smoke tests).", default_text="all")
    eval_batch_size: int = setting(1000, "Images per evaluation step (does not change the results).")
    log_every_steps: int = setting(
        10, "Log train loss, lr and images/s to W&B (and the progress bar) every N steps.")
    wandb_project: str | None = setting(None, "W&B project.", default_text="WANDB_PROJECT, else cnn-job")
    wandb_mode: WandbMode | None = setting(
        None, "online, offline or disabled.",
        default_text="WANDB_MODE, else online with an API key, offline without")
    run_name: str | None = setting(None, "W&B run name.", default_text="W&B picks one")
    summary_json: Path | None = setting(None, "Write the final metrics and timings here as JSON.")

    def __post_init__(self) -> None:
        recipes.check(self.dataset, self.net)
        for name, value in recipes.defaults(self.dataset, self.net).items():
            if getattr(self, name) is None:  # not given: the recipe's
                setattr(self, name, value)
        if self.checkpoint_uri is None:
            self.checkpoint_uri = default_checkpoint_uri(self.dataset)
        self.cache_dir = Path(self.cache_dir or default_cache_dir()).expanduser()
        for name, values in CHOICES.items():
            if getattr(self, name) not in values:
                raise JobError(f"--{name.replace('_', '-')} {getattr(self, name)} is not one of "
                               f"{', '.join(v for v in values if v is not None)}")
        check_seed(self.seed)
        if self.data_uri is not None:  # a URI refused before the checkpoint folder is made
            uri_kind(self.data_uri, "--data-uri")
        check_storage_retry_s(self.storage_retry_s)
        # Seconds read from the environment alone, refused here, before any work and on every
        # rank alike, not when first used (rank 0's progress lines, W&B's thread).
        progress_interval_s()
        init_timeout_s()
        trainer_status.interval_s()
        trainer_status.timeout_s()
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.eval_batch_size >= 1, "--eval-batch-size must be at least 1"),
            (math.isfinite(self.lr) and self.lr > 0, "--lr must be a positive finite number"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
            (math.isfinite(self.collective_timeout_s) and self.collective_timeout_s >= 1,
             "--collective-timeout-s must be a finite number of seconds, at least 1"),
            (math.isfinite(self.lease_seconds) and self.lease_seconds >= 1,
             "--lease-seconds must be a finite number of seconds, at least 1"),
            (not self.overwrite or self.resume == "never",
             "--overwrite deletes the run in --checkpoint-uri: it goes with --resume never only"),
            (self.checkpoint_every_steps >= 0, "--checkpoint-every-steps must be 0 or more"),
            (self.log_every_steps >= 1, "--log-every-steps must be at least 1"),
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
        """Plain values only, so a checkpoint holding it loads with weights_only=True; URIs
        without any user:password written into them."""
        return {
            key: strip_userinfo(str(value) if isinstance(value, Path) else value)
            for key, value in dataclasses.asdict(self).items()
        }


# Each choice setting's values, from its type (None too where it may be None): what TrainConfig
# checks.
CHOICES = {name: values + ((None,) if type(None) in typing.get_args(hint) else ())
           for name, hint in typing.get_type_hints(TrainConfig).items() if (values := choices(hint))}


# ----------------------------------------------------------------------------------------------
# what each setting is to a run (a sweep's trials take CNN_JOB_* variables by it: job/sweep.py)

# Every TrainConfig field, once. `result`: it can change the numbers a run ends with (device and
# precision too: CPU and GPU kernels, fp32 and bf16 differ in their last bits and more).
# `where`: where and how the run happens, never its numbers (a CUDA graph replays the eager
# step's own kernels; the data's sha256 is checked whatever URI serves it; evaluation batches
# sum the same losses). `run`: which run this is and what becomes of the one already there
# (a sweep sets them for each trial: its folder, its W&B name, resumed from its own checkpoints).
SETTING_KINDS = {
    "result": ("net", "epochs", "batch_size", "lr", "lr_schedule", "augment", "tta", "seed",
               "device", "precision", "limit_train"),
    "where": ("data_uri", "cache_dir", "s3_endpoint_url", "compile", "checkpoint_every_steps",
              "keep_checkpoints", "lease_seconds", "storage_retry_s", "collective_timeout_s",
              "eval_batch_size", "log_every_steps", "wandb_project", "wandb_mode",
              "summary_json"),
    "run": ("dataset", "checkpoint_uri", "run_name", "resume", "overwrite"),
}


def setting_kind(name: str) -> str:
    """`result`, `where` or `run`: what TrainConfig's setting `name` is to a run."""
    return next(kind for kind, names in SETTING_KINDS.items() if name in names)
