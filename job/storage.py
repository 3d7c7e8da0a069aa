"""Where bytes live: local folders and HTTP(S) mirrors behind a few small functions.

Every write is atomic: bytes go to a temporary name in the same folder, are flushed to disk,
and only then renamed over the final name, so a reader (or a resume after a crash) sees the
old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from job.errors import JobError

HTTP_TIMEOUT_S = 60
CHUNK_BYTES = 1 << 20
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path`; on success it replaces `path`, else it vanishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a finished file follows the umask
        with os.fdopen(fd, "wb") as tmp:
            yield tmp
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as out:
        out.write(data)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some filesystems do not allow it, which is harmless.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on one machine (one downloads, the others wait)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def check_writable_folder(folder: Path, what: str, option: str) -> None:
    """Fail fast, before any work, if `folder` cannot take new files."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".write-probe.", dir=folder):
            pass
    except OSError as error:
        raise JobError(
            f"{what} {folder} is not writable ({error.strerror or error}); "
            f"pass a writable folder with {option}"
        ) from None


# ----------------------------------------------------------------------------------------------
# HTTP(S)


def http_get_bytes(url: str) -> bytes | None:
    """A small file, or None when the server says it has none (404)."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def http_download(url: str, dest: Path, expected_md5: str | None = None) -> None:
    """Stream `url` into `dest` atomically; a wrong checksum leaves nothing behind.

    Raises urllib/OS errors for the caller to turn into one line; ValueError on a bad checksum.
    """
    md5 = hashlib.md5(usedforsecurity=False)
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        expected_bytes = response.headers.get("Content-Length")
        with atomic_output(dest) as out:
            received = 0
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                md5.update(chunk)
                received += len(chunk)
            if expected_bytes is not None and received != int(expected_bytes):
                raise ValueError(f"connection closed after {received} of {expected_bytes} bytes")
            if expected_md5 is not None and md5.hexdigest() != expected_md5:
                raise ValueError(f"md5 {md5.hexdigest()} is not the published {expected_md5}")
