"""`cnn-job launch`: torchrun's own launcher (elastic agent, rendezvous, restarts), run in this
process, with the job's exit status surviving it.

torchrun reports any worker failure as its own status 1 with a long ChildFailedError traceback,
so a pod could not tell Kubernetes "bad input, do not retry" (2) from "preempted, retry" (75).
Here every worker writes its exit status to a file in a folder this launcher makes; when the
agent is done, the node's status is decided from those files:

- 0: every worker finished the run;
- 2: a worker stopped on bad input (it printed the one line that says why);
- 69: a worker found storage out of reach for the whole retry budget (its line says so), or the
  other nodes did not all join the rendezvous within --rdzv-timeout (one line says so): what
  was out of reach may be back for the same command;
- 75: the workers were stopped by a signal with their checkpoint written (or before starting);
- 1: anything else: a worker crashed, was killed, or lost a peer (one line names it).

Before the workers start, the launcher waits for the other nodes (with --nnodes above 1): it says
so in one line, and a stop signal ends that wait at once (torch's store would hold it off until
its timeout), with 75: nothing has started, nothing is lost.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
import threading
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from job.errors import JobError, StorageUnavailable, check_seconds, first_line, seconds_from_env
from job.preemption import (
    PREEMPTED_EXIT_CODE,
    SIGNALS,
    handle_signals_from_here,
    leave_at_once,
)

STATUS_DIR_ENV = "CNN_JOB_STATUS_DIR"
CRASHED = 1
# The other nodes did not come: transient like storage out of reach, and so the same status,
# which the manifests retry (counted against the Job's retries).
RENDEZVOUS_FAILED = StorageUnavailable.exit_code
USAGE = "cnn-job launch [TORCHRUN OPTIONS] train DATASET [OPTIONS]"
RDZV_TIMEOUT_ENV = "CNN_JOB_RDZV_TIMEOUT_S"
# How long a node waits for the others to join, whichever rendezvous backend (torchrun's own
# defaults: 900 s for the static one, 600 s for c10d's).
RDZV_TIMEOUT_S = 600.0


def split_command(args: list[str]) -> tuple[list[str], list[str]]:
    """[torchrun options], [train DATASET options]: the job's command starts at `train`."""
    if "train" not in args:
        raise JobError(f"no `train DATASET` to launch: {USAGE}")
    at = args.index("train")
    return args[:at], args[at:]


def launch(torchrun_args: list[str], job_args: list[str]) -> int:
    """Run `train ...` on this node's workers under torchrun's launcher; the node's status."""
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import elastic_launch

    quiet_torch_logs()
    config, command, command_args = torchrun_config(torchrun_args, job_args)
    status_dir = Path(tempfile.mkdtemp(prefix="cnn-job-status-"))
    os.environ[STATUS_DIR_ENV] = str(status_dir)  # the workers inherit it
    failures = {}
    try:
        with StopBeforeWorkers(status_dir):
            say_waiting(config)
            elastic_launch(config, command)(*command_args)
        return 0
    except ChildFailedError as failed:
        failures = {failure.local_rank: failure.exitcode for failure in failed.failures.values()}
    except SignalException:
        pass  # the agent has passed the signal on to the workers and waited for them
    except (RendezvousError, DistError) as error:  # the rendezvous store's, not a worker's
        print_rendezvous_failure(config, error)
        return RENDEZVOUS_FAILED
    finally:
        # torchrun's handler (it raises SignalException) outlives its workers: ours again, so
        # that a late signal still ends this launcher with a status, not by the signal.
        handle_signals_from_here()
        statuses = read_statuses(status_dir)
        shutil.rmtree(status_dir, ignore_errors=True)
    return node_status(statuses, failures)


def rendezvous_timeout_s(config) -> float:
    """How long this node waits for the others, as torch's rendezvous backend reads it."""
    return float(config.rdzv_configs[_timeout_key(config.rdzv_backend)])


def _timeout_key(backend: str) -> str:
    return "timeout" if backend == "static" else "join_timeout"


def say_waiting(config) -> None:
    """One line, before the rendezvous, on a node that waits for others."""
    if config.max_nodes <= 1:
        return
    nodes = (f"{config.min_nodes}" if config.min_nodes == config.max_nodes
             else f"{config.min_nodes} to {config.max_nodes}")
    timeout_s = rendezvous_timeout_s(config)
    until = (datetime.now().astimezone() + timedelta(seconds=timeout_s)).strftime("%H:%M:%S %Z")
    print(f"waiting for {nodes} nodes (this one included) to join the rendezvous at "
          f"{config.rdzv_endpoint}, until {until} (--rdzv-timeout {timeout_s:g} s)", flush=True)


def print_rendezvous_failure(config, error: BaseException) -> None:
    from job.progress import print_error

    print_error(f"no rendezvous at {config.rdzv_endpoint} within {rendezvous_timeout_s(config):g} "
                f"s, the other nodes did not all join ({first_line(error, 160)}): start them "
                "with the same rendezvous options, then run the same command again (exit status "
                f"{RENDEZVOUS_FAILED})")


class StopBeforeWorkers:
    """Until torchrun starts the workers, a stop signal ends this launcher at once, exit 75.

    Waiting for the other nodes, the launcher's main thread can sit in torch's store (C++) until
    the rendezvous times out, and a Python signal handler runs only once it is back: 10 minutes
    late. Here the signal's handler only marks it, and a thread that Python wakes through
    signal.set_wakeup_fd acts on it. torchrun puts its own handler in place right before it
    starts the workers; from then on the signal is its (it passes it on to the workers)."""

    def __init__(self, status_dir: Path) -> None:
        self.status_dir = status_dir

    def __enter__(self) -> StopBeforeWorkers:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)  # as set_wakeup_fd requires
        for signum in SIGNALS:
            signal.signal(signum, _noted)
        self.previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.done = threading.Event()
        threading.Thread(target=self._watch, name="stop-before-workers", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        signal.set_wakeup_fd(self.previous_fd)
        if signal.getsignal(signal.SIGTERM) is _noted:  # no worker started (a failed rendezvous)
            handle_signals_from_here()
        os.close(self.write_fd)  # the watching thread reads the end, and closes its side

    def _watch(self) -> None:
        while data := os.read(self.read_fd, 64):
            for signum in data:
                if (signum in SIGNALS and not self.done.is_set()
                        and signal.getsignal(signum) is _noted):
                    self._stop(signal.Signals(signum).name)
        os.close(self.read_fd)

    def _stop(self, signal_name: str) -> None:
        shutil.rmtree(self.status_dir, ignore_errors=True)
        # at once: the main thread may be in torch's store for minutes
        leave_at_once(f"stopped by {signal_name} before any worker started, while waiting for "
                      "the other nodes: nothing was lost; run the same command again (exit "
                      f"status {PREEMPTED_EXIT_CODE})", PREEMPTED_EXIT_CODE)


def _noted(signum, frame) -> None:
    """A stop signal before the workers start: StopBeforeWorkers's thread acts on it."""


def torchrun_config(torchrun_args: list[str], job_args: list[str]):
    """torchrun's launch config for these options, as `torchrun` itself makes it: without a
    rendezvous on one node (or with --standalone), a c10d store of its own on a free port. A
    bad option is one JobError line, not argparse's usage or an AssertionError."""
    from torch.distributed.run import config_from_args, get_args_parser, parse_min_max_nnodes

    parser = get_args_parser()

    def refuse(message: str):
        raise JobError(f"bad launcher option: {message}: {USAGE}")

    parser.error = refuse  # argparse would print its usage, then two lines, then exit
    parser.add_argument(
        "--rdzv-timeout", "--rdzv_timeout", type=float, default=None,
        help=f"Seconds a node waits for the others to join (env {RDZV_TIMEOUT_ENV}, default "
             f"{RDZV_TIMEOUT_S:g}; whole seconds, at least 1: 0 waits the least the backends "
             "take); an entry of --rdzv-conf (timeout, join_timeout) wins.")
    parsed = parser.parse_args([*torchrun_args, "-m", "job", *job_args])
    timeout_s = rdzv_timeout_setting(parsed.rdzv_timeout)
    try:
        # What torchrun's run() does before config_from_args (torch/distributed/run.py).
        one_node = parse_min_max_nnodes(parsed.nnodes)[1] == 1
        if parsed.standalone or (one_node and parsed.rdzv_backend == "static"
                                 and not parsed.rdzv_endpoint and parsed.master_port is None):
            parsed.rdzv_backend, parsed.rdzv_endpoint = "c10d", "localhost:0"  # port 0: a free one
            parsed.rdzv_id = str(uuid.uuid4())
        if parsed.master_port is None:
            parsed.master_port = 29500  # torchrun's default, for the static rendezvous
        config, command, command_args = config_from_args(parsed)
    except (AssertionError, ValueError, RuntimeError) as error:
        refuse(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    if config.nproc_per_node < 1:
        refuse(f"--nproc-per-node {parsed.nproc_per_node}: at least 1 worker")
    check_endpoint(config.rdzv_endpoint,
                   "--rdzv-endpoint" if parsed.rdzv_endpoint else "--master-addr/--master-port",
                   refuse)
    key = _timeout_key(config.rdzv_backend)
    if key not in {entry.split("=", 1)[0].strip() for entry in parsed.rdzv_conf.split(",")}:
        # whole seconds, as the backends read them, and at least 1, the least they take
        config.rdzv_configs[key] = max(1, math.ceil(timeout_s))
    return config, command, command_args


def rdzv_timeout_setting(option: float | None) -> float:
    """--rdzv-timeout, else CNN_JOB_RDZV_TIMEOUT_S, else RDZV_TIMEOUT_S; a bad value refused."""
    if option is None:
        return seconds_from_env(RDZV_TIMEOUT_ENV, RDZV_TIMEOUT_S)
    return check_seconds(option, f"--rdzv-timeout {option:g}")


def check_endpoint(endpoint: str, option: str, refuse) -> None:
    """HOST:PORT as torch's rendezvous reads it, checked before anything starts: torch would
    raise it from inside the launcher, a 70-line traceback."""
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    try:
        parse_rendezvous_endpoint(endpoint, default_port=29400)
    except ValueError:
        refuse(f"{option} {endpoint!r}: not HOST:PORT (a host name or IP address, and a port "
               "from 0 to 65535)")


def quiet_torch_logs() -> None:
    """torch's launcher logs W…/E… lines (the OMP_NUM_THREADS banner, each failed worker, the
    agent's own state) that the job's one-line report already covers. They stay off the
    console unless asked for with torchrun's own LOGLEVEL (LOGLEVEL=INFO or WARNING)."""
    import logging

    if os.environ.get("LOGLEVEL"):
        return
    # torch._logging gives "torch.distributed" a stderr handler of its own and stops propagation;
    # a NullHandler in its place also keeps logging's last-resort handler from printing them.
    logging.getLogger("torch.distributed").handlers = [logging.NullHandler()]
    logging.getLogger("torch.distributed").propagate = False


def read_statuses(status_dir: Path) -> dict[int, int]:
    """Local rank → exit status, for the workers that exited through the CLI."""
    statuses = {}
    for path in status_dir.glob("local-rank-*"):
        try:
            statuses[int(path.name.rsplit("-", 1)[1])] = int(path.read_text())
        except (ValueError, OSError):
            continue
    return statuses


def node_status(statuses: dict[int, int], failures: dict[int, int]) -> int:
    """The node's exit status from its workers' statuses and the agent's failure codes."""
    for status in (JobError.exit_code, StorageUnavailable.exit_code):
        if status in statuses.values():
            return status  # the worker's own line said why
    unexplained = {rank: code for rank, code in failures.items() if statuses.get(rank) != code}
    if not unexplained and statuses and set(statuses.values()) <= {0, PREEMPTED_EXIT_CODE}:
        return PREEMPTED_EXIT_CODE if PREEMPTED_EXIT_CODE in statuses.values() else 0
    rank, code = next(iter(unexplained.items()), (None, None))
    if rank is None:
        print_crash("the workers ended without a status (killed, or a crash before exit)")
    elif code is not None and code < 0:
        print_crash(f"worker local rank {rank} was killed by {signal.Signals(-code).name}")
    else:
        print_crash(f"worker local rank {rank} failed with exit status {code} (its traceback is "
                    "above; a lost peer shows as a connection error)")
    return CRASHED


def print_crash(message: str) -> None:
    from job.progress import print_error

    print_error(f"{message}; the run's checkpoints are intact: run the same command to resume "
                f"(exit status {CRASHED})")


def record_status(status: int) -> None:
    """In a worker started by `launch`: leave this process's exit status for the launcher."""
    status_dir = os.environ.get(STATUS_DIR_ENV)
    local_rank = os.environ.get("LOCAL_RANK")
    if status_dir and local_rank is not None:
        try:
            (Path(status_dir) / f"local-rank-{local_rank}").write_text(str(status))
        except OSError:
            pass  # the launcher then reports this worker as ended without a status
