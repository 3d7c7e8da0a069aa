"""The `cnn-job` command line: typer commands that declare options and hand off to one function.

Every option also reads an environment variable CNN_JOB_<OPTION>, because Kubernetes passes
settings as env. Defaults come from TrainConfig, the one place they live.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from job.config import DATASETS, TrainConfig
from job.errors import JobError
from job.progress import print_error

app = typer.Typer(
    name="cnn-job",
    help="Train the seed CNNs on MNIST or CIFAR-10: one process, or DDP under torchrun.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _option(name: str, help: str, flag: bool = False) -> typer.Option:
    """A --NAME option (--NAME/--no-NAME for a flag) that also reads CNN_JOB_NAME from the env."""
    dashed = name.replace("_", "-")
    declaration = f"--{dashed}/--no-{dashed}" if flag else f"--{dashed}"
    return typer.Option(declaration, help=help, envvar="CNN_JOB_" + name.upper())


@app.callback()
def _root() -> None:
    """Train the seed CNNs on MNIST or CIFAR-10: one process, or DDP under torchrun."""


@app.command()
def train(
    dataset: Annotated[str, typer.Argument(
        help=f"Which dataset and seed net: {' or '.join(DATASETS)}.",
        envvar="CNN_JOB_DATASET", show_default=False,
    )],
    epochs: Annotated[int, _option("epochs", "Epochs to train in all (a resume counts done ones).")]
    = _DEFAULTS["epochs"],
    batch_size: Annotated[int, _option("batch_size", "Images per step per process.")]
    = _DEFAULTS["batch_size"],
    lr: Annotated[float, _option("lr", "Adam learning rate.")] = _DEFAULTS["lr"],
    lr_schedule: Annotated[str, _option(
        "lr_schedule", "linear or cosine decay to 0 over the run, or constant (the seed's).",
    )] = _DEFAULTS["lr_schedule"],
    seed: Annotated[int, _option("seed", "Seed for init, shuffling and augmentation.")]
    = _DEFAULTS["seed"],
    device: Annotated[str, _option("device", "auto (CUDA when present), cpu or cuda.")]
    = _DEFAULTS["device"],
    precision: Annotated[str, _option("precision", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16.")]
    = _DEFAULTS["precision"],
    data_uri: Annotated[Optional[str], _option(
        "data_uri", "Folder or http(s) mirror laid out as <dataset>/<archive>; default: public mirrors.",
    )] = None,
    cache_dir: Annotated[Optional[Path], _option(
        "cache_dir", "Where downloaded archives are kept. [default: ~/.cache/cnn-job]",
    )] = None,
    checkpoint_uri: Annotated[Optional[str], _option(
        "checkpoint_uri", "Folder for checkpoints. [default: runs/<dataset>/checkpoints]",
    )] = None,
    resume: Annotated[str, _option("resume", "auto: continue from the newest checkpoint; never.")]
    = _DEFAULTS["resume"],
    keep_checkpoints: Annotated[int, _option("keep_checkpoints", "Newest checkpoints to keep.")]
    = _DEFAULTS["keep_checkpoints"],
    limit_train: Annotated[Optional[int], _option(
        "limit_train", "Train on the first N training images only (smoke tests).",
    )] = None,
    augment: Annotated[bool, _option(
        "augment", "Random 4-px-padded crop and horizontal flip (CIFAR-10).", flag=True,
    )] = _DEFAULTS["augment"],
    eval_batch_size: Annotated[int, _option(
        "eval_batch_size", "Images per evaluation step (does not change results).",
    )] = _DEFAULTS["eval_batch_size"],
    summary_json: Annotated[Optional[Path], _option(
        "summary_json", "Write the final metrics and timings here as JSON.",
    )] = None,
) -> None:
    """Train a seed CNN, checkpointing every epoch and resuming from the newest checkpoint."""
    settings = {k: v for k, v in locals().items() if v is not None}
    _run(lambda: run_training(TrainConfig(**settings)))


def run_training(cfg: TrainConfig) -> dict:
    # Imported here so that `--help` and bad-option errors answer without loading torch.
    from job.train import train as train_loop

    return train_loop(cfg)


def _run(action) -> None:
    """Turn a JobError into one line on stderr and exit status 2."""
    try:
        action()
    except JobError as error:
        print_error(str(error))
        raise typer.Exit(JobError.exit_code) from None


def main() -> None:
    """Console-script entry: usage errors, like JobErrors, are one line and exit status 2."""
    try:
        status = app(prog_name="cnn-job", standalone_mode=False)
    except typer.TyperException as error:  # bad option value, missing argument, ...
        if not error.format_message():  # `cnn-job` alone: the help was the answer
            sys.exit(0)
        context = getattr(error, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if context else ""
        print_error(error.format_message() + hint)
        sys.exit(getattr(error, "exit_code", JobError.exit_code))
    except typer.Abort:
        print_error("interrupted")
        sys.exit(130)
    sys.exit(status if isinstance(status, int) else 0)
