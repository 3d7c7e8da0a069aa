"""The datasets moved to an air-gapped GPU machine in transfers of at most N MiB, and
bench/gpu_check.py run there (docs/gpu-check.md).

The GPU machine has no network and no pip, and files reach it only by whatever transfer there is
(a USB stick, a file drop with a size limit, a copy through a jump host). So the data goes in as
few transfers of at most --part-mib MiB (60 by default) as it fits into, each a folder:

    python3 bench/gpu_visit.py pack [--part-mib 60]   # here, once: .gpu-visit/transfer-N/
    python3 bench/gpu_visit.py arrive [--probe]       # there: what has arrived, checked
    python3 bench/gpu_visit.py run --out DIR          # there: reassemble, verify, gpu_check.py

CIFAR-10's archive (189 MB) is gzip of a 268 MB tar that gzip barely shrinks (JPEG-decoded
pixels). xz (preset 6) brings the tar to about 150 MB, so MNIST (11 MB) and CIFAR-10 take 3
transfers of 60 MiB, against 4 for the archive split as it is. On arrival the tar is gzipped
again as the archive was made (Python's gzip, level 9, its name and time stamp in the header): the
same bytes, checked against SHA256SUMS. Were the GPU machine's zlib to compress differently, the
rebuilt archive would still hold the checked tar, and the report says so. Where the archive
cannot be rebuilt here, `pack` splits the archive as it is.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

from gpu_check import CIFAR, sha256_of  # bench/ is this script's own folder on sys.path

REPO = Path(__file__).resolve().parent.parent
VISIT = REPO / ".gpu-visit"  # git-ignored: its transfer-N/ folders are what is moved
MNIST = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
PART_MIB = 60  # the largest transfer, by default
CHUNK = 2**20
CHECK = "python3 bench/gpu_visit.py arrive --probe"
RUN = "PYTHONUNBUFFERED=1 python3 bench/gpu_visit.py run --out results"


def gzip_header(path: Path) -> dict:
    """The name and time stamp in a gzip file's header (what rebuilding it byte for byte needs)."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    flags, mtime = head[3], struct.unpack("<I", head[4:8])[0]
    name = head[10:head.index(b"\0", 10)].decode("latin-1") if flags & 8 else ""
    level = {2: 9, 4: 1}.get(head[8], 6)  # XFL: the slowest or the fastest compression, else 6
    return {"name": name, "mtime": mtime, "level": level}


def regzip(chunks, out: Path, header: dict) -> str:
    """Write `chunks` (the tar's bytes) gzipped as Python's tarfile/gzip made the archive; the
    tar's sha256."""
    tar_digest = hashlib.sha256()
    with open(out, "wb") as raw, gzip.GzipFile(filename=header["name"], mode="wb", fileobj=raw,
                                               compresslevel=header["level"],
                                               mtime=header["mtime"]) as packed:
        for chunk in chunks:
            tar_digest.update(chunk)
            packed.write(chunk)
    return tar_digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# here: pack


def xz_stream(tar_gz: Path, xz_out: Path) -> None:
    """The archive's tar, xz-compressed: with the xz program on all cores where there is one
    (minutes on 2 cores), else Python's lzma (one core)."""
    xz = shutil.which("xz")
    with gzip.open(tar_gz, "rb") as tar, open(xz_out, "wb") as out:
        if xz:
            process = subprocess.Popen([xz, "-6", "-T0", "-c"], stdin=subprocess.PIPE, stdout=out)
            shutil.copyfileobj(tar, process.stdin, CHUNK)
            process.stdin.close()
            if process.wait() != 0:
                sys.exit("error: xz failed")
            return
        compressor = lzma.LZMACompressor(preset=6)
        while chunk := tar.read(CHUNK):
            out.write(compressor.compress(chunk))
        out.write(compressor.flush())


def decompressed(parts: list[Path]):
    """The tar's bytes out of the xz parts, joined in order."""
    decompressor = lzma.LZMADecompressor()
    for chunk in read_parts(parts):
        while chunk:
            yield decompressor.decompress(chunk)
            chunk = decompressor.unused_data if decompressor.eof else b""
            if decompressor.eof:  # another stream follows (xz files may be concatenated)
                decompressor = lzma.LZMADecompressor()


def read_parts(paths: list[Path]):
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk


def pack(data: Path, visit: Path, part_bytes: int = PART_MIB * 2**20) -> dict:
    """`visit`/transfer-N/ folders of at most `part_bytes` each, MNIST in the first, and the
    plan (in every folder)."""
    archive = data / CIFAR
    if visit.exists():
        shutil.rmtree(visit)
    work = visit / "work"
    work.mkdir(parents=True)
    header = gzip_header(archive)
    xz_path = work / "cifar-10-python.tar.xz"
    started = time.perf_counter()
    xz_stream(archive, xz_path)
    print(f"xz of CIFAR-10's tar: {xz_path.stat().st_size / 2**20:.1f} MiB in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    rebuilt, started = work / "rebuilt.tar.gz", time.perf_counter()
    tar_sha256 = regzip(decompressed([xz_path]), rebuilt, header)
    same = sha256_of(rebuilt) == sha256_of(archive)
    print(f"the archive rebuilt from it (as on arrival) in {time.perf_counter() - started:.0f} s: "
          f"{'the same bytes' if same else 'other bytes'}", flush=True)
    if same:
        encoding, payload = "xz of the tar, gzipped again on arrival", xz_path
    else:  # this machine's gzip does not remake the archive: move it as it is
        encoding, payload = "the archive split as it is", archive
    rebuilt.unlink()

    plan = {"encoding": encoding, "gzip": header, "tar_sha256": tar_sha256,
            "archive_sha256": sha256_of(archive), "mnist": {}, "parts": []}
    used = [0]  # bytes per transfer
    (visit / "transfer-1" / "mnist").mkdir(parents=True)
    for name in MNIST:
        shutil.copyfile(data / "mnist" / name, visit / "transfer-1" / "mnist" / name)
        plan["mnist"][name] = sha256_of(data / "mnist" / name)
        used[0] += (data / "mnist" / name).stat().st_size
    with open(payload, "rb") as source:
        while True:
            room = part_bytes - used[-1]
            if room < min(2**20, part_bytes // 4):  # no sliver of a part: the next transfer
                used.append(0)
                room = part_bytes
            chunk = source.read(room)
            if not chunk:
                break
            transfer = len(used)
            part = visit / f"transfer-{transfer}" / f"cifar10.part-{len(plan['parts']) + 1}"
            part.parent.mkdir(exist_ok=True)
            part.write_bytes(chunk)
            used[-1] += len(chunk)
            plan["parts"].append({"transfer": transfer, "name": f"transfer-{transfer}/{part.name}",
                                  "bytes": len(chunk),
                                  "sha256": hashlib.sha256(chunk).hexdigest()})
    shutil.rmtree(work)
    plan["transfers"] = [{"transfer": transfer, "folder": f".gpu-visit/transfer-{transfer}",
                          "bytes": size} for transfer, size in enumerate(used, 1)]
    for transfer in range(1, len(used) + 1):  # the plan goes with every transfer: any one will do
        (visit / f"transfer-{transfer}" / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    return plan


# ----------------------------------------------------------------------------------------------
# there: arrive and run


def arrived(visit: Path) -> tuple[dict | None, list[str]]:
    """The plan, and what of it is missing or damaged (empty when everything is here)."""
    plans = sorted(visit.glob("transfer-*/plan.json"))
    if not plans:
        return None, ["no .gpu-visit/transfer-N/plan.json here: move the folders `pack` made "
                      "into this checkout's .gpu-visit/"]
    plan = json.loads(plans[-1].read_text())
    problems = []
    for part in plan["parts"]:
        path = visit / part["name"]
        if not path.is_file():
            problems.append(f"{part['name']} is not here: move transfer {part['transfer']} "
                            f"(.gpu-visit/transfer-{part['transfer']}/) into this checkout")
        elif path.stat().st_size != part["bytes"] or sha256_of(path) != part["sha256"]:
            problems.append(f"{part['name']} is damaged: move transfer {part['transfer']} again")
    for name, digest in plan["mnist"].items():
        path = visit / "transfer-1" / "mnist" / name
        if not path.is_file() or sha256_of(path) != digest:
            problems.append(f"mnist/{name} missing or damaged: move transfer 1 again")
    return plan, problems


def assemble(visit: Path, plan: dict) -> tuple[Path, str]:
    """A data folder as gpu_check.py reads it, and what its CIFAR-10 is."""
    data = visit / "data"
    (data / "cifar10").mkdir(parents=True, exist_ok=True)
    if not (data / "mnist").exists():
        (data / "mnist").symlink_to(visit / "transfer-1" / "mnist")
    archive = data / CIFAR
    parts = [visit / part["name"] for part in plan["parts"]]
    started = time.perf_counter()
    if not (archive.is_file() and sha256_of(archive) == plan["archive_sha256"]):
        if plan["encoding"].startswith("xz"):
            tar_sha256 = regzip(decompressed(parts), archive, plan["gzip"])
            if tar_sha256 != plan["tar_sha256"]:
                sys.exit("error: CIFAR-10's tar did not come out of its parts whole")
        else:
            with open(archive, "wb") as out:
                for chunk in read_parts(parts):
                    out.write(chunk)
    digest = sha256_of(archive)
    same = digest == plan["archive_sha256"]
    if not same and not plan["encoding"].startswith("xz"):
        sys.exit("error: CIFAR-10's parts do not join into the archive")
    sums = {CIFAR: digest, **{f"mnist/{name}": sha for name, sha in plan["mnist"].items()}}
    (data / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in sums.items()))
    kind = ("the archive, byte for byte" if same else
            "rebuilt: the archive's tar, sha256 checked; its gzip bytes differ from the archive's")
    print(f"CIFAR-10 assembled from {len(parts)} parts in {time.perf_counter() - started:.1f} s: "
          f"{kind}", flush=True)
    return data, kind


def probe() -> str:
    """What the GPU machine is: GPU, driver, Python, torch (for the report)."""
    lines = []
    for command in (["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                     "--format=csv,noheader"],
                    [sys.executable, "-c", "import torch, sys; print('python', sys.version.split()[0],"
                     " 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', "
                     "torch.backends.cudnn.version(), 'nccl', torch.cuda.nccl.version(), "
                     "'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"]):
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60)
            lines.append((result.stdout + result.stderr).strip())
        except (OSError, subprocess.TimeoutExpired) as error:
            lines.append(f"{command[0]}: {error}")
    return "\n".join(lines)


def run(visit: Path, out: Path, training_only: bool = False) -> int:
    """Assemble the data, then gpu_check.py on the GPU; its report, table, log, profiler tables
    and the machine's description land in `out` (the folder to bring back)."""
    plan, problems = arrived(visit)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 3
    out.mkdir(parents=True, exist_ok=True)
    (out / "machine.txt").write_text(probe() + "\n")
    data, kind = assemble(visit, plan)
    command = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--data", str(data),
               "--out", str(out / "results-cuda.json"), "--table", str(out / "table.md"),
               "--profile", str(out / "profile.txt"), *(["--training-only"] if training_only else [])]
    with open(out / "gpu-check.log", "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        for line in process.stdout:
            print(line, end="", flush=True)
            log.write(line)
            log.flush()
        status = process.wait()
    results = out / "results-cuda.json"
    if results.is_file():  # how the data came, beside what was measured on it
        report = json.loads(results.read_text())
        report["carried"] = {"encoding": plan["encoding"], "cifar10": kind,
                             "transfers": len(plan["transfers"])}
        results.write_text(json.dumps(report, indent=2) + "\n")
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    packing = sub.add_parser("pack", help="here: split the data into .gpu-visit/transfer-N/ "
                             "folders and say what to move")
    packing.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets",
                         help="the datasets folder (mnist/, cifar10/)")
    packing.add_argument("--part-mib", type=float, default=PART_MIB,
                         help="the largest transfer, in MiB (default: %(default)s)")
    arriving = sub.add_parser("arrive", help="there: check what has arrived")
    arriving.add_argument("--probe", action="store_true",
                          help="also say what the GPU machine is (GPU, driver, torch)")
    running = sub.add_parser("run", help="there: reassemble and verify the data, run gpu_check.py")
    running.add_argument("--out", type=Path, required=True,
                         help="folder for the report, table, log and profiles (bring it back)")
    running.add_argument("--training-only", action="store_true",
                         help="gpu_check.py's training runs alone (a rerun after a change)")
    args = parser.parse_args()
    if args.verb == "pack":
        if args.part_mib < 1:
            parser.error("--part-mib must be at least 1")
        plan = pack(args.data, VISIT, int(args.part_mib * 2**20))
        print(f"CIFAR-10 packed as {plan['encoding']}, in {len(plan['parts'])} parts. Move each "
              f"folder into the GPU machine's checkout, at the same path:")
        for transfer in plan["transfers"]:
            print(f"  transfer {transfer['transfer']}: {transfer['folder']}/ "
                  f"({transfer['bytes'] / 2**20:.1f} MiB)")
        print(f"Then, there: {CHECK}\n             {RUN}")
        return 0
    if args.verb == "arrive":
        if args.probe:
            print(probe())
        plan, problems = arrived(VISIT)
        here = sorted({p["transfer"] for p in (plan or {}).get("parts", [])
                       if (VISIT / p["name"]).is_file()})
        print(f"transfers here: {here}; " + ("; ".join(problems) if problems else "all here"))
        return 0
    return run(VISIT, args.out, args.training_only)


if __name__ == "__main__":
    sys.exit(main())
