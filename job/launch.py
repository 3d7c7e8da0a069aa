"""`cnn-job launch`: torchrun's own launcher (elastic agent, rendezvous, restarts), run in this
process, with the job's exit status surviving it.

torchrun reports any worker failure as its own status 1 with a long ChildFailedError traceback,
so a pod could not tell Kubernetes "bad input, do not retry" (2) from "preempted, retry" (75).
Here every worker writes its exit status to a file in a folder this launcher makes; when the
agent is done, the node's status is decided from those files:

- 0: every worker finished the run;
- 2: a worker stopped on bad input (it printed the one line that says why);
- 69: a worker found storage out of reach for the whole retry budget (its line says so);
- 75: the workers were stopped by a signal with their checkpoint written (or before starting);
- 1: anything else: a worker crashed, was killed, or lost a peer (one line names it).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import uuid
from pathlib import Path

from job.errors import JobError, StorageUnavailable
from job.preemption import PREEMPTED_EXIT_CODE, handle_signals_from_here

STATUS_DIR_ENV = "CNN_JOB_STATUS_DIR"
CRASHED = 1
USAGE = "cnn-job launch [TORCHRUN OPTIONS] train DATASET [OPTIONS]"


def split_command(args: list[str]) -> tuple[list[str], list[str]]:
    """[torchrun options], [train DATASET options]: the job's command starts at `train`."""
    if "train" not in args:
        raise JobError(f"no `train DATASET` to launch: {USAGE}")
    at = args.index("train")
    return args[:at], args[at:]


def launch(torchrun_args: list[str], job_args: list[str]) -> int:
    """Run `train ...` on this node's workers under torchrun's launcher; the node's status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    quiet_torch_logs()
    config, command, command_args = torchrun_config(torchrun_args, job_args)
    status_dir = Path(tempfile.mkdtemp(prefix="cnn-job-status-"))
    os.environ[STATUS_DIR_ENV] = str(status_dir)  # the workers inherit it
    failures = {}
    try:
        elastic_launch(config, command)(*command_args)
        return 0
    except ChildFailedError as failed:
        failures = {failure.local_rank: failure.exitcode for failure in failed.failures.values()}
    except SignalException:
        pass  # the agent has passed the signal on to the workers and waited for them
    finally:
        # torchrun's handler (it raises SignalException) outlives its workers: ours again, so
        # that a late signal still ends this launcher with a status, not by the signal.
        handle_signals_from_here()
        statuses = read_statuses(status_dir)
        shutil.rmtree(status_dir, ignore_errors=True)
    return node_status(statuses, failures)


def torchrun_config(torchrun_args: list[str], job_args: list[str]):
    """torchrun's launch config for these options, as `torchrun` itself makes it: without a
    rendezvous on one node (or with --standalone), a c10d store of its own on a free port. A
    bad option is one JobError line, not argparse's usage or an AssertionError."""
    from torch.distributed.run import config_from_args, get_args_parser, parse_min_max_nnodes

    parser = get_args_parser()

    def refuse(message: str):
        raise JobError(f"bad launcher option: {message}: {USAGE}")

    parser.error = refuse  # argparse would print its usage, then two lines, then exit
    parsed = parser.parse_args([*torchrun_args, "-m", "job", *job_args])
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
    return config, command, command_args


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
