"""The `cnn-job` command line: typer commands that declare options and hand off to one function.

Every option also reads an environment variable CNN_JOB_<OPTION>, because Kubernetes passes
settings as env. Defaults come from TrainConfig, the one place they live.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from job.config import (
    CompileMode,
    Dataset,
    Device,
    LrSchedule,
    Net,
    Precision,
    Resume,
    TrainConfig,
    WandbMode,
    default_cache_dir,
    default_checkpoint_uri,
)
from job.datasets import DATASETS, preset
from job.errors import JobError, strip_userinfo
from job.preemption import PREEMPTED_EXIT_CODE, Interrupted, handle_signals_from_here
from job.progress import follow_up, print_error, set_last_line

app = typer.Typer(
    name="cnn-job",
    help="Train a CNN recipe on MNIST or CIFAR-10: one process, or DDP under torchrun.",
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
                        show_default=metadata["default_text"] or True,
                        parser=_path if "Path" in str(_FIELDS[name].type) else None)


def _path(value: str) -> Path:
    """A path option's value; an empty one would be the working folder, so it is refused."""
    if not value.strip():
        raise typer.BadParameter("is empty; name a folder or file, or leave the option out "
                                 "for its default")
    return Path(value)


EndpointOption = Annotated[str | None, _option("s3_endpoint_url")]


@app.callback(invoke_without_command=True)
def _root(
    context: typer.Context,
    # Questions about the build, like --help: no CNN_JOB_* variable, which would turn every
    # command of a pod that has it set into this answer.
    version: Annotated[bool, typer.Option(
        "--version", help="Print the job's version, the git commit it was built from, Python, "
        "torch, CUDA and cuDNN versions and the GPUs it sees, then exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --version: as one JSON object.")]
    = False,
) -> None:
    """Train a CNN recipe on MNIST or CIFAR-10: one process, or DDP under torchrun."""
    if version:
        from job.version import build_facts, describe

        facts = build_facts()
        print(json.dumps(facts) if as_json else describe(facts))
        raise typer.Exit(0)
    if as_json:  # alone, or before a command: never silently dropped
        raise typer.BadParameter("it goes with --version", context, param_hint="'--json'")


@app.command()
def train(
    dataset: Annotated[Dataset, typer.Argument(
        help=_FIELDS["dataset"].metadata["help"], envvar="CNN_JOB_DATASET", show_default=False,
    )],
    net: Annotated[Net, _option("net")] = _DEFAULTS["net"],
    # None: the recipe's default (its DEFAULTS), so that only options given override it
    epochs: Annotated[int | None, _option("epochs")] = None,
    batch_size: Annotated[int | None, _option("batch_size")] = None,
    lr: Annotated[float | None, _option("lr")] = None,
    lr_schedule: Annotated[LrSchedule | None, _option("lr_schedule")] = None,
    seed: Annotated[int, _option("seed")] = _DEFAULTS["seed"],
    device: Annotated[Device, _option("device")] = _DEFAULTS["device"],
    precision: Annotated[Precision, _option("precision")] = _DEFAULTS["precision"],
    compile: Annotated[CompileMode, _option("compile")] = _DEFAULTS["compile"],
    data_uri: Annotated[str | None, _option("data_uri")] = None,
    cache_dir: Annotated[Path | None, _option("cache_dir")] = None,
    checkpoint_uri: Annotated[str | None, _option("checkpoint_uri")] = None,
    s3_endpoint_url: EndpointOption = None,
    checkpoint_every_steps: Annotated[int, _option("checkpoint_every_steps")]
    = _DEFAULTS["checkpoint_every_steps"],
    resume: Annotated[Resume, _option("resume")] = _DEFAULTS["resume"],
    overwrite: Annotated[bool, _option("overwrite", flag=True)] = _DEFAULTS["overwrite"],
    lease_seconds: Annotated[float, _option("lease_seconds")] = _DEFAULTS["lease_seconds"],
    storage_retry_s: Annotated[float, _option("storage_retry_s")] = _DEFAULTS["storage_retry_s"],
    collective_timeout_s: Annotated[float, _option("collective_timeout_s")]
    = _DEFAULTS["collective_timeout_s"],
    keep_checkpoints: Annotated[int, _option("keep_checkpoints")] = _DEFAULTS["keep_checkpoints"],
    limit_train: Annotated[int | None, _option("limit_train")] = None,
    augment: Annotated[bool | None, _option("augment", flag=True)] = None,
    tta: Annotated[bool | None, _option("tta", flag=True)] = None,
    eval_batch_size: Annotated[int, _option("eval_batch_size")] = _DEFAULTS["eval_batch_size"],
    summary_json: Annotated[Path | None, _option("summary_json")] = None,
    log_every_steps: Annotated[int, _option("log_every_steps")] = _DEFAULTS["log_every_steps"],
    wandb_project: Annotated[str | None, _option("wandb_project")] = None,
    wandb_mode: Annotated[WandbMode | None, _option("wandb_mode")] = None,
    run_name: Annotated[str | None, _option("run_name")] = None,
) -> None:
    """Train the --net recipe on DATASET, checkpointing every epoch and resuming from the newest checkpoint.

    On SIGTERM or SIGINT it finishes the step, checkpoints and exits with status 75
    (preempted: run the same command again to resume). Bad input exits with status 2; S3 out of
    reach for longer than --storage-retry-s, with 69.
    """
    # By name, each option to its field; None (not given) is TrainConfig's default.
    summary = _run(lambda: run_training(TrainConfig(
        dataset=dataset, net=net, epochs=epochs, batch_size=batch_size, lr=lr,
        lr_schedule=lr_schedule, augment=augment, tta=tta, seed=seed, device=device,
        precision=precision, compile=compile, data_uri=data_uri, cache_dir=cache_dir,
        checkpoint_uri=checkpoint_uri, s3_endpoint_url=s3_endpoint_url,
        checkpoint_every_steps=checkpoint_every_steps, resume=resume, overwrite=overwrite,
        lease_seconds=lease_seconds, storage_retry_s=storage_retry_s,
        collective_timeout_s=collective_timeout_s, keep_checkpoints=keep_checkpoints,
        limit_train=limit_train, eval_batch_size=eval_batch_size, log_every_steps=log_every_steps,
        wandb_project=wandb_project, wandb_mode=wandb_mode, run_name=run_name,
        summary_json=summary_json)))
    if summary and summary.get("preempted_by"):  # the loop said so on rank 0
        raise typer.Exit(PREEMPTED_EXIT_CODE)
    if summary:
        _print_where_the_model_is(summary, checkpoint_uri or default_checkpoint_uri(dataset),
                                  s3_endpoint_url, data_uri)


def _print_where_the_model_is(summary: dict, checkpoint_uri: str, endpoint_url: str | None,
                              data_uri: str | None) -> None:
    """A finished run's last lines: its final checkpoint, and the command that evaluates it
    (which reads the run's data too)."""
    # Rank 0 speaks for the run: torchrun's other ranks write no checkpoint and keep quiet.
    if os.environ.get("RANK", "0") != "0" or not summary.get("checkpoint"):
        return
    val_acc = summary["final_val_acc"]
    tta = " with TTA" if summary["history"] and summary["history"][-1].get("tta") else ""
    command = follow_up(["cnn-job", "evaluate", checkpoint_uri], endpoint_url, checkpoint_uri,
                        data_uri)
    print(strip_userinfo(f"model: {summary['checkpoint']} (val_acc "
                         f"{'-' if val_acc is None else format(val_acc, '.2%')}{tta})"))
    print(f"next: {command}", flush=True)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def launch(ctx: typer.Context) -> None:
    """Run train on this node's workers under torchrun's launcher, keeping the job's exit status.

    cnn-job launch [TORCHRUN OPTIONS] train DATASET [OPTIONS], e.g. cnn-job launch --nnodes 2
    --nproc-per-node 1 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29400 train cifar10.
    Exit status: 0 done, 2 bad input, 75 stopped by a signal with the checkpoint written, 1 a
    crashed or lost worker (no launcher traceback).
    """
    from job.launch import launch as launch_workers
    from job.launch import split_command

    def run() -> int:
        torchrun_args, job_args = split_command(list(ctx.args))
        _check_train_args(job_args[1:])  # once, here, not once per worker
        return launch_workers(torchrun_args, job_args)

    raise typer.Exit(_run(run))


def _train_context(args: list[str]):
    """`cnn-job train ARGS` parsed as the command parses it, its CNN_JOB_* variables included; a
    usage error propagates: _main prints it as it does for `cnn-job train`."""
    command = typer.main.get_command(app).get_command(None, "train")
    return command.make_context("cnn-job train", list(args))


def _check_train_args(args: list[str]) -> None:
    """What `train ARGS` would refuse before any work (a missing dataset, a bad value) is one
    line from the launcher, as from `cnn-job train`, instead of the same line from every worker."""
    try:
        params = _train_context(args).params
    except typer.Exit:  # --help, printed: no workers to start
        raise typer.Exit(0) from None
    TrainConfig(**params)


def _train_settings_from_environment() -> dict:
    """The settings the CNN_JOB_* variables give `cnn-job train`, parsed as train parses them,
    by option name (a sweep's trials take them by job/config.py's SETTING_KINDS)."""
    # DATASET from the command line when CNN_JOB_DATASET is unset: a stand-in, never kept
    context = _train_context([] if os.environ.get("CNN_JOB_DATASET") else [next(iter(DATASETS))])
    return {name: value for name, value in context.params.items()
            if context.get_parameter_source(name).name == "ENVIRONMENT"}


def run_training(cfg: TrainConfig, trial=None) -> dict:
    """The training loop; `trial`: a sweep's trial (job/sweep.py's Trial) that it runs as."""
    # Imported here so that `--help` and bad-option errors answer without loading torch.
    from job.train import train as train_loop

    return train_loop(cfg, trial)


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
                                         "<dataset>/<archive>, the archives under their canonical "
                                         "names (mnist/train-images-idx3-ubyte.gz, ..., "
                                         "cifar10/cifar-10-python.tar.gz).")],
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
    from job.data import check_cache_dir, fetch_archives, load_splits

    def pull():
        p = preset(dataset)
        check_cache_dir(cache_dir or default_cache_dir())
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


# ----------------------------------------------------------------------------------------------
# cnn-job sweep ...: many runs of train, one per trial (job/sweep.py)

sweep_app = typer.Typer(help="Sweeps: a YAML file of settings to try, each trial a resumable "
                        "training run (docs/sweeps.md).", no_args_is_help=True)
app.add_typer(sweep_app, name="sweep")
SweepFileArgument = Annotated[str, typer.Argument(
    help="The sweep file (YAML): dataset, checkpoint_uri, fixed, grid, random, seeds.",
    show_default=False)]


@sweep_app.command("plan")
def sweep_plan(
    sweep_file: SweepFileArgument,
    as_json: Annotated[bool, typer.Option("--json", help="Print the expanded plan as JSON.")]
    = False,
) -> None:
    """The trials a sweep file expands to, in order: grid × random draws × seeds."""
    from job.progress import print_sweep_plan
    from job.sweep import as_variables, load_plan

    plan = _run(lambda: load_plan(sweep_file, _train_settings_from_environment()))
    environment = as_variables(plan.environment)
    if as_json:
        print(json.dumps({**plan.identity(), "checkpoint_uri": plan.root,
                          "environment": environment}, indent=2))
    else:
        print_sweep_plan(plan.identity(), plan.root, environment)


@sweep_app.command("run")
def sweep_run(
    sweep_file: SweepFileArgument,
    trial: Annotated[int | None, typer.Option(
        help="The trial to run, in this process.", show_default="JOB_COMPLETION_INDEX "
        "(a Kubernetes Indexed Job's pod)")] = None,
    parallel: Annotated[int | None, typer.Option(
        help="Run every trial not finished yet on this machine, K at a time, each a child "
        "process (one GPU each, or the CPU's cores shared).", show_default=False)] = None,
) -> None:
    """Run one trial as `cnn-job train` with its settings (resumable, exit 75 on a signal,
    0 finished or pruned), or every trial with --parallel K (exit 0 all finished or pruned, 1 one
    failed, 69 storage out of reach, 75 stopped or running elsewhere).

    A trial takes CNN_JOB_* variables of where and how it runs (data, cache, checkpoint cadence,
    ...) where the file sets none; one that would change its result is refused unless the file
    sets that value (docs/sweeps.md lists both kinds).
    """
    from job.sweep import load_plan, run_parallel, run_trial, trial_from_environment, trial_line

    plan = _run(lambda: load_plan(sweep_file, _train_settings_from_environment()))
    if parallel is not None:
        raise typer.Exit(_run(lambda: run_parallel(plan, parallel, _say)))
    index = _run(lambda: trial if trial is not None else trial_from_environment())
    status = _run(lambda: run_trial(plan, index, run_training))
    if status["status"] == "stopped":
        _last_line(trial_line(status))
        raise typer.Exit(PREEMPTED_EXIT_CODE)
    if status["status"] == "finished":
        _print_where_the_model_is(status["summary"], plan.trial_uri(index), plan.endpoint_url,
                                  plan.config(index).data_uri)
    _last_line(trial_line(status))  # finished, or pruned (exit 0: done, as a Job counts it)


def _last_line(line: str) -> None:
    """A command's closing line, on stdout and in the pod's termination message."""
    print(line, flush=True)
    set_last_line(line)


def _say(message: str) -> None:
    print(message, flush=True)


@sweep_app.command("report")
def sweep_report(
    uri: Annotated[str, typer.Argument(help="The sweep's root: its checkpoint_uri, a folder or "
                                       "s3://BUCKET/PREFIX.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON instead.")]
    = False,
    plot: Annotated[Path | None, typer.Option(
        help="Also draw val_acc against each swept option into this PNG.", show_default=False)]
    = None,
    s3_endpoint_url: EndpointOption = None,
) -> None:
    """The trials best first, from the sweep's status files (no checkpoint is loaded)."""
    from job.progress import print_sweep_report
    from job.storage import check_output_file
    from job.sweep import report

    def run():
        if plot:
            check_output_file(plot, "--plot")
        plan, rows = report(uri, s3_endpoint_url)
        if plot:
            from job.sweep_plot import save_plot

            save_plot(plan, rows, plot)
        return plan, rows

    plan, rows = _run(run)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print_sweep_report(plan, rows, uri, s3_endpoint_url)
    if plot:
        print(f"plot: {plot}", file=sys.stderr if as_json else sys.stdout)


# ----------------------------------------------------------------------------------------------
# after training: cnn-job evaluate, predict, export

CheckpointArgument = Annotated[str, typer.Argument(
    help="A checkpoint file, or a checkpoint folder or s3://BUCKET/PREFIX (its `latest`); local "
         "or s3://.", show_default=False)]
DeviceOption = Annotated[Device, _option("device")]
TtaOption = Annotated[bool | None, typer.Option(
    "--tta/--no-tta", help="Test-time augmentation: the recipe's views' logits weighted (CIFAR-10: "
    "mirror and 1 px shifts, 6 views; MNIST: shifts, 3).", envvar="CNN_JOB_TTA",
    show_default="as training evaluated these weights: on for --net fast's final ones")]


def _note(message: str) -> None:
    """A side remark (a fallback, other data) on stderr: stdout stays the command's answer."""
    print(message, file=sys.stderr, flush=True)


@app.command()
def evaluate(
    checkpoint: CheckpointArgument,
    data_uri: Annotated[str | None, typer.Option(
        help="Folder, s3:// or http(s) URI laid out as <dataset>/<archive>, as for train.",
        envvar="CNN_JOB_DATA_URI", show_default="the run's --data-uri, else the public mirrors")] = None,
    test_data: Annotated[list[str] | None, typer.Option(
        help="Your own labelled images in the dataset's archive format instead (local or s3://): "
             "MNIST: the gzipped IDX images and labels files (give the option twice); CIFAR-10: "
             "a python batch like test_batch, or a cifar-10-python.tar.gz.",
        show_default=False)] = None,
    cache_dir: Annotated[Path | None, _option("cache_dir")] = None,
    device: DeviceOption = _DEFAULTS["device"],
    precision: Annotated[Precision | None, typer.Option(
        help="fp32, bf16, or auto (bf16 autocast on CUDA only).", envvar="CNN_JOB_PRECISION",
        show_default="the run's")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="Images per evaluation step.", envvar="CNN_JOB_EVAL_BATCH_SIZE",
        show_default="the run's --eval-batch-size")] = None,
    json_path: Annotated[str | None, typer.Option(
        "--json", help="Also write the report as JSON to this file (- for stdout, instead of "
        "the tables).", show_default=False)] = None,
    s3_endpoint_url: EndpointOption = None,
    tta: TtaOption = None,
) -> None:
    """Loss, accuracy, accuracy per class and the confusion matrix of a checkpoint on a test split.

    The same evaluation as training's after every epoch (with the run's batch size and
    precision): a run's final checkpoint scores the final_val_acc training reported. Under
    torchrun the split is sharded over the processes and the sums all-reduced.
    """
    from job.inference import evaluate_checkpoint
    from job.progress import print_evaluation
    from job.storage import Output

    def run() -> dict | None:
        output = Output(json_path, "--json") if json_path and json_path != "-" else None
        if output:
            output.check()
        report = evaluate_checkpoint(
            checkpoint, data_uri=data_uri, test_data=test_data or [], cache_dir=cache_dir,
            device=device, batch_size=batch_size, precision=precision,
            endpoint_url=s3_endpoint_url, log=_note, tta=tta)
        if report and output:
            output.write((json.dumps(report, indent=2) + "\n").encode())
        return report

    report = _run(run)
    if report and json_path == "-":
        print(json.dumps(report, indent=2))
    elif report:
        print_evaluation(report)


@app.command()
def predict(
    checkpoint: CheckpointArgument,
    images: Annotated[list[str], typer.Argument(
        help="PNG or JPEG files, local or s3://, of any size and colour mode.", show_default=False)],
    top_k: Annotated[int, typer.Option(help="Classes to show per image, most likely first.",
                                       envvar="CNN_JOB_TOP_K")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image and line.")]
    = False,
    device: DeviceOption = _DEFAULTS["device"],
    s3_endpoint_url: EndpointOption = None,
    tta: TtaOption = None,
) -> None:
    """The most likely classes of each image, with their probabilities.

    Images are brought to what the dataset's look like: MNIST grayscale 28×28 (light digits on
    black: colours are not inverted), CIFAR-10 RGB 32×32; the centred square is kept and resized,
    transparency goes onto black.
    """
    from job.inference import predict as classify
    from job.progress import print_predictions

    predictions = _run(lambda: classify(checkpoint, images, top_k=top_k, device=device,
                                        endpoint_url=s3_endpoint_url, log=_note, tta=tta))
    print_predictions(predictions, as_json)


@app.command()
def export(
    checkpoint: CheckpointArgument,
    export_format: Annotated[str, typer.Option(
        "--format", help="onnx, torch-export (a torch.export .pt2 program) or safetensors.",
        show_default=False)],
    output: Annotated[str, typer.Option(help="File to write, local or s3://BUCKET/KEY.",
                                        show_default=False)],
    s3_endpoint_url: EndpointOption = None,
    tta: Annotated[bool | None, typer.Option(
        "--tta/--no-tta", help="ONNX and torch-export: the program's logits are the test-time "
        "augmented ones (its metadata says which).",
        show_default="as training evaluated these weights")] = None,
) -> None:
    """Write the checkpoint's net as ONNX, a torch.export program or safetensors weights.

    Each file carries what a server needs without this project's code: input shape, channel
    order, normalisation, class names and provenance (see the README).
    """
    from job.export import export_checkpoint

    result = _run(lambda: export_checkpoint(checkpoint, export_format, output, s3_endpoint_url,
                                            log=_note, tta=tta))
    metadata = result["metadata"]
    print(f"{result['output']}  {result['format']}  {result['bytes']:,} bytes  {metadata['dataset']} "
          f"step {metadata['step']}  {_exported_val_acc(metadata, checkpoint)}")


def _exported_val_acc(metadata: dict, checkpoint: str) -> str:
    """Training's val_acc, said of the file only where the file computes what was measured."""
    if metadata["val_acc"] is None:
        return "val_acc -"
    measured = format(metadata["val_acc"], ".2%")
    trained_tta, file_tta = metadata["val_acc_with_tta"], metadata["test_time_augmentation"]
    if metadata["format"] == "safetensors":  # weights only: TTA is the server's to apply
        return f"val_acc {measured}" + (" (training's, with TTA)" if trained_tta else "")
    if trained_tta == file_tta:
        return f"val_acc {measured}" + (" (with TTA)" if file_tta else "")
    return (f"val_acc - (training's {measured} was {'with' if trained_tta else 'without'} TTA; "
            f"this file's logits are {'with' if file_tta else 'without'} it: "
            f"`cnn-job evaluate {checkpoint} --{'' if file_tta else 'no-'}tta` scores them)")


def _run(action):
    """Run `action`; a JobError becomes one line on stderr and its exit status: 2 for bad input,
    69 for storage that stayed unreachable (StorageUnavailable)."""
    try:
        return action()
    except JobError as error:
        print_error(str(error))
        raise typer.Exit(error.exit_code) from None


def main() -> None:
    """Console-script entry: usage errors, like JobErrors, are one line and exit status 2."""
    from job.progress import write_termination_message

    status = _main()
    write_termination_message()  # its last line, for `kubectl describe pod`: done, stopped, error
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
        # One line: click lists a missing choice's values one per line, and pydantic-style
        # "Value error, " prefixes the message a Literal's check gives.
        message = " ".join(error.format_message().split()).replace("Value error, ", "")
        print_error(message + hint)
        return getattr(error, "exit_code", JobError.exit_code)
    except Interrupted as interrupted:  # a stop signal outside the training loop
        print_error(interrupted.line())
        return PREEMPTED_EXIT_CODE
    except typer.Abort:
        print_error("interrupted")
        return 130
    return status if isinstance(status, int) else 0
