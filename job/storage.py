"""Where bytes live: local folders, HTTP(S) mirrors and S3 prefixes, told apart in one place
(`uri_kind`) for the data and the checkpoint options alike; and one file by URI, a local path or
an `s3://BUCKET/KEY` object (`open_object`), read whole or written atomically.

Every write is atomic: bytes go to a temporary name in the same folder, are flushed to disk,
and only then renamed over the final name, so a reader (or a resume after a crash) sees the
old file or the new one, never half of one.

S3 requests ride out an outage: a fault that passes is retried for the storage retry budget
(`retrying`), then ends the job with exit status 69 (StorageUnavailable), never 2. Each request
waits at most `request_timeout_s` (derived from that budget) for a connection or for its next
bytes, and botocore does not retry on its own: an endpoint that accepts and never answers is
given up on after the budget plus one such timeout, as one that refuses is. A key, prefix
or mirror path with a `.`, `..` or empty segment is refused, since it names folders of the cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import io
import os
import random
import re
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from job.errors import (
    JobError,
    StorageUnavailable,
    cannot_write,
    check_seconds,
    reason,
    seconds_from_env,
)
from job.preemption import Interrupted, stop_requested
from job.progress import say

T = TypeVar("T")

HTTP_TIMEOUT_S = 60  # the public mirrors'; a user's mirror gets request_timeout_s(budget)
CHUNK_BYTES = 1 << 20
_UMASK = os.umask(0o022)
os.umask(_UMASK)


SUPPORTED = {"local": "a folder", "s3": "s3://", "http": "http(s)://"}
_KIND_OF_SCHEME = {"file": "local", "s3": "s3", "http": "http", "https": "http"}


def uri_kind(uri: str, option: str, allowed: tuple[str, ...] = ("local", "s3", "http")) -> str:
    """"local" (a path, or file://), "s3" or "http" (http:// or https://); any other scheme, or a
    kind outside `allowed`, is one JobError naming the option, the URI and what it takes; so is
    an empty one (which would otherwise mean the working folder) and a URL with no host."""
    if not uri.strip():
        raise JobError(f"{option} is empty; name a folder or URI, or leave it out for its default")
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    kind = _KIND_OF_SCHEME.get(scheme)
    if kind not in allowed:
        names = [SUPPORTED[k] for k in allowed]
        supported = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise JobError(f"{option} {uri}: {scheme}:// is not supported; use {supported}")
    if kind == "http":
        if not urllib.parse.urlsplit(uri).hostname:
            raise JobError(f"{option} {uri} names no host; write it as http(s)://HOST/PATH")
        check_segments(urllib.parse.unquote(urllib.parse.urlsplit(uri).path).strip("/"), uri)
    return kind


def check_segments(path: str, uri: str) -> None:
    """Refuse a key, prefix or URL path with a `.`, `..` or empty segment (`a//b`): each part of
    one names a folder of the cache, which such a segment would leave or make ambiguous. Local
    paths are the user's own and are not checked."""
    if path and any(segment in ("", ".", "..") for segment in path.split("/")):
        raise JobError(f"{uri}: a path segment is empty, '.' or '..'; write the URI without them")


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


def remove_stale_partials(folder: Path, pattern: str = "*") -> list[Path]:
    """Delete the temporary files that `atomic_output` left for the names matching `pattern`
    when its process was killed outright (SIGKILL, OOM, power loss: no cleanup ran). Call it
    only while holding the lock that every writer of those names takes, so that no live
    write loses its file. Returns what it deleted."""
    removed = []
    for path in folder.glob(f".{pattern}.*.partial"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


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


def check_output_file(path: Path, option: str) -> None:
    """Fail fast, before any work and creating nothing, if a file cannot be written at `path`.
    The one rule for every file a user names for output (--summary-json, --json, --output,
    CNN_JOB_RECORD_INDICES): its folder must already exist, as for a shell's `>` (a typo in a
    path is refused, not made into folders), `path` must not be a folder or a device, and the
    folder must take a new file. Folders the job owns (--checkpoint-uri, --cache-dir) are made."""
    if path.exists() and not path.is_file():
        raise JobError(f"{option} {path} is not a regular file; name a file to write")
    if not path.parent.is_dir():
        raise JobError(f"{option} {path}: there is no folder {path.parent}; create it first, or "
                       "name a file in a folder that exists")
    check_writable_folder(path.parent, "output folder", option, create=False)


def check_writable_folder(folder: Path, what: str, option: str, create: bool = True) -> None:
    """Fail fast, before any work, if `folder` cannot take new files (made first if `create`)."""
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".write-probe.", dir=folder):
            pass
    except OSError as error:
        raise JobError(
            f"{what} {folder} is not writable ({reason(error)}); "
            f"pass a writable folder with {option}"
        ) from None


# ----------------------------------------------------------------------------------------------
# HTTP(S)


def http_get_bytes(url: str, timeout_s: float = HTTP_TIMEOUT_S) -> bytes | None:
    """A small file, or None when the server says it has none (404)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def http_download(url: str, dest: Path, expected_md5: str | None = None,
                  timeout_s: float = HTTP_TIMEOUT_S) -> None:
    """Stream `url` into `dest` atomically; a wrong checksum leaves nothing behind. `timeout_s`
    bounds the wait for the connection and for each chunk.

    Raises urllib/OS errors for the caller to turn into one line; ValueError on a bad checksum
    (TruncatedTransfer, one, when the connection dropped before the end).
    """
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        expected_bytes = response.headers.get("Content-Length")
        with atomic_output(dest) as out:
            md5 = copy_hashing_md5(response, out)
            if expected_bytes is not None and out.tell() != int(expected_bytes):
                raise TruncatedTransfer(
                    f"connection closed after {out.tell()} of {expected_bytes} bytes")
            if expected_md5 is not None and md5 != expected_md5:
                raise ValueError(f"md5 {md5} is not the published {expected_md5}")


def http_transient_reason(error: BaseException) -> str | None:
    """A few words on an HTTP(S) mirror's `error` when it is a fault that passes (the server
    unreachable or refusing connections, a timeout, 429 or 5xx, a connection dropped
    mid-transfer); None when a retry would fail the same way (404, 403, a certificate)."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}" if error.code >= 500 or error.code == 429 else None
    if isinstance(error, urllib.error.URLError) and isinstance(error.reason, BaseException):
        error = error.reason
    if isinstance(error, ssl.SSLError):
        return None
    if isinstance(error, TruncatedTransfer | http.client.IncompleteRead
                  | http.client.RemoteDisconnected):
        return "connection dropped mid-transfer"
    if isinstance(error, TimeoutError):  # no strerror: socket.timeout's text is its argument
        return "timed out"
    if isinstance(error, ConnectionError | socket.gaierror):
        return error.strerror or type(error).__name__
    return None


def copy_hashing_md5(source: BinaryIO, out: BinaryIO) -> str:
    """Stream `source` into `out` a chunk at a time; returns the md5 of the bytes copied."""
    md5 = hashlib.md5(usedforsecurity=False)
    while chunk := source.read(CHUNK_BYTES):
        out.write(chunk)
        md5.update(chunk)
    return md5.hexdigest()


# ----------------------------------------------------------------------------------------------
# S3-compatible object storage (AWS S3, MinIO, R2, ...)

# One request waits this long at most for a connection, and for each next piece of its answer:
# a third of the retry budget, between these bounds (3 s, so that a loaded server is not taken
# for a silent one; 60 s, botocore's own read timeout). botocore does not retry on its own
# (`ride_out` does, inside the budget), so a request that never gets an answer costs one timeout.
REQUEST_TIMEOUT_MIN_S = 3.0
REQUEST_TIMEOUT_MAX_S = 60.0
MULTIPART_THRESHOLD_BYTES = 64 << 20

# A fault that passes (the endpoint unreachable, a timeout, throttling, a 5xx, a connection
# dropped mid-transfer) is retried with exponential backoff and jitter for up to the storage
# retry budget (`train --storage-retry-s`, CNN_JOB_STORAGE_RETRY_S) from its first failure: an
# outage shorter than that costs a wait, not the run; a longer one ends it with exit status 69.
STORAGE_RETRY_ENV = "CNN_JOB_STORAGE_RETRY_S"
RETRY_FIRST_WAIT_S = 0.5
RETRY_MAX_WAIT_S = 16.0
RETRY_REPORT_EVERY_S = 30.0  # at most one "retrying" line this often, per operation
TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "RequestTimeout", "InternalError",
                   "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests",
                   "RequestLimitExceeded", "BandwidthLimitExceeded", "OperationAborted"}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` → ("bucket", "some/prefix"); a `.`, `..` or empty segment is
    refused, because the prefix also names a folder of the cache (--data-uri)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise JobError(f"{uri} is not an S3 URI; write it as s3://BUCKET/PREFIX")
    prefix = prefix.rstrip("/")
    check_segments(bucket, uri)
    check_segments(prefix, uri)
    return bucket, prefix


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """--s3-endpoint-url, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (AWS's own order)."""
    return (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


DEFAULT_STORAGE_RETRY_S = 300.0  # --storage-retry-s's default (TrainConfig's): a few minutes


def check_storage_retry_s(seconds: float) -> None:
    check_seconds(seconds, f"--storage-retry-s {seconds:g}")


def storage_retry_s() -> float:
    """The retry budget where no --storage-retry-s is given (evaluate, export, checkpoints,
    data, ...): CNN_JOB_STORAGE_RETRY_S, else train's default."""
    return seconds_from_env(STORAGE_RETRY_ENV, DEFAULT_STORAGE_RETRY_S)


def request_timeout_s(retry_s: float) -> float:
    """How long one request to storage (S3 or a user's HTTP(S) mirror) waits for a connection
    or for the next bytes of its answer, for a retry budget of `retry_s` seconds."""
    return min(REQUEST_TIMEOUT_MAX_S, max(REQUEST_TIMEOUT_MIN_S, retry_s / 3))


def s3_client(endpoint_url: str | None = None, retry_s: float | None = None):
    """A boto3 S3 client on the standard credential chain (env, files, IAM role / IRSA), whose
    requests time out after `request_timeout_s` of the retry budget and are tried once each
    (`retrying` tries them again, inside the budget).

    A custom endpoint (MinIO, R2, ...) gets path-style addressing, and checksums are only sent
    where the API requires them, which MinIO and R2 accept.
    """
    import boto3
    from botocore.config import Config

    endpoint = s3_endpoint(endpoint_url)
    bad_endpoint = JobError(f"S3 endpoint {endpoint} is not a URL; write it as "
                            "http(s)://HOST[:PORT] in --s3-endpoint-url / AWS_ENDPOINT_URL")
    if endpoint and urllib.parse.urlsplit(endpoint).scheme not in ("http", "https"):
        raise bad_endpoint
    timeout_s = request_timeout_s(storage_retry_s() if retry_s is None else retry_s)
    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
        s3={"addressing_style": "path" if endpoint else "auto"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    try:
        return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
    except ValueError:  # botocore's "Invalid endpoint: ..."
        raise bad_endpoint from None


CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                    "InvalidToken", "ExpiredToken", "InvalidSecurity", "Forbidden"}


class TruncatedTransfer(ValueError):
    """A download that ended early: its connection dropped mid-transfer."""


def transient_reason(error: BaseException) -> str | None:
    """A few words on `error` when it is a fault that passes: the endpoint unreachable or
    refusing connections, a timeout, throttling or a server error (5xx), a connection dropped
    mid-transfer. None when a retry would fail the same way (credentials, a missing bucket or
    object, a certificate that does not match)."""
    import builtins

    from botocore import exceptions as boto

    if type(error).__name__ == "S3UploadFailedError" and isinstance(error.__context__,
                                                                    boto.ClientError):
        error = error.__context__  # boto3's upload_file wraps what S3 answered
    if isinstance(error, boto.ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code in TRANSIENT_CODES or status >= 500 or status == 429:
            return code or f"HTTP {status}"
        return None
    if isinstance(error, boto.SSLError):
        return None
    if isinstance(error, boto.ConnectTimeoutError):
        return "connect timeout"
    if isinstance(error, boto.ReadTimeoutError):
        return "read timeout"
    if isinstance(error, boto.EndpointConnectionError | boto.ProxyConnectionError):
        cause = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error.kwargs.get("error", "")))
        return cause[1].strip() if cause else "cannot connect"
    if isinstance(error, boto.ConnectionClosedError):  # urllib3's ProtocolError, as its cause
        cause = error.kwargs.get("error")
        if any(isinstance(arg, TimeoutError) for arg in getattr(cause, "args", ())):
            return "send timeout"  # a request body the endpoint stopped reading
        return "connection closed"
    if isinstance(error, boto.ResponseStreamingError | boto.IncompleteReadError | TruncatedTransfer):
        return "connection dropped mid-transfer"
    if isinstance(error, builtins.ConnectionError | TimeoutError):
        return error.strerror or type(error).__name__
    return None


def s3_source(endpoint_url: str | None) -> str:
    """How the lines name an S3 endpoint."""
    return f"S3 endpoint {s3_endpoint(endpoint_url) or 'AWS S3'}"


def unavailable(source: str, uri: str, reason: str, seconds: float) -> StorageUnavailable:
    return StorageUnavailable(
        f"{source} unreachable for {seconds:.0f} s ({reason}) at {uri}; the "
        f"checkpoints are intact: run the same command to resume once it answers "
        f"(exit status {StorageUnavailable.exit_code})")


def s3_error_line(error: BaseException, uri: str, endpoint_url: str | None = None) -> JobError | None:
    """What boto3 raised, as one JobError line (credentials never in it); None for an exception
    that is not boto3's. A fault that passes is StorageUnavailable."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return JobError(
            f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, or give the pod an IAM role)")
    if reason := transient_reason(error):
        return unavailable(s3_source(endpoint_url), uri, reason, 0)
    if type(error).__name__ == "S3UploadFailedError" and isinstance(error.__context__, ClientError):
        error = error.__context__
    if not isinstance(error, ClientError):
        return None
    code = str(error.response.get("Error", {}).get("Code", "unknown"))
    if code == "NoSuchBucket":
        return JobError(f"bucket of {uri} does not exist; create it or fix the URI")
    if code in ("NoSuchKey", "404", "NotFound"):
        return JobError(f"{uri} does not exist in S3; check the URI (or push it first)")
    if code in CREDENTIAL_CODES:
        return JobError(
            f"S3 refused the request for {uri} ({code}): check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY or the role's permissions")
    message = error.response.get("Error", {}).get("Message", "")
    return JobError(f"S3 error {code} for {uri}: {message}".rstrip(": "))


@contextlib.contextmanager
def s3_errors(uri: str, endpoint_url: str | None = None) -> Iterator[None]:
    """Turn what boto3 raises into one JobError line (s3_error_line), without retrying."""
    try:
        yield
    except Exception as error:
        line = s3_error_line(error, uri, endpoint_url)
        if line is None:
            raise
        raise line from None


def retrying(action: Callable[[], T], uri: str, endpoint_url: str | None, retry_s: float) -> T:
    """`action()` on S3, riding out faults that pass (`ride_out`); anything else is one JobError
    line (s3_error_line)."""
    with s3_errors(uri, endpoint_url):
        return ride_out(action, s3_source(endpoint_url), uri, retry_s, transient_reason)


def ride_out(action: Callable[[], T], source: str, uri: str, retry_s: float,
             reason_of: Callable[[BaseException], str | None]) -> T:
    """`action()`, run again after a fault that passes (`reason_of` gives its reason; None: it
    would fail the same way, raised as it is) with exponential backoff and jitter, for up to
    `retry_s` seconds from the start of its first failed try (a request that timed out has
    spent its timeout of the budget), with a line at the first failure and every
    RETRY_REPORT_EVERY_S; then StorageUnavailable. No try starts after the budget is spent, so
    it ends at most one request's timeout past it. A stop signal during a wait, or during a try
    that then fails, ends it as a preemption."""
    outage_began = last_report = None
    wait_s = RETRY_FIRST_WAIT_S
    while True:
        try_began = time.monotonic()
        try:
            return action()
        except Exception as error:
            reason = reason_of(error)
            if reason is None:
                raise
        now = time.monotonic()
        outage_began = try_began if outage_began is None else outage_began
        left_s = retry_s - (now - outage_began)
        if left_s <= 0:
            raise unavailable(source, uri, reason, now - outage_began)
        if last_report is None or now - last_report >= RETRY_REPORT_EVERY_S:
            say(True, f"{source} unreachable ({reason}) at {uri}; retrying for up to "
                      f"{left_s:.0f} s more")
            last_report = now
        pause(min(left_s, random.uniform(wait_s / 2, wait_s)))
        wait_s = min(2 * wait_s, RETRY_MAX_WAIT_S)


def pause(seconds: float) -> None:
    """Sleep, in short steps that end it as a preemption (Interrupted) once the training loop
    has been sent a stop signal; outside the loop the signal interrupts the sleep by itself."""
    deadline = time.monotonic() + seconds
    while True:
        if signal_name := stop_requested():
            raise Interrupted(signal_name)
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            return
        time.sleep(min(left_s, 0.1))


@dataclass(frozen=True)
class ObjectInfo:
    name: str  # relative to the store's folder or prefix
    size: int
    modified: float  # seconds since the epoch


class LocalStore:
    """A folder. Writes are atomic renames."""

    def __init__(self, uri: str) -> None:
        self.folder = local_path(uri)
        self.uri = str(self.folder)

    def location(self, name: str) -> str:
        return str(self.folder / name)

    def parent(self) -> tuple[LocalStore, str]:
        """The folder this one is in, and its name there: where a URI named a file."""
        return LocalStore(str(self.folder.parent)), self.folder.name

    def check_writable(self, option: str) -> None:
        check_writable_folder(self.folder, "checkpoint folder", option)

    def list(self) -> list[ObjectInfo]:
        if not self.folder.is_dir():
            return []
        return [ObjectInfo(p.name, (st := p.stat()).st_size, st.st_mtime)
                for p in self.folder.iterdir() if p.is_file()]

    def write(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.folder / name, data)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)


class S3Store:
    """A prefix in a bucket. An object becomes visible only once completely uploaded
    (single PUT or a completed multipart upload), which is what makes writes atomic here.
    Every request is retried through an outage of up to `retry_s` seconds (see `retrying`)."""

    def __init__(self, uri: str, endpoint_url: str | None = None,
                 retry_s: float | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.endpoint_url = endpoint_url
        self.retry_s = storage_retry_s() if retry_s is None else retry_s
        self.client = s3_client(endpoint_url, self.retry_s)
        self.out_of_reach = False  # see retrying

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def location(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def parent(self) -> tuple[S3Store, str]:
        """The prefix this one is in, and its last part there: where a URI named an object."""
        return _object_in_s3(self.uri, self.endpoint_url, self.retry_s)

    def errors(self, name: str | None = None):
        """One JobError line for what a request raises, without retrying (see `retrying`)."""
        return s3_errors(self.location(name) if name else self.uri, self.endpoint_url)

    def retrying(self, action: Callable[[], T], name: str | None = None) -> T:
        """`action()` (this store's requests) retried through an outage; see `retrying`. An
        outage that outlasts it (the budget spent, or a stop signal during it) leaves
        `out_of_reach` set until a request succeeds again."""
        try:
            result = retrying(action, self.location(name) if name else self.uri,
                              self.endpoint_url, self.retry_s)
        except (StorageUnavailable, Interrupted):
            self.out_of_reach = True
            raise
        self.out_of_reach = False
        return result

    def check_writable(self, option: str) -> None:
        probe = f".write-probe-{os.getpid()}"
        self.check_bucket()

        def write_and_delete() -> None:
            self.client.put_object(Bucket=self.bucket, Key=self.key(probe), Body=b"")
            self.client.delete_object(Bucket=self.bucket, Key=self.key(probe))

        self.retrying(write_and_delete)

    def list(self) -> list[ObjectInfo]:
        start = self.key("")

        def listing() -> list[ObjectInfo]:
            found = []
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start
            ):
                for item in page.get("Contents", []):
                    name = item["Key"][len(start):]
                    if name and "/" not in name:
                        found.append(ObjectInfo(name, item["Size"],
                                                item["LastModified"].timestamp()))
            return found

        return self.retrying(listing)

    def check_bucket(self, uri: str | None = None) -> None:
        """A missing bucket answers HEAD with a bare 404; name it as a missing bucket, and as
        `uri` where the user wrote a shorter URI than this store's."""
        from botocore.exceptions import ClientError

        uri = uri or self.uri

        def head() -> None:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as error:
                if str(error.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket"):
                    raise JobError(
                        f"bucket {self.bucket} of {uri} does not exist; create it or fix the URI"
                    ) from None
                raise

        retrying(head, uri, self.endpoint_url, self.retry_s)

    def write(self, name: str, data: bytes) -> None:
        self.retrying(lambda: self.client.upload_fileobj(
            io.BytesIO(data), self.bucket, self.key(name), Config=_transfer_config()), name)

    def abort_incomplete_uploads(self, name: str) -> int:
        """Abort the multipart uploads of `name` that were started and never completed (a push
        killed outright, or whose abort failed); their parts are stored, and billed, until then.
        Returns how many there were."""
        key = self.key(name)

        def abort() -> int:
            aborted = 0
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=key
            ):
                for upload in page.get("Uploads", []):
                    if upload["Key"] == key:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                                           UploadId=upload["UploadId"])
                        aborted += 1
            return aborted

        return self.retrying(abort, name)

    def upload_file(self, name: str, path: Path) -> None:
        # On an exception or Interrupted, s3transfer cancels the transfer, waits for the parts
        # in flight and aborts its multipart upload before this returns; only SIGKILL (or a
        # failed abort) leaves one behind, for abort_incomplete_uploads to find.
        self.retrying(lambda: self.client.upload_file(
            str(path), self.bucket, self.key(name), Config=_transfer_config()), name)

    def download(self, name: str, dest: Path) -> None:
        """Fetch one object into `dest` (atomically), reusing a cached copy whose size and ETag
        still match; a single-part object's ETag is its md5 and is checked."""
        key, uri = self.key(name), self.location(name)
        marker = dest.with_name(dest.name + ".etag")

        def fetch() -> str | None:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
            etag, size = head["ETag"].strip('"'), head["ContentLength"]
            if dest.is_file() and dest.stat().st_size == size and _read_text(marker) == etag:
                return None
            with atomic_output(dest) as out:
                body = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=head["ETag"])["Body"]
                md5 = copy_hashing_md5(body, out)
                if out.tell() != size:
                    raise TruncatedTransfer(f"{uri}: got {out.tell()} of {size} bytes")
                if "-" not in etag and md5 != etag:
                    raise JobError(f"{uri}: downloaded bytes do not match the object's ETag (md5)")
            return etag

        if etag := self.retrying(fetch, name):
            atomic_write_bytes(marker, etag.encode())

    def read(self, name: str) -> bytes | None:
        from botocore.exceptions import ClientError

        def get() -> bytes | None:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise

        return self.retrying(get, name)

    def delete(self, name: str) -> None:
        self.retrying(lambda: self.client.delete_object(Bucket=self.bucket, Key=self.key(name)),
                      name)


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD_BYTES)


def open_store(uri: str, endpoint_url: str | None = None, option: str = "--checkpoint-uri",
               retry_s: float | None = None) -> LocalStore | S3Store:
    if uri_kind(uri, option, allowed=("local", "s3")) == "s3":
        return S3Store(uri, endpoint_url, retry_s)
    return LocalStore(uri)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# one file by URI: the after-training commands' checkpoints, images and outputs


def open_object(uri: str, option: str, endpoint_url: str | None = None,
                allowed: tuple[str, ...] = ("local", "s3")) -> tuple[LocalStore | S3Store, str]:
    """The store of the file's folder or the object's prefix, and its name there:
    `s3://bucket/a/b.pt` → (the store of s3://bucket/a, "b.pt"). The URI is classified here,
    once, among `allowed` (local and s3, or one of them)."""
    if uri_kind(uri, option, allowed) == "s3":
        return _object_in_s3(uri, endpoint_url)
    return LocalStore(uri).parent()


def _object_in_s3(uri: str, endpoint_url: str | None,
                  retry_s: float | None = None) -> tuple[S3Store, str]:
    parent, _, name = uri.rstrip("/").rpartition("/")
    if parent in ("s3:", "s3:/") or not name:
        raise JobError(f"{uri} names no object; write it as s3://BUCKET/KEY")
    parse_s3_uri(uri)  # the object's name is a segment too
    return S3Store(parent, endpoint_url, retry_s), name


def read_object(uri: str, option: str, endpoint_url: str | None = None) -> bytes:
    """The bytes of a local file or an S3 object; JobError (one line) when it cannot be read."""
    store, name = open_object(uri, option, endpoint_url)
    return read_whole(store, name, uri)


def read_whole(store: LocalStore | S3Store, name: str, uri: str) -> bytes:
    """The bytes of `name` in `store` (opened on `uri`), or one JobError line naming `uri`."""
    try:
        data = store.read(name)
    except IsADirectoryError:
        raise JobError(f"{uri} is a folder, not a file") from None
    except OSError as error:  # a local file's: S3's arrive as JobErrors already
        raise JobError(f"cannot read {uri} ({reason(error)})") from None
    if data is None and isinstance(store, S3Store):
        raise JobError(f"{uri} does not exist in S3; check the URI")
    if data is None:
        raise JobError(f"cannot read {uri} ({os.strerror(errno.ENOENT)})")
    return data


class Output:
    """Where one result goes: checked before the work that produces it, written atomically."""

    def __init__(self, uri: str, option: str, endpoint_url: str | None = None) -> None:
        self.uri, self.option = uri, option
        self.store, self.name = open_object(uri, option, endpoint_url)

    def check(self) -> None:
        """Fail fast (JobError) when the output cannot be written: before any work."""
        if isinstance(self.store, S3Store):
            self.store.check_bucket(self.uri)
        else:
            check_output_file(self.store.folder / self.name, self.option)

    def write(self, data: bytes) -> str:
        """Replace the output with `data` in one step; returns where it went."""
        try:
            self.store.write(self.name, data)
        except OSError as error:
            raise cannot_write(f"{self.option} {self.uri}", error, self.option,
                               "nothing was written") from None
        return self.store.location(self.name)
