"""SIGTERM and SIGINT: finish the current step, checkpoint, exit with PREEMPTED_EXIT_CODE.

Kubernetes sends SIGTERM before it kills a pod (node drain, spot reclaim, `kubectl delete`);
torchrun forwards it to every worker. The first signal only raises a flag; the loop checks
it between steps, and under DDP the ranks sum their flags at the same steps so that they all
stop after the same step. A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import signal

import torch

from job import distributed
from job.distributed import Dist

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "preempted, checkpoint written, safe to retry"
CHECK_EVERY_STEPS = 10  # under DDP the flag costs a collective (and a GPU sync) when read


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal_name and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def agreed(self, d: Dist, step: int) -> bool:
        """Whether every rank stops after this step (all ranks call it at every step)."""
        if not d.enabled:
            return self.signal_name is not None
        if step % CHECK_EVERY_STEPS:
            return False
        flag = torch.tensor([float(self.signal_name is not None)], device=d.device)
        if distributed.all_reduce_sum(d, flag).item() == 0:
            return False
        # Another rank may have been the one signalled (multi-node: one pod is preempted): this
        # rank stops, and exits 75, all the same.
        self.signal_name = self.signal_name or "a signal to another rank"
        return True
