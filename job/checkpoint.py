"""What a checkpoint holds, where it goes, how many are kept, and which one a resume loads.

A checkpoint is one plain dict (model, optimizer, epoch, step, config, RNG states, metrics),
saved with torch.save so that `torch.load(path, weights_only=True)` reads it. Each is stored
under a step-unique name (`step-000001234.pt`) in a folder or an S3 prefix, completely, before
a small `latest` pointer is moved to name it; older ones beyond `keep` are deleted after that.
A resume reads the pointer, and if the checkpoint it names is missing or unreadable, falls
back to the newest loadable one and says so in one line.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable

import torch

from job.errors import JobError
from job.storage import open_store

POINTER = "latest"
NAME_PATTERN = re.compile(r"^step-(\d{9})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}.pt"


def to_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> dict:
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError("not a cnn-job checkpoint")
    return state


class CheckpointManager:
    def __init__(self, uri: str, keep: int = 3, endpoint_url: str | None = None,
                 log: Callable[[str], None] = print) -> None:
        if keep < 1:
            raise JobError("--keep-checkpoints must be at least 1")
        self.store = open_store(uri, endpoint_url)
        self.keep = keep
        self.log = log

    def location(self, name: str) -> str:
        return self.store.location(name)

    def check_writable(self) -> None:
        self.store.check_writable("--checkpoint-uri")

    def names(self) -> list[str]:
        """Complete checkpoints, newest (highest step) first."""
        return sorted((o.name for o in self.store.list() if NAME_PATTERN.match(o.name)),
                      reverse=True)

    def pointer(self) -> str | None:
        data = self.store.read(POINTER)
        name = data.decode("utf-8", "replace").strip() if data else None
        return name if name and NAME_PATTERN.match(name) else None

    def save(self, state: dict, step: int) -> str:
        name = checkpoint_name(step)
        try:
            self.store.write(name, to_bytes(state))
            self.store.write(POINTER, f"{name}\n".encode())
        except OSError as error:
            raise JobError(
                f"could not write checkpoint {self.location(name)} ({error.strerror or error}); "
                "the previous checkpoint is intact: free space or pass another --checkpoint-uri"
            ) from None
        for old in self.names()[self.keep:]:
            self.store.delete(old)
        return self.location(name)

    def load_latest(self) -> tuple[dict, str] | None:
        """The newest loadable checkpoint and its location; None when there is none at all.

        Checkpoints that exist but none of which loads are an error: starting over silently
        would throw away the run the user meant to continue.
        """
        pointer = self.pointer()
        candidates = self.names()
        if pointer:
            candidates = [pointer] + [name for name in candidates if name != pointer]
        for index, name in enumerate(candidates):
            try:
                data = self.store.read(name)
                if data is None:
                    raise FileNotFoundError("missing")
                return from_bytes(data), self.location(name)
            except Exception as error:  # any unreadable checkpoint: try the next one
                reason = (str(error).splitlines() or [type(error).__name__])[0][:120]
                if index + 1 == len(candidates):
                    raise JobError(
                        f"no loadable checkpoint in {self.store.uri} (newest {candidates[0]}: "
                        f"{reason}); delete the broken files or "
                        "pass --resume never to start over"
                    ) from None
                self.log(f"checkpoint {self.location(name)} is unreadable ({reason}); "
                         f"falling back to {candidates[index + 1]}")
        return None

    def describe(self) -> list[dict]:
        """Every checkpoint, newest first: what `cnn-job checkpoints list` shows."""
        pointer = self.pointer()
        objects = {o.name: o for o in self.store.list()}
        rows = []
        for name in self.names():
            row = {"name": name, "location": self.location(name), "latest": name == pointer,
                   "size": objects[name].size, "modified": objects[name].modified}
            try:
                state = from_bytes(self.store.read(name) or b"")
            except Exception as error:
                row["error"] = (str(error).splitlines() or ["unreadable"])[0][:80]
                rows.append(row)
                continue
            last = state["metrics"][-1] if state.get("metrics") else {}
            row.update(step=state["step"], epoch=state["epoch"],
                       epoch_step=state.get("epoch_step", 0),
                       val_acc=last.get("val_acc") if last.get("step") == state["step"] else None)
            rows.append(row)
        return rows
