"""Datasets: archives fetched from where the user points, parsed into uint8 tensors that live
on the training device, and served as shuffled, normalised (optionally augmented) batches made
with batched tensor ops on that device. No PIL, no DataLoader workers. After training, the test
split that `cnn-job evaluate` scores: the archives', or a user's own files in their format.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import json
import pickle
import posixpath
import re
import tarfile
import tempfile
import urllib.error
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from job.datasets import PRESETS, DatasetPreset
from job.errors import JobError, first_line
from job.progress import say
from job.storage import (
    S3Store,
    atomic_output,
    atomic_write_bytes,
    check_writable_folder,
    file_digest,
    file_lock,
    http_download,
    http_get_bytes,
    local_path,
    parse_s3_uri,
    read_object,
    remove_stale_partials,
    uri_kind,
)

# ----------------------------------------------------------------------------------------------
# fetching the archives

LAYOUT_HINT = (
    "a folder, s3:// prefix or http(s) mirror laid out like ../shared/datasets "
    "(<dataset>/<archive>)"
)


def fetch_archives(
    p: DatasetPreset, data_uri: str | None, cache_dir: Path, endpoint_url: str | None = None,
    retry_s: float | None = None,
) -> dict[str, Path]:
    """Local paths of the dataset's archives, downloading them into `cache_dir` at most once."""
    if data_uri is None:
        return _download_all(p, list(p.mirrors), cache_dir / "public" / p.name, published=True)
    kind = uri_kind(data_uri, "--data-uri")
    if kind == "s3":
        return _download_all_s3(p, data_uri, cache_dir, endpoint_url, retry_s)
    if kind == "http":
        base = data_uri.rstrip("/")
        cache = cache_dir / _slug(base) / p.name
        return _download_all(p, [f"{base}/{p.name}"], cache, published=False, sums_url=base)
    folder = local_path(data_uri) / p.name
    paths = {a.name: folder / a.name for a in p.archives}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        raise JobError(
            f"--data-uri {data_uri}: no {p.name}/{missing[0]} there; point it at {LAYOUT_HINT}"
        )
    return paths


def check_cache_dir(cache_dir: Path) -> None:
    """Before any work: the cache folder can be made and written (a bad --cache-dir, or an
    XDG_CACHE_HOME it defaults from, is one line, not a traceback at the first download)."""
    check_writable_folder(cache_dir, "cache folder", "--cache-dir (or CNN_JOB_CACHE_DIR)")


def _dataset_store(p: DatasetPreset, uri: str, endpoint_url: str | None,
                   retry_s: float | None = None) -> S3Store:
    """PREFIX/<dataset>/ of s3://BUCKET/PREFIX, the bucket checked to exist (named by `uri`)."""
    parse_s3_uri(uri)  # a malformed URI is named as the user wrote it
    store = S3Store(f"{uri.rstrip('/')}/{p.name}", endpoint_url, retry_s)
    store.check_bucket(uri)
    return store


def _download_all_s3(
    p: DatasetPreset, data_uri: str, cache_dir: Path, endpoint_url: str | None,
    retry_s: float | None = None,
) -> dict[str, Path]:
    store = _dataset_store(p, data_uri, endpoint_url, retry_s)
    cache = cache_dir / "s3" / store.bucket / store.prefix
    paths = {}
    for archive in p.archives:
        dest = cache / archive.name
        with _download_lock(dest):  # one process per machine downloads; the others reuse it
            store.download(archive.name, dest)
        paths[archive.name] = dest
    return paths


def push_archives(
    p: DatasetPreset, source_dir: Path, uri: str, endpoint_url: str | None = None
) -> dict[str, str]:
    """Upload a local copy's archives to `uri` (s3://BUCKET/PREFIX), after checking that they
    parse, so that nothing broken lands in the bucket. Returns archive name → sha256."""
    paths = fetch_archives(p, str(source_dir), cache_dir=source_dir)
    splits = load_splits(p, paths)
    store = _dataset_store(p, uri, endpoint_url)
    for name, path in paths.items():
        if aborted := store.abort_incomplete_uploads(name):  # left by a push that was killed
            say(True, f"aborted {aborted} incomplete multipart upload{'s' * (aborted > 1)} of "
                      f"{store.location(name)} before uploading it again")
        store.upload_file(name, path)
    return splits.sha256


@contextlib.contextmanager
def _download_lock(dest: Path) -> Iterator[None]:
    """Hold `dest`'s lock and delete the temporary files of a download of it that was killed
    outright: every writer of `dest` takes this lock, so none of them is a live one's."""
    with file_lock(dest):
        remove_stale_partials(dest.parent, glob.escape(dest.name))
        yield


def _slug(url: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", url.split("://", 1)[1]).strip("_")


def _download_all(
    p: DatasetPreset, bases: list[str], cache: Path, published: bool, sums_url: str | None = None
) -> dict[str, Path]:
    # A user's mirror may publish SHA256SUMS beside the dataset folders (../shared/datasets does);
    # the public mirrors' files are checked against torchvision's published md5s.
    sha256_sums = _read_sha256_sums(sums_url) if sums_url else {}
    paths = {}
    for archive in p.archives:
        dest = cache / archive.name
        md5 = archive.md5 if published else None
        sha256 = sha256_sums.get(f"{p.name}/{archive.name}")
        with _download_lock(dest):
            if not (dest.is_file() and _cached_copy_ok(dest, md5, sha256)):
                _download_one(p, archive.name, bases, dest, md5)
                if sha256 and file_digest(dest) != sha256:
                    dest.unlink()
                    raise JobError(
                        f"{bases[0]}/{archive.name} does not match the mirror's SHA256SUMS; "
                        "the mirror holds a damaged copy"
                    )
        paths[archive.name] = dest
    return paths


def _cached_copy_ok(path: Path, md5: str | None, sha256: str | None) -> bool:
    if md5 and file_digest(path, "md5") != md5:
        return False
    return not (sha256 and file_digest(path) != sha256)


def _download_one(p: DatasetPreset, name: str, bases: list[str], dest: Path, md5: str | None):
    failures = []
    for base in bases:
        url = f"{base}/{name}"
        try:
            http_download(url, dest, expected_md5=md5)
            return
        except (urllib.error.URLError, OSError, ValueError) as error:
            failures.append(f"{url}: {getattr(error, 'reason', None) or error}")
    raise JobError(
        f"could not download {p.name} ({'; '.join(failures)}); without internet, "
        f"point --data-uri at {LAYOUT_HINT}"
    )


def _read_sha256_sums(base_url: str) -> dict[str, str]:
    try:
        text = http_get_bytes(f"{base_url}/SHA256SUMS")
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise JobError(
            f"--data-uri {base_url} does not answer ({reason}); check the URL, or point it "
            f"at {LAYOUT_HINT}"
        ) from None
    sums = {}
    for line in (text or b"").decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) == 2 and re.fullmatch(r"[0-9a-f]{64}", parts[0]):
            sums[parts[1].lstrip("*")] = parts[0]
    return sums


# ----------------------------------------------------------------------------------------------
# parsing the archives


@dataclass
class ImageSplits:
    """Both splits as uint8 images N×H×W×C (channels last, as stored on the device) and labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    sha256: dict[str, str]  # archive name -> checksum of the file trained on (provenance)


def load_splits(p: DatasetPreset, paths: dict[str, Path], cache_dir: Path | None = None) -> ImageSplits:
    """Both splits of the archives at `paths`. With a `cache_dir`, the parsed arrays are kept
    there, keyed by the archives' sha256, and memory-mapped by the next start instead of being
    parsed again (a changed archive has another sha256; a damaged cache is parsed again)."""
    sha256 = {name: archive_sha256(path, cache_dir) for name, path in paths.items()}
    if cache_dir is None:
        return _parse(p, paths, sha256)
    key = hashlib.sha256(" ".join(sorted(sha256.values())).encode()).hexdigest()[:20]
    folder = cache_dir / "parsed" / f"{p.name}-{key}"
    with file_lock(folder):  # one process per machine parses; the others then map its arrays
        splits = _load_parsed(folder, sha256, len(p.class_names))
        if splits is None:
            splits = _parse(p, paths, sha256)
            _save_parsed(folder, splits)
    return splits


def _parse(p: DatasetPreset, paths: dict[str, Path], sha256: dict[str, str]) -> ImageSplits:
    if p.name == "mnist":
        images = {s: read_idx(paths[f"{s}-images-idx3-ubyte.gz"]) for s in ("train", "t10k")}
        labels = {s: read_idx(paths[f"{s}-labels-idx1-ubyte.gz"]) for s in ("train", "t10k")}
        for split in ("train", "t10k"):
            if images[split].ndim != 3 or labels[split].ndim != 1:
                raise JobError(f"{paths[f'{split}-images-idx3-ubyte.gz']}: not MNIST images")
            if len(images[split]) != len(labels[split]):
                raise JobError(f"{p.name} {split}: {len(images[split])} images but "
                               f"{len(labels[split])} labels; the archives do not belong together")
            if bad := labels_outside(labels[split], len(p.class_names)):
                raise JobError(f"{paths[f'{split}-labels-idx1-ubyte.gz']}: {bad}; not MNIST labels")
            if not len(images[split]):  # training would divide by it after an epoch
                raise JobError(f"{paths[f'{split}-images-idx3-ubyte.gz']} holds no images")
        return ImageSplits(
            images["train"].unsqueeze(-1), labels["train"].long(),
            images["t10k"].unsqueeze(-1), labels["t10k"].long(), sha256,
        )
    train_images, train_labels, test_images, test_labels = read_cifar10(
        paths["cifar-10-python.tar.gz"]
    )
    return ImageSplits(train_images, train_labels, test_images, test_labels, sha256)


# ----------------------------------------------------------------------------------------------
# the parsed-dataset cache

SPLIT_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")
MANIFEST = "manifest.json"  # written last: a folder without it is incomplete


def labels_outside(labels: torch.Tensor, classes: int) -> str | None:
    """What is wrong with labels that are not all class indices 0..classes-1 (None: nothing).
    Checked at load: an out-of-range label would otherwise be an IndexError in the loss."""
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < classes:
        return f"labels outside 0..{classes - 1} (from {int(labels.min())} to {int(labels.max())})"
    return None


def archive_sha256(path: Path, cache_dir: Path | None) -> str:
    """An archive's sha256; with a `cache_dir`, remembered there by the file's path, size,
    modification time, inode and status-change time, so that an unchanged archive is not read
    again at every start. As in git's index, the inode and ctime catch a rewrite whose mtime
    was put back (`touch -r`): no call can set a file's ctime."""
    if cache_dir is None:
        return file_digest(path)
    resolved, stat = str(path.resolve()), path.stat()
    identity = {"path": resolved, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "inode": stat.st_ino, "ctime_ns": stat.st_ctime_ns}
    memo = cache_dir / "sha256" / f"{hashlib.sha256(resolved.encode()).hexdigest()[:32]}.json"
    try:
        saved = json.loads(memo.read_text())
        if {key: saved.get(key) for key in identity} == identity and len(saved["sha256"]) == 64:
            return saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no memo yet, or a damaged one: hash the file
    digest = file_digest(path)
    atomic_write_bytes(memo, json.dumps({**identity, "sha256": digest}).encode())
    return digest


try:  # in the job's image; `make gpu-check` runs on a bare python3 with torch and numpy only
    import xxhash

    ARRAY_DIGEST = "xxh3_128"  # ~5 GB/s here: CIFAR-10's 184 MB of arrays in tens of ms
except ImportError:
    xxhash = None
    ARRAY_DIGEST = "blake2b_128"  # ~10 times slower: 0.4 s for CIFAR-10


def array_digest(array: np.ndarray, algorithm: str | None = None) -> str:
    """"<algorithm>:<hex digest>" of an array's bytes, as the parsed cache's manifest records it."""
    algorithm = algorithm or ARRAY_DIGEST
    data = memoryview(np.ascontiguousarray(array)).cast("B")
    if algorithm == "xxh3_128":
        return f"{algorithm}:{xxhash.xxh3_128_hexdigest(data)}"
    return f"{algorithm}:{hashlib.blake2b(data, digest_size=16).hexdigest()}"


def _save_parsed(folder: Path, splits: ImageSplits) -> None:
    arrays = {}
    for name in SPLIT_ARRAYS:
        array = getattr(splits, name).numpy()
        with atomic_output(folder / f"{name}.npy") as out:
            np.save(out, array)
        arrays[name] = [list(array.shape), str(array.dtype), array_digest(array)]
    manifest = {"sha256": splits.sha256, "arrays": arrays}
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=1).encode())


def _load_parsed(folder: Path, sha256: dict[str, str], classes: int) -> ImageSplits | None:
    """The cached arrays, memory-mapped (copy on write), each proven by its manifest's xxh3-128
    before it is served; None when any part is missing, of other archives, or damaged
    (truncated, another shape, other bytes, a label out of range): the caller parses again."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest["sha256"] != sha256:
            return None
        arrays = {}
        for name in SPLIT_ARRAYS:
            path = folder / f"{name}.npy"
            array = np.load(path, mmap_mode="c", allow_pickle=False)
            shape, dtype, digest = manifest["arrays"][name]
            if [list(array.shape), str(array.dtype)] != [shape, dtype]:
                return None
            if not digest.startswith(f"{ARRAY_DIGEST}:"):  # written where the other hash was
                return None
            if array_digest(array) != digest:
                say(True, f"the parsed-data cache {path} does not match its checksum (changed "
                          "on disk): parsing the archives again")
                return None
            arrays[name] = torch.from_numpy(array)
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None
    for split in ("train", "test"):
        if bad := labels_outside(arrays[f"{split}_labels"], classes):
            say(True, f"the parsed-data cache {folder / f'{split}_labels.npy'} holds {bad}: "
                      "parsing the archives again")
            return None
    return ImageSplits(**arrays, sha256=sha256)


def _corrupt(path: Path, detail: object, user_file: str | None = None) -> JobError:
    """A damaged archive: a fetched one is fetched again; a user's own file (`user_file`, as
    they named it, not the copy read) is theirs to check."""
    if user_file:
        return JobError(f"--test-data {user_file} is corrupt or truncated ({detail}); check that file")
    return JobError(
        f"{path} is corrupt or truncated ({detail}); delete it and fetch the dataset again"
    )


def read_idx(path: Path, user_file: str | None = None) -> torch.Tensor:
    """An MNIST IDX file (gzip-compressed, unsigned bytes) as a uint8 tensor of its shape."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise _corrupt(path, error, user_file) from None
    if len(raw) < 4 or raw[0:2] != b"\0\0" or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise _corrupt(path, "no IDX header for unsigned bytes", user_file)
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise _corrupt(path, f"header promises {expected} bytes, file holds {len(raw) - header}",
                       user_file)
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy())


CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"


class _CifarUnpickler(pickle.Unpickler):
    """The batches are pickles; a pickle can run any code, so only numpy arrays are allowed."""

    ALLOWED: ClassVar = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def unpickle_batch(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    images = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or len(images) != len(labels):
        raise ValueError(f"unexpected batch shape {images.shape}")
    if labels.size and not 0 <= labels.min() <= labels.max() <= 9:
        raise ValueError("labels outside 0..9")
    # Rows are R, G, B planes of 32×32; the device keeps images channels last (N×H×W×C).
    return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_cifar10(path: Path, user_file: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CIFAR-10 python tarball, read member by member in memory: nothing is extracted to
    disk, and a member whose name would escape the archive's folder is refused. Errors name
    `user_file` (a user's own --test-data) where given."""
    wanted = {*CIFAR_TRAIN, CIFAR_TEST}
    batches = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                name = posixpath.normpath(member.name)
                if name.startswith(("/", "..")) or member.name.startswith("/"):
                    raise JobError(
                        f"{user_file or path} holds a member that escapes its folder "
                        f"({member.name!r}); refusing the archive: "
                        f"{'check that file' if user_file else 'fetch a genuine copy'}"
                    )
                base = posixpath.basename(name)
                if member.isfile() and posixpath.dirname(name) == CIFAR_FOLDER and base in wanted:
                    batches[base] = unpickle_batch(tar.extractfile(member).read())
    except (tarfile.TarError, OSError, EOFError, zlib.error, pickle.UnpicklingError,
            ValueError, KeyError) as error:
        raise _corrupt(path, error, user_file) from None
    missing = sorted(wanted - batches.keys())
    if missing:
        raise _corrupt(path, f"no {CIFAR_FOLDER}/{missing[0]} inside", user_file)

    def stack(names):
        images = np.concatenate([batches[n][0] for n in names])
        labels = np.concatenate([batches[n][1] for n in names])
        return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)

    return (*stack(CIFAR_TRAIN), *stack([CIFAR_TEST]))


# ----------------------------------------------------------------------------------------------
# a test split: the archives', or a user's own test files


@dataclass
class TestSplit:
    images: torch.Tensor  # N×H×W×C uint8
    labels: torch.Tensor  # N int64
    source: str  # what the user named: a data URI or the test files
    sha256: dict[str, str]  # file name -> sha256 of what was read


def load_test_split(p: DatasetPreset, data_uri: str | None, cache_dir: Path,
                    endpoint_url: str | None) -> TestSplit:
    """The test split of the dataset's archives at `data_uri` (as `train --data-uri` takes it).
    Each archive's download lock lets one process per machine fetch it while the others wait."""
    check_cache_dir(cache_dir)
    paths = fetch_archives(p, data_uri, cache_dir, endpoint_url)
    splits = load_splits(p, paths, cache_dir)  # mapped from training's parsed cache when there
    test_archives = [name for name in paths if p.name != "mnist" or name.startswith("t10k")]
    return TestSplit(splits.test_images, splits.test_labels, data_uri or "the public mirrors",
                     {name: splits.sha256[name] for name in test_archives})


def read_test_files(p: DatasetPreset, uris: list[str], checkpoint: str,
                    endpoint_url: str | None) -> TestSplit:
    """A user's own labelled images in the dataset's archive format: for MNIST a gzipped IDX
    images file and its labels file (in any order); for CIFAR-10 one python-pickle batch (like
    `test_batch`) or a cifar-10-python.tar.gz (its test batch). Local paths or s3:// objects."""
    images = labels = None
    sha256 = {}
    with tempfile.TemporaryDirectory(prefix="cnn-job-test-data.") as folder:
        for uri in uris:
            data = read_object(uri, "--test-data", endpoint_url)
            name = Path(uri.rstrip("/")).name
            sha256[name] = hashlib.sha256(data).hexdigest()
            path = Path(folder) / f"{len(sha256)}-{name}"
            path.write_bytes(data)
            kind, parsed = _parse_test_file(path, data, uri)
            if kind == "images":
                images = _one(images, parsed, uri, "images")
            elif kind == "labels":
                labels = _one(labels, parsed, uri, "labels")
            else:
                images, labels = _one(images, parsed[0], uri, "images"), parsed[1]
            if images is not None and tuple(images.shape[1:]) != _shape(p):
                other = [q.name for q in PRESETS.values() if _shape(q) == tuple(images.shape[1:])]
                what = f"{other[0]} data" if other else "images"
                raise JobError(
                    f"{checkpoint} is a {p.name} checkpoint ({'×'.join(map(str, _shape(p)))} images), "
                    f"but --test-data {uri} holds {what} ({'×'.join(map(str, images.shape[1:]))}): "
                    f"pass {p.name} test data")
    if images is None or labels is None:
        raise JobError(f"--test-data: {p.name} needs images and labels "
                       f"({'an IDX images file and an IDX labels file' if p.name == 'mnist' else 'a batch'})")
    if len(images) != len(labels):
        raise JobError(f"--test-data: {len(images)} images but {len(labels)} labels; the files do "
                       "not belong together")
    if not len(images):
        raise JobError(f"--test-data {' '.join(uris)} holds no images: pass labelled test images")
    if bad := labels_outside(labels, len(p.class_names)):
        raise JobError(f"--test-data {' '.join(uris)}: {bad}")
    return TestSplit(images, labels, " ".join(uris), sha256)


def _shape(p: DatasetPreset) -> tuple[int, int, int]:
    return p.image_size, p.image_size, p.channels


def _one(current, new, uri: str, what: str):
    if current is not None:
        raise JobError(f"--test-data {uri}: a second file of {what}; pass one of each")
    return new


def _parse_test_file(path: Path, data: bytes, uri: str):
    """("images", N×H×W×C) | ("labels", N) | ("both", (images, labels)), from the file's contents."""
    unknown = JobError(f"--test-data {uri} is not a dataset archive: pass gzipped IDX files "
                       "(MNIST) or a CIFAR-10 python batch or tarball")
    if data[:2] == b"\x1f\x8b":
        with contextlib.suppress(tarfile.TarError, OSError, EOFError, zlib.error):
            if tarfile.is_tarfile(path):
                return "both", read_cifar10(path, uri)[2:]
        tensor = read_idx(path, uri)
        if tensor.ndim == 3:
            return "images", tensor.unsqueeze(-1)
        if tensor.ndim == 1:
            return "labels", tensor.long()
        raise JobError(f"--test-data {uri}: an IDX file of {tensor.ndim} dimensions; MNIST images "
                       "have 3 (N×28×28), labels 1")
    if data[:1] == b"\x80":  # a pickle: one CIFAR-10 batch, which may only build numpy arrays
        try:
            images, labels = unpickle_batch(data)
        except (pickle.UnpicklingError, ValueError, KeyError, EOFError, TypeError,
                AttributeError) as error:
            raise JobError(f"--test-data {uri} is not a CIFAR-10 batch ({first_line(error, 80)})") from None
        return "both", (torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))
    raise unknown


# ----------------------------------------------------------------------------------------------
# on-device batches


def derived_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of its parts (seed, epoch, step, rank, ...)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DeviceBatches:
    """One split held on the device as uint8; yields (normalised float images, labels).

    Training epochs: the epoch's order is a permutation drawn from (seed, epoch) alone, and the
    run walks it front to back in global batches of batch_size × world_size, rank r taking
    every world_size-th image from position r (as DistributedSampler does). So a step always
    consumes a prefix of the permutation, and where a run stands in its epoch is one number,
    the count of permutation positions consumed: a resume with another batch size or world
    size starts at that position, and each image is still used exactly once per epoch. At the
    end, the last `(N - position) % world_size` positions sit the epoch out (drop_last).
    Augmentation is drawn per permutation position from (seed, epoch), so an image gets the
    same crop and flip whatever the batch size, world size or resume point.

    Evaluation (shuffle=False): rank r takes images r, r + world_size, ... in order.
    """

    PAD = 4  # pixels of zero padding for the random crop, as torchvision's RandomCrop(32, 4)
    # (a recipe with another augmentation subclasses this: see job/recipes/fast.py)

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, p: DatasetPreset, device: torch.device,
        batch_size: int, *, shuffle: bool, augment: bool = False, seed: int = 0,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        self.images = images.to(device)  # N×H×W×C uint8
        self.labels = labels.to(device)
        self.device = device
        self.batch_size = batch_size
        self.shuffle, self.augment, self.seed = shuffle, augment, seed
        self.rank, self.world_size = rank, world_size
        # x_normalised = (x_uint8 / 255 - mean) / std, folded into one multiply-add
        std = torch.tensor(p.std, device=device).view(1, -1, 1, 1)
        mean = torch.tensor(p.mean, device=device).view(1, -1, 1, 1)
        self.scale, self.shift = 1 / (255 * std), -mean / std
        self.record_to: str | None = None  # append "epoch: indices" per batch to <this>.rank<r>
        self.per_rank = self.remaining(0) // world_size if shuffle else len(
            range(rank, len(self.images), world_size))  # evaluation shards may differ by one

    def __len__(self) -> int:
        """Batches per whole epoch on this rank."""
        return -(-self.per_rank // self.batch_size)

    def remaining(self, position: int) -> int:
        """Images (all ranks) a training epoch still serves after `position` of its order."""
        return (len(self.images) - position) // self.world_size * self.world_size

    def steps(self, position: int) -> int:
        """Steps a training epoch takes from `position` to its end."""
        return -(-self.remaining(position) // (self.batch_size * self.world_size))

    def order(self, epoch: int, position: int = 0) -> torch.Tensor:
        """Dataset indices this rank serves in `epoch` from `position` on, in serving order."""
        if not self.shuffle:
            return torch.arange(self.rank, len(self.images), self.world_size, device=self.device)
        return self._permutation(epoch)[self._positions(position)].to(self.device)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, "shuffle", epoch))
        return torch.randperm(len(self.images), generator=generator)

    def _positions(self, position: int) -> torch.Tensor:
        """This rank's permutation positions from `position` on: every world_size-th one."""
        end = position + self.remaining(position)
        return torch.arange(position + self.rank, end, self.world_size)

    def epoch(self, epoch: int, position: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from permutation `position` on (0: the whole epoch)."""
        order = self.order(epoch, position)
        if self.augment:
            crops = self._crops(epoch)[:, self._positions(position).to(self.device)]
        for start in range(0, len(order), self.batch_size):
            index = order[start: start + self.batch_size]
            if self.record_to:
                with open(f"{self.record_to}.rank{self.rank}", "a") as record:
                    record.write(f"{epoch}: {' '.join(map(str, index.tolist()))}\n")
            images = self.images[index]
            if self.augment:
                images = self._crop_and_flip(images, *crops[:, start: start + self.batch_size])
            # N×H×W×C viewed as N×C×H×W is a channels_last tensor: no copy, and the float ops
            # below keep that memory format for the convolutions.
            images = images.permute(0, 3, 1, 2).float().mul_(self.scale).add_(self.shift)
            yield images, self.labels[index]

    def _crops(self, epoch: int) -> torch.Tensor:
        """3 × N: vertical and horizontal crop offsets and a flip bit per permutation position."""
        n, span = len(self.images), 2 * self.PAD + 1
        generator = torch.Generator(device=self.device).manual_seed(
            derived_seed(self.seed, "augment", epoch))
        offsets = torch.randint(0, span, (2, n), device=self.device, generator=generator)
        flips = torch.randint(0, 2, (1, n), device=self.device, generator=generator)
        return torch.cat([offsets, flips])

    def _crop_and_flip(self, images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                       flip: torch.Tensor) -> torch.Tensor:
        """Each image's 4-pixel-padded crop at (dy, dx), mirrored where flip is 1: one gather."""
        n, height, width, _ = images.shape
        pad = self.PAD
        rows = dy.view(n, 1) + torch.arange(height, device=self.device)
        columns = torch.arange(width, device=self.device)
        columns = dx.view(n, 1) + torch.where(flip.view(n, 1).bool(), columns.flip(0), columns)
        padded = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad))
        batch = torch.arange(n, device=self.device).view(n, 1, 1)
        return padded[batch, rows.view(n, height, 1), columns.view(n, 1, width)]
