"""`make bench`: our pipeline against a seed-style one, side by side, plus 5-epoch accuracy.

Speed: one epoch of each dataset through
  - seed-style: uint8 arrays → PIL images → torchvision ToTensor/Normalize → DataLoader
    (2 workers, batch 64, shuffled), the same net (contiguous fp32) and Adam 1e-3, the way the
    origin write-up and torchvision's datasets do it;
  - ours: `cnn-job train DATASET --epochs 1` (on-device uint8 data, batched tensor ops,
    channels_last), timed by the job itself (`train_seconds` in its summary).
Accuracy: `cnn-job train DATASET` on defaults (5 epochs), its final validation accuracy.
Start-up: `cnn-job train DATASET --epochs 1 --limit-train 64` on a warm cache, W&B disabled,
three times: the median wall time of the process, and of its seconds from process start to the
first training step (`seconds_to_first_step` in its summary).
A recipe, `--nets DATASET/NET` for each (dataset, --net) of the registry (job/recipes; `mnist/fast`
is part of the default): its whole default run for each of --seeds, and for each its final
accuracy (with test-time augmentation where the recipe evaluates with it, what training
reports), that final checkpoint's without (`cnn-job evaluate --no-tta`, one evaluation pass),
its epochs, training seconds and images/s, and their means and spreads over the seeds.
Results print as markdown tables and are written to bench/results-<device>.json, the recipes'
under `recipes`, keyed DATASET/NET (the fields of the nets not run this time are kept, and so
are the runs recorded for other seeds: `--seeds 1` adds seed 1 to a recorded seed 0, and the
means and spreads cover both).

Against an earlier commit (`make bench BASELINE=<rev>`, `--baseline REV`): a worktree of REV
is checked out beside this one, and for each of --datasets, --rounds times, one training epoch
of the seed net by REV's code, one by this checkout's (the same command line, the same
interpreter and packages) and one of the seed-style reference, in turns whose order rotates
each round. It prints each one's images/s (median and spread over the rounds), the ratio of
ours to REV's and to the reference, and writes them to bench/compare-<device>.json. A speed
claim rests on this table: whole epochs, side by side, in one sitting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from job.data import fetch_archives, load_splits
from job.datasets import preset
from job.recipes import RECIPES, load

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "datasets"


class SeedStyleDataset(Dataset):
    """Like torchvision.datasets.MNIST/CIFAR10: uint8 arrays in memory, PIL per item."""

    def __init__(self, images, labels, mean, std):
        self.images = images.squeeze(-1).numpy() if images.shape[-1] == 1 else images.numpy()
        self.labels = labels.tolist()
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def seed_style_images_per_second(dataset: str, data_uri: str, device: str, limit: int | None):
    p = preset(dataset)
    splits = load_splits(p, fetch_archives(p, data_uri, Path(tempfile.gettempdir())))
    images, labels = splits.train_images[:limit], splits.train_labels[:limit]
    loader = DataLoader(
        SeedStyleDataset(images, labels, p.mean, p.std), batch_size=64, shuffle=True,
        num_workers=2, pin_memory=device == "cuda",
    )
    torch.manual_seed(0)
    model = load(dataset, "seed").build_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen = 0
    started = time.perf_counter()
    for batch_images, batch_labels in loader:
        batch_images, batch_labels = batch_images.to(device), batch_labels.to(device)
        loss = F.cross_entropy(model(batch_images), batch_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(batch_labels)
    if device == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def cnn_job(dataset: str, data_uri: str, device: str, workdir: Path, *extra: str,
            tree: Path = REPO) -> dict:
    """`cnn-job train` with the job's code of `tree` (this checkout, or another commit's
    worktree: the same interpreter and packages, `job` imported from there); its summary."""
    summary = workdir / f"{dataset}-{len(list(workdir.iterdir()))}.json"
    command = [
        sys.executable, "-m", "job", "train", dataset, "--data-uri", data_uri,
        "--device", device, "--resume", "never", "--overwrite", "--checkpoint-uri", str(workdir / "ckpt"),
        "--summary-json", str(summary), "--wandb-mode", "disabled", *extra,
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
    return {**json.loads(summary.read_text()), "wall_seconds": time.perf_counter() - started}


def one_epoch(side: str, tree: Path, dataset: str, data_uri: str, device: str,
              workdir: Path, limit: int | None) -> float:
    """Images/s of one training epoch of the seed net: by `tree`'s job, or the seed-style
    reference (side "seed_style")."""
    if side == "seed_style":
        return seed_style_images_per_second(dataset, data_uri, device, limit)
    limit_args = ["--limit-train", str(limit)] if limit else []
    return cnn_job(dataset, data_uri, device, workdir, "--epochs", "1", *limit_args,
                   tree=tree)["train_images_per_second"]


def compare(baseline: str, datasets: list[str], data_uri: str, device: str, rounds: int,
            workdir: Path, limit: int | None) -> dict:
    """One training epoch per side and round, rotating the order (see the module's doc)."""
    revision = subprocess.run(["git", "rev-parse", "--short", baseline], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout.strip()
    tree = workdir / f"baseline-{revision}"
    if "://" not in data_uri:  # each side runs in its own checkout
        data_uri = str(Path(data_uri).resolve())
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), revision], cwd=REPO,
                   check=True)
    try:
        table = {}
        for dataset in datasets:
            sides = {revision: tree, "ours": REPO, "seed_style": REPO}
            names, measured = list(sides), {name: [] for name in sides}
            for round_index in range(rounds):
                turn = names[round_index % len(names):] + names[:round_index % len(names)]
                for name in turn:
                    measured[name].append(
                        one_epoch(name, sides[name], dataset, data_uri, device, workdir, limit))
                    print(json.dumps({"dataset": dataset, "round": round_index + 1, "side": name,
                                      "images_per_second": measured[name][-1]}), flush=True)
            row = {name: {"images_per_second": values,
                          "median": statistics.median(values),
                          "spread": (max(values) - min(values)) / statistics.median(values)}
                   for name, values in measured.items()}
            row["ours_over_baseline"] = row["ours"]["median"] / row[revision]["median"]
            row["ours_over_seed_style"] = row["ours"]["median"] / row["seed_style"]["median"]
            row["baseline_over_seed_style"] = row[revision]["median"] / row["seed_style"]["median"]
            table[dataset] = row
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           check=True, capture_output=True, text=True).stdout.strip()
    return {"baseline": revision, "ours": head + ("+changes" if dirty else ""), "rounds": rounds,
            "device": device, "date": time.strftime("%Y-%m-%d"), "limit_train": limit,
            "datasets": table}


def print_comparison(result: dict) -> None:
    base, ours = result["baseline"], result["ours"]
    print(f"\n{result['date']}, {result['device']}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{result['rounds']} rounds: one epoch of the seed net, images/s (median, spread = "
          "(max - min) / median)\n")
    print(f"| dataset | {base} | {ours} | seed-style | {ours} / {base} | {ours} / seed-style | "
          f"{base} / seed-style |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dataset, row in result["datasets"].items():
        cells = [f"{row[side]['median']:,.0f} ± {row[side]['spread']:.0%}"
                 for side in (base, "ours", "seed_style")]
        print(f"| {dataset} | {' | '.join(cells)} | {row['ours_over_baseline']:.2f}× | "
              f"{row['ours_over_seed_style']:.2f}× | {row['baseline_over_seed_style']:.2f}× |")


def start_up(dataset: str, data_uri: str, device: str, workdir: Path, runs: int = 3) -> dict:
    """Median wall seconds of a 64-image, 1-epoch run (evaluation on the whole test split
    included) and median seconds from process start to its first step, on a warm cache."""
    cnn_job(dataset, data_uri, device, workdir, "--epochs", "1", "--limit-train", "64")  # warms
    results = [cnn_job(dataset, data_uri, device, workdir, "--epochs", "1", "--limit-train", "64")
               for _ in range(runs)]
    return {"wall_seconds": statistics.median(r["wall_seconds"] for r in results),
            "seconds_to_first_step": statistics.median(r["seconds_to_first_step"] for r in results)}


def recipe_runs(dataset: str, net: str, data_uri: str, device: str, workdir: Path,
                seeds: tuple[int, ...]) -> dict:
    """The recipe's whole default run once per seed: its final accuracy (with TTA where the
    recipe evaluates with it), and then that final checkpoint's without TTA (`cnn-job evaluate
    --no-tta`, one evaluation pass), epochs, training seconds, images/s and the wall time."""
    runs = []
    for seed in seeds:
        full = cnn_job(dataset, data_uri, device, workdir, "--net", net, "--seed", str(seed))
        run = {"seed": seed, "val_acc": full["final_val_acc"], "tta": full["tta"],
               "epochs": full["epochs"], "train_seconds": full["train_seconds"],
               "train_images_per_second": full["train_images_per_second"],
               "wall_seconds": full["wall_seconds"],
               "seconds_to_first_step": full["seconds_to_first_step"]}
        if full["tta"]:
            plain = subprocess.run(
                [sys.executable, "-m", "job", "evaluate", full["checkpoint"], "--data-uri",
                 data_uri, "--device", device, "--no-tta", "--json", "-"],
                check=True, capture_output=True, text=True)
            run["val_acc_no_tta"] = json.loads(plain.stdout)["accuracy"]
        runs.append(run)
    return {"device": device, **accuracy_over(runs)}


def accuracy_over(runs: list[dict]) -> dict:
    """The mean and spread (max - min) of the runs' accuracies (and of those without TTA, where
    every run has one), their mean epochs and training seconds, with the runs, by seed."""
    runs = sorted(runs, key=lambda run: run["seed"])
    result = {}
    for key in ("val_acc", "val_acc_no_tta"):
        values = [run[key] for run in runs if key in run]
        if len(values) == len(runs):
            result[f"mean_{key}"] = statistics.mean(values)
            result[f"spread_{key}"] = max(values) - min(values)
    for key in ("epochs", "train_seconds", "train_images_per_second"):
        result[f"mean_{key}"] = statistics.mean(run[key] for run in runs)
    return {**result, "runs": runs}


def recorded_with(recorded: dict, measured: dict) -> dict:
    """A recipe's record after this bench's runs: the runs recorded before stay, but for the
    seeds run again, and the means and spreads cover them all."""
    again = {run["seed"] for run in measured["runs"]}
    return {**recorded, **measured, **accuracy_over(
        measured["runs"] + [run for run in recorded.get("runs", []) if run["seed"] not in again])}


def print_recipes(records: dict) -> None:
    print("\n| recipe | seeds | epochs | val acc (mean) | without TTA | spread | train s (mean) | "
          "img/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, record in records.items():
        plain = f"{record['mean_val_acc_no_tta']:.2%}" if "mean_val_acc_no_tta" in record else "-"
        tta = " (TTA)" if all(run.get("tta") for run in record["runs"]) else ""
        print(f"| {label} | {len(record['runs'])} | {record['mean_epochs']:g} | "
              f"{record['mean_val_acc']:.2%}{tta} | {plain} | {record['spread_val_acc']:.2%} | "
              f"{record['mean_train_seconds']:,.0f} | {record['mean_train_images_per_second']:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"])
    parser.add_argument("--data-uri", default=os.environ.get("CNN_JOB_DATA_URI", str(DEFAULT_DATA)))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit-train", type=int, default=None, help="images per speed epoch")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the full-length runs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1],
                        help="the seeds of each DATASET/NET recipe's full runs")
    parser.add_argument("--nets", nargs="+", default=["seed", "mnist/fast"],
                        choices=["seed", *(f"{dataset}/{net}" for dataset, net in RECIPES)],
                        help="seed: the seed nets' speed, start-up and 5-epoch accuracy on "
                             "--datasets, against the seed-style reference; DATASET/NET: that "
                             "recipe's whole default run once per --seeds (on a 2-core CPU "
                             "seconds for mnist/fast, ~40 minutes for each CIFAR-10 one)")
    parser.add_argument("--baseline", metavar="REV",
                        help="compare the seed nets' training epochs with commit REV's, and only that")
    parser.add_argument("--rounds", type=int, default=2, help="--baseline: epochs per side")
    args = parser.parse_args()

    if args.baseline:
        with tempfile.TemporaryDirectory() as tmp:
            result = compare(args.baseline, args.datasets, args.data_uri, args.device,
                             max(args.rounds, 2), Path(tmp), args.limit_train)
        print_comparison(result)
        (REPO / "bench" / f"compare-{args.device}.json").write_text(json.dumps(result, indent=2) + "\n")
        return

    rows, measured = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for label in [] if args.no_accuracy else [n for n in args.nets if "/" in n]:
            dataset, net = label.split("/")
            measured[label] = recipe_runs(dataset, net, args.data_uri, args.device, workdir,
                                          tuple(args.seeds))
            print(json.dumps({label: measured[label]}), flush=True)
        for dataset in args.datasets if "seed" in args.nets else ():
            limit = ["--limit-train", str(args.limit_train)] if args.limit_train else []
            seed = seed_style_images_per_second(dataset, args.data_uri, args.device, args.limit_train)
            ours = cnn_job(dataset, args.data_uri, args.device, workdir, "--epochs", "1", *limit)
            row = {
                "dataset": dataset, "device": args.device,
                "seed_style_images_per_second": seed,
                "ours_images_per_second": ours["train_images_per_second"],
                "speedup": ours["train_images_per_second"] / seed,
            }
            row["start_up"] = start_up(dataset, args.data_uri, args.device, workdir)
            if not args.no_accuracy:
                full = cnn_job(dataset, args.data_uri, args.device, workdir)
                row.update(
                    epochs=full["epochs"], final_val_acc=full["final_val_acc"],
                    final_train_loss=full["final_train_loss"],
                    train_seconds=full["train_seconds"],
                )
            rows.append(row)
            print(json.dumps(row), flush=True)

    out = REPO / "bench" / f"results-{args.device}.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    recorded = results.setdefault("recipes", {})
    for label, record in measured.items():
        recorded[label] = recorded_with(recorded.get(label, {}), record)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{device_name}, torch {torch.__version__}, {os.cpu_count()} cpu cores\n")
    if rows:
        print("| dataset | seed-style img/s | cnn-job img/s | speed-up | 5-epoch val acc | train s |")
        print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        acc = f"{r['final_val_acc']:.2%}" if "final_val_acc" in r else "-"
        secs = f"{r['train_seconds']:.0f}" if "train_seconds" in r else "-"
        print(f"| {r['dataset']} | {r['seed_style_images_per_second']:,.0f} | "
              f"{r['ours_images_per_second']:,.0f} | {r['speedup']:.2f}× | {acc} | {secs} |")
    if rows:
        print("\n| dataset | start to first step, s | `--epochs 1 --limit-train 64` wall, s |")
        print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['dataset']} | {r['start_up']['seconds_to_first_step']:.2f} | "
              f"{r['start_up']['wall_seconds']:.2f} |")
    if measured:
        print_recipes({label: recorded[label] for label in measured})
    results.update({"device": device_name, "torch": torch.__version__})
    results.update({"rows": rows} if rows else {})
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
