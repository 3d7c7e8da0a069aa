"""Peak memory of `cnn-job data pull` on gzip bombs posing as a dataset's archives, against the
real archives: each run in a child process, its peak RSS as the kernel counts it (ru_maxrss from
wait4), beside that of a child that stops just before parsing (the imports: python, torch, numpy).

    .venv/bin/python bench/gzip_bomb.py [--inflated-mib 2560] [--data ../shared/datasets]

A bomb is a few MB of gzip that inflates to --inflated-mib of zeros behind a genuine-looking
start: for MNIST, the IDX header of 60000 training images of 28×28; for CIFAR-10, a tar member
cifar-10-batches-py/data_batch_1 of that size. Prints one line per case: exit status, the
output's last line, and peak RSS in MB (less the bare child's).
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CNN_JOB = Path(sys.executable).parent / "cnn-job"
ZEROS_BYTES = 16 << 20  # one gzip member of zeros, repeated: a 2.5 GiB bomb is made in a blink
MNIST_ARCHIVES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                  "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _gzip_of(head: bytes, zeros: int, tail: bytes = b"") -> bytes:
    """gzip members whose inflated bytes are `head`, `zeros` zero bytes, then `tail`."""
    block = gzip.compress(bytes(ZEROS_BYTES), compresslevel=9, mtime=0)
    whole, rest = divmod(zeros, ZEROS_BYTES)
    return b"".join([gzip.compress(head, mtime=0), block * whole,
                     gzip.compress(bytes(rest) + tail, compresslevel=9, mtime=0)])


def mnist_bomb(folder: Path, inflated_bytes: int) -> Path:
    """`folder`/mnist/ whose training images are a bomb with a genuine header; its other three
    archives are empty files (the images are parsed first). Returns `folder`."""
    (folder / "mnist").mkdir(parents=True, exist_ok=True)
    for name in MNIST_ARCHIVES[1:]:
        (folder / "mnist" / name).write_bytes(b"")
    header = b"\0\0\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (60000, 28, 28))
    (folder / "mnist" / MNIST_ARCHIVES[0]).write_bytes(_gzip_of(header, inflated_bytes))
    return folder


def cifar10_bomb(folder: Path, inflated_bytes: int) -> Path:
    """`folder`/cifar10/cifar-10-python.tar.gz holding one member, data_batch_1, of
    `inflated_bytes` zeros (a multiple of 512). Returns `folder`."""
    (folder / "cifar10").mkdir(parents=True, exist_ok=True)
    member = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    member.size = inflated_bytes
    header = member.tobuf(format=tarfile.USTAR_FORMAT)
    archive = folder / "cifar10" / "cifar-10-python.tar.gz"
    archive.write_bytes(_gzip_of(header, inflated_bytes + 2 * 512))  # the end: two zero blocks
    return folder


def child_peak(command: list[str], env: dict | None = None) -> tuple[int, str, int]:
    """Run `command`; its exit status, its output (stdout and stderr) and its peak RSS in bytes."""
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        return process.returncode, output.read(), usage.ru_maxrss * 1024  # Linux counts KiB


def pull(dataset: str, folder: Path, cache: Path) -> tuple[int, str, int]:
    return child_peak([str(CNN_JOB), "data", "pull", dataset, str(folder), "--cache-dir", str(cache)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inflated-mib", type=int, default=2560)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets")
    args = parser.parse_args()
    inflated = args.inflated_mib << 20
    with tempfile.TemporaryDirectory(prefix="cnn-job-bomb.") as scratch:
        scratch = Path(scratch)
        cache = scratch / "cache"
        bare = pull("mnist", scratch / "empty", cache)[2]
        print(f"bare child (imports only): peak RSS {bare / 1e6:.0f} MB")
        cases = [
            ("mnist", "real archives", args.data),
            ("mnist", f"bomb, {args.inflated_mib} MiB inflated", mnist_bomb(scratch / "m", inflated)),
            ("cifar10", "real archives", args.data),
            ("cifar10", f"bomb, {args.inflated_mib} MiB inflated", cifar10_bomb(scratch / "c", inflated)),
        ]
        for dataset, what, folder in cases:
            compressed = sum(f.stat().st_size for f in (folder / dataset).iterdir())
            status, output, peak = pull(dataset, folder, cache)
            last = (output.strip().splitlines() or [""])[-1][:160]
            print(f"{dataset} {what} ({compressed / 1e6:.1f} MB of gzip): exit {status}, peak RSS "
                  f"{peak / 1e6:.0f} MB ({(peak - bare) / 1e6:+.0f} MB over the bare child): {last}")


if __name__ == "__main__":
    main()
