"""`make gpu-check`: prove the CUDA path on a machine with an NVIDIA GPU, and measure it.

Made for an air-gapped GPU box: no network and no pip. It needs only a PyTorch already
installed there (2.11 or newer), typer, rich and numpy; no boto3, no wandb (W&B is disabled),
run from a source checkout (`PYTHONPATH=.`), with the data from a folder brought along:

    PYTHONPATH=. python3 bench/gpu_check.py --data ../shared/datasets

Files may have to travel in pieces of at most 64 MiB: MNIST (11 MB) goes whole; CIFAR-10's
189 MB archive may come split (`split -b 60M -d cifar-10-python.tar.gz
cifar-10-python.tar.gz.part-`) with the folder's SHA256SUMS: the parts are joined and checked
against it on arrival. Without CIFAR-10 a synthetic CIFAR-shaped set, clearly labelled, measures
throughput only.

What it runs, each a real `python -m job ...` process (as a user would run it):
  1. both seed nets, 5 epochs, and `--net fast` (10 epochs, TTA; no cold start), on CUDA (bf16
     autocast, channels_last), each step a CUDA graph (--compile cuda-graph, the default
     there) and eager (--compile off), on a warm dataset cache (a first 1-epoch run parses
     the archives and is timed as the cold start): wall seconds from process start to the
     final checkpoint, seconds to the first step, train seconds, images/s, accuracy, peak GPU
     memory;
  2. a checkpoint written on the GPU, resumed on the CPU, and resumed on the GPU again;
  3. SIGTERM on the GPU: exit status 75 with a checkpoint written;
  4. a single-rank NCCL process group under torchrun (an all-reduce through it);
  5. `pytest -m gpu` (the GPU-only tests), where pytest is installed.
It prints one table and writes bench/results-cuda.json. `--device cpu --dry-run` runs the same
steps, small, on the CPU (Gloo instead of NCCL): the test suite does, so that it cannot rot.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import platform
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CIFAR = "cifar10/cifar-10-python.tar.gz"


# ----------------------------------------------------------------------------------------------
# data brought along


def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def published_sums(data: Path) -> dict[str, str]:
    sums = {}
    if (data / "SHA256SUMS").is_file():
        for line in (data / "SHA256SUMS").read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                sums[parts[1].lstrip("*")] = parts[0]
    return sums


def prepare_data(data: Path, work: Path) -> tuple[Path, str]:
    """A data folder the job can read, and what CIFAR-10 is in it: "real", "joined from N parts"
    or "synthetic (throughput only)". Joined parts are checked against SHA256SUMS."""
    archive = data / CIFAR
    if archive.is_file():
        return data, "real"
    parts = sorted(archive.parent.glob(archive.name + ".part-*"))
    folder = work / "data"
    (folder / "cifar10").mkdir(parents=True, exist_ok=True)
    if (data / "mnist").is_dir():
        (folder / "mnist").symlink_to((data / "mnist").resolve())
    joined = folder / CIFAR
    if parts:
        with open(joined, "wb") as out:
            for part in parts:
                out.write(part.read_bytes())
        expected = published_sums(data).get(CIFAR)
        if expected is None or sha256_of(joined) != expected:
            sys.exit(f"error: the {len(parts)} parts of {CIFAR} do not join into the archive "
                     "SHA256SUMS names; bring them again")
        return folder, f"joined from {len(parts)} parts, sha256 checked"
    write_synthetic_cifar(joined)
    return folder, "synthetic (throughput only: its accuracy means nothing)"


def write_synthetic_cifar(path: Path, train: int = 10000, test: int = 2000) -> None:
    """Random CIFAR-shaped images in the real archive format, so the job's real loader runs."""
    import numpy as np

    generator = np.random.default_rng(0)

    def batch(n: int) -> bytes:
        return pickle.dumps({b"data": generator.integers(0, 256, (n, 3072), dtype=np.uint8),
                             b"labels": generator.integers(0, 10, n).tolist()})

    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)]
        for name, data in [*((n, batch(train // 5)) for n in names), ("test_batch", batch(test))]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------------------------
# running the job as a user would


def job_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def job(*args: str, timeout_s: float = 900) -> tuple[int, str, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "job", *args], capture_output=True, text=True,
                            env=job_env(), timeout=timeout_s, cwd=REPO)
    return result.returncode, result.stdout + result.stderr, time.perf_counter() - started


def train_args(dataset: str, data: Path, folder: Path, device: str, small: bool, *extra: str):
    limit = ["--limit-train", "640", "--epochs", "1"] if small else []
    return ["train", dataset, "--data-uri", str(data), "--checkpoint-uri", str(folder),
            "--device", device, "--cache-dir", str(folder.parent / "cache"), *limit, *extra]


def check_training(dataset: str, data: Path, work: Path, device: str, small: bool,
                   compile_mode: str | None = None, net: str = "seed") -> dict:
    """One run, timed: `compile_mode` None is the cold start (1 epoch on 640 images, parsing
    the archives into the cache), else a whole run at --compile compile_mode. `net` fast: its
    whole default run (10 epochs, TTA); small, in batches of 128 without TTA."""
    name = f"{dataset}-{net}-{compile_mode or 'cold'}"
    folder, summary = work / f"{name}-ckpt", work / f"{name}.json"
    extra = ["--compile", compile_mode] if compile_mode else []  # cold: train_args' small run
    if net != "seed":
        extra += ["--net", net, *(["--batch-size", "128", "--no-tta"] if small else [])]
        dataset_label = f"{dataset} --net {net}"
    else:
        dataset_label = dataset
    code, output, wall_s = job(*train_args(dataset, data, folder, device,
                                           small or compile_mode is None, *extra,
                                           "--summary-json", str(summary)))
    label = {None: "cold cache, 1 epoch of 640", "off": "eager"}.get(compile_mode, compile_mode)
    row = {"step": f"train {dataset_label}, {label}", "ok": code == 0, "wall_s": round(wall_s, 2)}
    if code != 0:
        return {**row, "detail": output[-800:]}
    result = json.loads(summary.read_text())
    return {**row, "first_step_s": round(result["seconds_to_first_step"], 2),
            "train_s": round(result["train_seconds"], 2),
            "images_per_s": round(result["train_images_per_second"] or 0),
            "val_acc": result["final_val_acc"], "precision": result["precision"],
            "compile": result["compile"], "epochs": result["epochs"],
            "peak_gpu_gib": result.get("gpu/max_memory_allocated_gib"), "device": result["device"]}


def check_device_round_trip(data: Path, work: Path, device: str) -> dict:
    """A checkpoint written on `device`, resumed on the CPU, then on `device` again."""
    folder, started = work / "round-trip", time.perf_counter()
    steps = [(device, "1"), ("cpu", "2"), (device, "3")][: 3 if device != "cpu" else 2]
    for where, epochs in steps:
        code, output, _ = job(*train_args("mnist", data, folder, where, False, "--epochs", epochs,
                                          "--limit-train", "640"))
        if code != 0 or (epochs != "1" and "resumed from" not in output):
            return {"step": " → ".join(where for where, _ in steps) + " checkpoint", "ok": False,
                    "detail": output[-800:]}
    return {"step": " → ".join(where for where, _ in steps) + " checkpoint", "ok": True,
            "wall_s": round(time.perf_counter() - started, 2)}


def check_sigterm(data: Path, work: Path, device: str) -> dict:
    folder = work / "sigterm"
    command = [sys.executable, "-m", "job", *train_args("mnist", data, folder, device, False,
                                                        "--checkpoint-every-steps", "5")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=job_env(), cwd=REPO)
    deadline = time.monotonic() + 300
    while not (folder / "latest").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    signalled = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    return {"step": f"SIGTERM on {device}", "ok": process.returncode == 75,
            "wall_s": round(time.perf_counter() - signalled, 2), "detail": output[-300:]}


def nccl_worker(backend: str) -> None:
    """Under torchrun: one all-reduce through a real process group."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else None
    if device is not None:
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    value = torch.ones(4, device=device) * (dist.get_rank() + 1)
    dist.all_reduce(value)
    assert value.sum().item() == 4 * dist.get_world_size() * (dist.get_world_size() + 1) / 2
    dist.destroy_process_group()
    print(f"all_reduce over {backend}: ok")


def check_process_group(backend: str) -> dict:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone",
         str(Path(__file__).resolve()), "--process-group-worker", backend],
        capture_output=True, text=True, env=job_env(), timeout=300, cwd=REPO)
    return {"step": f"single-rank {backend} process group under torchrun",
            "ok": result.returncode == 0 and "ok" in result.stdout,
            "wall_s": round(time.perf_counter() - started, 2),
            "detail": (result.stdout + result.stderr)[-500:]}


def check_gpu_tests(data: Path) -> dict:
    """The GPU-only suite, kept apart in tests/test_gpu.py (the rest needs boto3, moto, W&B)."""
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return {"step": "pytest -m gpu", "ok": None, "detail": "pytest is not installed here"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p",
                             "no:cacheprovider", "tests/test_gpu.py"], capture_output=True,
                            text=True, env={**job_env(), "CNN_JOB_TEST_DATA": str(data)},
                            cwd=REPO, timeout=900)
    # 5: every GPU test was deselected or skipped (none apply here), which is not a failure.
    return {"step": "pytest -m gpu", "ok": result.returncode in (0, 5),
            "detail": result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""}


# ----------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dry-run", action="store_true", help="small runs (the CPU test does)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--process-group-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.process_group_worker:
        nccl_worker(args.process_group_worker)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU visible; `--device cpu --dry-run` checks this script on a CPU",
              file=sys.stderr)
        return 2
    out = args.out or REPO / "bench" / f"results-{'cuda' if args.device == 'cuda' else 'cpu-dry'}.json"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        work = Path(scratch)
        data, cifar_kind = prepare_data(args.data, work)
        modes = [None, "cuda-graph", "off"] if args.device == "cuda" else [None, "off"]
        rows = [check_training(dataset, data, work, args.device, args.dry_run, mode)
                for dataset in ("mnist", "cifar10") for mode in modes]
        # --net fast on a warm cache (the cold start is the seed's above)
        rows += [check_training("cifar10", data, work, args.device, args.dry_run, mode, "fast")
                 for mode in modes[1:]]
        for row in rows[len(modes):]:
            row["data"] = cifar_kind
        rows += [check_device_round_trip(data, work, args.device),
                 check_sigterm(data, work, args.device),
                 check_process_group("nccl" if args.device == "cuda" else "gloo"),
                 check_gpu_tests(data)]
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__, "python": platform.python_version(), "dry_run": args.dry_run,
        "cifar10_data": cifar_kind, "checks": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"written: {out}")
    return 0 if all(row["ok"] is not False for row in rows) else 1


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gpu-check on {report['device']} (torch {report['torch']})")
    columns = ("step", "ok", "wall_s", "first_step_s", "train_s", "images_per_s", "val_acc",
               "peak_gpu_gib")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="left" if column == "step" else "right")
    for row in report["checks"]:
        cells = []
        for column in columns:
            value = row.get(column)
            if column == "val_acc" and value is not None:
                value = f"{value:.2%}"
            cells.append("-" if value is None else str(value))
        table.add_row(*cells)
    Console(width=170).print(table)
    print(f"CIFAR-10 data: {report['cifar10_data']}")
    rows = {row["step"]: row for row in report["checks"]}
    for dataset in ("mnist", "cifar10", "cifar10 --net fast"):
        graphed, eager = rows.get(f"train {dataset}, cuda-graph"), rows.get(f"train {dataset}, eager")
        if graphed and eager and graphed.get("images_per_s") and eager.get("images_per_s"):
            print(f"{dataset}: CUDA graph {graphed['images_per_s'] / eager['images_per_s']:.2f}x "
                  "the eager step's images/s")


if __name__ == "__main__":
    sys.exit(main())
