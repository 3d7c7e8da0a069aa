"""What a checkpoint holds, where it goes, how many are kept, and which one a resume loads.

A checkpoint is one plain dict (model, optimizer, epoch, step, config, RNG states, metrics),
saved with torch.save so that `torch.load(path, weights_only=True)` reads it. Files are named
by global step and written atomically; a small `latest` pointer names the newest one and
moves only after that file is complete. A resume reads the pointer, and if the file it names
is missing or unreadable, falls back to the newest loadable one and says so.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import torch

from job.errors import JobError
from job.storage import atomic_write_bytes, check_writable_folder, is_remote, local_path

POINTER = "latest"
NAME_PATTERN = re.compile(r"^step-(\d{9})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}.pt"


def to_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class CheckpointManager:
    """Checkpoints in one folder: `step-000001234.pt` files and the `latest` pointer."""

    def __init__(self, uri: str, keep: int = 3, log: Callable[[str], None] = print) -> None:
        if is_remote(uri):
            scheme = uri.split("://", 1)[0]
            raise JobError(f"--checkpoint-uri {uri}: {scheme}:// is not supported; use a folder")
        if keep < 1:
            raise JobError("--keep-checkpoints must be at least 1")
        self.folder = local_path(uri)
        self.keep = keep
        self.log = log

    def location(self, name: str) -> str:
        return str(self.folder / name)

    def check_writable(self) -> None:
        check_writable_folder(self.folder, "checkpoint folder", "--checkpoint-uri")

    def names(self) -> list[str]:
        """Complete checkpoints, newest (highest step) first."""
        if not self.folder.is_dir():
            return []
        found = [p.name for p in self.folder.iterdir() if NAME_PATTERN.match(p.name)]
        return sorted(found, reverse=True)

    def save(self, state: dict, step: int) -> str:
        name = checkpoint_name(step)
        try:
            atomic_write_bytes(self.folder / name, to_bytes(state))
            atomic_write_bytes(self.folder / POINTER, f"{name}\n".encode())
        except OSError as error:
            raise JobError(
                f"could not write checkpoint {self.location(name)} ({error.strerror or error}); "
                "the previous checkpoint is intact: free space or pass another --checkpoint-uri"
            ) from None
        for old in self.names()[self.keep:]:
            (self.folder / old).unlink(missing_ok=True)
        return self.location(name)

    def _pointer(self) -> str | None:
        try:
            name = (self.folder / POINTER).read_text().strip()
        except OSError:
            return None
        return name if NAME_PATTERN.match(name) else None

    def load_latest(self) -> tuple[dict, str] | None:
        """The newest loadable checkpoint and its location, or None when there is none."""
        pointer = self._pointer()
        candidates = self.names()
        if pointer:
            candidates = [pointer] + [name for name in candidates if name != pointer]
        for index, name in enumerate(candidates):
            try:
                state = torch.load(self.folder / name, map_location="cpu", weights_only=True)
                if not isinstance(state, dict) or "model" not in state:
                    raise ValueError("not a cnn-job checkpoint")
            except Exception as error:  # any unreadable file: try the next one
                following = candidates[index + 1] if index + 1 < len(candidates) else None
                reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
                self.log(
                    f"checkpoint {self.location(name)} is unreadable ({reason}); "
                    + (f"falling back to {following}" if following else "starting from scratch")
                )
                continue
            return state, self.location(name)
        return None
