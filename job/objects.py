"""One file by URI, a local path or an `s3://BUCKET/KEY` object: read it whole, or write it
atomically (the after-training commands' checkpoints, images and exports).

Built on storage.py's stores: a local write goes to a temporary name and is renamed, an S3 write
is one PUT or a completed multipart upload, so a reader sees the old object or the new one.
"""

from __future__ import annotations

from pathlib import Path

from job.errors import JobError
from job.storage import S3Store, atomic_write_bytes, check_output_file, local_path, uri_kind


def split_s3(uri: str, endpoint_url: str | None = None) -> tuple[S3Store, str]:
    """`s3://bucket/a/b.pt` → (the store of s3://bucket/a, "b.pt")."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    if parent in ("s3:", "s3:/") or not name:
        raise JobError(f"{uri} names no object; write it as s3://BUCKET/KEY")
    return S3Store(parent, endpoint_url), name


def read_object(uri: str, option: str, endpoint_url: str | None = None) -> bytes:
    """The bytes of a local file or an S3 object; JobError (one line) when it cannot be read."""
    if uri_kind(uri, option, allowed=("local", "s3")) == "s3":
        store, name = split_s3(uri, endpoint_url)
        data = store.read(name)
        if data is None:
            raise JobError(f"{uri} does not exist in S3; check the URI")
        return data
    path = local_path(uri)
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise JobError(f"{uri} is a folder, not a file") from None
    except OSError as error:
        raise JobError(f"cannot read {uri} ({error.strerror or error})") from None


class Output:
    """Where one result goes: checked before the work that produces it, written atomically."""

    def __init__(self, uri: str, option: str, endpoint_url: str | None = None) -> None:
        self.uri, self.option = uri, option
        self.s3 = uri_kind(uri, option, allowed=("local", "s3")) == "s3"
        if self.s3:
            self.store, self.name = split_s3(uri, endpoint_url)
        else:
            self.path = local_path(uri)

    def check(self) -> None:
        """Fail fast (JobError) when the output cannot be written: before any work."""
        if self.s3:
            self.store.check_bucket(self.uri)
            return
        check_output_file(self.path, self.option)

    def write(self, data: bytes) -> str:
        """Replace the output with `data` in one step; returns where it went."""
        if self.s3:
            self.store.write(self.name, data)
            return self.store.location(self.name)
        try:
            atomic_write_bytes(self.path, data)
        except OSError as error:
            raise JobError(f"could not write {self.option} {self.uri} "
                           f"({error.strerror or error}); nothing was written") from None
        return str(Path(self.path))
