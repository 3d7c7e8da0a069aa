"""The training loop, top to bottom; the only module that wires the others together."""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from job import distributed, tracking
from job.checkpoint import Checkpointer, CheckpointManager, RunState
from job.config import TrainConfig, preset, uses_bf16
from job.data import DeviceBatches, FastBatches, ImageSplits, check_cache_dir, fetch_archives, load_splits
from job.distributed import Dist
from job.errors import JobError
from job.evaluation import evaluate
from job.models import build_model, init_whitening
from job.optim import WHITENING_BIAS_EPOCHS, Adam, Lookahead, fast_sgd
from job.preemption import PREEMPTED_EXIT_CODE, StopRequest
from job.progress import EpochProgress, say
from job.step import (
    TrainStep,
    choose_cuda_kernels,
    mean_cross_entropy,
    resolve_compile,
    summed_smoothed_cross_entropy,
)
from job.storage import check_output_file
from job.summary import build_summary, process_seconds, provenance, write_summary

RECORD_INDICES_ENV = "CNN_JOB_RECORD_INDICES"  # PATH: each rank appends its batches' indices


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as configured; returns the summary (rank 0's is complete)."""
    d = distributed.setup(cfg.device, cfg.collective_timeout_s)
    checkpoints = CheckpointManager(cfg.checkpoint_uri, cfg.keep_checkpoints,
                                    cfg.s3_endpoint_url, log=functools.partial(say, d.is_main))
    try:
        return _train(cfg, d, checkpoints)
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
    paths = fetch_archives(p, cfg.data_uri, cfg.cache_dir, cfg.s3_endpoint_url)
    splits = load_splits(p, paths, cfg.cache_dir)
    if cfg.limit_train is not None:
        splits.train_images = splits.train_images[: cfg.limit_train]
        splits.train_labels = splits.train_labels[: cfg.limit_train]
    if len(splits.train_images) < d.world_size:
        raise JobError(f"--limit-train {cfg.limit_train} leaves fewer images than processes")
    return splits


TRIANGLE_PEAK = 0.23  # of the run, where the triangle schedule peaks
WHITENING_IMAGES = 5000  # the fast net's whitening filters come from the first this many images


def lr_at(cfg: TrainConfig, done: int, total: int) -> float:
    """Learning rate for the step about to run: a pure function of the run's progress, `done`
    of `total` (images, so that it means the same at any batch size or world size)."""
    progress = min(done / total, 1.0)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1 - progress)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "triangle":  # airbench94's: 0.2 → 1 over the first 23%, then → 0.07
        rise = progress / TRIANGLE_PEAK
        fall = (progress - TRIANGLE_PEAK) / (1 - TRIANGLE_PEAK)
        return cfg.lr * (0.2 + 0.8 * rise if progress < TRIANGLE_PEAK else 1 - 0.93 * fall)
    return cfg.lr


class Throughput:
    """Images per second between successive reads."""

    def __init__(self) -> None:
        self.started, self.images = time.perf_counter(), 0

    def read(self) -> float:
        now = time.perf_counter()
        rate = self.images / max(now - self.started, 1e-9)
        self.started, self.images = now, 0
        return rate


def gpu_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"gpu/max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "gpu/max_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


# ----------------------------------------------------------------------------------------------
# setting up


@dataclass
class Setup:
    """What the loop works with, built once before it."""

    model: torch.nn.Module  # the net itself: evaluated and checkpointed
    step: TrainStep  # trains a batch: the net (in DDP under torchrun), eager or CUDA-graphed
    train_batches: DeviceBatches
    test_batches: DeviceBatches
    autocast: Callable  # a context manager factory: bf16 autocast, or a no-op
    checkpointer: Checkpointer
    environment: dict  # provenance: world size, device, precision, data sha256, versions, commit
    class_names: tuple[str, ...]
    say: Callable[[str], None]  # a line on rank 0's console
    lookahead: Lookahead | None = None  # the fast net's EMA copy (None for the seed nets)


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


def set_up(cfg: TrainConfig, d: Dist, checkpoints: CheckpointManager) -> Setup:
    say_main = functools.partial(say, d.is_main)
    step_mode = resolve_compile(cfg.compile, d.device, d.enabled)  # refused before any work
    error = None
    if d.is_main:
        try:
            claim_outputs(cfg, checkpoints)
        except JobError as refused:
            error = refused
    distributed.fail_together(d, error)

    splits = load_data(cfg, d)
    p = preset(cfg.dataset)
    torch.manual_seed(cfg.seed)
    choose_cuda_kernels(d.device)
    model = build_model(cfg.dataset, cfg.net).to(d.device, memory_format=torch.channels_last)
    # fused: one kernel for all parameters, on CUDA and CPU alike (+5-15% images/s on CPU here)
    optimizer = Adam(model.parameters(), cfg.lr) if cfg.net == "seed" else None
    train_batches = (FastBatches if cfg.net == "fast" else DeviceBatches)(
        splits.train_images, splits.train_labels, p, d.device, cfg.batch_size, shuffle=True,
        augment=cfg.augment, seed=cfg.seed, rank=d.rank, world_size=d.world_size,
    )
    lookahead, criterion = None, mean_cross_entropy
    if cfg.net == "fast":
        optimizer, lookahead, criterion = set_up_fast(model, train_batches, cfg.lr)
    test_batches = DeviceBatches(
        splits.test_images, splits.test_labels, p, d.device, cfg.eval_batch_size,
        shuffle=False, rank=d.rank, world_size=d.world_size,
    )
    # An audit trail of which images each rank trained on, in order (tests read it).
    train_batches.record_to = os.environ.get(RECORD_INDICES_ENV) or None
    bf16 = uses_bf16(cfg.precision, d.device.type)
    autocast = functools.partial(torch.autocast, d.device.type, torch.bfloat16, enabled=bf16)
    return Setup(
        model=model,
        step=TrainStep(DistributedDataParallel(model) if d.enabled else model, optimizer,
                       autocast, graphed=step_mode == "cuda-graph", say=say_main,
                       batch_size=cfg.batch_size, criterion=criterion),
        train_batches=train_batches,
        test_batches=test_batches,
        autocast=autocast,
        checkpointer=Checkpointer(checkpoints, cfg, d, model, optimizer, splits.sha256,
                                  train_batches.remaining, lookahead),
        environment=provenance(d.world_size, d.device, bf16, splits.sha256, step_mode),
        class_names=p.class_names,
        say=say_main,
        lookahead=lookahead,
    )


def set_up_fast(model: torch.nn.Module, train_batches: FastBatches, lr: float):
    """The fast net's whitening filters (from the first normalised training images, on the
    device), its SGD, lookahead and loss, for the batches' batch size and world size."""
    batch_size, world_size = train_batches.batch_size, train_batches.world_size
    if not train_batches.remaining(0):
        raise JobError(f"--batch-size {batch_size} × {world_size} processes is more than the "
                       f"{len(train_batches.images)} training images: --net fast drops an epoch's "
                       "last partial batch, so no step would run; lower --batch-size")
    first = train_batches.images[:WHITENING_IMAGES].permute(0, 3, 1, 2).float()
    init_whitening(model, first * train_batches.scale + train_batches.shift)
    optimizer = fast_sgd(model, lr, batch_size * world_size)
    return optimizer, Lookahead(model), summed_smoothed_cross_entropy(world_size)


def start_tracker(cfg: TrainConfig, d: Dist, job: Setup, run_id: str | None):
    """W&B on rank 0, continuing the checkpointed run's W&B run when there is one."""
    return tracking.start(
        enabled=d.is_main, mode=cfg.wandb_mode, project=cfg.wandb_project, run_name=cfg.run_name,
        run_id=run_id, config={**cfg.to_dict(), **job.environment},
        class_names=job.class_names, say=job.say,
    )


# ----------------------------------------------------------------------------------------------
# the loop


def _train(cfg: TrainConfig, d: Dist, checkpoints: CheckpointManager) -> dict:
    job = set_up(cfg, d, checkpoints)
    batches, checkpointer = job.train_batches, job.checkpointer
    run = checkpointer.resume() if cfg.resume == "auto" else RunState()
    tracker = start_tracker(cfg, d, job, run.wandb_run_id)
    epoch_images = batches.remaining(0)  # all ranks' images in a whole epoch
    job.say(f"training {cfg.dataset} on {d.world_size} × {d.device.type}: "
            f"{epoch_images} images/epoch, batch {cfg.batch_size}/process")

    train_seconds, trained_images, first_step_s = 0.0, 0, None
    with tracker, StopRequest() as stop:
        while run.epoch < cfg.epochs and not stop.decided(d):  # all ranks, after each epoch
            run.begin_epoch(d)
            if cfg.net == "fast":  # its whitening bias trains in the first epochs only
                job.step.optimizer.set_lr_scale("whitening_bias", run.epoch < WHITENING_BIAS_EPOCHS)
            description = f"epoch {run.epoch + 1}/{cfg.epochs}"
            started, throughput = time.perf_counter(), Throughput()
            with EpochProgress(description, batches.per_rank, d.is_main, d.world_size,
                               run.epoch_position // d.world_size) as bar:
                for images, labels in batches.epoch(run.epoch, run.epoch_position):
                    lr = lr_at(cfg, run.epoch * epoch_images + run.epoch_position,
                               cfg.epochs * epoch_images)
                    first_step_s = first_step_s or process_seconds()  # start-up, measured
                    loss = job.step(images, labels, lr)  # a device tensor: no sync here
                    run.advance(loss, labels.numel(), d.world_size)
                    if job.lookahead:
                        job.lookahead.after_step(run.step, (run.epoch * epoch_images + run.epoch_position)
                                                 / (cfg.epochs * epoch_images))
                    trained_images += labels.numel() * d.world_size
                    throughput.images += labels.numel() * d.world_size
                    status = None
                    if run.step % cfg.log_every_steps == 0:  # .item() syncs a GPU: not every step
                        loss_value = loss.item()
                        if not d.enabled:  # under DDP, ranks stop together at the next save
                            run.check_finite(loss_value)
                        status = f"loss {loss_value:.4f}"
                        tracker.log({"train/loss": loss_value, "train/lr": lr,
                                     "train/images_per_second": throughput.read(),
                                     "epoch": run.epoch + run.epoch_position / epoch_images}, run.step)
                    bar.advance(labels.numel(), status)
                    if stop.agreed(d, run.step):
                        break
                    checkpointer.save(run, tracker)  # when due (--checkpoint-every-steps)
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            train_seconds += time.perf_counter() - started

            if batches.remaining(run.epoch_position):  # stopped inside the epoch
                checkpointer.save(run, tracker, force=True)
                break
            run.sync_epoch_loss(d)
            final = run.epoch + 1 == cfg.epochs
            if job.lookahead and final:
                job.lookahead.finish()  # the run's final weights are the EMA's, BN statistics too
            # Test-time augmentation costs 6 forward passes an image: only the final evaluation,
            # the one the run reports, makes them (as airbench does); the others see the net as is.
            evaluation = evaluate(job.model, job.test_batches, d, job.autocast, len(job.class_names),
                                  cfg.tta and final)
            run.end_epoch(evaluation)
            tracker.log({"train/epoch_loss": run.history[-1]["train_loss"], "val/loss": evaluation.loss,
                         "val/acc": evaluation.accuracy, "epoch": run.epoch,
                         **gpu_memory(d.device)}, run.step)
            tracker.log_evaluation(evaluation, run.step)
            checkpointer.save(run, tracker, force=True, val_acc=evaluation.accuracy)
            job.say(f"{description}  train_loss {run.history[-1]['train_loss']:.4f}  "
                    f"val_loss {evaluation.loss:.4f}  val_acc {evaluation.accuracy:.2%}"
                    + (" (TTA)" if evaluation.tta else ""))

        preempted_by = stop.signal_name if run.epoch < cfg.epochs else None
        if preempted_by:
            job.say(f"preempted by {preempted_by} at step {run.step}: checkpoint "
                    f"{checkpointer.location} written; run the same command to resume "
                    f"(exit status {PREEMPTED_EXIT_CODE})")
        summary = {**build_summary(cfg.dataset, run, train_seconds, trained_images,
                                   checkpointer.location, preempted_by, tracker.run_id,
                                   # how steps ran in the end (a failed capture runs eagerly)
                                   {**job.environment, "compile": job.step.mode}, first_step_s),
                   "net": cfg.net, "tta": cfg.tta, **gpu_memory(d.device)}
        if d.is_main and cfg.summary_json and not preempted_by:
            write_summary(Path(cfg.summary_json), summary)
        tracker.close(summary, wait_s=tracking.WAIT_AFTER_STOP_S if preempted_by else None)
        # Leave together, still under StopRequest (a late signal cannot split the ranks' exit
        # statuses): rank 0 may still be writing, and a rank that tears its process group down
        # while a peer is mid-exchange can be aborted by Gloo.
        distributed.barrier(d)
    return summary
