"""Datasets: archives fetched from where the user points, parsed into uint8 tensors that live
on the training device, and served as shuffled, normalised (optionally augmented) batches made
with batched tensor ops on that device. No PIL, no DataLoader workers. After training, the test
split that `cnn-job evaluate` scores: the archives', or a user's own files in their format.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import gzip
import hashlib
import io
import json
import math
import pickle
import posixpath
import re
import shutil
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

from job.datasets import CIFAR_PYTHON, IDX, PRESETS, DatasetPreset
from job.errors import JobError, cannot_write, first_line, reason
from job.progress import say
from job.storage import (
    CHUNK_BYTES,
    S3Store,
    atomic_output,
    atomic_write_bytes,
    check_writable_folder,
    file_digest,
    file_lock,
    http_download,
    http_get_bytes,
    http_transient_reason,
    local_path,
    parse_s3_uri,
    read_object,
    remove_stale_partials,
    request_timeout_s,
    ride_out,
    storage_retry_s,
    uri_kind,
)

# ----------------------------------------------------------------------------------------------
# fetching the archives

def layout_hint(p: DatasetPreset) -> str:
    """Where --data-uri may point: the layout itself, with the dataset's archive names."""
    return ("a folder, s3:// prefix or http(s) mirror laid out as <dataset>/<archive>, for "
            f"{p.name}: {', '.join(f'{p.name}/{archive.name}' for archive in p.archives)}")


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
        cache = cache_path(cache_dir, data_uri, _slug(base), p.name)
        return _download_all(p, [f"{base}/{p.name}"], cache, published=False, sums_url=base,
                             retry_s=storage_retry_s() if retry_s is None else retry_s)
    folder = local_path(data_uri) / p.name
    paths = {a.name: folder / a.name for a in p.archives}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        raise JobError(
            f"--data-uri {data_uri}: no {p.name}/{missing[0]} there; point it at {layout_hint(p)}"
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
    cache = cache_path(cache_dir, data_uri, "s3", store.bucket, store.prefix)
    paths = {}
    for archive in p.archives:
        dest = cache / archive.name
        with _download_lock(dest):  # one process per machine downloads; the others reuse it
            before = _file_identity(dest)
            try:
                store.download(archive.name, dest)  # a cached copy whose ETag matches is kept
            except OSError as error:  # the cache's disk: boto3's own errors are JobErrors here
                if _file_identity(dest) == before:
                    raise _no_room(p, archive.name, dest, error) from None
                # The archive landed; only its ETag marker did not: fetched again next time.
                _cannot_cache(cache_dir, dest.with_name(dest.name + ".etag"), error)
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
def _download_lock(dest: Path) -> Iterator[OSError | None]:
    """Hold `dest`'s lock and delete the temporary files of a download of it that was killed
    outright: every writer of `dest` takes this lock, so none of them is a live one's. Yields
    the error where the disk refuses the lock (see _try_lock): a cached copy may still serve."""
    with _try_lock(dest) as refused:
        if refused is None:
            with contextlib.suppress(OSError):  # a folder that refuses it refuses the download too
                remove_stale_partials(dest.parent, glob.escape(dest.name))
        yield refused


def _slug(url: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", url.split("://", 1)[1]).strip("_")


def _download_all(
    p: DatasetPreset, bases: list[str], cache: Path, published: bool, sums_url: str | None = None,
    retry_s: float = 0.0,
) -> dict[str, Path]:
    # A user's mirror may publish SHA256SUMS beside the dataset folders (../shared/datasets does);
    # the public mirrors' files are checked against torchvision's published md5s. A user's
    # mirror that fails for a while is waited for (`retry_s`, as S3 is); the public mirrors are
    # tried one after another, once: failing them all is a machine without internet.
    sha256_sums = _read_sha256_sums(p, sums_url, retry_s) if sums_url else {}
    paths = {}
    for archive in p.archives:
        dest = cache / archive.name
        md5 = archive.md5 if published else None
        sha256 = sha256_sums.get(f"{p.name}/{archive.name}")
        with _download_lock(dest) as refused:
            if not (dest.is_file() and _cached_copy_ok(dest, md5, sha256)):
                if refused:
                    raise _no_room(p, archive.name, dest, refused)
                if published:
                    _download_one(p, archive.name, bases, dest, md5)
                else:
                    _download_from_mirror(p, archive.name, bases[0], dest, retry_s)
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
            if _refused_by_disk(error):
                raise _no_room(p, name, dest, error) from None
            failures.append(f"{url}: {getattr(error, 'reason', None) or error}")
    raise JobError(
        f"could not download {p.name} ({'; '.join(failures)}); without internet, "
        f"point --data-uri at {layout_hint(p)}"
    )


def _download_from_mirror(p: DatasetPreset, name: str, base: str, dest: Path,
                          retry_s: float) -> None:
    url = f"{base}/{name}"
    try:
        ride_out(lambda: http_download(url, dest, timeout_s=request_timeout_s(retry_s)),
                 f"HTTP mirror {base}", url, retry_s, http_transient_reason)
    except (urllib.error.URLError, OSError, ValueError) as error:
        if _refused_by_disk(error):
            raise _no_room(p, name, dest, error) from None
        raise JobError(f"could not download {p.name} from {url} "
                       f"({getattr(error, 'reason', None) or error}); check --data-uri, or point "
                       f"it at {layout_hint(p)}") from None


def _read_sha256_sums(p: DatasetPreset, base_url: str, retry_s: float) -> dict[str, str]:
    url = f"{base_url}/SHA256SUMS"
    try:
        text = ride_out(lambda: http_get_bytes(url, request_timeout_s(retry_s)),
                        f"HTTP mirror {base_url}", url, retry_s, http_transient_reason)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise JobError(
            f"--data-uri {base_url} does not answer ({reason}); check the URL, or point it "
            f"at {layout_hint(p)}"
        ) from None
    sums = {}
    for line in (text or b"").decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) == 2 and re.fullmatch(r"[0-9a-f]{64}", parts[0]):
            sums[parts[1].lstrip("*")] = parts[0]
    return sums


# ----------------------------------------------------------------------------------------------
# the cache folder: paths kept inside it, and writes a full or read-only disk may refuse


def cache_path(cache_dir: Path, uri: str, *parts: str) -> Path:
    """`cache_dir`/`parts`, the parts taken from `uri`: a JobError naming the URI unless the path
    resolves inside `cache_dir`. storage.py's parsing refuses `..` in a URI; this guards every
    cache path derived from one, whatever slipped through."""
    path = cache_dir.joinpath(*parts)
    if not path.resolve().is_relative_to(cache_dir.resolve()):
        raise JobError(f"--data-uri {uri} would be cached outside --cache-dir {cache_dir}; "
                       "write it without '..' in its path")
    return path


# Errors of a disk that will not take the cache's files; a network error is none of them.
DISK_REFUSALS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}

_WARNED_CACHES: set[Path] = set()  # one warning per cache folder and process


def _refused_by_disk(error: BaseException) -> bool:
    """A download's error that is the cache's disk refusing the file (urllib wraps the network's
    own errors, connection refused included, in URLError)."""
    return (isinstance(error, OSError) and not isinstance(error, urllib.error.URLError)
            and error.errno in DISK_REFUSALS)


def _no_room(p: DatasetPreset, name: str, dest: Path, error: OSError) -> JobError:
    """A download with nowhere to go: the data itself cannot be had."""
    return cannot_write(f"the data cache at {dest.parent}", error,
                        "--cache-dir (or CNN_JOB_CACHE_DIR)",
                        f"{p.name}'s {name} cannot be downloaded")


def _cannot_cache(cache_dir: Path, path: Path, error: OSError) -> None:
    """The cache only saves time: where its disk refuses a write (full, read-only, no permission),
    the run goes on from memory, and says so once."""
    if cache_dir not in _WARNED_CACHES:
        _WARNED_CACHES.add(cache_dir)
        say(True, f"warning: cannot write the data cache at {path} ({reason(error)}); going on "
                  "without it this run")


@contextlib.contextmanager
def _cache_write(cache_dir: Path, path: Path) -> Iterator[None]:
    """A write to the cache (at `path`, as the warning names it) that the run can do without."""
    try:
        yield
    except OSError as error:
        _cannot_cache(cache_dir, path, error)


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[OSError | None]:
    """`path`'s file lock, held for the block; yields None, or the error where the disk refuses
    the lock file (read-only, no permission): then no one can write there either, and the block
    reads what is there, unlocked, and writes nothing."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(path))
            refused = None
        except OSError as error:
            refused = error
        yield refused


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced (its inode, mtime and size); None where there is none."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _remove(path: Path) -> None:
    """Whatever is at `path`: a file, or a folder that took a cache file's place."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


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
    parsed again (a changed archive has another sha256; a damaged cache is parsed again). A cache
    whose disk is full or read-only is read where it can be and otherwise done without: one
    warning line, and the splits parsed in memory."""
    sha256 = {name: archive_sha256(path, cache_dir) for name, path in paths.items()}
    if cache_dir is None:
        return _parse(p, paths, sha256)
    key = hashlib.sha256(" ".join(sorted(sha256.values())).encode()).hexdigest()[:20]
    folder = cache_dir / "parsed" / f"{p.name}-{key}"
    with _try_lock(folder) as refused:  # one process per machine parses; the others map its arrays
        if refused is None:
            with _cache_write(cache_dir, folder):  # left by a writer killed outright: none is live
                remove_stale_partials(folder)
        splits = _load_parsed(folder, sha256, len(p.class_names))
        if splits is None:
            splits = _parse(p, paths, sha256)
            if refused:
                _cannot_cache(cache_dir, folder, refused)
            else:
                with _cache_write(cache_dir, folder):
                    _save_parsed(folder, splits)
    return splits


def _parse(p: DatasetPreset, paths: dict[str, Path], sha256: dict[str, str]) -> ImageSplits:
    if p.archive_format == IDX:
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
    (tarball,) = paths.values()
    train_images, train_labels, test_images, test_labels = read_cifar10(tarball)
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
    with _cache_write(cache_dir, memo):
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
    """The arrays, then the manifest that makes the folder complete. Where the disk refuses
    (full, read-only), raises its OSError having removed what it wrote: a full disk gets its
    space back, and a folder without its manifest is never read."""
    _remove(folder / MANIFEST)  # incomplete until the new one lands
    arrays = {}
    try:
        for name in SPLIT_ARRAYS:
            array = getattr(splits, name).numpy()
            _remove(folder / f"{name}.npy")  # a folder there would refuse the rename
            with atomic_output(folder / f"{name}.npy") as out:
                np.save(out, array)
            arrays[name] = [list(array.shape), str(array.dtype), array_digest(array)]
        manifest = {"sha256": splits.sha256, "arrays": arrays}
        atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    except OSError:
        for name in arrays:
            with contextlib.suppress(OSError):
                _remove(folder / f"{name}.npy")
        raise


def _load_parsed(folder: Path, sha256: dict[str, str], classes: int) -> ImageSplits | None:
    """The cached arrays, memory-mapped (copy on write), each proven by its manifest's xxh3-128
    before it is served. None, quietly, when there is no complete cache of these archives; None
    with one line saying so when any part is damaged (a manifest entry missing, a file truncated
    or unreadable, another shape, other bytes, a label out of range). The caller parses again."""
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = _manifest_arrays(manifest)
    except FileNotFoundError:
        return None  # never completed: a first start, or its writer was killed before the end
    except (OSError, ValueError) as error:
        return _reparse(manifest_path, f"is damaged ({reason(error, 80)})")
    if manifest.get("sha256") != sha256:
        return None
    if any(not digest.startswith(f"{ARRAY_DIGEST}:") for _, _, digest in entries.values()):
        return None  # written where the other hash was: a different Python, not damage
    arrays = {}
    for name, (shape, dtype, digest) in entries.items():
        path = folder / f"{name}.npy"
        try:
            array = np.load(path, mmap_mode="c", allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            return _reparse(path, f"is damaged ({reason(error, 80)})")
        if [list(array.shape), str(array.dtype)] != [shape, dtype]:
            return _reparse(path, f"is damaged ({list(array.shape)} {array.dtype}, where the "
                                  f"manifest says {shape} {dtype})")
        if array_digest(array) != digest:
            return _reparse(path, "does not match its checksum (changed on disk)")
        arrays[name] = torch.from_numpy(array)
    for split in ("train", "test"):
        if bad := labels_outside(arrays[f"{split}_labels"], classes):
            return _reparse(folder / f"{split}_labels.npy", f"holds {bad}")
    return ImageSplits(**arrays, sha256=sha256)


def _manifest_arrays(manifest: object) -> dict[str, tuple[list[int], str, str]]:
    """The manifest's [shape, dtype, digest] of each array; a ValueError naming the first that
    is missing or malformed (a null digest, a shape that is not a list of sizes)."""
    arrays = manifest.get("arrays") if isinstance(manifest, dict) else None
    entries = {}
    for name in SPLIT_ARRAYS:
        entry = arrays.get(name) if isinstance(arrays, dict) else None
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], list)
                and all(isinstance(size, int) for size in entry[0])
                and isinstance(entry[1], str) and isinstance(entry[2], str)):
            raise ValueError(f"no shape, dtype and digest for {name}")
        entries[name] = tuple(entry)
    return entries


def _reparse(path: Path, what: str) -> None:
    """The one line for a damaged cache: it is parsed again from the archives (and rewritten)."""
    say(True, f"the parsed-data cache {path} {what}: parsing the archives again")


def _corrupt(path: Path, detail: object, user_file: str | None = None) -> JobError:
    """A damaged archive: a fetched one is fetched again; a user's own file (`user_file`, as
    they named it, not the copy read) is theirs to check."""
    if user_file:
        return JobError(f"--test-data {user_file} is corrupt or truncated ({detail}); check that file")
    return JobError(
        f"{path} is corrupt or truncated ({detail}); delete it and fetch the dataset again"
    )


# ----------------------------------------------------------------------------------------------
# how far an archive may inflate: a gzip bomb posing as one stops there

IDX_IMAGES_HEADER_BYTES = 16  # the magic number, then the count, rows and columns
CIFAR_BATCH_IMAGES = 10000  # in each of the six batch files
# A pickled CIFAR-10 record: its pixels at up to 2 bytes each (a Python 3 pickle, protocol 2,
# stores the uint8 array as a latin-1 string in UTF-8: ../shared/datasets' copy takes 1.46),
# then its label and its file name.
CIFAR_RECORD_SLACK_BYTES = 256


def inflated_bytes_bound(p: DatasetPreset, batch: bool = False) -> int:
    """The most bytes `p`'s archives can inflate to, from the facts of their format and the
    splits' sizes: MNIST's largest IDX file (the training images); CIFAR-10's tarball of all six
    batches, or with `batch` one batch file."""
    pixels = p.channels * p.image_size ** 2
    if p.archive_format == IDX:
        return IDX_IMAGES_HEADER_BYTES + max(p.split_sizes) * pixels
    record = 2 * pixels + CIFAR_RECORD_SLACK_BYTES
    if batch:
        return CIFAR_BATCH_IMAGES * record + (64 << 10)
    return sum(p.split_sizes) * record + (1 << 20)  # and the tar headers, padding, batches.meta


def _in_format(archive_format: str) -> DatasetPreset:
    """The dataset whose archives are in `archive_format`: its splits bound what they inflate to."""
    return next(p for p in PRESETS.values() if p.archive_format == archive_format)


def _too_big(path: Path, user_file: str | None, p: DatasetPreset, claim: str) -> JobError:
    name = f"--test-data {user_file}" if user_file else str(path)
    return JobError(f"{name} {claim}; it is not {p.name}'s {'test data' if user_file else 'archive'}")


class _Inflating:
    """A decompressing stream's reader (tarfile reads through it) that counts what it inflates
    and raises `refusal` once past `limit` bytes: a bomb costs what the dataset could, not what
    the bomb holds."""

    def __init__(self, stream: io.BufferedIOBase, limit: int, refusal: JobError) -> None:
        self.stream, self.limit, self.refusal, self.count = stream, limit, refusal, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size if size >= 0 else self.limit - self.count + 1)
        self.count += len(data)
        if self.count > self.limit:
            raise self.refusal
        return data


def _read_into(stream: io.BufferedIOBase, view: memoryview) -> int:
    """Fill `view` from `stream` a chunk at a time (one whole read would hold a second copy);
    returns the bytes read, fewer where the stream ends first."""
    held = 0
    while held < len(view) and (count := stream.readinto(view[held: held + CHUNK_BYTES])):
        held += count
    return held


def read_idx(path: Path, user_file: str | None = None) -> torch.Tensor:
    """An MNIST IDX file (gzip-compressed, unsigned bytes) as a uint8 tensor of its shape: inflated
    a chunk at a time into an array of the size its header promises, and never past what an
    MNIST split can hold (inflated_bytes_bound)."""
    p = _in_format(IDX)
    limit = inflated_bytes_bound(p)
    try:
        with gzip.open(path, "rb") as handle:
            magic = handle.read(4)
            if len(magic) < 4 or magic[:3] != b"\0\0\x08" or not 1 <= magic[3] <= 4:
                raise _corrupt(path, "no IDX header for unsigned bytes", user_file)
            sizes = handle.read(4 * magic[3])
            if len(sizes) < 4 * magic[3]:
                raise _corrupt(path, "no IDX header for unsigned bytes", user_file)
            dims = tuple(int.from_bytes(sizes[i: i + 4], "big") for i in range(0, len(sizes), 4))
            header, expected = 4 + len(sizes), math.prod(dims)
            if header + expected > limit:
                raise _too_big(path, user_file, p, f"has a header that promises {expected} bytes, "
                                                   f"more than the {limit} a {p.name} split can hold")
            data = np.empty(expected, np.uint8)
            held, beyond = _read_into(handle, memoryview(data)), 0
            while held == expected and (chunk := handle.read(CHUNK_BYTES)):
                beyond += len(chunk)  # more than promised: counted, never kept
                if header + expected + beyond > limit:
                    raise _too_big(path, user_file, p,
                                   f"inflates past the {limit} bytes a {p.name} split can hold")
    except (OSError, EOFError, zlib.error) as error:
        raise _corrupt(path, error, user_file) from None
    if held + beyond != expected:
        raise _corrupt(path, f"header promises {expected} bytes, file holds {held + beyond}",
                       user_file)
    return torch.from_numpy(data.reshape(dims))


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
    """The CIFAR-10 python tarball, streamed member by member in memory: nothing is extracted to
    disk, a member whose name would escape the archive's folder is refused, and so is one larger
    than a batch can be, or a tarball that inflates past both splits (inflated_bytes_bound).
    Errors name `user_file` (a user's own --test-data) where given."""
    p = _in_format(CIFAR_PYTHON)
    limit, batch_limit = inflated_bytes_bound(p), inflated_bytes_bound(p, batch=True)
    past_limit = f"inflates past the {limit} bytes both cifar10 splits can hold"
    wanted = {*CIFAR_TRAIN, CIFAR_TEST}
    batches = {}
    try:
        with gzip.open(path, "rb") as packed:
            inflating = _Inflating(packed, limit, _too_big(path, user_file, p, past_limit))
            with tarfile.open(fileobj=inflating, mode="r|", bufsize=CHUNK_BYTES) as tar:
                for member in tar:
                    name = posixpath.normpath(member.name)
                    if name.startswith(("/", "..")) or member.name.startswith("/"):
                        raise JobError(
                            f"{user_file or path} holds a member that escapes its folder "
                            f"({member.name!r}); refusing the archive: "
                            f"{'check that file' if user_file else 'fetch a genuine copy'}"
                        )
                    base = posixpath.basename(name)
                    is_batch = member.isfile() and posixpath.dirname(name) == CIFAR_FOLDER and base in wanted
                    # Refused at its header, before its bytes are inflated:
                    if is_batch and member.size > batch_limit:
                        raise _too_big(path, user_file, p, f"inflates past the {batch_limit} bytes a "
                                                           f"cifar10 batch can hold ({member.name})")
                    if member.size > limit - inflating.count:
                        raise _too_big(path, user_file, p, f"{past_limit} ({member.name})")
                    if is_batch:
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
    return TestSplit(splits.test_images, splits.test_labels, data_uri or "the public mirrors",
                     {a.name: splits.sha256[a.name] for a in p.archives if a.holds_test})


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
                       f"({TEST_FILES[p.archive_format]})")
    if len(images) != len(labels):
        raise JobError(f"--test-data: {len(images)} images but {len(labels)} labels; the files do "
                       "not belong together")
    if not len(images):
        raise JobError(f"--test-data {' '.join(uris)} holds no images: pass labelled test images")
    if bad := labels_outside(labels, len(p.class_names)):
        raise JobError(f"--test-data {' '.join(uris)}: {bad}")
    return TestSplit(images, labels, " ".join(uris), sha256)


# What --test-data takes in each archive format.
TEST_FILES = {IDX: "an IDX images file and an IDX labels file", CIFAR_PYTHON: "a batch"}


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
