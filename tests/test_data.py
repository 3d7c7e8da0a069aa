import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import job.data
from bench.gzip_bomb import cifar10_bomb, mnist_bomb, pull
from job.data import (
    fetch_archives,
    load_splits,
    load_test_split,
    read_cifar10,
    read_idx,
    read_test_files,
)
from job.datasets import preset
from job.errors import JobError, StorageUnavailable
from tests.conftest import REPO, read_only, run_cli


def sha256sums(data_dir: Path) -> dict[str, str]:
    lines = (data_dir / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split() for line in lines)}


# ----------------------------------------------------------------------------------------------
# the real archives


def test_mnist_archives_parse(mnist, data_dir):
    assert mnist.train_images.shape == (60000, 28, 28, 1)
    assert mnist.test_images.shape == (10000, 28, 28, 1)
    assert mnist.train_images.dtype == torch.uint8
    # The test labels are byte-identical to upstream: their famous first ten.
    assert mnist.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(mnist.train_labels).tolist()[:3] == [5923, 6742, 5958]
    assert 30 < mnist.train_images.float().mean() < 35  # upstream mean pixel is 33.3
    for name, digest in mnist.sha256.items():
        assert sha256sums(data_dir)[f"mnist/{name}"] == digest


def test_cifar10_archive_parses(cifar10, data_dir):
    assert cifar10.train_images.shape == (50000, 32, 32, 3)
    assert cifar10.test_images.shape == (10000, 32, 32, 3)
    assert torch.bincount(cifar10.train_labels).tolist() == [5000] * 10
    assert torch.bincount(cifar10.test_labels).tolist() == [1000] * 10
    channel_means = cifar10.train_images.float().mean(dim=(0, 1, 2)) / 255
    torch.testing.assert_close(channel_means, torch.tensor(preset("cifar10").mean), atol=0.01, rtol=0)
    assert cifar10.sha256["cifar-10-python.tar.gz"] == sha256sums(data_dir)["cifar10/cifar-10-python.tar.gz"]


# ----------------------------------------------------------------------------------------------
# damaged and hostile archives


def test_truncated_mnist_gzip_is_a_clear_error(tmp_path, data_dir):
    source = (data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    damaged = tmp_path / "t10k-labels-idx1-ubyte.gz"
    damaged.write_bytes(source[: len(source) // 2])
    with pytest.raises(JobError, match="corrupt or truncated"):
        read_idx(damaged)


def test_idx_whose_header_promises_more_than_it_holds(tmp_path):
    path = tmp_path / "bad-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(b"\0\0\x08\x01" + (100).to_bytes(4, "big") + bytes(99)))
    with pytest.raises(JobError, match="promises 100 bytes, file holds 99"):
        read_idx(path)
    path.write_bytes(gzip.compress(b"not an idx file at all"))
    with pytest.raises(JobError, match="no IDX header"):
        read_idx(path)


def test_truncated_cifar_tarball_is_a_clear_error(tmp_path, data_dir):
    damaged = tmp_path / "cifar-10-python.tar.gz"
    with open(data_dir / "cifar10" / "cifar-10-python.tar.gz", "rb") as source:
        damaged.write_bytes(source.read(5_000_000))
    with pytest.raises(JobError, match="corrupt or truncated"):
        read_cifar10(damaged)


def _tarball(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_member_escaping_its_folder_is_refused(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    _tarball(archive, {"cifar-10-batches-py/../../evil": b"x"})
    with pytest.raises(JobError, match="escapes its folder"):
        read_cifar10(archive)
    assert not (tmp_path.parent / "evil").exists()


class _RunsCode:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-cnn-job-test",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    _tarball(archive, {"cifar-10-batches-py/data_batch_1": pickle.dumps({"data": _RunsCode()})})
    with pytest.raises(JobError, match=r"refusing to load shutil\.rmtree"):
        read_cifar10(archive)


def test_cifar_batch_missing_from_tarball(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    batch = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]})
    _tarball(archive, {f"cifar-10-batches-py/data_batch_{i}": batch for i in range(1, 5)})
    with pytest.raises(JobError, match="no cifar-10-batches-py/data_batch_5 inside"):
        read_cifar10(archive)


def test_a_users_test_files_read_as_the_archives_test_split(data_dir, mnist, cifar10, tmp_path):
    mnist_files = [str(data_dir / "mnist" / name)  # in either order
                   for name in ("t10k-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz")]
    split = read_test_files(preset("mnist"), mnist_files, "run", None)
    assert torch.equal(split.images, mnist.test_images) and torch.equal(split.labels, mnist.test_labels)
    assert split.sha256 == {name: mnist.sha256[name] for name in split.sha256} and len(split.sha256) == 2
    tarball = str(data_dir / "cifar10" / "cifar-10-python.tar.gz")
    split = read_test_files(preset("cifar10"), [tarball], "run", None)
    assert torch.equal(split.images, cifar10.test_images) and split.source == tarball
    archives = load_test_split(preset("mnist"), str(data_dir), tmp_path, None)
    assert torch.equal(archives.labels, mnist.test_labels) and set(archives.sha256) == {
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
    with pytest.raises(JobError, match=r"run is a mnist checkpoint .* holds cifar10 data"):
        read_test_files(preset("mnist"), [tarball], "run", None)


# ----------------------------------------------------------------------------------------------
# fetching


def test_local_folder_without_archives(tmp_path):
    (tmp_path / "mnist").mkdir()
    with pytest.raises(JobError, match=r"no mnist/train-images-idx3-ubyte.gz there; point it at"):
        fetch_archives(preset("mnist"), str(tmp_path), tmp_path / "cache")


def test_http_mirror_downloads_once_and_verifies(http_mirror, data_dir, tmp_path):
    url, requests = http_mirror(data_dir)
    cache = tmp_path / "cache"
    paths = fetch_archives(preset("mnist"), url, cache)
    assert sorted(requests) == sorted(
        ["/SHA256SUMS"] + [f"/mnist/{a.name}" for a in preset("mnist").archives]
    )
    for name, path in paths.items():
        assert path.is_relative_to(cache)
        assert path.read_bytes() == (data_dir / "mnist" / name).read_bytes()
    requests.clear()
    assert fetch_archives(preset("mnist"), url, cache) == paths
    assert requests == ["/SHA256SUMS"]  # archives come from the cache the second time
    splits = load_splits(preset("mnist"), paths)
    assert splits.train_images.shape == (60000, 28, 28, 1)


def test_http_mirror_with_a_damaged_copy_leaves_nothing_in_the_cache(http_mirror, data_dir, tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(data_dir / "mnist", mirror / "mnist")
    shutil.copy(data_dir / "SHA256SUMS", mirror)
    damaged = mirror / "mnist" / "t10k-labels-idx1-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    url, _ = http_mirror(mirror)
    cache = tmp_path / "cache"
    with pytest.raises(JobError, match="does not match the mirror's SHA256SUMS"):
        fetch_archives(preset("mnist"), url, cache)
    leftovers = [p.name for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert "t10k-labels-idx1-ubyte.gz" not in leftovers
    assert not [name for name in leftovers if "partial" in name]


def test_unreachable_mirror_is_one_clear_error(tmp_path):
    with pytest.raises(StorageUnavailable, match=r"HTTP mirror http://127.0.0.1:9 unreachable "
                                                 r"for 0 s \(Connection refused\)"):
        fetch_archives(preset("mnist"), "http://127.0.0.1:9", tmp_path, retry_s=0)


class _FailingAtFirst(http.server.SimpleHTTPRequestHandler):
    """Answers 503 to the first request for each file, as a mirror behind a busy proxy might;
    serves it the next time."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path not in self.server.failed:
            self.server.failed.add(self.path)
            self.send_error(503, "busy")
        else:
            super().do_GET()


def test_a_mirror_that_fails_for_a_while_is_waited_for(tmp_path, data_dir, capsys):
    handler = functools.partial(_FailingAtFirst, directory=str(data_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.failed = set()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        paths = fetch_archives(preset("mnist"), url, tmp_path / "cache", retry_s=60)
    finally:
        server.shutdown()
        server.server_close()
    for name, path in paths.items():
        assert path.read_bytes() == (data_dir / "mnist" / name).read_bytes()
    said = capsys.readouterr().out
    assert f"HTTP mirror {url} unreachable (HTTP 503) at {url}/SHA256SUMS; retrying" in said
    assert f"at {url}/mnist/train-images-idx3-ubyte.gz; retrying" in said


def test_public_mirror_failure_says_how_to_use_a_local_copy(tmp_path, http_mirror, data_dir):
    # The public-mirror path, pointed at loopback and serving a copy with one byte more than
    # the published file: its md5 is refused and nothing stays in the cache.
    mirror = tmp_path / "mirror"
    shutil.copytree(data_dir / "mnist", mirror / "mnist")
    first = mirror / "mnist" / preset("mnist").archives[0].name
    first.write_bytes(first.read_bytes() + b"\0")
    url, _ = http_mirror(mirror)
    p = dataclasses.replace(preset("mnist"), mirrors=(f"{url}/mnist",))
    with pytest.raises(JobError, match=r"could not download mnist .*md5 .* is not the published"):
        fetch_archives(p, None, tmp_path / "cache")
    assert not [f for f in (tmp_path / "cache").rglob("*.gz")]


# ----------------------------------------------------------------------------------------------
# the parsed-dataset cache


def _mnist_copy(data_dir, tmp_path):
    folder = tmp_path / "data" / "mnist"
    shutil.copytree(data_dir / "mnist", folder)
    return {a.name: folder / a.name for a in preset("mnist").archives}


def _count_parses(monkeypatch) -> list:
    parses = []
    original = job.data._parse
    monkeypatch.setattr(job.data, "_parse", lambda *a: parses.append(1) or original(*a))
    return parses


def _assert_same_splits(a, b):
    for name in job.data.SPLIT_ARRAYS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.sha256 == b.sha256


def test_parsed_cache_miss_then_hit(data_dir, tmp_path, monkeypatch, mnist):
    paths, cache = _mnist_copy(data_dir, tmp_path), tmp_path / "cache"
    parses = _count_parses(monkeypatch)
    first = load_splits(preset("mnist"), paths, cache)
    second = load_splits(preset("mnist"), paths, cache)
    assert len(parses) == 1  # the second start mapped the arrays instead of parsing
    _assert_same_splits(first, mnist)
    _assert_same_splits(second, mnist)
    assert second.train_images.shape == (60000, 28, 28, 1)


def test_parsed_cache_sees_a_changed_archive(data_dir, tmp_path, monkeypatch):
    paths, cache = _mnist_copy(data_dir, tmp_path), tmp_path / "cache"
    first = load_splits(preset("mnist"), paths, cache)
    parses = _count_parses(monkeypatch)
    labels = paths["t10k-labels-idx1-ubyte.gz"]
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[8] = (content[8] + 1) % 10  # the first test label changes
    labels.write_bytes(gzip.compress(bytes(content), mtime=0))
    changed = load_splits(preset("mnist"), paths, cache)
    assert len(parses) == 1 and changed.sha256 != first.sha256
    assert changed.test_labels[0] == (first.test_labels[0] + 1) % 10


def test_parsed_cache_repairs_a_truncated_file(data_dir, tmp_path, monkeypatch, mnist, capsys):
    paths, cache = _mnist_copy(data_dir, tmp_path), tmp_path / "cache"
    load_splits(preset("mnist"), paths, cache)
    (cached,) = (cache / "parsed").glob("mnist-*/train_images.npy")
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])
    capsys.readouterr()
    parses = _count_parses(monkeypatch)
    _assert_same_splits(load_splits(preset("mnist"), paths, cache), mnist)
    assert len(parses) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert f"the parsed-data cache {cached} is damaged" in line and "parsing the archives again" in line
    _assert_same_splits(load_splits(preset("mnist"), paths, cache), mnist)
    assert len(parses) == 1  # repaired: mapped again


def _cached(cache: Path, name: str) -> Path:
    (path,) = (cache / "parsed").glob(f"mnist-*/{name}.npy")
    return path


def _rewrite_in_place(path: Path, change) -> None:
    """Change a cached array's values, same shape and size, as a disk fault or a hand would."""
    array = np.load(path)
    change(array)
    with open(path, "r+b") as handle:  # same inode, same size: only the bytes differ
        np.save(handle, array)


def test_parsed_cache_with_changed_image_bytes_is_parsed_again(data_dir, tmp_path, monkeypatch,
                                                               mnist, capsys):
    paths, cache = _mnist_copy(data_dir, tmp_path), tmp_path / "cache"
    load_splits(preset("mnist"), paths, cache)
    for name in ("train_images", "test_images"):
        size = _cached(cache, name).stat().st_size
        _rewrite_in_place(_cached(cache, name), lambda a: a.__setitem__(slice(0, 500), 255 - a[:500]))
        assert _cached(cache, name).stat().st_size == size
    capsys.readouterr()
    parses = _count_parses(monkeypatch)
    _assert_same_splits(load_splits(preset("mnist"), paths, cache), mnist)
    assert len(parses) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert "train_images.npy does not match its checksum" in line and "parsing the archives again" in line
    _assert_same_splits(load_splits(preset("mnist"), paths, cache), mnist)
    assert len(parses) == 1  # repaired: mapped again, without a word
    assert not capsys.readouterr().out


def test_parsed_cache_with_other_labels_is_parsed_again(data_dir, tmp_path, monkeypatch, mnist, capsys):
    paths, cache = _mnist_copy(data_dir, tmp_path), tmp_path / "cache"
    load_splits(preset("mnist"), paths, cache)
    _rewrite_in_place(_cached(cache, "train_labels"),
                      lambda a: a.__setitem__(slice(0, 667), (a[:667] + 1) % 10))  # still 0..9
    parses = _count_parses(monkeypatch)
    _assert_same_splits(load_splits(preset("mnist"), paths, cache), mnist)
    assert len(parses) == 1 and "train_labels.npy does not match its checksum" in capsys.readouterr().out


def test_parsed_cache_label_out_of_range_is_caught_even_with_a_matching_checksum(
        data_dir, tmp_path, monkeypatch, mnist, capsys):
    paths, cache = _mnist_copy(data_dir, tmp_path), tmp_path / "cache"
    load_splits(preset("mnist"), paths, cache)
    labels = _cached(cache, "test_labels")
    _rewrite_in_place(labels, lambda a: a.__setitem__(7, 32515))
    manifest_path = labels.parent / job.data.MANIFEST  # a hand that also "fixed" the manifest
    manifest = json.loads(manifest_path.read_text())
    manifest["arrays"]["test_labels"][2] = job.data.array_digest(np.load(labels))
    manifest_path.write_text(json.dumps(manifest))
    capsys.readouterr()
    parses = _count_parses(monkeypatch)
    _assert_same_splits(load_splits(preset("mnist"), paths, cache), mnist)
    assert len(parses) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert "test_labels.npy holds labels outside 0..9 (from 0 to 32515)" in line


def test_parsed_cache_without_xxhash_proves_its_arrays_with_blake2b(data_dir, tmp_path, monkeypatch,
                                                                   mnist, capsys):
    paths, cache = _mnist_copy(data_dir, tmp_path), tmp_path / "cache"
    load_splits(preset("mnist"), paths, cache)  # written with xxh3
    monkeypatch.setattr(job.data, "ARRAY_DIGEST", "blake2b_128")  # a python3 without xxhash
    parses = _count_parses(monkeypatch)
    _assert_same_splits(load_splits(preset("mnist"), paths, cache), mnist)
    assert len(parses) == 1 and not capsys.readouterr().out  # another hash: parsed again, quietly
    _rewrite_in_place(_cached(cache, "test_images"), lambda a: a.__setitem__(0, 255 - a[0]))
    _assert_same_splits(load_splits(preset("mnist"), paths, cache), mnist)
    assert len(parses) == 2 and "test_images.npy does not match its checksum" in capsys.readouterr().out


def test_archive_label_out_of_range_is_one_clear_error(data_dir, tmp_path):
    paths = _mnist_copy(data_dir, tmp_path)
    labels = paths["train-labels-idx1-ubyte.gz"]
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[8 + 123] = 200  # the 124th training label
    labels.write_bytes(gzip.compress(bytes(content), mtime=0))
    for cache in (None, tmp_path / "cache"):
        with pytest.raises(JobError, match=r"train-labels-idx1-ubyte.gz: labels outside 0..9 "
                                           r"\(from 0 to 200\); not MNIST labels"):
            load_splits(preset("mnist"), paths, cache)


def test_archive_of_zero_images_is_one_clear_error(data_dir, tmp_path):
    paths = _mnist_copy(data_dir, tmp_path)
    # valid IDX headers that promise 0 images (of 28×28) and 0 labels
    header = b"\0\0\x08\x03" + bytes(4) + b"\0\0\0\x1c" * 2
    paths["t10k-images-idx3-ubyte.gz"].write_bytes(gzip.compress(header))
    paths["t10k-labels-idx1-ubyte.gz"].write_bytes(gzip.compress(b"\0\0\x08\x01" + bytes(4)))
    with pytest.raises(JobError, match=r"t10k-images-idx3-ubyte.gz holds no images"):
        load_splits(preset("mnist"), paths)


def test_sha256_memo_sees_a_same_size_rewrite_with_its_mtime_put_back(data_dir, tmp_path):
    paths, cache = _mnist_copy(data_dir, tmp_path), tmp_path / "cache"
    archive = paths["t10k-labels-idx1-ubyte.gz"]
    content = bytearray(gzip.decompress(archive.read_bytes()))
    # gzip's stored (level 0) blocks: the file's size is its contents' size plus a fixed frame
    archive.write_bytes(gzip.compress(bytes(content), compresslevel=0, mtime=0))
    first = load_splits(preset("mnist"), paths, cache)
    before = archive.stat()
    # The file system's clock moves in ticks: wait (on the clock, not a sleep) until a change now
    # would get another ctime than the archive's, as any rewrite a person makes does.
    probe = tmp_path / "probe"
    while probe.touch() or probe.stat().st_ctime_ns <= before.st_ctime_ns:
        probe.unlink()
    assert content[8] != content[9]
    content[8], content[9] = content[9], content[8]  # two test labels swap: same size
    other = gzip.compress(bytes(content), compresslevel=0, mtime=0)
    assert len(other) == before.st_size
    with open(archive, "r+b") as handle:  # in place: the inode stays
        handle.write(other)
    os.utime(archive, ns=(before.st_atime_ns, before.st_mtime_ns))  # touch -r
    after = archive.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size,
                                                               before.st_mtime_ns)
    changed = load_splits(preset("mnist"), paths, cache)
    assert changed.sha256[archive.name] == hashlib.sha256(other).hexdigest() != first.sha256[archive.name]
    assert changed.test_labels[0] == first.test_labels[1]


def test_sha256_is_remembered_by_path_size_and_mtime(data_dir, tmp_path, monkeypatch):
    paths, cache = _mnist_copy(data_dir, tmp_path), tmp_path / "cache"
    archive = paths["train-labels-idx1-ubyte.gz"]
    digest = job.data.archive_sha256(archive, cache)
    hashed = []
    original = job.data.file_digest
    monkeypatch.setattr(job.data, "file_digest", lambda *a: hashed.append(a) or original(*a))
    assert job.data.archive_sha256(archive, cache) == digest and not hashed
    os.utime(archive, ns=(0, archive.stat().st_mtime_ns + 1))
    assert job.data.archive_sha256(archive, cache) == digest and len(hashed) == 1


def test_two_processes_fill_the_parsed_cache_at_once(data_dir, tmp_path):
    _mnist_copy(data_dir, tmp_path)
    script = ("import sys; from pathlib import Path; from job.datasets import preset; "
              "from job.data import fetch_archives, load_splits; p = preset('mnist'); "
              "s = load_splits(p, fetch_archives(p, sys.argv[1], Path(sys.argv[2])), Path(sys.argv[2])); "
              "print(int(s.train_images.sum()), int(s.test_labels.sum()))")
    command = [sys.executable, "-c", script, str(tmp_path / "data"), str(tmp_path / "cache")]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=REPO) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0] and outputs[0][0].strip()
    assert len(list((tmp_path / "cache" / "parsed").glob("mnist-*/manifest.json"))) == 1
    assert not list((tmp_path / "cache").rglob("*.partial"))


def _load_splits_quietly_twice(paths, cache, monkeypatch, mnist, capsys, expected_line: str):
    """The next start re-parses with `expected_line` (one line); the one after maps the repair."""
    capsys.readouterr()
    parses = _count_parses(monkeypatch)
    _assert_same_splits(load_splits(preset("mnist"), paths, cache), mnist)
    assert len(parses) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert expected_line in line and line.endswith("parsing the archives again"), line
    _assert_same_splits(load_splits(preset("mnist"), paths, cache), mnist)
    assert len(parses) == 1 and not capsys.readouterr().out  # repaired: mapped again


@pytest.mark.parametrize("entry", [None, "missing"])
def test_parsed_cache_manifest_without_a_digest_is_parsed_again(data_dir, tmp_path, monkeypatch,
                                                                mnist, capsys, entry):
    paths, cache = _mnist_copy(data_dir, tmp_path), tmp_path / "cache"
    load_splits(preset("mnist"), paths, cache)
    manifest_path = _cached(cache, "train_images").parent / job.data.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    if entry is None:
        manifest["arrays"]["train_images"][2] = None
    else:
        del manifest["arrays"]["test_labels"][2]
    manifest_path.write_text(json.dumps(manifest))
    _load_splits_quietly_twice(paths, cache, monkeypatch, mnist, capsys,
                               f"the parsed-data cache {manifest_path} is damaged")


def test_parsed_cache_array_replaced_by_a_folder_is_parsed_again(data_dir, tmp_path, monkeypatch,
                                                                 mnist, capsys):
    paths, cache = _mnist_copy(data_dir, tmp_path), tmp_path / "cache"
    load_splits(preset("mnist"), paths, cache)
    labels = _cached(cache, "train_labels")
    labels.unlink()
    (labels / "inside").mkdir(parents=True)  # a folder, not empty, where the array was
    _load_splits_quietly_twice(paths, cache, monkeypatch, mnist, capsys,
                               f"the parsed-data cache {labels} is damaged (Is a directory)")
    assert labels.is_file()


def test_partial_file_of_a_killed_cache_write_is_removed_by_the_next_start(data_dir, tmp_path,
                                                                          monkeypatch, mnist):
    paths, cache = _mnist_copy(data_dir, tmp_path), tmp_path / "cache"
    load_splits(preset("mnist"), paths, cache)
    # As a writer killed outright (SIGKILL, OOM) leaves the folder: the arrays written before it
    # died, the temporary file it was filling, and no manifest (written last).
    folder = _cached(cache, "train_images").parent
    (folder / job.data.MANIFEST).unlink()
    (folder / "test_labels.npy").unlink()
    torn = folder / ".test_labels.npy.k7q2zx9f.partial"
    torn.write_bytes(_cached(cache, "train_labels").read_bytes()[:5000])
    parses = _count_parses(monkeypatch)
    _assert_same_splits(load_splits(preset("mnist"), paths, cache), mnist)
    assert len(parses) == 1 and not torn.exists()
    assert not list(cache.rglob("*.partial")) and (folder / job.data.MANIFEST).is_file()


# ----------------------------------------------------------------------------------------------
# the cache on a full or read-only disk


@pytest.mark.parametrize("disk", ["full", "read-only parsed folder"])
def test_cache_that_cannot_be_written_trains_from_memory_with_one_warning(disk, tmpfs, tmp_path,
                                                                          data_dir):
    cache = tmp_path / "cache"
    if disk == "full":  # 20 MB: the memos fit, MNIST's 55 MB of parsed arrays do not
        tmpfs(cache)
        refused, reason = cache / "parsed", "space"
    else:
        refused, reason = tmpfs(cache / "parsed"), "Read-only file system"
        read_only(refused)
    result = run_cli("train", "mnist", "--data-uri", str(data_dir), "--cache-dir", str(cache),
                     "--checkpoint-uri", str(tmp_path / "c"), "--limit-train", "64", "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    (warning,) = [line for line in (result.stdout + result.stderr).splitlines() if "warning" in line]
    assert warning.startswith(f"warning: cannot write the data cache at {refused}"), warning
    assert reason in warning and warning.endswith("going on without it this run")
    assert not [p for p in cache.rglob("*") if p.suffix in (".partial", ".npy", ".json")
                and p.parent.parent == cache / "parsed"]  # nothing half-written stays


def test_read_only_parsed_cache_is_still_mapped(data_dir, tmp_path, tmpfs, monkeypatch, mnist, capsys):
    paths, cache = _mnist_copy(data_dir, tmp_path), tmp_path / "cache"
    tmpfs(cache / "parsed", size_mb=80)
    load_splits(preset("mnist"), paths, cache)
    read_only(cache / "parsed")
    capsys.readouterr()
    parses = _count_parses(monkeypatch)
    _assert_same_splits(load_splits(preset("mnist"), paths, cache), mnist)
    assert not parses and not capsys.readouterr().out  # served from the cache: nothing to say


def test_download_with_no_room_in_the_cache_is_one_line(s3, tmp_path, tmpfs):
    s3.client.put_object(Bucket=s3.bucket, Key="data/mnist/train-images-idx3-ubyte.gz",
                         Body=os.urandom(3 << 20))
    cache = tmpfs(tmp_path / "cache", size_mb=1)
    with pytest.raises(JobError, match=rf"cannot write the data cache at {cache}/s3/\S+ "
                                       r"\(No space left on device\).*--cache-dir") as error:
        fetch_archives(preset("mnist"), f"s3://{s3.bucket}/data", cache)
    assert "\n" not in str(error.value)
    assert not [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


# ----------------------------------------------------------------------------------------------
# cache paths stay inside --cache-dir


def test_s3_data_uri_with_dot_dot_writes_nothing_outside_the_cache(s3, tmp_path):
    cache = tmp_path / "cache"  # <cache>/s3/<bucket>/../../../outside is <tmp_path>/outside
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        s3.client.put_object(Bucket=s3.bucket, Key=f"../../../outside/mnist/{name}", Body=b"x")
    with pytest.raises(JobError):
        fetch_archives(preset("mnist"), f"s3://{s3.bucket}/../../../outside", cache)
    assert not (tmp_path / "outside").exists()


def test_cache_paths_derived_from_uris_stay_inside_the_cache_dir(tmp_path):
    cache = tmp_path / "cache"
    assert job.data.cache_path(cache, "s3://b/p", "s3", "b", "p/mnist") == cache / "s3/b/p/mnist"
    for uri, parts in [("s3://b/../../../x", ("s3", "b", "../../../x/mnist")),
                       ("http://..", ("..", "mnist")),
                       ("s3://b//etc", ("s3", "b", "/etc"))]:
        with pytest.raises(JobError, match=rf"--data-uri {re.escape(uri)} .*outside --cache-dir"):
            job.data.cache_path(cache, uri, *parts)
    assert not cache.exists()


# ----------------------------------------------------------------------------------------------
# archives inflate no further than the dataset can


def _dataset_bytes(dataset: str) -> int:
    """The real dataset's images and labels, as the splits hold them (uint8)."""
    p = preset(dataset)
    return sum(p.split_sizes) * (p.image_size ** 2 * p.channels + 1)


@pytest.fixture(scope="module")
def bare_peak(tmp_path_factory) -> int:
    """Peak RSS of `cnn-job data pull` that stops just before parsing: its imports' share."""
    folder = tmp_path_factory.mktemp("bare")
    status, output, peak = pull("mnist", folder, folder / "cache")
    assert status == 2 and "no mnist/train-images-idx3-ubyte.gz there" in output, output
    return peak


@pytest.mark.parametrize("dataset, make_bomb, inflated_mib", [
    ("mnist", mnist_bomb, 512),      # 0.5 MB of gzip, IDX header of 60000 training images
    ("cifar10", cifar10_bomb, 1024),  # 1 MB of gzip, a data_batch_1 member of 1 GiB
])
def test_gzip_bomb_is_one_line_and_costs_less_memory_than_the_dataset(
        dataset, make_bomb, inflated_mib, bare_peak, tmp_path):
    folder = make_bomb(tmp_path / "data", inflated_mib << 20)
    status, output, peak = pull(dataset, folder, tmp_path / "cache")
    assert status == 2 and len(output.splitlines()) == 1, output
    assert re.fullmatch(rf"error: {folder}/{dataset}/\S+ inflates past the \d+ bytes a {dataset} "
                        rf"\w+ can hold( \(\S+\))?; it is not {dataset}'s archive\n", output), output
    assert peak - bare_peak < 2 * _dataset_bytes(dataset), (peak, bare_peak)


def test_tarball_larger_than_the_dataset_is_refused_before_it_is_inflated(tmp_path):
    limit = job.data.inflated_bytes_bound(preset("cifar10"))
    archive = tmp_path / "cifar-10-python.tar.gz"
    huge = tarfile.TarInfo("cifar-10-batches-py/readme.html")  # a member nobody reads
    huge.size = limit + (1 << 20)
    with open(archive, "wb") as out:  # its header alone: refused before its bytes are wanted
        out.write(gzip.compress(huge.tobuf(format=tarfile.USTAR_FORMAT)))
    with pytest.raises(JobError, match=rf"inflates past the {limit} bytes both cifar10 splits can hold"):
        read_cifar10(archive)
