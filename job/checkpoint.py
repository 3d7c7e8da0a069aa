"""Checkpoints: what one holds, when the loop writes one, where it goes, how many are kept,
and what a resume restores.

A checkpoint is one plain dict (FORMAT below), saved with torch.save so that
`torch.load(path, weights_only=True)` reads it. Each is stored under a step-unique name
(`step-000001234.pt`) in a folder or an S3 prefix, completely, before a small `latest` pointer
is moved to name it; older ones beyond `keep` are deleted after that. A resume reads the
pointer, and if the checkpoint it names is missing or unreadable, falls back to the newest
loadable one and says so in one line.

Two layers: `CheckpointManager` is the storage side (names, pointer, retention, fallback,
listing) and needs no model; `Checkpointer` is the training loop's one handle, which owns the
model and optimizer and decides whether a step is saved and what goes in.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from job import distributed
from job.distributed import Dist
from job.errors import JobError
from job.storage import open_store

POINTER = "latest"
NAME_PATTERN = re.compile(r"^step-(\d{9})\.pt$")

# ----------------------------------------------------------------------------------------------
# the format: a contract with the checkpoints already in users' buckets

# key -> the type its value has. Every checkpoint ever written has the REQUIRED keys; the others
# came later (or may be None), and a checkpoint without them still resumes (see RunState).
FORMAT: dict[str, type | tuple[type, ...]] = {
    "model": dict,  # the net's state_dict (build_model(config["dataset"]))
    "optimizer": dict,  # Adam's state_dict
    "config": dict,  # TrainConfig.to_dict() of the run that wrote it
    "rng": dict,  # {"torch": CPU generator state, "cuda": GPU's, when trained on one}
    "epoch": int,  # completed epochs
    "step": int,  # optimizer steps in all
    "metrics": list,  # one dict per completed epoch: epoch, step, train_loss, val_loss, val_acc
    "epoch_step": int,  # steps done inside the current epoch (0 at an epoch boundary)
    "epoch_loss": list,  # [Σ loss·n, Σ n] of the current epoch so far, all ranks
    "data_sha256": dict,  # archive name -> sha256 of the file trained on
    "world_size": int,  # processes that trained it
    "wandb_run_id": (str, type(None)),  # the W&B run a resume continues
}
REQUIRED = ("model", "optimizer", "config", "rng", "epoch", "step", "metrics")


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}.pt"


def to_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> dict:
    """A checkpoint dict, checked against FORMAT; ValueError (one line) for anything else."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or objects beyond plain data
        raise ValueError(f"not a loadable torch file: {first_line(error, 100)}") from None
    if not isinstance(state, dict):
        raise ValueError(f"not a cnn-job checkpoint (a {type(state).__name__}, not a dict)")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise ValueError(f"not a cnn-job checkpoint (no {missing[0]!r})")
    for key, kind in FORMAT.items():
        if key in state and not isinstance(state[key], kind):
            raise ValueError(f"malformed checkpoint ({key!r} is a {type(state[key]).__name__})")
    if not isinstance(state["config"].get("dataset"), str):
        raise ValueError("malformed checkpoint (its config names no dataset)")
    return state


# ----------------------------------------------------------------------------------------------
# where the run stands


@dataclass
class RunState:
    """Where training stands; with the model, optimizer and RNG, all a step-exact resume needs."""

    epoch: int = 0  # completed epochs
    epoch_step: int = 0  # steps done inside the current epoch (0 at an epoch boundary)
    step: int = 0  # optimizer steps in all
    epoch_loss: list = field(default_factory=lambda: [0.0, 0.0])  # Σ loss·n, Σ n (all ranks)
    history: list = field(default_factory=list)  # one dict of metrics per completed epoch
    wandb_run_id: str | None = None
    # This rank's running [Σ loss·n, Σ n] of the current epoch (float64 on the device); rank 0
    # carries what a resume brought in. Summed over ranks into epoch_loss when saved.
    rank_loss: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_checkpoint(cls, state: dict) -> RunState:
        return cls(state["epoch"], state.get("epoch_step", 0), state["step"],
                   list(state.get("epoch_loss", [0.0, 0.0])), state["metrics"],
                   state.get("wandb_run_id"))

    def begin_epoch(self, d: Dist) -> None:
        self.rank_loss = torch.tensor(self.epoch_loss if d.is_main else [0.0, 0.0],
                                      dtype=torch.float64, device=d.device)

    def sync_epoch_loss(self, d: Dist) -> list[float]:
        """Σ loss·n and Σ n of the epoch so far over all ranks (a collective: every rank calls)."""
        self.epoch_loss = distributed.all_reduce_sum(d, self.rank_loss.clone()).tolist()
        return self.epoch_loss

    def end_epoch(self, evaluation) -> None:
        """Record a completed epoch (its loss synced first) with its evaluation."""
        loss_sum, count = self.epoch_loss
        self.epoch, self.epoch_step, self.epoch_loss = self.epoch + 1, 0, [0.0, 0.0]
        self.history.append({"epoch": self.epoch, "step": self.step, "train_loss": loss_sum / count,
                             "val_loss": evaluation.loss, "val_acc": evaluation.accuracy})


def rng_states(device: torch.device) -> dict:
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


# ----------------------------------------------------------------------------------------------
# storage: names, pointer, retention, fallback


class CheckpointManager:
    def __init__(self, uri: str, keep: int = 3, endpoint_url: str | None = None,
                 log: Callable[[str], None] = print) -> None:
        if keep < 1:
            raise JobError("--keep-checkpoints must be at least 1")
        self.store = open_store(uri, endpoint_url)
        self.keep = keep
        self.log = log

    def location(self, name: str) -> str:
        return self.store.location(name)

    def check_writable(self) -> None:
        self.store.check_writable("--checkpoint-uri")

    def names(self) -> list[str]:
        """Complete checkpoints, newest (highest step) first."""
        return sorted((o.name for o in self.store.list() if NAME_PATTERN.match(o.name)),
                      reverse=True)

    def pointer(self) -> str | None:
        """The name `latest` holds; None when it is missing, not a file or names no checkpoint
        (a resume then takes the newest loadable one)."""
        try:
            data = self.store.read(POINTER)
        except OSError:  # e.g. a folder named `latest`
            return None
        name = data.decode("utf-8", "replace").strip() if data else None
        return name if name and NAME_PATTERN.match(name) else None

    def save(self, state: dict, step: int) -> str:
        name = checkpoint_name(step)
        try:
            self.store.write(name, to_bytes(state))
            self.store.write(POINTER, f"{name}\n".encode())
        except OSError as error:
            raise JobError(
                f"could not write checkpoint {self.location(name)} ({error.strerror or error}); "
                "the previous checkpoint is intact: free space or pass another --checkpoint-uri"
            ) from None
        for old in self.names()[self.keep:]:
            self.store.delete(old)
        return self.location(name)

    def load_latest(self) -> tuple[dict, str] | None:
        """The newest loadable checkpoint and its location; None when there is none at all.

        Checkpoints that exist but none of which loads are an error: starting over silently
        would throw away the run the user meant to continue.
        """
        pointer = self.pointer()
        candidates = self.names()
        if pointer:
            candidates = [pointer] + [name for name in candidates if name != pointer]
        for index, name in enumerate(candidates):
            try:
                data = self.store.read(name)
                if data is None:
                    raise FileNotFoundError("missing")
                return from_bytes(data), self.location(name)
            except Exception as error:  # any unreadable checkpoint: try the next one
                reason = first_line(error, 120)
                if index + 1 == len(candidates):
                    raise JobError(
                        f"no loadable checkpoint in {self.store.uri} (newest {candidates[0]}: "
                        f"{reason}); delete the broken files or "
                        "pass --resume never to start over"
                    ) from None
                self.log(f"checkpoint {self.location(name)} is unreadable ({reason}); "
                         f"falling back to {candidates[index + 1]}")
        return None

    def describe(self) -> list[dict]:
        """Every checkpoint, newest first: what `cnn-job checkpoints list` shows."""
        pointer = self.pointer()
        objects = {o.name: o for o in self.store.list()}
        rows = []
        for name in self.names():
            row = {"name": name, "location": self.location(name), "latest": name == pointer,
                   "size": objects[name].size, "modified": objects[name].modified}
            try:
                run = RunState.from_checkpoint(from_bytes(self.store.read(name) or b""))
            except Exception as error:
                row["error"] = first_line(error, 80, "unreadable")
                rows.append(row)
                continue
            last = run.history[-1] if run.history else {}
            row.update(step=run.step, epoch=run.epoch, epoch_step=run.epoch_step,
                       val_acc=last.get("val_acc") if last.get("step") == run.step else None)
            rows.append(row)
        return rows


def first_line(error: BaseException, limit: int, fallback: str | None = None) -> str:
    """An exception's first line, cut to `limit` characters: for one-line reports."""
    return (str(error).splitlines() or [fallback or type(error).__name__])[0][:limit]


# ----------------------------------------------------------------------------------------------
# the training loop's handle


class Checkpointer:
    """What the loop saves and restores, and when: the loop calls `save(run, ...)` at every
    step and at every epoch end; this decides whether that step is written and what goes in.

    Every rank calls `save` at the same points (it sums the epoch's loss over ranks); rank 0
    alone writes. Every rank reads on `resume`.
    """

    def __init__(self, manager: CheckpointManager, cfg, d: Dist, model, optimizer,
                 data_sha256: dict, steps_per_epoch: int) -> None:
        self.manager, self.log = manager, manager.log
        self.cfg, self.d, self.model, self.optimizer = cfg, d, model, optimizer
        self.data_sha256, self.steps_per_epoch = data_sha256, steps_per_epoch
        self.every_steps = cfg.checkpoint_every_steps
        self.location: str | None = None  # the newest checkpoint written or resumed from

    def resume(self) -> RunState:
        """Load the newest checkpoint into model, optimizer and RNG; a fresh state when there
        is none."""
        resumed = self.manager.load_latest()
        if not resumed:
            return RunState()
        state, location = resumed
        if state["config"]["dataset"] != self.cfg.dataset:
            raise JobError(
                f"{location} is a {state['config']['dataset']} checkpoint; "
                f"pass another --checkpoint-uri for {self.cfg.dataset}, or --resume never"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng_states(state["rng"], self.d.device)
        run = RunState.from_checkpoint(state)
        self.location = location
        self.log(f"resumed from {location} "
                 f"(epoch {run.epoch + 1}, step {run.epoch_step} of it; {run.step} in all)")
        return run

    def due(self, run: RunState) -> bool:
        """The mid-epoch rule: every --checkpoint-every-steps steps, except at an epoch's last
        step, whose checkpoint follows its evaluation."""
        return bool(self.every_steps and run.step % self.every_steps == 0
                    and run.epoch_step < self.steps_per_epoch)

    def save(self, run: RunState, tracker, *, force: bool = False,
             val_acc: float | None = None) -> bool:
        """Write a checkpoint of `run` when due (or `force`d: at an epoch end, with its
        validation accuracy, or when stopping); returns whether one was written."""
        if not (force or self.due(run)):
            return False
        if run.epoch_step:  # inside an epoch: carry its loss so far
            run.sync_epoch_loss(self.d)
        if not self.d.is_main:
            return True
        self.location = self.manager.save(self.state(run, tracker.run_id), run.step)
        best = val_acc is not None and val_acc >= max(h["val_acc"] for h in run.history)
        tracker.log_checkpoint(self.location, ["latest", "best"] if best else ["latest"],
                               {"step": run.step, "epoch": run.epoch, "val_acc": val_acc})
        return True

    def state(self, run: RunState, wandb_run_id: str | None) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "epoch": run.epoch, "epoch_step": run.epoch_step, "step": run.step,
            "epoch_loss": list(run.epoch_loss), "metrics": run.history,
            "config": self.cfg.to_dict(), "rng": rng_states(self.d.device),
            "data_sha256": self.data_sha256, "world_size": self.d.world_size,
            "wandb_run_id": wandb_run_id,
        }
