"""The `cnn-job` command line: typer commands that declare options and hand off to one function.

Every option also reads an environment variable CNN_JOB_<OPTION>, because Kubernetes passes
settings as env. Defaults come from TrainConfig, the one place they live.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from job.config import DATASETS, TrainConfig, default_cache_dir, preset
from job.errors import JobError
from job.preemption import PREEMPTED_EXIT_CODE, Interrupted, handle_signals_from_here
from job.progress import print_error

app = typer.Typer(
    name="cnn-job",
    help="Train the seed CNNs on MNIST or CIFAR-10: one process, or DDP under torchrun.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_DEFAULTS = {name: f.default for name, f in _FIELDS.items()}


def _option(name: str, flag: bool = False) -> typer.Option:
    """TrainConfig's field `name` as a --NAME option (--NAME/--no-NAME for a flag) with the help
    and shown default from its metadata, that also reads CNN_JOB_NAME from the env."""
    dashed = name.replace("_", "-")
    declaration = f"--{dashed}/--no-{dashed}" if flag else f"--{dashed}"
    metadata = _FIELDS[name].metadata
    return typer.Option(declaration, help=metadata["help"], envvar="CNN_JOB_" + name.upper(),
                        show_default=metadata["default_text"] or True)


EndpointOption = Annotated[str | None, _option("s3_endpoint_url")]


@app.callback()
def _root() -> None:
    """Train the seed CNNs on MNIST or CIFAR-10: one process, or DDP under torchrun."""


@app.command()
def train(
    dataset: Annotated[str, typer.Argument(
        help=_FIELDS["dataset"].metadata["help"], envvar="CNN_JOB_DATASET", show_default=False,
    )],
    epochs: Annotated[int, _option("epochs")] = _DEFAULTS["epochs"],
    batch_size: Annotated[int, _option("batch_size")] = _DEFAULTS["batch_size"],
    lr: Annotated[float, _option("lr")] = _DEFAULTS["lr"],
    lr_schedule: Annotated[str, _option("lr_schedule")] = _DEFAULTS["lr_schedule"],
    seed: Annotated[int, _option("seed")] = _DEFAULTS["seed"],
    device: Annotated[str, _option("device")] = _DEFAULTS["device"],
    precision: Annotated[str, _option("precision")] = _DEFAULTS["precision"],
    data_uri: Annotated[str | None, _option("data_uri")] = None,
    cache_dir: Annotated[Path | None, _option("cache_dir")] = None,  # None: TrainConfig's factory
    checkpoint_uri: Annotated[str | None, _option("checkpoint_uri")] = None,
    s3_endpoint_url: EndpointOption = None,
    checkpoint_every_steps: Annotated[int, _option("checkpoint_every_steps")]
    = _DEFAULTS["checkpoint_every_steps"],
    resume: Annotated[str, _option("resume")] = _DEFAULTS["resume"],
    overwrite: Annotated[bool, _option("overwrite", flag=True)] = _DEFAULTS["overwrite"],
    lease_seconds: Annotated[float, _option("lease_seconds")] = _DEFAULTS["lease_seconds"],
    collective_timeout_s: Annotated[float, _option("collective_timeout_s")]
    = _DEFAULTS["collective_timeout_s"],
    keep_checkpoints: Annotated[int, _option("keep_checkpoints")] = _DEFAULTS["keep_checkpoints"],
    limit_train: Annotated[int | None, _option("limit_train")] = None,
    augment: Annotated[bool, _option("augment", flag=True)] = _DEFAULTS["augment"],
    eval_batch_size: Annotated[int, _option("eval_batch_size")] = _DEFAULTS["eval_batch_size"],
    summary_json: Annotated[Path | None, _option("summary_json")] = None,
    log_every_steps: Annotated[int, _option("log_every_steps")] = _DEFAULTS["log_every_steps"],
    wandb_project: Annotated[str | None, _option("wandb_project")] = None,
    wandb_mode: Annotated[str | None, _option("wandb_mode")] = None,
    run_name: Annotated[str | None, _option("run_name")] = None,
) -> None:
    """Train a seed CNN, checkpointing every epoch and resuming from the newest checkpoint.

    On SIGTERM or SIGINT it finishes the step, checkpoints and exits with status 75
    (preempted: run the same command again to resume). Bad input exits with status 2.
    """
    settings = {k: v for k, v in locals().items() if v is not None}
    summary = _run(lambda: run_training(TrainConfig(**settings)))
    if summary and summary.get("preempted_by"):  # the loop said so on rank 0
        raise typer.Exit(PREEMPTED_EXIT_CODE)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def launch(ctx: typer.Context) -> None:
    """Run train on this node's workers under torchrun's launcher, keeping the job's exit status.

    cnn-job launch [TORCHRUN OPTIONS] train DATASET [OPTIONS], e.g. cnn-job launch --nnodes 2
    --nproc-per-node 1 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29400 train cifar10.
    Exit status: 0 done, 2 bad input, 75 stopped by a signal with the checkpoint written, 1 a
    crashed or lost worker (no launcher traceback).
    """
    from job.launch import launch as launch_workers

    raise typer.Exit(_run(lambda: launch_workers(list(ctx.args))))


def run_training(cfg: TrainConfig) -> dict:
    # Imported here so that `--help` and bad-option errors answer without loading torch.
    from job.train import train as train_loop

    return train_loop(cfg)


# ----------------------------------------------------------------------------------------------
# cnn-job data ..., cnn-job checkpoints ...

data_app = typer.Typer(help="Seed a bucket with dataset archives, or fetch them into the cache.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
checkpoints_app = typer.Typer(help="Inspect checkpoints in a folder or S3 prefix.",
                              no_args_is_help=True)
app.add_typer(checkpoints_app, name="checkpoints")

DatasetArgument = Annotated[str, typer.Argument(help=f"{' or '.join(DATASETS)}.",
                                                show_default=False)]


@data_app.command("push")
def data_push(
    dataset: DatasetArgument,
    uri: Annotated[str, typer.Argument(help="s3://BUCKET/PREFIX to upload to.", show_default=False)],
    source: Annotated[Path, typer.Option("--from", help="Local folder laid out as "
                                         "<dataset>/<archive>, e.g. ../shared/datasets.")],
    s3_endpoint_url: EndpointOption = None,
) -> None:
    """Upload a dataset's archives (checked first) to PREFIX/<dataset>/ in a bucket."""
    from job.data import push_archives

    sums = _run(lambda: push_archives(preset(dataset), source, uri, s3_endpoint_url))
    for name, digest in sums.items():
        print(f"{uri.rstrip('/')}/{dataset}/{name}  sha256 {digest}")


@data_app.command("pull")
def data_pull(
    dataset: DatasetArgument,
    uri: Annotated[str, typer.Argument(help="s3://, http(s):// or folder to fetch from.",
                                       show_default=False)],
    cache_dir: Annotated[Path | None, _option("cache_dir")] = None,
    s3_endpoint_url: EndpointOption = None,
) -> None:
    """Fetch a dataset's archives into the cache and check that they parse."""
    from job.data import fetch_archives, load_splits

    def pull():
        p = preset(dataset)
        paths = fetch_archives(p, uri, cache_dir or default_cache_dir(), s3_endpoint_url)
        splits = load_splits(p, paths)
        return paths, splits

    paths, splits = _run(pull)
    for name, path in paths.items():
        print(f"{path}  sha256 {splits.sha256[name]}")
    print(f"{dataset}: {len(splits.train_labels)} training and {len(splits.test_labels)} "
          "test images, verified")


@checkpoints_app.command("list")
def checkpoints_list(
    uri: Annotated[str, typer.Argument(help="Checkpoint folder or s3://BUCKET/PREFIX.",
                                       show_default=False)],
    s3_endpoint_url: EndpointOption = None,
) -> None:
    """Checkpoints newest first: step, epoch, validation accuracy, size, time; * = latest."""
    from job.checkpoint import CheckpointManager
    from job.progress import print_checkpoint_table

    rows = _run(lambda: CheckpointManager(uri, endpoint_url=s3_endpoint_url).describe())
    print_checkpoint_table(uri, rows)


def _run(action):
    """Run `action`; a JobError becomes one line on stderr and exit status 2."""
    try:
        return action()
    except JobError as error:
        print_error(str(error))
        raise typer.Exit(JobError.exit_code) from None


def main() -> None:
    """Console-script entry: usage errors, like JobErrors, are one line and exit status 2."""
    status = _main()
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a worker of `cnn-job launch` (or torchrun)
        from job.launch import record_status

        record_status(status)
    if "job.distributed" in sys.modules:  # training ran (torch is loaded): maybe as one rank
        from job.distributed import exit_process

        exit_process(status)
    sys.exit(status)


def _main() -> int:
    handle_signals_from_here()
    try:
        status = app(prog_name="cnn-job", standalone_mode=False)
    except typer.TyperException as error:  # bad option value, missing argument, ...
        if not error.format_message():  # `cnn-job` alone: the help was the answer
            return 0
        context = getattr(error, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if context else ""
        print_error(error.format_message() + hint)
        return getattr(error, "exit_code", JobError.exit_code)
    except Interrupted as interrupted:  # a stop signal outside the training loop
        print_error(f"stopped by {interrupted.signal_name} before it finished, leaving nothing "
                    f"half-written: run the same command again (exit status {PREEMPTED_EXIT_CODE})")
        return PREEMPTED_EXIT_CODE
    except typer.Abort:
        print_error("interrupted")
        return 130
    return status if isinstance(status, int) else 0
