"""One writer per run: a checkpoint folder or prefix is held by one live job at a time.

Each storage kind uses its own primitive, so that a dead holder never locks a run out:

- A local folder: an exclusive `flock` on the folder itself. The kernel drops it when the
  holder dies, however it dies (kill -9 included), so a retried job starts at once.
- S3 (AWS, MinIO, R2): a lease object `<prefix>/.lease`, created only if absent (`If-None-Match:
  *`) and renewed every third of the lease period by a conditional overwrite of the holder's
  own version (`If-Match: <ETag>`). A job that finds it waits while it is fresh: renewed, it
  refuses (the holder is alive); not renewed for a whole period (the holder died), it takes it
  over with `If-Match` on the stale version, so of two jobs taking over at once one wins. Its
  age is measured on the server's clock (Date - Last-Modified), never on ours.

A holder that loses its lease (its renewals are refused: another job took over after a long
stall) finds out before its next checkpoint write and stops without writing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path

from job.errors import JobError
from job.storage import LocalStore, S3Store, atomic_write_bytes

HOLDER_NAME = ".holder"
LEASE_NAME = ".lease"
POLL_S = 0.5  # how often a waiting job looks at a fresh lease


def holder_description() -> str:
    """Who holds a run: the host (a pod's name in Kubernetes) and the process."""
    return f"{socket.gethostname()} pid {os.getpid()}"


class LocalLock:
    """An flock on the folder itself (no lock file to leave behind); who holds it is written to
    `<folder>/.holder` for the message a refused job prints, and removed on release."""

    def __init__(self, store: LocalStore) -> None:
        self.store, self.holder_file = store, store.folder / HOLDER_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        self.store.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.store.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = self.holder_file.read_text().strip()
            except OSError:
                holder = "another process"
            raise JobError(
                f"{self.store.uri} is in use by a live job ({holder}): one run has one writer; "
                "wait for it to end, or pass another --checkpoint-uri"
            ) from None
        self.fd = fd
        since = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        atomic_write_bytes(self.holder_file, f"{holder_description()} since {since}\n".encode())

    def check(self) -> None:
        """An flock is never taken away from a live holder."""

    def is_held(self) -> bool | None:
        """Whether a live job holds the folder, asked without taking the lock (which would
        refuse a job starting at that moment): the kernel's table of locks, /proc/locks, names
        the folder's inode while an flock is on it. None when that cannot be told."""
        try:
            st = self.store.folder.stat()
            table = Path("/proc/locks").read_text()
        except FileNotFoundError:
            return False if not self.store.folder.exists() else None
        except OSError:
            return None
        for line in table.splitlines():
            fields = line.split()
            if len(fields) < 6 or fields[1] != "FLOCK":  # "->" lines are waiters
                continue
            major, minor, inode = fields[5].split(":")
            if ((int(major, 16), int(minor, 16), int(inode))
                    == (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)):
                return True
        return False

    def holder(self) -> str:
        try:
            return self.holder_file.read_text().strip()
        except OSError:
            return "another process"

    def release(self) -> None:
        if self.fd is not None:
            self.holder_file.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class S3Lease:
    def __init__(self, store: S3Store, lease_s: float, log: Callable[[str], None]) -> None:
        self.store, self.lease_s, self.log = store, lease_s, log
        self.key = store.key(LEASE_NAME)
        self.location = store.location(LEASE_NAME)
        self.etag: str | None = None
        self.lost_to: str | None = None
        self.renewals = 0
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -- the requests, each one conditional ----------------------------------------------------

    def _put(self, **condition) -> str | None:
        """Write our lease under `condition`; its new ETag, or None when the condition fails."""
        from botocore.exceptions import ClientError

        # A new body each time, so that each renewal is a new version with a new ETag: that
        # change is how a waiting job sees that the holder is alive.
        self.renewals += 1
        body = json.dumps({"holder": holder_description(), "lease_s": self.lease_s,
                           "renewal": self.renewals, "nonce": os.urandom(8).hex()}).encode()
        try:
            return self.store.client.put_object(Bucket=self.store.bucket, Key=self.key, Body=body,
                                                **condition)["ETag"]
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                               "ConditionalRequestConflict"):
                return None
            raise

    def _look(self) -> tuple[str, float, str] | None:
        """The current lease's (ETag, age in seconds by the server's clock, holder); None when
        there is none."""
        from botocore.exceptions import ClientError

        try:
            response = self.store.client.get_object(Bucket=self.store.bucket, Key=self.key)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        now = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        try:
            holder = json.loads(response["Body"].read()).get("holder", "unknown")
        except (ValueError, AttributeError):
            holder = "unknown"
        return response["ETag"], (now - response["LastModified"]).total_seconds(), holder

    # -- acquire, renew, check, release --------------------------------------------------------

    def acquire(self) -> None:
        with self.store.errors():
            self.etag = self._acquire()
        self._renewer = threading.Thread(target=self._renew, name="s3-lease", daemon=True)
        self._renewer.start()

    def _acquire(self) -> str:
        watched = None  # (etag, monotonic time it was first seen)
        while True:
            etag = self._put(IfNoneMatch="*")
            if etag:
                return etag
            current = self._look()
            if current is None:  # released between our two requests
                continue
            etag, age_s, holder = current
            if watched and watched[0] != etag:
                raise JobError(
                    f"{self.store.uri} is in use by a live job ({holder}, lease renewed "
                    f"{age_s:.0f} s ago): one run has one writer; wait for it to end, or pass "
                    "another --checkpoint-uri")
            if watched is None:
                watched = (etag, time.monotonic())
                if age_s < self.lease_s:
                    self.log(f"{self.location} is held by {holder} (renewed {age_s:.0f} s ago); "
                             f"waiting up to {self.lease_s - age_s:.0f} s to see whether it is alive")
            expired = age_s >= self.lease_s or time.monotonic() - watched[1] >= self.lease_s + 1
            if expired:
                taken = self._put(IfMatch=etag)
                if taken:
                    self.log(f"took over the lease of {self.store.uri} from {holder}, who stopped "
                             f"renewing it {max(age_s, self.lease_s):.0f} s ago")
                    return taken
                continue  # another job took it first: look again
            time.sleep(POLL_S)

    def _renew(self) -> None:
        last_renewed = time.monotonic()
        while not self._stop.wait(self.lease_s / 3):
            try:
                etag = self._put(IfMatch=self.etag)
            except Exception:  # a network blip: try again next time, while the lease lasts
                if time.monotonic() - last_renewed > self.lease_s:
                    self.lost_to = "nobody it could reach (the renewals failed for a whole period)"
                    return
                continue
            if etag is None:
                current = self._look_quietly()
                self.lost_to = current[2] if current else "nobody (the lease was deleted)"
                return
            self.etag, last_renewed = etag, time.monotonic()

    def _look_quietly(self):
        with contextlib.suppress(Exception):
            return self._look()
        return None

    def is_held(self) -> bool:
        """Whether a live job holds the run: a lease renewed within its period (one read)."""
        with self.store.errors():
            current = self._look()
        return current is not None and current[1] < self.lease_s

    def holder(self) -> str:
        current = self._look_quietly()
        return current[2] if current else "unknown"

    def check(self) -> None:
        if self.lost_to:
            raise JobError(
                f"lost the lease on {self.store.uri} to {self.lost_to}: another job now writes "
                "this run, so this one stops without writing a checkpoint")

    def release(self) -> None:
        self._stop.set()
        if self._renewer:
            self._renewer.join()
        if self.lost_to or not self.etag:
            return
        with contextlib.suppress(Exception):  # at worst the lease expires by itself
            current = self._look()
            if current and current[0] == self.etag:
                self.store.client.delete_object(Bucket=self.store.bucket, Key=self.key)
        self.etag = None


def lease_for(store: LocalStore | S3Store, lease_s: float, log: Callable[[str], None]):
    return S3Lease(store, lease_s, log) if isinstance(store, S3Store) else LocalLock(store)
