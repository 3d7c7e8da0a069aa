"""Terminal output: a rich progress bar with images/s and ETA on rank 0, silence elsewhere."""

from __future__ import annotations

import sys
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


def print_error(message: str) -> None:
    """One line on stderr, nothing else (no traceback, no box, no credential)."""
    print(f"error: {strip_userinfo(message)}", file=sys.stderr, flush=True)


class ImagesPerSecondColumn(ProgressColumn):
    """Throughput of the task, counted in images (the task advances by batch sizes)."""

    def render(self, task: Task) -> Text:
        speed = "--" if task.speed is None else f"{task.speed:,.0f}"
        return Text(f"{speed} img/s", style="progress.data.speed")


class EpochProgress:
    """A bar for one epoch, advanced by images, with a short status text (the running loss).

    Counts images of all ranks (each rank trains its equal share at the same pace), and is
    shown by rank 0 only. Off a terminal (cluster logs) rich prints the finished bar once, so
    each epoch leaves one bar line followed by its metrics line.
    """

    def __init__(self, description: str, total_images: int, enabled: bool, world_size: int = 1,
                 done_images: int = 0):
        self.world_size = world_size
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
            disable=not enabled,
            # Off a terminal nothing is redrawn, so no refresh thread competes for the GIL.
            auto_refresh=console.is_terminal,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task(
            description, total=total_images * world_size, completed=done_images * world_size,
            status="",
        )

    def __enter__(self) -> EpochProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def advance(self, images: int, status: str | None = None) -> None:
        fields = {} if status is None else {"status": status}
        self._progress.update(self._task, advance=images * self.world_size, **fields)


def say(enabled: bool, message: str) -> None:
    if enabled:
        console.print(strip_userinfo(message))


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
    console.print(table)
    console.print("* = the checkpoint `latest` names (what --resume auto continues from)")
