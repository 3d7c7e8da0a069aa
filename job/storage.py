"""Where bytes live: local folders, HTTP(S) mirrors and S3 prefixes, told apart in one place
(`uri_kind`) for the data and the checkpoint options alike; and one file by URI, a local path or
an `s3://BUCKET/KEY` object (`open_object`), read whole or written atomically.

Every write is atomic: bytes go to a temporary name in the same folder, are flushed to disk,
and only then renamed over the final name, so a reader (or a resume after a crash) sees the
old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from job.errors import JobError

HTTP_TIMEOUT_S = 60
CHUNK_BYTES = 1 << 20
_UMASK = os.umask(0o022)
os.umask(_UMASK)


SUPPORTED = {"local": "a folder", "s3": "s3://", "http": "http(s)://"}
_KIND_OF_SCHEME = {"file": "local", "s3": "s3", "http": "http", "https": "http"}


def uri_kind(uri: str, option: str, allowed: tuple[str, ...] = ("local", "s3", "http")) -> str:
    """"local" (a path, or file://), "s3" or "http" (http:// or https://); any other scheme, or a
    kind outside `allowed`, is one JobError naming the option, the URI and what it takes."""
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    kind = _KIND_OF_SCHEME.get(scheme)
    if kind not in allowed:
        names = [SUPPORTED[k] for k in allowed]
        supported = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise JobError(f"{option} {uri}: {scheme}:// is not supported; use {supported}")
    return kind


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
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        expected_bytes = response.headers.get("Content-Length")
        with atomic_output(dest) as out:
            md5 = copy_hashing_md5(response, out)
            if expected_bytes is not None and out.tell() != int(expected_bytes):
                raise ValueError(f"connection closed after {out.tell()} of {expected_bytes} bytes")
            if expected_md5 is not None and md5 != expected_md5:
                raise ValueError(f"md5 {md5} is not the published {expected_md5}")


def copy_hashing_md5(source: BinaryIO, out: BinaryIO) -> str:
    """Stream `source` into `out` a chunk at a time; returns the md5 of the bytes copied."""
    md5 = hashlib.md5(usedforsecurity=False)
    while chunk := source.read(CHUNK_BYTES):
        out.write(chunk)
        md5.update(chunk)
    return md5.hexdigest()


# ----------------------------------------------------------------------------------------------
# S3-compatible object storage (AWS S3, MinIO, R2, ...)

S3_MAX_ATTEMPTS = 3  # bounded retries: an endpoint that does not answer fails in seconds
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 60
MULTIPART_THRESHOLD_BYTES = 64 << 20


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` → ("bucket", "some/prefix")."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise JobError(f"{uri} is not an S3 URI; write it as s3://BUCKET/PREFIX")
    return bucket, prefix.strip("/")


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """--s3-endpoint-url, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (AWS's own order)."""
    return (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client on the standard credential chain (env, files, IAM role / IRSA).

    A custom endpoint (MinIO, R2, ...) gets path-style addressing, and checksums are only sent
    where the API requires them, which MinIO and R2 accept.
    """
    import boto3
    from botocore.config import Config

    endpoint = s3_endpoint(endpoint_url)
    config = Config(
        retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=S3_READ_TIMEOUT_S,
        s3={"addressing_style": "path" if endpoint else "auto"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                    "InvalidToken", "ExpiredToken", "InvalidSecurity", "Forbidden"}


@contextlib.contextmanager
def s3_errors(uri: str, endpoint_url: str | None = None) -> Iterator[None]:
    """Turn what boto3 raises into one JobError line. Credentials never appear in it."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError):
        raise JobError(
            f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, or give the pod an IAM role)"
        ) from None
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError):
        endpoint = s3_endpoint(endpoint_url) or "AWS S3"
        raise JobError(
            f"S3 endpoint {endpoint} does not answer ({S3_MAX_ATTEMPTS} attempts) for {uri}; "
            "check --s3-endpoint-url / AWS_ENDPOINT_URL and the network"
        ) from None
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", "unknown"))
        if code == "NoSuchBucket":
            raise JobError(f"bucket of {uri} does not exist; create it or fix the URI") from None
        if code in ("NoSuchKey", "404", "NotFound"):
            raise JobError(f"{uri} does not exist in S3; check the URI (or push it first)") from None
        if code in CREDENTIAL_CODES:
            raise JobError(
                f"S3 refused the request for {uri} ({code}): check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or the role's permissions"
            ) from None
        message = error.response.get("Error", {}).get("Message", "")
        raise JobError(f"S3 error {code} for {uri}: {message}".rstrip(": ")) from None


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
    (single PUT or a completed multipart upload), which is what makes writes atomic here."""

    def __init__(self, uri: str, endpoint_url: str | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.endpoint_url = endpoint_url
        self.client = s3_client(endpoint_url)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def location(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def parent(self) -> tuple[S3Store, str]:
        """The prefix this one is in, and its last part there: where a URI named an object."""
        return _object_in_s3(self.uri, self.endpoint_url)

    def errors(self, name: str | None = None):
        return s3_errors(self.location(name) if name else self.uri, self.endpoint_url)

    def check_writable(self, option: str) -> None:
        probe = f".write-probe-{os.getpid()}"
        self.check_bucket()
        with self.errors():
            self.client.put_object(Bucket=self.bucket, Key=self.key(probe), Body=b"")
            self.client.delete_object(Bucket=self.bucket, Key=self.key(probe))

    def list(self) -> list[ObjectInfo]:
        found = []
        start = self.key("")
        with self.errors():
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start
            ):
                for item in page.get("Contents", []):
                    name = item["Key"][len(start):]
                    if name and "/" not in name:
                        found.append(ObjectInfo(name, item["Size"],
                                                item["LastModified"].timestamp()))
        return found

    def check_bucket(self, uri: str | None = None) -> None:
        """A missing bucket answers HEAD with a bare 404; name it as a missing bucket, and as
        `uri` where the user wrote a shorter URI than this store's."""
        from botocore.exceptions import ClientError

        uri = uri or self.uri
        with s3_errors(uri, self.endpoint_url):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as error:
                if str(error.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket"):
                    raise JobError(
                        f"bucket {self.bucket} of {uri} does not exist; create it or fix the URI"
                    ) from None
                raise

    def write(self, name: str, data: bytes) -> None:
        with self.errors(name):
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self.key(name),
                                       Config=_transfer_config())

    def abort_incomplete_uploads(self, name: str) -> int:
        """Abort the multipart uploads of `name` that were started and never completed (a push
        killed outright, or whose abort failed); their parts are stored, and billed, until then.
        Returns how many there were."""
        key = self.key(name)
        aborted = 0
        with self.errors(name):
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=key
            ):
                for upload in page.get("Uploads", []):
                    if upload["Key"] == key:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                                           UploadId=upload["UploadId"])
                        aborted += 1
        return aborted

    def upload_file(self, name: str, path: Path) -> None:
        # On an exception or Interrupted, s3transfer cancels the transfer, waits for the parts
        # in flight and aborts its multipart upload before this returns; only SIGKILL (or a
        # failed abort) leaves one behind, for abort_incomplete_uploads to find.
        with self.errors(name):
            self.client.upload_file(str(path), self.bucket, self.key(name),
                                    Config=_transfer_config())

    def download(self, name: str, dest: Path) -> None:
        """Fetch one object into `dest` (atomically), reusing a cached copy whose size and ETag
        still match; a single-part object's ETag is its md5 and is checked."""
        key, uri = self.key(name), self.location(name)
        marker = dest.with_name(dest.name + ".etag")
        with self.errors(name):
            head = self.client.head_object(Bucket=self.bucket, Key=key)
            etag, size = head["ETag"].strip('"'), head["ContentLength"]
            if dest.is_file() and dest.stat().st_size == size and _read_text(marker) == etag:
                return
            with atomic_output(dest) as out:
                body = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=head["ETag"])["Body"]
                md5 = copy_hashing_md5(body, out)
                if out.tell() != size:
                    raise JobError(f"{uri}: got {out.tell()} of {size} bytes; try again")
                if "-" not in etag and md5 != etag:
                    raise JobError(f"{uri}: downloaded bytes do not match the object's ETag (md5)")
        atomic_write_bytes(marker, etag.encode())

    def read(self, name: str) -> bytes | None:
        from botocore.exceptions import ClientError

        with self.errors(name):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise

    def delete(self, name: str) -> None:
        with self.errors(name):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(name))


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD_BYTES)


def open_store(uri: str, endpoint_url: str | None = None,
               option: str = "--checkpoint-uri") -> LocalStore | S3Store:
    if uri_kind(uri, option, allowed=("local", "s3")) == "s3":
        return S3Store(uri, endpoint_url)
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


def _object_in_s3(uri: str, endpoint_url: str | None) -> tuple[S3Store, str]:
    parent, _, name = uri.rstrip("/").rpartition("/")
    if parent in ("s3:", "s3:/") or not name:
        raise JobError(f"{uri} names no object; write it as s3://BUCKET/KEY")
    return S3Store(parent, endpoint_url), name


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
        raise JobError(f"cannot read {uri} ({error.strerror or error})") from None
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
            raise JobError(f"could not write {self.option} {self.uri} "
                           f"({error.strerror or error}); nothing was written") from None
        return self.store.location(self.name)
