"""Variants of the job's source, timed side by side on a GPU: which change buys training seconds.

Each variant is a copy of the checkout with text replaced in its files (no knob is added to the
job for an experiment); each runs `cnn-job train` as a user would, on one warm dataset cache,
and reports its summary's train seconds, seconds to the first step (and its start-up phases),
wall seconds and final accuracy. The data is the folder given (--data, with cifar10/ and
mnist/), or synthetic sets of the real sizes (speed only: their accuracy means nothing). Run
from the checkout, on the GPU machine:

    PYTHONPATH=. python3 bench/gpu_variants.py --out results

The table prints last, and goes to variants.md in the --out folder, with the runs' JSON in
variants.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from gpu_check import CIFAR, job, write_synthetic_cifar  # noqa: E402

# name -> [(file, old text, new text)]; "base" is the checkout as it is.
VARIANTS: dict[str, list[tuple[str, str, str]]] = {
    "base": [],
    "cudnn search": [("job/step.py", "torch.backends.cudnn.benchmark = False",
                      "torch.backends.cudnn.benchmark = True")],
    "cudnn search, 1 algorithm": [("job/step.py", "torch.backends.cudnn.benchmark = False",
                                   "torch.backends.cudnn.benchmark = True; "
                                   "torch.backends.cudnn.benchmark_limit = 1")],
    # the optimisers over lists of per-parameter tensors instead of one flat buffer apiece
    "per-tensor optimiser": [("job/optim.py", "FLAT_BUFFERS = True", "FLAT_BUFFERS = False")],
}
# What each found, on an H200 (2026-11-26, synthetic CIFAR-10, train seconds of 2 fast runs / 1
# seed run, base then with cudnn.benchmark = True): fast 2.91, 2.65 against 7.27, 3.9; seed 2.36
# against 5.52; with benchmark_limit 1, fast 6.13, 3.55 and seed 4.71. So the job runs without it.
RUNS = [("cifar10", "fast"), ("cifar10", "fast"), ("cifar10", "seed"), ("mnist", "seed")]


def write_synthetic_mnist(folder: Path, train: int = 60000, test: int = 10000) -> None:
    """Random MNIST-shaped images in the real gzipped IDX files, so the job's real loader runs."""
    import gzip

    import numpy as np

    generator = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("t10k", test)):
        for kind, dims, values in (("images-idx3", (n, 28, 28), 256), ("labels-idx1", (n,), 10)):
            header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
            data = generator.integers(0, values, dims, dtype=np.uint8).tobytes()
            with gzip.open(folder / f"{split}-{kind}-ubyte.gz", "wb", compresslevel=1) as out:
                out.write(header + data)


def variant_tree(name: str, edits: list[tuple[str, str, str]], root: Path) -> Path:
    tree = root / name.replace(" ", "-").replace(",", "")
    shutil.copytree(REPO / "job", tree / "job")
    for file, old, new in edits:
        text = (tree / file).read_text()
        if old not in text:
            sys.exit(f"error: variant {name!r}: {old!r} is not in {file}")
        (tree / file).write_text(text.replace(old, new))
    return tree


def train(tree: Path, data: Path, cache: Path, folder: Path, net: str, dataset: str,
          device: str, *extra: str) -> dict:
    summary = folder.with_suffix(".json")
    code, output, wall = job("train", dataset, "--net", net, "--data-uri", str(data), "--cache-dir",
                             str(cache), "--checkpoint-uri", str(folder), "--device", device,
                             "--summary-json", str(summary), *extra, timeout_s=300, tree=tree)
    if code != 0:
        return {"ok": False, "detail": output[-600:]}
    s = json.loads(summary.read_text())
    return {"ok": True, "wall_s": round(wall, 2), "first_step_s": round(s["seconds_to_first_step"], 2),
            "train_s": round(s["train_seconds"], 2), "val_acc": s["final_val_acc"],
            "startup_s": {phase: round(seconds, 3) for phase, seconds in s["startup_s"].items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="a folder with cifar10/ (else synthetic)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="1 epoch of 2,048 images (a CPU check)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="variants-"))
    data = args.data.resolve() if args.data else None
    if data is None:
        data = root / "data"
        (data / "cifar10").mkdir(parents=True)
        write_synthetic_cifar(data / CIFAR, train=50000, test=10000)
        write_synthetic_mnist(data / "mnist")
    cache = root / "cache"
    small = ["--epochs", "1", "--limit-train", "2048", "--no-tta"]
    # the archives parsed into the cache, and the GPU's kernels loaded once, before any timing
    warm_tree = variant_tree("warm-up", [], root)
    for dataset, net in dict.fromkeys(RUNS):
        warm = train(warm_tree, data, cache, root / f"warm-{dataset}-{net}", net, dataset,
                     args.device, *small)
        print(json.dumps({"warm-up": {"dataset": dataset, "net": net, **warm}}), flush=True)
    rows = []
    for name in args.variants:
        tree = variant_tree(name, VARIANTS[name], root)
        for dataset, net in RUNS:
            row = {"variant": name, "dataset": dataset, "net": net,
                   **train(tree, data, cache, root / f"ckpt-{len(rows)}", net, dataset,
                           args.device, *(small if args.small else []))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "variants.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| variant | net | train s (each) | first step s | wall s | val acc (each) |",
             "|---|---|---|---:|---:|---|"]
    for name in args.variants:
        for dataset, net in dict.fromkeys(RUNS):
            mine = [r for r in rows if r["variant"] == name and r["dataset"] == dataset
                    and r["net"] == net and r["ok"]]
            if mine:
                accuracies = ", ".join(f"{r['val_acc']:.4f}" for r in mine)
                lines.append(f"| {name} | {dataset} {net} | "
                             f"{', '.join(str(r['train_s']) for r in mine)} | "
                             f"{statistics.median(r['first_step_s'] for r in mine):.2f} | "
                             f"{statistics.median(r['wall_s'] for r in mine):.2f} | {accuracies} |")
    table = "\n".join(lines)
    (args.out / "variants.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
