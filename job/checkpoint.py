"""Checkpoints: what one holds, when the loop writes one, where it goes, how many are kept,
and what a resume restores.

A checkpoint is one plain dict (FORMAT below), saved with torch.save so that
`torch.load(path, weights_only=True)` reads it. Each is stored under a step-unique name
(`step-000001234.pt`) in a folder or an S3 prefix, completely, before a small `latest` pointer
is moved to name it; older ones beyond `keep` are deleted after that. A resume reads the
pointer, and if the checkpoint it names is missing or unreadable, falls back to the newest
loadable one and says so in one line.

Two layers: `CheckpointManager` is the storage side (names, pointer, retention, fallback,
listing) and needs no model; `Checkpointer` is the training loop's one handle, which holds the
model and the recipe's `Training` (optimiser, and whatever else the recipe saves) and decides
whether a step is saved and what goes in. After training, `load_checkpoint` takes a checkpoint
by URI (a file, a folder or an s3:// prefix or object) for evaluate, predict and export.
"""

from __future__ import annotations

import io
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from job import distributed, recipes
from job.datasets import PRESETS, DatasetPreset
from job.distributed import Dist
from job.errors import JobError, cannot_write, first_line, strip_userinfo
from job.lease import lease_for
from job.preemption import Interrupted
from job.recipes.base import Training
from job.storage import LocalStore, S3Store, open_store, read_whole, remove_stale_partials

POINTER = "latest"
NAME_PATTERN = re.compile(r"^step-(\d{9})\.pt$")

# ----------------------------------------------------------------------------------------------
# the format: a contract with the checkpoints already in users' buckets

# key -> the type its value has. Every checkpoint ever written has the REQUIRED keys; the others
# came later (or may be None), and a checkpoint without them still resumes (see RunState).
# Beside these, a checkpoint holds what its recipe's Training adds (job/recipes/base.py: its
# STATE, e.g. --net fast's "lookahead"), which that recipe checks when a run resumes.
FORMAT: dict[str, type | tuple[type, ...]] = {
    "model": dict,  # the net's state_dict (recipes.load(dataset, net).build_model())
    "optimizer": dict,  # the recipe optimiser's state_dict, in torch.optim's format
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
    "epoch_position": int,  # images of the epoch's permutation consumed (all ranks)
    "run": dict,  # {"id": hex, "started": ISO time}: the run this checkpoint continues
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
        if needs := re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error)):
            # torch's own message is a page of advice on loading it anyway (running its code)
            raise ValueError(f"it needs code to load ({needs[1]} is not plain data), and a "
                             "checkpoint is never loaded by running code") from None
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
    """Where training stands; with the model, optimizer and RNG, all a resume needs."""

    epoch: int = 0  # completed epochs
    epoch_step: int = 0  # steps done inside the current epoch (0 at an epoch boundary)
    step: int = 0  # optimizer steps in all
    epoch_loss: list = field(default_factory=lambda: [0.0, 0.0])  # Σ loss·n, Σ n (all ranks)
    history: list = field(default_factory=list)  # one dict of metrics per completed epoch
    wandb_run_id: str | None = None
    # Images of the current epoch's permutation consumed by all ranks: where a resume starts,
    # whatever its batch size or world size (see DeviceBatches).
    epoch_position: int = 0
    run: dict = field(default_factory=lambda: {"id": uuid.uuid4().hex,
                                               "started": datetime.now(timezone.utc).isoformat()})
    # This rank's running [Σ loss·n, Σ n] of the current epoch (float64 on the device); rank 0
    # carries what a resume brought in. Summed over ranks into epoch_loss when saved.
    rank_loss: torch.Tensor | None = field(default=None, repr=False)
    # The first step whose loss was not finite on this rank (inf: none); kept on the device so
    # that watching for divergence costs no sync per step.
    rank_diverged_at: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_checkpoint(cls, state: dict) -> RunState:
        epoch_step = state.get("epoch_step", 0)
        # Checkpoints from before positions were recorded: every step took a full global batch.
        position = state.get("epoch_position", epoch_step * state["config"].get("batch_size", 0)
                             * state.get("world_size", 1))
        run = state.get("run") or {"id": "before-run-ids", "started": None}
        return cls(state["epoch"], epoch_step, state["step"],
                   list(state.get("epoch_loss", [0.0, 0.0])), state["metrics"],
                   state.get("wandb_run_id"), position, run)

    @property
    def evaluated(self) -> dict:
        """The history entry of exactly these weights: an epoch end's, else {} (inside one)."""
        last = self.history[-1] if self.history else {}
        return last if last.get("step") == self.step else {}

    @property
    def val_acc(self) -> float | None:
        """The validation accuracy of exactly these weights: set at an epoch end, None inside."""
        return self.evaluated.get("val_acc")

    def begin_epoch(self, d: Dist) -> None:
        self.rank_loss = torch.tensor(self.epoch_loss if d.is_main else [0.0, 0.0],
                                      dtype=torch.float64, device=d.device)
        self.rank_diverged_at = torch.tensor(math.inf, dtype=torch.float64, device=d.device)

    def advance(self, loss: torch.Tensor, images: int, world_size: int) -> None:
        """Count one optimizer step of `images` per rank and its mean `loss` (this rank's)."""
        self.step, self.epoch_step = self.step + 1, self.epoch_step + 1
        self.epoch_position += images * world_size
        # The epoch loss weighs every batch by its size: a short last one counts less.
        self.rank_loss[0] += loss * images
        self.rank_loss[1] += images
        self.rank_diverged_at = torch.where(torch.isfinite(loss), self.rank_diverged_at,
                                            self.rank_diverged_at.clamp(max=self.step))

    def progress(self, epoch_images: int, epochs: int) -> float:
        """The fraction of the run's images trained so far (what lr schedules are drawn over)."""
        return (self.epoch * epoch_images + self.epoch_position) / (epochs * epoch_images)

    def check_finite(self, loss_value: float) -> None:
        """Stop at a loss already read on the host (a log step) if it is not finite."""
        if not math.isfinite(loss_value):
            raise Diverged(int(self.rank_diverged_at.item()))

    def sync_epoch_loss(self, d: Dist) -> list[float]:
        """Σ loss·n and Σ n of the epoch so far over all ranks (a collective: every rank calls).
        A loss that is not finite stops the run here, before anything is written."""
        self.epoch_loss = distributed.all_reduce_sum(d, self.rank_loss.clone()).tolist()
        if not math.isfinite(self.epoch_loss[0]):
            first = self.rank_diverged_at.item()
            raise Diverged(int(first) if math.isfinite(first) else self.step)
        return self.epoch_loss

    def end_epoch(self, evaluation) -> None:
        """Record a completed epoch (its loss synced first) with its evaluation."""
        loss_sum, count = self.epoch_loss
        self.epoch, self.epoch_step, self.epoch_loss = self.epoch + 1, 0, [0.0, 0.0]
        self.epoch_position = 0
        self.history.append({"epoch": self.epoch, "step": self.step, "train_loss": loss_sum / count,
                             "val_loss": evaluation.loss, "val_acc": evaluation.accuracy,
                             "tta": evaluation.tta})


class Diverged(JobError):
    """The training loss stopped being a finite number: a result no checkpoint should hold."""

    def __init__(self, step: int) -> None:
        super().__init__(
            f"the training loss became NaN or inf at step {step}: the run diverged; "
            "the last checkpoint with a finite loss stays `latest`: lower --lr, or start a new "
            "run (--resume never with another --checkpoint-uri)")
        self.step = step


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
    def __init__(self, uri: str | LocalStore | S3Store, keep: int = 3,
                 endpoint_url: str | None = None, log: Callable[[str], None] = print,
                 retry_s: float | None = None) -> None:
        """`uri`: a checkpoint folder or s3:// prefix, or the store already opened on one."""
        if keep < 1:
            raise JobError("--keep-checkpoints must be at least 1")
        self.store = (open_store(uri, endpoint_url, retry_s=retry_s) if isinstance(uri, str)
                      else uri)
        self.keep = keep
        self.log = log
        self.lease = None  # held while this process writes the run (see hold)

    def hold(self, lease_s: float) -> None:
        """Become the run's one writer, or raise JobError naming the live holder."""
        self.lease = lease_for(self.store, lease_s, self.log)
        self.lease.acquire()
        if isinstance(self.store, LocalStore):  # torn writes of a killed holder: ours to clear
            remove_stale_partials(self.store.folder)

    def check_held(self) -> None:
        """Raise, with no request, when this process may no longer write the run (see lease)."""
        if self.lease:
            self.lease.check_held()

    def release(self) -> None:
        if self.lease:
            self.lease.release()
            self.lease = None

    def clear(self) -> list[str]:
        """Delete every checkpoint and the pointer (--overwrite); returns what was deleted."""
        doomed = [*self.names(), POINTER] if self.holds_a_run() else []
        for name in doomed:
            self.store.delete(name)
        return doomed

    def holds_a_run(self) -> bool:
        return bool(self.names()) or any(o.name == POINTER for o in self.store.list())

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
        """Write a checkpoint, then the pointer, then prune: of this run's earlier checkpoints
        (lower steps) the newest keep - 1 stay; the one just written is never deleted."""
        name = checkpoint_name(step)
        try:
            if self.lease:
                self.lease.check()
            self.store.write(name, to_bytes(state))
            if self.lease:  # the write may have waited out an outage: still the run's writer?
                self.lease.check()
            self.store.write(POINTER, f"{name}\n".encode())
        except Interrupted as stopped:  # a stop signal while storage was not answering
            raise Interrupted(stopped.signal_name, (
                f"while writing checkpoint {self.location(name)}, which storage did not take "
                f"before the stop: it was not written and {POINTER} names the checkpoint it "
                "named before; run the same command to resume from it")) from None
        except OSError as error:
            earlier = [old for old in self.names() if old < name]
            kept = (f"the previous checkpoint {earlier[0]} is intact" if earlier
                    else "this run has no checkpoint yet")
            raise cannot_write(f"checkpoint {self.location(name)}", error, "--checkpoint-uri",
                               kept) from None
        earlier = [old for old in self.names() if old < name]
        for old in earlier[self.keep - 1:]:
            self.store.delete(old)
        return self.location(name)

    def load_latest(self, accept: Callable[[dict], None] | None = None) -> tuple[dict, str] | None:
        """The newest loadable checkpoint and its location; None when there is none at all.
        `accept` may refuse a checkpoint that loads but does not fit (raising ValueError): it
        then counts as unreadable too.

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
                state = from_bytes(data)
                if accept:
                    accept(state)
                return state, self.location(name)
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
        """Every checkpoint, newest first: what `cnn-job checkpoints list` shows. A local path
        that is no folder is a mistake, not an empty run (an S3 prefix has no such state)."""
        if isinstance(self.store, LocalStore) and not self.store.folder.is_dir():
            what = "is a file" if self.store.folder.exists() else "does not exist"
            raise JobError(f"{self.store.uri} {what}: pass the checkpoint folder a run writes "
                           "(--checkpoint-uri), or an s3:// prefix")
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
            row.update(step=run.step, epoch=run.epoch, epoch_step=run.epoch_step,
                       val_acc=run.val_acc)
            rows.append(row)
        return rows


# ----------------------------------------------------------------------------------------------
# a checkpoint, by URI

CHECKPOINT_HINT = "pass a checkpoint file, a checkpoint folder or an s3:// prefix or object"


@dataclass
class LoadedCheckpoint:
    state: dict  # the checkpoint dict, checked against checkpoint.FORMAT
    location: str  # the file or object it came from

    @property
    def preset(self) -> DatasetPreset:
        return PRESETS[self.state["config"]["dataset"]]

    @property
    def val_acc(self) -> float | None:
        """The validation accuracy training reported for exactly these weights (an epoch end)."""
        return RunState.from_checkpoint(self.state).val_acc

    @property
    def net(self) -> str:
        return recipes.saved_net(self.state["config"])

    @property
    def recipe(self) -> recipes.Recipe:
        """The recipe that trained these weights: it builds the net and knows its TTA views."""
        return recipes.load(self.preset.name, self.net)

    @property
    def tta(self) -> bool:
        """Whether the run evaluates its final weights with test-time augmentation (--tta)."""
        return bool(self.state["config"].get("tta", False))

    @property
    def val_acc_with_tta(self) -> bool:
        """Whether the val_acc training reported for these weights was with test-time
        augmentation: a --tta run's final epoch only. Weights with no val_acc (inside an epoch),
        or from before the history said: the run's --tta."""
        return bool(RunState.from_checkpoint(self.state).evaluated.get("tta", self.tta))

    def model(self, device: torch.device, channels_last: bool = True) -> torch.nn.Module:
        """The net with the checkpoint's weights, in eval mode; channels_last as training runs it
        (so that evaluation computes exactly what training's did)."""
        model = self.recipe.build_model()
        try:
            model.load_state_dict(self.state["model"])
        except (RuntimeError, KeyError, TypeError) as error:
            raise JobError(f"{self.location}: its weights do not fit the {self.preset.name} net "
                           f"(--net {self.net}) ({first_line(error, 100)})") from None
        model = model.to(device, memory_format=torch.channels_last if channels_last
                         else torch.contiguous_format)
        return model.eval()

    def provenance(self) -> dict:
        """Where these weights come from: what an export or an evaluation report carries."""
        from job.version import git_commit

        run = self.state.get("run") or {}
        return {
            "checkpoint": strip_userinfo(self.location),
            "run_id": run.get("id"),
            "step": self.state["step"],
            "epoch": self.state["epoch"],
            "val_acc": self.val_acc,
            "val_acc_with_tta": self.val_acc_with_tta,
            "data_sha256": self.state.get("data_sha256", {}),
            "git_commit": git_commit(),
        }


def load_checkpoint(uri: str, endpoint_url: str | None = None,
                    log: Callable[[str], None] = print) -> LoadedCheckpoint:
    """A checkpoint file (local, or an s3:// object), or the one `latest` names in a checkpoint
    folder or s3:// prefix (the newest loadable one if that is broken, said in one line)."""
    folder = open_store(uri, endpoint_url, option="CHECKPOINT")  # the URI told apart, once
    if isinstance(folder, LocalStore):
        if not folder.folder.exists():
            raise JobError(f"{uri} does not exist: {CHECKPOINT_HINT}")
        single = not folder.folder.is_dir()
    else:  # S3 has no folders to look at: an object is told by its name
        name = folder.uri.rpartition("/")[2]
        single = NAME_PATTERN.match(name) or name.endswith(".pt")
    if single:  # read through the store of its folder or prefix
        data = read_whole(*folder.parent(), uri)
        try:
            return _checked(from_bytes(data), uri)
        except ValueError as error:
            raise JobError(f"{uri}: {error}; {CHECKPOINT_HINT}") from None
    try:
        found = CheckpointManager(folder, log=log).load_latest()
    except JobError as error:  # none loads: drop the training advice (--resume never)
        raise JobError(str(error).split("; delete the broken files")[0]) from None
    if found is None:
        raise JobError(f"no checkpoints in {uri}: {CHECKPOINT_HINT}")
    return _checked(*found)


def _checked(state: dict, location: str) -> LoadedCheckpoint:
    if state["config"]["dataset"] not in PRESETS:
        raise JobError(f"{location} is a checkpoint of an unknown dataset "
                       f"{state['config']['dataset']!r}")
    return LoadedCheckpoint(state, location)


# ----------------------------------------------------------------------------------------------
# the training loop's handle


# Settings that define a run: a resume that changes one would not continue the run it names.
# (Batch size, world size and --epochs may change: see Checkpointer.resume and the README.)
def _as_option(name: str, value) -> str:
    """A setting as it is passed: `--seed 1`, and a flag as one (`--augment`, `--no-augment`)."""
    option = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{option}" if value else f"--no-{option}"
    return f"--{option} {value}"


RUN_DEFINING = ("net", "seed", "limit_train", "augment", "lr", "lr_schedule")
RUN_DEFINING_BEFORE = {"net": recipes.NET_BEFORE_RECIPES}  # what checkpoints before a setting had


class Checkpointer:
    """What the loop saves and restores, and when: the loop calls `save(run, ...)` at every
    step and at every epoch end; this decides whether that step is written and what goes in.

    Every rank calls `save` at the same points (it sums the epoch's loss over ranks); rank 0
    alone writes. Every rank reads on `resume`.
    """

    def __init__(self, manager: CheckpointManager, cfg, d: Dist, model, training,
                 data_sha256: dict, batches) -> None:
        self.manager, self.log = manager, manager.log
        self.cfg, self.d, self.model = cfg, d, model
        self.training = training  # the recipe's: its optimiser and any state it saves beside it
        self.data_sha256 = data_sha256
        self.batches = batches  # the training batches: what an epoch serves after a position
        self.every_steps = cfg.checkpoint_every_steps
        self.location: str | None = None  # the newest checkpoint written or resumed from

    def resume(self) -> RunState:
        """Load the newest checkpoint into the model, the recipe's training state and the RNG; a
        fresh state when there is none. A checkpoint of another run (dataset, data, seed, ...)
        is refused."""
        resumed = self.manager.load_latest(accept=self._fits)
        if not resumed:
            return RunState()
        state, location = resumed
        self._check_same_run(state, location)
        self.training.load_state_dict(state)
        self.model.load_state_dict(state["model"])
        restore_rng_states(state["rng"], self.d.device)
        run = RunState.from_checkpoint(state)
        self._check_epochs_left(state, run)
        self.location = location
        self.log(f"resumed from {location} (epoch {run.epoch + 1}, step {run.epoch_step} of it, "
                 f"image {run.epoch_position} of its order; {run.step} in all)")
        self._say_what_changed(state, run)
        return run

    def _fits(self, state: dict) -> None:
        """ValueError unless the checkpoint's weights and the recipe's state fit this net."""
        if (state["config"]["dataset"] != self.cfg.dataset
                or recipes.saved_net(state["config"]) != self.cfg.net):
            return  # refused with its own message once chosen (_check_same_run)
        expected = {name: tuple(t.shape) for name, t in self.model.state_dict().items()}
        found = {name: tuple(getattr(t, "shape", ())) for name, t in state["model"].items()}
        if found != expected:
            raise ValueError("its weights do not fit the net")
        self.training.check(state)

    def _check_same_run(self, state: dict, location: str) -> None:
        saved = state["config"]
        if saved["dataset"] != self.cfg.dataset:
            raise JobError(
                f"{location} is a {saved['dataset']} checkpoint; "
                f"pass another --checkpoint-uri for {self.cfg.dataset}, or --resume never"
            )
        fix = "start a new run with --resume never and another --checkpoint-uri"
        for name in RUN_DEFINING:
            ours = getattr(self.cfg, name)
            theirs = saved.get(name, RUN_DEFINING_BEFORE.get(name, ours))
            if ours != theirs:
                raise JobError(
                    f"{_as_option(name, ours)} differs from the run in {self.manager.store.uri} "
                    f"({_as_option(name, theirs)}): a resume continues that run; pass "
                    f"{_as_option(name, theirs)}, or {fix}")
        for archive, digest in state.get("data_sha256", {}).items():
            ours = self.data_sha256.get(archive)
            if ours != digest:
                raise JobError(
                    f"the {saved['dataset']} data differs from the run's in "
                    f"{self.manager.store.uri} ({archive}: sha256 {str(ours)[:12]}… here, "
                    f"{digest[:12]}… there): point --data-uri at the run's data, or {fix}")

    def _check_epochs_left(self, state: dict, run: RunState) -> None:
        """A resume may lengthen or shorten a run, never end it before where it already is:
        its last epoch's evaluation, TTA and the recipe's finish (lookahead) would not describe
        the weights `latest` holds."""
        started = run.epoch + (1 if run.epoch_position else 0)
        planned = state["config"].get("epochs", self.cfg.epochs)
        # Ending at the boundary it stopped at is consistent unless the last epoch does more
        # than the others (TTA, the recipe's end-of-run step), which those weights never had.
        last_epoch_does_more = self.cfg.tta or type(self.training).end_run is not Training.end_run
        cut_at_a_boundary = (self.cfg.epochs == run.epoch and planned > self.cfg.epochs
                             and last_epoch_does_more)
        if self.cfg.epochs < started or cut_at_a_boundary:
            where = (f"inside epoch {started}" if run.epoch_position
                     else f"after epoch {run.epoch}")
            raise JobError(
                f"--epochs {self.cfg.epochs} ends before the run in {self.manager.store.uri}, "
                f"which is {where} (step {run.step}) of the {planned} it planned: a resume cannot "
                "end a run before where it is, or without its last epoch's finish (TTA, the "
                f"recipe's end of run); pass --epochs {max(started, run.epoch + 1)} or "
                f"more (--epochs {planned} as planned), or start a new run with --resume never "
                "and another --checkpoint-uri")

    def _say_what_changed(self, state: dict, run: RunState) -> None:
        """One line for each allowed change (batch size, world size, --epochs)."""
        saved = state["config"]
        before = (saved.get("batch_size"), state.get("world_size", 1))
        now = (self.cfg.batch_size, self.d.world_size)
        if before != now and run.epoch_position:
            remaining = self.batches.remaining(run.epoch_position)
            left_out = len(self.batches.images) - run.epoch_position - remaining
            use = (f"{left_out} images at the end of that order are left out of it (the recipe "
                   "serves only whole batches)" if left_out
                   else "so each image is still used once in it")
            self.log(f"batch {now[0]} × {now[1]} processes (the run had {before[0]} × {before[1]}): "
                     f"continuing epoch {run.epoch + 1} at image {run.epoch_position} of its order "
                     f"with {remaining} images more; {use}")
        elif before != now:
            self.log(f"batch {now[0]} × {now[1]} processes from here (the run had "
                     f"{before[0]} × {before[1]})")
        if saved.get("epochs") != self.cfg.epochs and self.cfg.lr_schedule != "constant":
            self.log(f"--epochs {self.cfg.epochs} (the run had {saved.get('epochs')}): the "
                     f"{self.cfg.lr_schedule} learning-rate schedule now spans {self.cfg.epochs} epochs")

    def due(self, run: RunState) -> bool:
        """The mid-epoch rule: every --checkpoint-every-steps steps, except at an epoch's last
        step, whose checkpoint follows its evaluation."""
        return bool(self.every_steps and run.step % self.every_steps == 0
                    and self.batches.remaining(run.epoch_position) > 0)

    def save(self, run: RunState, tracker, *, force: bool = False,
             val_acc: float | None = None) -> bool:
        """Write a checkpoint of `run` when due (or `force`d: at an epoch end, with its
        validation accuracy, or when stopping); returns whether one was written."""
        if self.d.is_main:
            self.manager.check_held()  # a lease lost mid-epoch stops the run now, not at its end
        if not (force or self.due(run)):
            return False
        if run.epoch_step:  # inside an epoch: carry its loss so far (and stop if diverged)
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
            "model": self.model.state_dict(), **self.training.state_dict(),
            "epoch": run.epoch, "epoch_step": run.epoch_step, "step": run.step,
            "epoch_loss": list(run.epoch_loss), "metrics": run.history,
            "config": self.cfg.to_dict(), "rng": rng_states(self.d.device),
            "data_sha256": self.data_sha256, "world_size": self.d.world_size,
            "wandb_run_id": wandb_run_id, "epoch_position": run.epoch_position, "run": run.run,
        }
