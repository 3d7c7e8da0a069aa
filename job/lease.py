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

A holder that loses its lease (a renewal refused, and the lease naming another holder: another
job took over after a long stall) stops at its next step (`check_held`), without writing.
Storage out of reach is not a lost lease, however long it lasts: renewals go on being tried,
and the first one after the outage still matches our version if nobody else wrote, so the
run keeps its lease and its work. Before a checkpoint write a lease not confirmed lately is
renewed first, retried for the storage retry budget as any request is; storage still out of
reach then ends the run as storage unavailable (exit 69), not as a lease lost to another job.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import NamedTuple

from job.errors import JobError, cannot_write, first_line
from job.storage import (
    LocalStore,
    S3Store,
    atomic_write_bytes,
    s3_error_line,
    transient_reason,
)

HOLDER_NAME = ".holder"
LEASE_NAME = ".lease"
POLL_S = 0.5  # how often a waiting job looks at a fresh lease
RELEASE_WAIT_S = 1.0  # the most a stopping job waits for a renewal under way


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
        try:  # atomically: a failed write leaves no partial file behind
            atomic_write_bytes(self.holder_file, f"{holder_description()} since {since}\n".encode())
        except OSError as error:
            self.release()
            raise cannot_write(str(self.holder_file), error, "--checkpoint-uri") from None

    def check(self) -> None:
        """An flock is never taken away from a live holder."""

    check_held = check

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
            with contextlib.suppress(OSError):  # a read-only folder: there is none to remove
                self.holder_file.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class Seen(NamedTuple):
    """The lease object as read: its version, age by the server's clock, and who wrote it."""

    etag: str
    age_s: float
    holder: str
    nonce: str | None


class S3Lease:
    def __init__(self, store: S3Store, lease_s: float, log: Callable[[str], None]) -> None:
        self.store, self.lease_s, self.log = store, lease_s, log
        self.key = store.key(LEASE_NAME)
        self.location = store.location(LEASE_NAME)
        self.etag: str | None = None
        self.ended: JobError | None = None  # why this job may no longer write the run
        self.confirmed = 0.0  # monotonic time S3 last confirmed a write of ours
        self.renewals = 0
        # The nonces of our writes since the last one S3 confirmed: a write whose answer was
        # lost (a connection dropped) may have landed, and must not pass for another holder's.
        self._ours: set[str] = set()
        self._lock = threading.Lock()  # one renewal at a time: the renewer's, or check()'s
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -- the requests, each one conditional ----------------------------------------------------

    def _put(self, **condition) -> str | None:
        """Write our lease under `condition`; its new ETag, or None when the condition fails."""
        from botocore.exceptions import ClientError

        # A new body each time, so that each renewal is a new version with a new ETag: that
        # change is how a waiting job sees that the holder is alive.
        self.renewals += 1
        nonce = os.urandom(8).hex()
        self._ours.add(nonce)
        body = json.dumps({"holder": holder_description(), "lease_s": self.lease_s,
                           "renewal": self.renewals, "nonce": nonce}).encode()
        try:
            return self.store.client.put_object(Bucket=self.store.bucket, Key=self.key, Body=body,
                                                **condition)["ETag"]
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                               "ConditionalRequestConflict"):
                return None
            raise

    def _look(self) -> Seen | None:
        """The current lease; None when there is none."""
        from botocore.exceptions import ClientError

        try:
            response = self.store.client.get_object(Bucket=self.store.bucket, Key=self.key)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        now = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        try:
            body = json.loads(response["Body"].read())
            holder, nonce = body.get("holder", "unknown"), body.get("nonce")
        except (ValueError, AttributeError):
            holder, nonce = "unknown", None
        return Seen(response["ETag"], (now - response["LastModified"]).total_seconds(), holder,
                    nonce)

    def _retrying(self, action, **condition):
        return self.store.retrying(functools.partial(action, **condition), LEASE_NAME)

    # -- acquire, renew, check, release --------------------------------------------------------

    def acquire(self) -> None:
        self.etag = self._acquire()
        self.confirmed = time.monotonic()
        self._ours.clear()
        self._renewer = threading.Thread(target=self._renew, name="s3-lease", daemon=True)
        self._renewer.start()

    def _acquire(self) -> str:
        watched = None  # (etag, monotonic time it was first seen)
        while True:
            etag = self._retrying(self._put, IfNoneMatch="*")
            if etag:
                return etag
            current = self._retrying(self._look)
            if current is None:  # released between our two requests
                continue
            if current.nonce in self._ours:  # ours: the answer to our write was lost
                return current.etag
            etag, age_s, holder = current.etag, current.age_s, current.holder
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
                taken = self._retrying(self._put, IfMatch=etag)
                if taken:
                    self.log(f"took over the lease of {self.store.uri} from {holder}, who stopped "
                             f"renewing it {max(age_s, self.lease_s):.0f} s ago")
                    return taken
                continue  # another job took it first (or the answer was lost): look again
            time.sleep(POLL_S)

    def _renew_once(self) -> None:
        """Overwrite our own version. Refused, the lease is looked at: a version we wrote (its
        answer lost in an outage) is still ours; another holder's means the run is theirs now.
        Raises what a request raised."""
        etag = self._put(IfMatch=self.etag)
        if etag is None:
            current = self._look()
            if current is None:
                self.ended = JobError(
                    f"the lease {self.location} was deleted while this job held it, so another "
                    "job may have written this run: this one stops without writing a checkpoint; "
                    "run the same command to resume from the newest checkpoint")
                return
            if current.nonce not in self._ours:
                self.ended = JobError(
                    f"lost the lease on {self.store.uri} to {current.holder}: another job now "
                    "writes this run, so this one stops without writing a checkpoint")
                return
            etag = current.etag
        self.etag, self.confirmed = etag, time.monotonic()
        self._ours.clear()

    def _renew(self) -> None:
        """Every third of the lease period. A renewal that fails is tried again at the next one:
        storage out of reach for as long as it lasts (the lease may expire meanwhile: while no
        other job takes it, the next renewal still matches our version; check() gives it the
        retry budget before a checkpoint write), any other failure for a lease period, after
        which the run ends at its next step (check_held)."""
        failing_since = None
        while not self._stop.wait(self.lease_s / 3):
            try:
                with self._lock:
                    if self.ended:
                        return
                    self._renew_once()
            except Exception as error:
                now = time.monotonic()
                failing_since = now if failing_since is None else failing_since
                if not transient_reason(error) and now - failing_since >= self.lease_s:
                    self.ended = (s3_error_line(error, self.location, self.store.endpoint_url)
                                  or JobError(f"could not renew the lease {self.location} "
                                              f"({first_line(error, 200)})"))
                continue
            failing_since = None

    def is_held(self) -> bool:
        """Whether a live job holds the run: a lease renewed within its period (one read)."""
        current = self._retrying(self._look)
        return current is not None and current.age_s < self.lease_s

    def holder(self) -> str:
        with contextlib.suppress(Exception):
            if current := self._look():
                return current.holder
        return "unknown"

    def check(self) -> None:
        """Before a checkpoint write: raise why this job may no longer write the run. A lease
        not confirmed for two thirds of its period (renewals failing in an outage, however
        long, a stalled process) is renewed here first, retried as any request is: storage
        back, the run keeps its lease; still out of reach after the budget, exit 69."""
        if self.ended is None and time.monotonic() - self.confirmed > self.lease_s * 2 / 3:
            with self._lock:
                if self.ended is None:
                    self.store.retrying(self._renew_once, LEASE_NAME)
        self.check_held()

    def check_held(self) -> None:
        """At every step, with no request: raise why this job may no longer write the run (the
        lease lost to another job, or renewals refused for a lease period), so that it does not
        train on for a checkpoint it could not write."""
        if self.ended:
            raise self.ended

    def release(self) -> None:
        """Stop renewing and delete our lease; not where storage is out of reach (the lease
        then expires by itself), so that a job stopping in an outage leaves within its grace
        period rather than wait on more requests."""
        self._stop.set()
        if self._renewer:
            self._renewer.join(RELEASE_WAIT_S)
            if self._renewer.is_alive():  # its renewal is waiting on storage that does not answer
                return
        if self.ended or not self.etag or self.store.out_of_reach:
            return
        with contextlib.suppress(Exception):  # at worst the lease expires by itself
            current = self._look()
            if current and current.etag == self.etag:
                self.store.client.delete_object(Bucket=self.store.bucket, Key=self.key)
        self.etag = None


def lease_for(store: LocalStore | S3Store, lease_s: float, log: Callable[[str], None]):
    return S3Lease(store, lease_s, log) if isinstance(store, S3Store) else LocalLock(store)
