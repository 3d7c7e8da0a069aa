"""What the job prints: on rank 0 a rich progress bar with images/s and ETA on a terminal, plain
progress lines off one (cluster and CI logs), and the tables of `checkpoints list`, `evaluate` and
`predict`; silence on the other ranks."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from job.errors import strip_userinfo

console = Console(highlight=False, soft_wrap=True)  # log lines stay whole off a terminal

# Off a terminal, a progress line goes out at a log step (every --log-every-steps) once this many
# seconds have passed since the previous line: 0 prints one at every log step.
PROGRESS_INTERVAL_ENV = "CNN_JOB_PROGRESS_INTERVAL_S"
DEFAULT_PROGRESS_INTERVAL_S = 10.0


def print_error(message: str) -> None:
    """One line on stderr, nothing else (no traceback, no box, no credential); the command's
    last line, unless it goes on to say another."""
    line = f"error: {strip_userinfo(message)}"
    print(line, file=sys.stderr, flush=True)
    set_last_line(line)


# ----------------------------------------------------------------------------------------------
# the last line: how the command ended, for Kubernetes' termination message

# Kubernetes shows this file's text as the container's termination message (`kubectl describe
# pod`, `status.containerStatuses[].state.terminated.message`) and keeps at most 4096 bytes.
TERMINATION_LOG_ENV = "CNN_JOB_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
TERMINATION_MESSAGE_MAX_BYTES = 4096

_last_line: str | None = None


def set_last_line(line: str) -> None:
    """Say how the command ended: `done: ...`, `stopped at ...`, `error: ...`; the latest wins."""
    global _last_line
    _last_line = strip_userinfo(line)


def write_termination_message() -> None:
    """The last line, into CNN_JOB_TERMINATION_LOG (default /dev/termination-log, which the
    kubelet creates in every container), by rank 0 only (torchrun's other workers keep quiet;
    `cnn-job launch`, which has no RANK, writes what it said last). Nothing when no line was
    set, the file is not there, or it cannot be written at once (a FIFO nobody reads): a
    message must never change how the command ends, nor when."""
    if _last_line is None or os.environ.get("RANK", "0") != "0":
        return
    path = os.environ.get(TERMINATION_LOG_ENV) or DEFAULT_TERMINATION_LOG
    # Cut to the limit on a character boundary, as Kubernetes would cut it anyway.
    message = _last_line.encode()[:TERMINATION_MESSAGE_MAX_BYTES].decode(errors="ignore").encode()
    try:
        # A file that is there only (the kubelet's, or a test's): never one made in a /dev that
        # a process running as root outside a pod could write to. Truncated: the latest line.
        # Non-blocking: a FIFO with no reader refuses at once (ENXIO) rather than hang the exit,
        # and a full one refuses the write (EAGAIN).
        descriptor = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NONBLOCK)
    except OSError:
        return
    try:
        os.write(descriptor, message)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class ImagesPerSecondColumn(ProgressColumn):
    """Throughput of the task, counted in images (the task advances by batch sizes)."""

    def render(self, task: Task) -> Text:
        speed = "--" if task.speed is None else f"{task.speed:,.0f}"
        return Text(f"{speed} img/s", style="progress.data.speed")


class EpochProgress:
    """One epoch's progress, advanced by images, with a short status text (the running loss).

    Counts images of all ranks (each rank trains its equal share at the same pace), and is
    shown by rank 0 only. On a terminal it is a rich bar, redrawn in place. Off a terminal
    (`kubectl logs`, CI, `| tee`) nothing can be redrawn, so it prints plain lines instead:

        epoch 2/5  41.3%  24,768/60,000 images  loss 0.0812  4,035 img/s  elapsed 0:00:06  eta 0:00:08

    one at a log step (every --log-every-steps; `status` is set then) once at least
    CNN_JOB_PROGRESS_INTERVAL_S seconds (default 10; 0: every log step) have passed since the
    previous line, and one when the epoch ends. img/s counts the images since the previous line;
    the ETA assumes the epoch's average pace so far.
    """

    def __init__(self, description: str, total_images: int, enabled: bool, world_size: int = 1,
                 done_images: int = 0):
        self.world_size = world_size
        self.description = description
        self.total = total_images * world_size
        self.done = done_images * world_size
        self.lines = enabled and not console.is_terminal
        self.interval_s = progress_interval_s() if self.lines else 0.0
        self.started = self.last_line_at = time.monotonic()
        self.started_done = self.last_line_done = self.done
        self.status = ""
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            ImagesPerSecondColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled or self.lines,
            auto_refresh=True,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task(description, total=self.total, completed=self.done,
                                             status="")

    def __enter__(self) -> EpochProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)
        if self.lines and exc[0] is None and self.last_line_done != self.done:
            self._print_line(time.monotonic())

    def advance(self, images: int, status: str | None = None) -> None:
        self.done += images * self.world_size
        if status is not None:
            self.status = status
        if not self.lines:
            self._progress.update(self._task, advance=images * self.world_size,
                                  **({} if status is None else {"status": status}))
            return
        now = time.monotonic()
        if status is not None and now - self.last_line_at >= self.interval_s:
            self._print_line(now)

    def _print_line(self, now: float) -> None:
        window_s = max(now - self.last_line_at, 1e-9)
        rate = (self.done - self.last_line_done) / window_s
        elapsed_s = now - self.started
        average = (self.done - self.started_done) / max(elapsed_s, 1e-9)
        eta = _clock((self.total - self.done) / average) if average > 0 else "--"
        fraction = self.done / self.total if self.total else 1.0
        parts = [self.description, f"{fraction:6.1%}", f"{self.done:,}/{self.total:,} images",
                 self.status, f"{rate:,.0f} img/s", f"elapsed {_clock(elapsed_s)}", f"eta {eta}"]
        print("  ".join(part for part in parts if part), flush=True)
        self.last_line_at, self.last_line_done = now, self.done


def progress_interval_s() -> float:
    return env_seconds(PROGRESS_INTERVAL_ENV, DEFAULT_PROGRESS_INTERVAL_S)


def env_seconds(name: str, default: float) -> float:
    """A number of seconds (0 or more) from the environment variable `name`; one that is not
    gets `default` and one warning line (a bad log setting must not stop a run, nor one rank of
    it)."""
    text = os.environ.get(name, "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        print(f"warning: {name}={text!r} is not a number of seconds (0 or more); using {default:g}",
              flush=True)
        return default
    return value


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def say(enabled: bool, message: str) -> None:
    if enabled:
        console.print(strip_userinfo(message))


def print_table(table: Table) -> None:
    """A table on stdout. Off a terminal (`| cat`, `| grep`, logs) there is no width to fit, so it
    is printed whole, as wide as its contents, instead of cut to 80 columns."""
    if console.is_terminal:
        console.print(table)
    else:
        Console(highlight=False, width=10_000).print(table)


def print_checkpoint_table(uri: str, rows: list[dict]) -> None:
    if not rows:
        console.print(f"no checkpoints in {uri}")
        return
    table = Table(title=uri, title_justify="left")
    for column in ("", "checkpoint", "step", "epoch", "val acc", "size", "written (UTC)"):
        table.add_column(column, justify="left" if column in ("", "checkpoint") else "right",
                         no_wrap=True)
    for row in rows:
        written = datetime.fromtimestamp(row["modified"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        size = f"{row['size'] / 2**20:.1f} MiB"
        if "error" in row:
            table.add_row("*" if row["latest"] else "", row["name"], "-", "-",
                          f"unreadable: {row['error']}", size, written)
            continue
        epoch = str(row["epoch"]) + (f" +{row['epoch_step']} steps" if row["epoch_step"] else "")
        accuracy = "-" if row["val_acc"] is None else f"{row['val_acc']:.2%}"
        table.add_row("*" if row["latest"] else "", row["name"], str(row["step"]), epoch,
                      accuracy, size, written)
    print_table(table)
    console.print("* = the checkpoint `latest` names (what --resume auto continues from)")


def print_evaluation(report: dict) -> None:
    """`cnn-job evaluate`: the totals, accuracy per class, and the confusion matrix."""
    names = report["class_names"]
    console.print(f"{report['checkpoint']}  ({report['dataset']}, step {report['step']}, "
                  f"epoch {report['epoch']})  on {report['data']}")
    reported = report["training_val_acc"]
    totals = Table(title="evaluation", title_justify="left")
    for column in ("images", "loss", "accuracy", "training reported", "device", "precision",
                   "processes"):
        totals.add_column(column, justify="right", no_wrap=True)
    totals.add_row(f"{report['images']:,}", f"{report['loss']:.4f}",
                   f"{report['accuracy']:.2%} ({report['correct']:,})",
                   "-" if reported is None else f"{reported:.2%}", report["device"],
                   report["precision"], str(report["world_size"]))
    print_table(totals)
    per_class = Table(title="accuracy per class", title_justify="left")
    for column in ("class", "images", "correct", "accuracy"):
        per_class.add_column(column, justify="left" if column == "class" else "right", no_wrap=True)
    for index, name in enumerate(names):
        row = report["confusion_matrix"][index]
        per_class.add_row(name, f"{sum(row):,}", f"{row[index]:,}",
                          f"{report['per_class_accuracy'][name]:.2%}")
    print_table(per_class)
    matrix = Table(title="confusion matrix (rows: true class, columns: predicted)",
                   title_justify="left")
    matrix.add_column("true \\ predicted", no_wrap=True)
    for name in names:
        matrix.add_column(name, justify="right", no_wrap=True)
    for name, row in zip(names, report["confusion_matrix"]):
        matrix.add_row(name, *(f"{count:,}" for count in row))
    print_table(matrix)


def print_predictions(predictions: list[dict], as_json: bool) -> None:
    """`cnn-job predict`: one line per image, its top classes with their probabilities; with
    `as_json`, one JSON object per line instead."""
    for prediction in predictions:
        if as_json:
            print(json.dumps(prediction), flush=True)
            continue
        top = "  ".join(f"{guess['class']} {guess['probability']:.2%}" for guess in prediction["top"])
        print(f"{prediction['image']}  {top}", flush=True)


def _setting(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def print_sweep_plan(plan: dict, root: str) -> None:
    """`cnn-job sweep plan`: one row per trial, one column per swept option."""
    fixed = ", ".join(f"{name} {_setting(value)}" for name, value in plan["fixed"].items())
    table = Table(title=f"sweep {plan['name']}: {plan['dataset']}, {len(plan['trials'])} trials",
                  title_justify="left")
    table.add_column("trial", justify="right", no_wrap=True)
    for name in plan["swept"]:
        table.add_column(name + (" (log)" if name in plan["log_scale"] else ""), justify="right",
                         no_wrap=True)
    for trial in plan["trials"]:
        table.add_row(f"{trial['trial']:03d}",
                      *(_setting(trial["settings"].get(name)) for name in plan["swept"]))
    print_table(table)
    console.print(strip_userinfo(f"fixed: {fixed or 'nothing (the recipe defaults)'}"))
    console.print(strip_userinfo(f"root: {root} (trial N in {root.rstrip('/')}/trial-NNN)"))


def print_sweep_report(plan: dict, rows: list[dict], root: str) -> None:
    """`cnn-job sweep report`: the trials best first."""
    table = Table(title=f"sweep {plan['name']}", title_justify="left")
    for column in ("trial", "status", *plan["swept"], "epochs", "val acc", "train s"):
        table.add_column(column, justify="left" if column == "status" else "right", no_wrap=True)
    for row in rows:
        status = row["status"] + (f": {row['error']}" if row.get("error") else "")
        if row.get("pruned"):
            status = f"pruned at epoch {row['pruned']['epoch']}"
        table.add_row(f"{row['trial']:03d}", status,
                      *(_setting(row["settings"].get(name)) for name in plan["swept"]),
                      str(row["epochs"]),
                      "-" if row["val_acc"] is None else f"{row['val_acc']:.2%}",
                      "-" if row["train_seconds"] is None else f"{row['train_seconds']:.1f}")
    print_table(table)
    for row in rows:
        if row.get("pruned"):  # the rung and the metric it was pruned on, said in full
            console.print(f"pruned: trial {row['trial']:03d} at epoch {row['pruned']['epoch']}: "
                          f"{row['pruned']['reason']}")
    console.print(strip_userinfo(f"root: {root}"))
    best = next((row for row in rows if row["status"] == "finished"), None)
    if best:
        settings = ", ".join(f"{k} {_setting(v)}" for k, v in best["settings"].items())
        console.print(strip_userinfo(f"best: trial {best['trial']:03d} ({settings}) val_acc "
                                     f"{best['val_acc']:.2%}: cnn-job evaluate {best['uri']}"))
