"""The torchrun environment as one small object, the process group, and rank helpers.

Without torchrun the job is one plain process (rank 0 of 1) and every helper here is a no-op.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from job.errors import JobError

_joined_a_group = False  # this process was a rank of a process group (see exit_process)
EXIT_HOOKS_WAIT_S = 5.0


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise JobError("--device cuda, but no CUDA GPU is visible; use --device cpu or auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    """torchrun's own variables; set by hand to something else, one line (exit 2)."""
    text = os.environ.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < (1 if name == "WORLD_SIZE" else 0):
        raise JobError(f"{name}={text!r} is not a {'process count' if name == 'WORLD_SIZE' else 'rank'}; "
                       "torchrun sets it: unset it to run one process")
    return value


def setup(device_preference: str, timeout_s: float = 300) -> Dist:
    """Read torchrun's environment; join the process group when there is more than one rank.

    NCCL on GPUs, Gloo on CPU. `timeout_s` bounds how long a rank waits in a collective for a
    peer that is gone without closing its connections (a dead node); a peer process that dies
    closes them, and its peers fail at once.
    """
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        exit_with_the_launcher()
    world_size, rank, local_rank = (_env_int(name, default) for name, default in
                                    (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    if rank >= world_size:
        raise JobError(f"RANK={rank} is not below WORLD_SIZE={world_size}; torchrun sets them: "
                       "unset them to run one process")
    if world_size > 1 and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise JobError(f"WORLD_SIZE={world_size} but {name} is not set: start the job "
                               "with torchrun or cnn-job launch, which set it, or unset "
                               "WORLD_SIZE to run one process")
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        join_process_group(device, timeout_s)
    return Dist(rank, local_rank, world_size, device)


def join_process_group(device: torch.device, timeout_s: float) -> None:
    """NCCL on a GPU (bound to it: `device_id` makes NCCL set up its communicator now, not at
    the first collective), Gloo on CPU; torchrun's environment names the peers. bench/gpu_check.py
    calls this with one rank, as one GPU is all a machine may have: NCCL refuses two ranks on one GPU
    ("Duplicate GPU detected")."""
    global _joined_a_group
    _joined_a_group = True
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def exit_with_the_launcher(poll_s: float = 1.0) -> None:
    """A worker whose launcher (torchrun's agent) is killed outright is not told: it would train
    on, and its peers would finish a run whose node is gone. Watch for the reparenting that the
    agent's death causes, and leave at once (its peers then fail, and the set is restarted)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print("error: this worker's launcher died; stopping (exit status 1)", file=sys.stderr,
              flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(d: Dist, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place where there are several); returns it."""
    if d.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def fail_together(d: Dist, error: JobError | None) -> None:
    """Raise on every rank when any rank has `error` (a collective: every rank calls it).

    Checks that one rank makes (rank 0 owns the checkpoints) would otherwise leave the others
    waiting in their next collective until the timeout.
    """
    if d.enabled:
        failed = torch.tensor([float(error is not None)], device=d.device)
        if all_reduce_sum(d, failed).item() and error is None:
            raise JobError("another rank stopped the run on bad input (its error line says why)")
    if error is not None:
        raise error


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def exit_process(status: int) -> NoReturn:
    """Exit with `status`, skipping the interpreter's teardown once torch is loaded.

    That teardown frees torch's and Triton's C++ objects after all Python code has run:
    - it takes 0.5-0.9 s (a fifth of a short CPU run's wall time), for nothing: the OS frees
      a process's memory at once;
    - in a process that was a rank, on a loaded 2-core machine about one 2-rank run in 50 lost
      a finished rank in it ("terminate called without an active exception", SIGABRT, no Python
      frame left; compare pytorch/pytorch#179291 and #190489). That turned success into a
      failed pod, and left torchrun on the other pods waiting 5 minutes at its exit barrier.
    Everything of ours is closed by now (process group destroyed, W&B finished, checkpoints
    written). A plain process still runs the atexit hooks (W&B's, logging's), for at most
    EXIT_HOOKS_WAIT_S: W&B's waits for its service process, which waits out W&B's whole init
    timeout when the server never answered, and a stopped job must leave within its grace
    period. A rank exits the way a forked worker does, as it always has. Both streams, and
    C's, are flushed first.
    """
    if not _joined_a_group:
        hooks = threading.Thread(target=atexit._run_exitfuncs, name="atexit", daemon=True)
        hooks.start()
        hooks.join(EXIT_HOOKS_WAIT_S)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        ctypes.CDLL(None).fflush(None)  # what C code printed through stdio
    except (OSError, AttributeError):
        pass
    os._exit(status)
