"""SIGTERM and SIGINT, from process start to exit: nothing half-written, a clear line, and an
exit status that tells the orchestrator a retry will succeed (PREEMPTED_EXIT_CODE).

Kubernetes sends SIGTERM before it kills a pod (node drain, spot reclaim, `kubectl delete`);
torchrun forwards it to every worker. Two regimes:

- Outside the training loop (start-up, downloads, parsing, `data push`), the signal raises
  `Interrupted` where the program is. It unwinds like any exception: temporary files are
  removed, multipart uploads aborted, and the CLI prints one line and exits 75.
- Inside the loop, `StopRequest` only raises a flag; the loop checks it between steps, and under
  DDP the ranks sum their flags at the same steps so that they all stop after the same step,
  checkpoint, and exit 75. A second Ctrl-C aborts at once (exit 130), as a `kill -9` would: the
  step or checkpoint under way is dropped (an upload never completes, a local file stays a
  `.partial` that the next run removes), the newest checkpoint written before it stays.
"""

from __future__ import annotations

import os
import signal
import sys

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "preempted, nothing lost, safe to retry"
ABORTED_EXIT_CODE = 130  # the shell's status for a process ended by Ctrl-C
CHECK_EVERY_STEPS = 10  # under DDP the flag costs a collective (and a GPU sync) when read
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal outside the training loop. A BaseException, like KeyboardInterrupt, so
    that no `except Exception` on the way swallows it; cleanup code (`finally`, context
    managers) still runs."""

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, signal_name: str, what: str | None = None) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.what = what or ("before it finished, leaving nothing half-written: run the same "
                             "command again")

    def line(self) -> str:
        """The CLI's one line for it."""
        return f"stopped by {self.signal_name} {self.what} (exit status {self.exit_code})"


def leave_at_once(line: str, status: int) -> None:
    """One error line (also the pod's termination message), then exit with `status` without
    waiting for anything: for a signal that must end the process where an exception could not
    (threads of an upload in flight, a main thread inside torch's C++ store)."""
    from job.progress import print_error, write_termination_message

    print_error(line)
    write_termination_message()
    sys.stdout.flush()
    os._exit(status)


def abort_at_once() -> None:
    """A second Ctrl-C: one line, then leave."""
    leave_at_once("a second Ctrl-C: stopped at once, dropping the step or checkpoint under way; "
                  "the newest checkpoint written before it stays: run the same command to resume "
                  f"from it (exit status {ABORTED_EXIT_CODE})", ABORTED_EXIT_CODE)


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def handle_signals_from_here() -> None:
    """Make SIGTERM and SIGINT raise Interrupted from now on (the CLI calls it first thing)."""
    for signum in SIGNALS:
        signal.signal(signum, _raise_interrupted)


_loop_stop: StopRequest | None = None  # the training loop's, while it runs


def stop_requested() -> str | None:
    """The signal the training loop was sent (its StopRequest's flag), else None. Outside the
    loop a signal raises Interrupted by itself; inside it only raises the flag, which a wait that
    could outlast a preemption (a storage retry's) reads here, to raise Interrupted itself."""
    return _loop_stop.signal_name if _loop_stop else None


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = {}
        self._outer: StopRequest | None = None

    def __enter__(self) -> StopRequest:
        global _loop_stop
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._outer, _loop_stop = _loop_stop, self
        return self

    def __exit__(self, *exc) -> None:
        global _loop_stop
        _loop_stop = self._outer
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal_name and signum == signal.SIGINT:
            abort_at_once()
        self.signal_name = signal.Signals(signum).name

    def agreed(self, d, step: int) -> bool:
        """Inside an epoch: whether every rank stops after this step (all ranks call it at
        every step; under DDP the ranks vote every CHECK_EVERY_STEPS steps)."""
        if d.enabled and step % CHECK_EVERY_STEPS:
            return False
        return self.decided(d)

    def decided(self, d) -> bool:
        """Whether every rank stops here: a vote of all ranks (a collective: every rank calls it
        at the same point), so that no rank goes on into a step, an evaluation or an epoch the
        others have left."""
        if not d.enabled:
            return self.signal_name is not None
        import torch

        from job import distributed

        flag = torch.tensor([float(self.signal_name is not None)], device=d.device)
        if distributed.all_reduce_sum(d, flag).item() == 0:
            return False
        # Another rank may have been the one signalled (multi-node: one pod is preempted): this
        # rank stops, and exits 75, all the same.
        self.signal_name = self.signal_name or "a signal to another rank"
        return True
