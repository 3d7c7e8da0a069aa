"""Read what W&B recorded in an offline run: the `run-<id>.wandb` file is a leveldb-style log
of protobuf Records (the format `wandb sync` uploads from)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK_BYTES = 32768
HEADER_BYTES = 7  # checksum (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER_BYTES])
    assert ident == b":W&B" and magic == 0xBEE1, "not a W&B transaction log"
    position, pending = HEADER_BYTES, b""
    while position + HEADER_BYTES <= len(data):
        left_in_block = BLOCK_BYTES - position % BLOCK_BYTES
        if left_in_block < HEADER_BYTES:
            position += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + HEADER_BYTES])
        if length == 0 and kind == 0:
            break
        chunk = data[position + HEADER_BYTES:position + HEADER_BYTES + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum
        position += HEADER_BYTES + length
        pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


class OfflineRun:
    """History rows, config, summary and artifacts of one offline run folder."""

    def __init__(self, folder: Path) -> None:
        (log,) = folder.glob("run-*.wandb")
        self.folder = folder
        self.run_id = log.stem.removeprefix("run-")
        self.history, self.config, self.summary, self.artifacts = [], {}, {}, []
        for record in records(log):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                self.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind in ("run", "config"):
                updates = record.run.config.update if kind == "run" else record.config.update
                self.config.update({_key(i): json.loads(i.value_json) for i in updates})
            elif kind == "summary":
                self.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
            elif kind == "artifact":
                self.artifacts.append(record.artifact)


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    return [OfflineRun(folder) for folder in sorted((wandb_dir / "wandb").glob("offline-run-*"))]
