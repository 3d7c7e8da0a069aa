"""The optimisers' flat buffers against their per-tensor path (FLAT_BUFFERS in job/optim.py), on
the CPU: images per second of the eager training step (job/step.py's TrainStep) of the seed
MNIST and CIFAR-10 nets (Adam, batch 64) and of the fast net (SGD in three groups, batch 256),
each built by train's own set-up (job/train.py's build_trainer: the recipe's net, optimiser,
loss and step) over random images (speed only). In each run a fresh net and optimiser of each
setting take turns, ten steps at a time, so that a busy machine slows both alike. The process's
host memory is set up as the job's (job/step.py's tune_device): both settings then reuse their
steps' memory. Left to glibc's adaptive thresholds, the two in one process hid what the flat
buffers cost alone in a training run (the per-tensor net's gradients kept the heap from being
trimmed for both); `make bench BASELINE=<rev>`'s whole epochs are what a speed claim rests on.

    .venv/bin/python bench/optim_speed.py [--runs 3] [--steps 300] [--fast-steps 40] [--json F]

It prints one JSON line per run and setting, then a Markdown table: the medians of the runs,
the ratio of the medians and of each run's pair, the fastest block each setting ran, and the
optimiser's update alone (microseconds, fastest).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from job import distributed, optim
from job.config import TrainConfig
from job.data import ImageSplits
from job.datasets import preset
from job.step import TrainStep, tune_device
from job.train import Trainer, build_trainer

# row -> (dataset, --net, batch size, the option that gives its timed steps)
NETS = {"mnist seed": ("mnist", "seed", 64, "steps"),
        "cifar10 seed": ("cifar10", "seed", 64, "steps"),
        "cifar10 fast": ("cifar10", "fast", 256, "fast_steps")}
WARMUP_STEPS = 5  # untimed: the first steps allocate the states and warm the caches
BLOCK_STEPS = 10  # the two settings take turns this many steps at a time
UPDATE_BLOCKS = 20  # blocks of optimiser updates alone, per setting


def random_splits(dataset: str, images: int) -> ImageSplits:
    """`images` random uint8 images of the dataset's shape, and labels, as both splits."""
    p, generator = preset(dataset), torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (images, p.image_size, p.image_size, p.channels),
                           dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, len(p.class_names), (images,), generator=generator)
    return ImageSplits(pixels, labels, pixels, labels, sha256={})


def built(dataset: str, net: str, batch_size: int, flat: bool, splits: ImageSplits) -> Trainer:
    """A fresh net, its recipe's optimiser (flat or per-tensor), loss and eager step, in fp32 on
    the CPU, as train sets them up."""
    optim.FLAT_BUFFERS = flat  # read when the optimiser is built
    cfg = TrainConfig(dataset=dataset, net=net, batch_size=batch_size, device="cpu",
                      precision="fp32", compile="off")
    return build_trainer(cfg, distributed.setup(cfg.device), splits, "off", print)


def one_run(dataset: str, net: str, batch_size: int, steps: int) -> dict[bool, dict]:
    """Per setting (flat or not): images per second of `steps` steps and of its fastest block
    (the least disturbed by the machine's other work), and the microseconds of the optimiser's
    update alone (its fastest block, after the last step's backward). The settings take turns
    in blocks of BLOCK_STEPS, flat first in even blocks and second in odd ones."""
    splits = random_splits(dataset, 8 * batch_size)
    trainers = {flat: built(dataset, net, batch_size, flat, splits) for flat in (True, False)}
    batches = list(trainers[True].train_batches.epoch(0))  # 8, made before any timing
    steppers: dict[bool, TrainStep] = {flat: trainer.step for flat, trainer in trainers.items()}
    blocks_s: dict[bool, list[float]] = {flat: [] for flat in steppers}
    for step in steppers.values():
        for index in range(WARMUP_STEPS):
            step(*batches[index % len(batches)], 1e-3)
    for block in range(0, steps, BLOCK_STEPS):
        for flat in (True, False) if block // BLOCK_STEPS % 2 == 0 else (False, True):
            started = time.perf_counter()
            for index in range(block, block + BLOCK_STEPS):
                steppers[flat](*batches[index % len(batches)], 1e-3)
            blocks_s[flat].append(time.perf_counter() - started)
    update_blocks_s: dict[bool, list[float]] = {flat: [] for flat in steppers}
    for _ in range(UPDATE_BLOCKS):
        for flat, step in steppers.items():
            started = time.perf_counter()
            for _ in range(BLOCK_STEPS):
                step.optimizer.step()
            update_blocks_s[flat].append(time.perf_counter() - started)
    return {flat: {"images_per_second": len(s) * BLOCK_STEPS * batch_size / sum(s),
                   "best_block_images_per_second": BLOCK_STEPS * batch_size / min(s),
                   "update_us": 1e6 * min(update_blocks_s[flat]) / BLOCK_STEPS}
            for flat, s in blocks_s.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each setting per net")
    parser.add_argument("--steps", type=int, default=300, help="timed steps of a seed net's run")
    parser.add_argument("--fast-steps", type=int, default=40, help="timed steps of the fast net's")
    parser.add_argument("--json", type=Path, default=None, help="also write the runs here")
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    args = parser.parse_args()
    tune_device(torch.device("cpu"))
    rows = []
    for name in args.nets:
        dataset, net, batch_size, steps_option = NETS[name]
        steps = getattr(args, steps_option)
        for run in range(args.runs):
            for flat, figures in one_run(dataset, net, batch_size, steps).items():
                row = {"net": name, "batch": batch_size, "run": run, "flat": flat, "steps": steps,
                       **{key: round(value, 1) for key, value in figures.items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\n{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| net | batch | flat images/s: median (runs) | per-tensor | flat / per-tensor: "
          "medians (each run) | best blocks: flat, per-tensor | update µs: flat, per-tensor "
          "|\n|---|---:|---|---|---|---|---|")
    for name in args.nets:
        flat, per_tensor = ([r for r in rows if r["net"] == name and r["flat"] == setting]
                            for setting in (True, False))
        rates = [[r["images_per_second"] for r in setting] for setting in (flat, per_tensor)]
        ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(*rates))
        best = [max(r["best_block_images_per_second"] for r in setting)
                for setting in (flat, per_tensor)]
        update = [min(r["update_us"] for r in setting) for setting in (flat, per_tensor)]
        print(f"| {name} | {NETS[name][2]} | "
              + " | ".join(f"{statistics.median(r):.0f} ({', '.join(f'{v:.0f}' for v in r)})"
                           for r in rates)
              + f" | {statistics.median(rates[0]) / statistics.median(rates[1]):.2f} ({ratios}) | "
              f"{best[0]:.0f}, {best[1]:.0f} | {update[0]:.0f}, {update[1]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
