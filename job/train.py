"""The training loop, top to bottom; the only module that wires the others together."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel

from job import distributed, recipes, tracking, trainer_status
from job.batches import DeviceBatches
from job.checkpoint import Checkpointer, CheckpointManager, RunState
from job.config import TrainConfig, uses_bf16
from job.data import ImageSplits, check_cache_dir, fetch_archives, load_splits
from job.datasets import preset
from job.distributed import Dist
from job.errors import JobError
from job.evaluation import evaluate
from job.optim import lr_at
from job.preemption import PREEMPTED_EXIT_CODE, StopRequest
from job.progress import EpochProgress, say, set_last_line
from job.recipes.base import Recipe, Training
from job.step import TrainStep, autocast_for, resolve_compile, tune_device
from job.storage import check_output_file
from job.summary import build_summary, process_seconds, provenance, write_summary

if TYPE_CHECKING:
    from job.sweep import Trial

RECORD_INDICES_ENV = "CNN_JOB_RECORD_INDICES"  # PATH: each rank appends its batches' indices


def train(cfg: TrainConfig, trial: Trial | None = None) -> dict:
    """Run (or resume) training as configured; returns the summary (rank 0's is complete).
    `trial`: a sweep's trial (job/sweep.py, one process), which adds its keys to W&B's config
    and, at each epoch's start, may stop the run early (its summary says why, under "pruned")."""
    clock = Clock()
    d = distributed.setup(cfg.device, cfg.collective_timeout_s)
    torch.empty(0, device=d.device)  # CUDA's context is made here, not inside a later phase
    clock.mark("device_init")
    checkpoints = CheckpointManager(cfg.checkpoint_uri, cfg.keep_checkpoints,
                                    cfg.s3_endpoint_url, log=functools.partial(say, d.is_main),
                                    retry_s=cfg.storage_retry_s)
    try:
        return _train(cfg, d, checkpoints, clock, trial)
    finally:
        checkpoints.release()  # the next job on this run need not wait for the lease to expire
        distributed.teardown(d)


# ----------------------------------------------------------------------------------------------
# helpers the loop calls


def load_data(cfg: TrainConfig, d: Dist) -> ImageSplits:
    """The dataset's splits. Each archive's file lock makes one process per machine download it
    while the others wait, outside any collective (a download is not bounded by the collective
    timeout)."""
    p = preset(cfg.dataset)
    paths = fetch_archives(p, cfg.data_uri, cfg.cache_dir, cfg.s3_endpoint_url, cfg.storage_retry_s)
    splits = load_splits(p, paths, cfg.cache_dir)
    if cfg.limit_train is not None:
        splits.train_images = splits.train_images[: cfg.limit_train]
        splits.train_labels = splits.train_labels[: cfg.limit_train]
    if len(splits.train_images) < d.world_size:
        raise JobError(f"--limit-train {cfg.limit_train} leaves fewer images than processes")
    return splits


class Clock:
    """The run's timings: the start-up phase by phase until the first step, seconds spent
    training (epochs, evaluation excluded), the images they trained, and images per second
    between log steps."""

    def __init__(self) -> None:
        self.train_seconds, self.trained_images = 0.0, 0
        # (phase, seconds since the process started when it ended), from the process's start:
        # the phases' seconds add up to the time to the first step.
        self.marks: list[tuple[str, float]] = []
        self.mark("interpreter_and_imports")
        self.begin_epoch()

    def mark(self, phase: str) -> None:
        """`phase` of the start-up has just ended."""
        self.marks.append((phase, process_seconds()))

    @property
    def seconds_to_first_step(self) -> float | None:
        return self.marks[-1][1] if self.marks[-1][0] == "until_the_loop" else None

    def startup_s(self) -> dict[str, float]:
        """Each start-up phase's seconds, in order."""
        ends = [0.0] + [end for _, end in self.marks]
        return {phase: end - ends[index] for index, (phase, end) in enumerate(self.marks)}

    def begin_epoch(self) -> None:
        self.epoch_started = self.since = time.perf_counter()
        self.images_since = 0

    def before_step(self) -> None:
        if self.seconds_to_first_step is None:
            self.mark("until_the_loop")  # the loop's own start: the epoch, the progress bar

    def count(self, images: int) -> None:
        self.trained_images += images
        self.images_since += images

    def images_per_second(self) -> float:
        """Since the previous call (or the epoch's start)."""
        now = time.perf_counter()
        rate = self.images_since / max(now - self.since, 1e-9)
        self.since, self.images_since = now, 0
        return rate

    def end_epoch(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.train_seconds += time.perf_counter() - self.epoch_started


def gpu_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"gpu/max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "gpu/max_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


# ----------------------------------------------------------------------------------------------
# setting up


@dataclass
class Trainer:
    """What trains: the recipe's net, its Training and the step, over the batches."""

    recipe: Recipe  # the --net's recipe for this dataset
    model: torch.nn.Module  # the net itself: evaluated and checkpointed
    training: Training  # the recipe's optimiser, loss and step/epoch hooks for this run
    step: TrainStep  # trains a batch: the net (in DDP under torchrun), eager or CUDA-graphed
    train_batches: DeviceBatches
    test_batches: DeviceBatches
    autocast: Callable  # a context manager factory: bf16 autocast, or a no-op


@dataclass
class Setup(Trainer):
    """What the loop works with, built once before it."""

    checkpointer: Checkpointer
    environment: dict  # provenance: world size, device, precision, data sha256, versions, commit
    class_names: tuple[str, ...]
    say: Callable[[str], None]  # a line on rank 0's console


def claim_outputs(cfg: TrainConfig, checkpoints: CheckpointManager) -> None:
    """Before any work, never after an epoch: the outputs can be written, this job is the run's
    one writer, and --resume never does not silently mix two runs in one folder. The files first,
    which create nothing, so that a refused one leaves no checkpoint folder behind."""
    if cfg.summary_json:
        check_output_file(Path(cfg.summary_json), "--summary-json")
    if record := os.environ.get(RECORD_INDICES_ENV):
        check_output_file(Path(f"{record}.rank0"), RECORD_INDICES_ENV)
    check_cache_dir(cfg.cache_dir)
    checkpoints.check_writable()
    checkpoints.hold(cfg.lease_seconds)
    if cfg.resume == "never" and checkpoints.holds_a_run():
        if not cfg.overwrite:
            raise JobError(
                f"--resume never, but {checkpoints.store.uri} already holds a run (newest "
                f"{(checkpoints.names() or ['only a pointer'])[0]}): pass --overwrite to delete it "
                "and start afresh, or another --checkpoint-uri")
        deleted = checkpoints.clear()
        checkpoints.log(f"--overwrite: deleted {len(deleted)} files of the earlier run in "
                        f"{checkpoints.store.uri}")


def set_up(cfg: TrainConfig, d: Dist, checkpoints: CheckpointManager, clock: Clock) -> Setup:
    say_main = functools.partial(say, d.is_main)
    step_mode = resolve_compile(cfg.compile, d.device, d.enabled)  # refused before any work
    error = None
    if d.is_main:
        try:
            claim_outputs(cfg, checkpoints)
        except JobError as refused:
            error = refused
    distributed.fail_together(d, error)
    clock.mark("claim_outputs")

    splits = load_data(cfg, d)
    clock.mark("read_data")
    trainer = build_trainer(cfg, d, splits, step_mode, say_main, clock.mark)
    # An audit trail of which images each rank trained on, in order (tests read it).
    trainer.train_batches.record_to = os.environ.get(RECORD_INDICES_ENV) or None
    return Setup(
        **vars(trainer),
        checkpointer=Checkpointer(checkpoints, cfg, d, trainer.model, trainer.training,
                                  splits.sha256, trainer.train_batches),
        environment=provenance(d.world_size, d.device, uses_bf16(cfg.precision, d.device.type),
                               splits.sha256, step_mode),
        class_names=preset(cfg.dataset).class_names,
        say=say_main,
    )


def build_trainer(cfg: TrainConfig, d: Dist, splits: ImageSplits, step_mode: str,
                  say: Callable[[str], None], mark: Callable[[str], None] = lambda phase: None
                  ) -> Trainer:
    """The recipe's net (seeded), its batches of `splits` on the device, its Training and the
    step (`step_mode` as resolve_compile gave it): what the loop trains with, and what bench/
    builds its runs from. `mark` is told each phase of the start-up as it ends."""
    recipe = recipes.load(cfg.dataset, cfg.net)
    torch.manual_seed(cfg.seed)
    tune_device(d.device)
    model = recipe.build_model().to(d.device, memory_format=torch.channels_last)
    mark("model_build")
    train_batches = recipe.train_batches(
        splits.train_images, splits.train_labels, d.device, cfg.batch_size, augment=cfg.augment,
        seed=cfg.seed, rank=d.rank, world_size=d.world_size)
    test_batches = DeviceBatches(
        splits.test_images, splits.test_labels, recipe.dataset, d.device, cfg.eval_batch_size,
        shuffle=False, rank=d.rank, world_size=d.world_size,
    )
    mark("data_to_device")
    training = recipe.start(model, train_batches, cfg.lr)  # e.g. whitening filters, optimiser
    mark("recipe_start")
    autocast = autocast_for(cfg.precision, d.device)
    step = TrainStep(DistributedDataParallel(model) if d.enabled else model, training.optimizer,
                     autocast, graphed=step_mode == "cuda-graph", say=say,
                     batch_size=cfg.batch_size, criterion=training.criterion)
    return Trainer(recipe, model, training, step, train_batches, test_batches, autocast)


def start_tracker(cfg: TrainConfig, d: Dist, job: Setup, run_id: str | None, trial: Trial | None):
    """W&B on rank 0, continuing the checkpointed run's W&B run when there is one; and the
    progress reports to Kubeflow Trainer where the pod's environment names its status server."""
    wandb = tracking.start(
        enabled=d.is_main, mode=cfg.wandb_mode, project=cfg.wandb_project, run_name=cfg.run_name,
        run_id=run_id,
        config={**cfg.to_dict(), **job.environment, **(trial.tracking if trial else {})},
        class_names=job.class_names, say=job.say,
    )
    return trainer_status.alongside(wandb, enabled=d.is_main, epochs=cfg.epochs, say=job.say)


def log_step(cfg: TrainConfig, d: Dist, run: RunState, tracker, loss: torch.Tensor, lr: float,
             clock: Clock, epoch_images: int) -> str | None:
    """At every --log-every-steps step: the loss read (a sync on a GPU, so not every step) and
    checked, and W&B's train curves; returns the progress bar's status then."""
    if run.step % cfg.log_every_steps:
        return None
    loss_value = loss.item()
    if not d.enabled:  # under DDP, ranks stop together at the next save
        run.check_finite(loss_value)
    tracker.log({"train/loss": loss_value, "train/lr": lr,
                 "train/images_per_second": clock.images_per_second(),
                 "epoch": run.epoch + run.epoch_position / epoch_images}, run.step)
    return f"loss {loss_value:.4f}"


def end_epoch(cfg: TrainConfig, d: Dist, job: Setup, run: RunState, tracker) -> None:
    """A completed epoch: its loss summed over ranks, the test split evaluated, W&B told, a
    checkpoint written and the epoch's line printed."""
    run.sync_epoch_loss(d)
    final = run.epoch + 1 == cfg.epochs
    if final:
        job.training.end_run()
    # Test-time augmentation costs a forward pass per view: only the final evaluation, the one
    # the run reports, makes them (as airbench does); the others see the net as it is.
    evaluation = evaluate(job.model, job.test_batches, d, job.autocast, len(job.class_names),
                          job.recipe.tta if cfg.tta and final else None)
    run.end_epoch(evaluation)
    tracker.log({"train/epoch_loss": run.history[-1]["train_loss"], "val/loss": evaluation.loss,
                 "val/acc": evaluation.accuracy, "epoch": run.epoch, **gpu_memory(d.device)},
                run.step)
    tracker.log_evaluation(evaluation, run.step)
    job.checkpointer.save(run, tracker, force=True, val_acc=evaluation.accuracy)
    job.say(f"epoch {run.epoch}/{cfg.epochs}  train_loss {run.history[-1]['train_loss']:.4f}  "
            f"val_loss {evaluation.loss:.4f}  val_acc {evaluation.accuracy:.2%}"
            + (" (TTA)" if evaluation.tta else ""))


def finish(cfg: TrainConfig, d: Dist, job: Setup, run: RunState, tracker, clock: Clock,
           stopped_by: str | None, pruned: str | None) -> dict:
    """The run's summary: said, written (--summary-json) and sent to W&B, which is closed."""
    preempted_by = stopped_by if run.epoch < cfg.epochs else None
    if preempted_by:
        job.say(f"preempted by {preempted_by} at step {run.step}: checkpoint "
                f"{job.checkpointer.location} written; run the same command to resume "
                f"(exit status {PREEMPTED_EXIT_CODE})")
    summary = {**build_summary(cfg.dataset, run, clock.train_seconds, clock.trained_images,
                               job.checkpointer.location, preempted_by, tracker.run_id,
                               # how steps ran in the end (a failed capture runs eagerly)
                               {**job.environment, "compile": job.step.mode},
                               clock.seconds_to_first_step),
               "net": cfg.net, "tta": cfg.tta, "startup_s": clock.startup_s(),
               "first_steps_s": job.step.first_steps_s, **gpu_memory(d.device),
               **({"pruned": pruned} if pruned else {})}
    if d.is_main and cfg.summary_json and not preempted_by:
        write_summary(Path(cfg.summary_json), summary)
    if d.is_main:  # how the run ended, in one line: the pod's termination message
        set_last_line(_last_line(summary, run))
    tracker.close(summary)  # W&B gets at most tracking.WAIT_AT_CLOSE_S, stopped or finished
    return summary


def _last_line(summary: dict, run: RunState) -> str:
    if summary["preempted_by"]:  # the epoch it stopped in, counted from 1 as the progress lines do
        epoch = run.epoch + (1 if run.epoch_position else 0)
        return f"stopped at epoch {epoch}, step {run.step}: run the same command to resume"
    val_acc = summary["final_val_acc"]
    return (f"done: val_acc {'-' if val_acc is None else format(val_acc, '.2%')} at step "
            f"{summary['steps']}, model {summary['checkpoint']}")


# ----------------------------------------------------------------------------------------------
# the loop


def _train(cfg: TrainConfig, d: Dist, checkpoints: CheckpointManager, clock: Clock,
           trial: Trial | None) -> dict:
    job = set_up(cfg, d, checkpoints, clock)
    batches, checkpointer = job.train_batches, job.checkpointer
    run = checkpointer.resume() if cfg.resume == "auto" else RunState()
    clock.mark("resume")
    tracker = start_tracker(cfg, d, job, run.wandb_run_id, trial)
    clock.mark("tracker_start")
    epoch_images = batches.remaining(0)  # all ranks' images in a whole epoch
    job.say(f"training {cfg.dataset} (--net {cfg.net}) on {d.world_size} × {d.device.type}: "
            f"{epoch_images} images/epoch, batch {cfg.batch_size}/process")

    pruned = None  # why a sweep's early stopping ended the trial here
    with tracker, StopRequest() as stop:
        while run.epoch < cfg.epochs and not stop.decided(d):  # all ranks, after each epoch
            if trial and (pruned := trial.after_epochs(run.history)):  # its rung's decision
                break
            run.begin_epoch(d)
            job.training.begin_epoch(run.epoch)
            clock.begin_epoch()
            with EpochProgress(f"epoch {run.epoch + 1}/{cfg.epochs}", batches.per_rank, d.is_main,
                               d.world_size, run.epoch_position // d.world_size) as bar:
                for images, labels in batches.epoch(run.epoch, run.epoch_position):
                    lr = lr_at(cfg.lr_schedule, cfg.lr, run.progress(epoch_images, cfg.epochs))
                    clock.before_step()
                    loss = job.step(images, labels, lr)  # a device tensor: no sync here
                    run.advance(loss, labels.numel(), d.world_size)
                    job.training.after_step(run.step, run.progress(epoch_images, cfg.epochs))
                    clock.count(labels.numel() * d.world_size)
                    status = log_step(cfg, d, run, tracker, loss, lr, clock, epoch_images)
                    bar.advance(labels.numel(), status)
                    if stop.agreed(d, run.step):
                        break
                    checkpointer.save(run, tracker)  # when due (--checkpoint-every-steps)
            clock.end_epoch(d.device)
            if batches.remaining(run.epoch_position):  # stopped inside the epoch
                checkpointer.save(run, tracker, force=True)
                break
            end_epoch(cfg, d, job, run, tracker)

        summary = finish(cfg, d, job, run, tracker, clock, stop.signal_name, pruned)
        # Leave together, still under StopRequest (a late signal cannot split the ranks' exit
        # statuses): rank 0 may still be writing, and a rank that tears its process group down
        # while a peer is mid-exchange can be aborted by Gloo.
        distributed.barrier(d)
    return summary
