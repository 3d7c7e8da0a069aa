"""Two nodes, one run, the way a cluster treats pods: each "node" is one `cnn-job launch`
process (torchrun's launcher, one worker), rendezvous on loopback. A signal to either node at
any point, a killed worker or launcher, bad input, a node lost for good: every process ends in
bounded time with the status the manifests act on, and the run continues from its checkpoint.
Every wait is on a state (a file, an object, a relay holding a write), bounded."""

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import CNN_JOB, Relay, run_cli
from tests.test_cli import assert_one_line_error
from tests.test_preemption import read_checkpoint

WAIT_S = 120
STOP_S = 10  # SIGTERM: every process has exited within this, with status 75
LOST_S = 60  # kill -9: every other process has exited within this, non-zero


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class Nodes:
    """Two `cnn-job launch` processes training one run, as two pods would."""

    def __init__(self, data_dir, checkpoint_uri, *train_args, launch_args=(), env=None, tmp=None,
                 store_port=None):
        port = free_port()
        self.logs = [Path(tmp) / f"node{rank}.log" for rank in (0, 1)]
        self.processes, self.seen_workers = [], set()
        for rank in (0, 1):
            rendezvous = launch_args or ("--nnodes", "2", "--node-rank", str(rank),
                                         "--master-addr", "127.0.0.1", "--master-port", str(port))
            command = [str(CNN_JOB), "launch", "--nproc-per-node", "1", *rendezvous,
                       "train", "mnist", "--data-uri", str(data_dir), "--checkpoint-uri",
                       str(checkpoint_uri), "--device", "cpu", *train_args]
            with open(self.logs[rank], "w") as log:
                self.processes.append(subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                    start_new_session=True))
            if rank == 0 and store_port:  # node 0 hosts the rendezvous store, as pod 0 does
                wait_for(lambda: listening(store_port), self)

    def wait(self, timeout_s: float = WAIT_S) -> tuple[list[int], float]:
        """Both nodes' exit statuses, and the seconds until the last of them exited."""
        started = time.monotonic()
        statuses = [process.wait(timeout=timeout_s) for process in self.processes]
        return statuses, time.monotonic() - started

    def output(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def workers(self, rank: int) -> list[int]:
        """The node's worker processes (torchrun starts each in a session of its own)."""
        pid = self.processes[rank].pid
        pids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        self.seen_workers.update(pids)
        return pids

    def kill_all(self) -> None:
        for pid in [process.pid for process in self.processes] + sorted(self.seen_workers):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for process in self.processes:
            process.wait()

    def assert_all_gone(self, timeout_s: float = 0) -> None:
        """No launcher and no worker of either node is left running (within `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        left = [1]
        while left:
            left = [p for p in self.processes if p.poll() is None]
            left += [pid for pid in self.seen_workers if alive(pid)]
            assert not left or time.monotonic() < deadline, f"processes left: {left}"
            time.sleep(0.05)


def alive(pid) -> bool:
    """Running (not exited, and not a zombie waiting to be reaped)."""
    pid = getattr(pid, "pid", pid)
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for(condition, nodes: Nodes, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if any(process.poll() is not None for process in nodes.processes):
            raise AssertionError("a node ended early:\n" + nodes.output(0)[-2000:] + nodes.output(1)[-2000:])
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


TRAIN = ("--epochs", "2", "--limit-train", "3200", "--checkpoint-every-steps", "5",
         "--lr-schedule", "constant")


@pytest.fixture
def nodes(tmp_path):
    started = []

    def start(*args, **kwargs) -> Nodes:
        started.append(Nodes(*args, tmp=tmp_path, **kwargs))
        return started[-1]

    yield start
    for running in started:
        running.kill_all()


def rerun_completes(data_dir, folder, tmp_path, nodes, *extra) -> None:
    rerun = nodes(data_dir, folder, *TRAIN, *extra)
    statuses, _ = rerun.wait()
    assert statuses == [0, 0], rerun.output(0)[-3000:]
    assert "resumed from" in rerun.output(0)


@pytest.mark.parametrize("signalled", [0, 1])
def test_sigterm_to_either_node_during_a_step(data_dir, tmp_path, nodes, signalled):
    folder = tmp_path / "ckpt"
    run = nodes(data_dir, folder, *TRAIN)
    wait_for((folder / "latest").exists, run)
    run.workers(0), run.workers(1)
    run.processes[signalled].send_signal(signal.SIGTERM)
    statuses, seconds = run.wait()
    assert statuses == [75, 75] and seconds < STOP_S, (statuses, seconds, run.output(signalled))
    run.assert_all_gone()
    assert run.output(0).count("preempted by") == 1  # rank 0 alone says it
    for rank in (0, 1):
        assert "Traceback" not in run.output(rank)
    interrupted = read_checkpoint(None, folder)
    assert 0 < interrupted["epoch_position"] < 3200 and interrupted["epoch"] == 0
    if signalled == 1:  # (once is enough: the resume itself is the same whichever node it was)
        # That it ends bit for bit where an uninterrupted run does is the DDP resume's promise,
        # proven under torchrun in test_preemption; here: two nodes resume and finish.
        rerun_completes(data_dir, folder, tmp_path, nodes)


def test_sigterm_during_evaluation(data_dir, tmp_path, nodes):
    folder, record = tmp_path / "ckpt", tmp_path / "indices"
    run = nodes(data_dir, folder, *TRAIN, env={"CNN_JOB_RECORD_INDICES": str(record)})
    rank1 = Path(f"{record}.rank1")
    # Rank 1 has served epoch 1's last batch (25 steps of 64): it is evaluating now.
    wait_for(lambda: rank1.exists() and rank1.read_text().count("\n") >= 25, run)
    run.workers(0), run.workers(1)
    run.processes[1].send_signal(signal.SIGTERM)
    statuses, seconds = run.wait()
    assert statuses == [75, 75] and seconds < STOP_S, (statuses, seconds, run.output(1))
    print(f"SIGTERM during evaluation: every process exited in {seconds:.1f} s")
    run.assert_all_gone()
    assert read_checkpoint(None, folder)["epoch"] == 1  # epoch 1 evaluated and checkpointed


def test_sigterm_during_a_checkpoint_write(s3, data_dir, tmp_path, nodes):
    held = Relay(s3.endpoint, hold_put="/step-")
    try:
        uri = f"s3://{s3.bucket}/run"
        run = nodes(data_dir, uri, *TRAIN, env={"AWS_ENDPOINT_URL": held.url})
        assert held.holding.wait(WAIT_S)  # rank 0 is uploading its first checkpoint
        run.workers(0), run.workers(1)
        run.processes[1].send_signal(signal.SIGTERM)
        run.processes[0].send_signal(signal.SIGTERM)
        released = time.monotonic()
        held.release.set()
        statuses, _ = run.wait()
        seconds = time.monotonic() - released
        assert statuses == [75, 75] and seconds < STOP_S, (statuses, seconds, run.output(0))
        print(f"SIGTERM during a checkpoint upload: every process exited {seconds:.1f} s after it")
        run.assert_all_gone()
        assert read_checkpoint(s3, uri)["epoch_position"] > 0
    finally:
        held.close()


@pytest.mark.parametrize("victim", ["worker", "launcher"])
def test_kill_9_of_a_worker_or_launcher_ends_every_process(data_dir, tmp_path, nodes, victim):
    folder = tmp_path / "ckpt"
    run = nodes(data_dir, folder, *TRAIN)
    wait_for((folder / "latest").exists, run)
    worker = run.workers(1)[0]
    run.workers(0)
    killed = time.monotonic()
    os.kill(worker if victim == "worker" else run.processes[1].pid, signal.SIGKILL)
    statuses, _ = run.wait(timeout_s=LOST_S)
    run.assert_all_gone(timeout_s=LOST_S - (time.monotonic() - killed))  # orphans follow too
    assert 0 not in statuses, (statuses, run.output(0))
    if victim == "launcher":  # (one epoch is enough to show that it resumes)
        rerun_completes(data_dir, folder, tmp_path, nodes, "--epochs", "1")


def test_bad_input_is_status_2_on_every_node_without_a_traceback(data_dir, tmp_path, nodes):
    run = nodes(data_dir, tmp_path / "ckpt", "--limit-train", "1")
    statuses, _ = run.wait()
    assert statuses == [2, 2]
    for rank in (0, 1):
        assert "leaves fewer images than processes" in run.output(rank)
        assert "Traceback" not in run.output(rank) and "ChildFailedError" not in run.output(rank)


def test_elastic_scale_down_continues_on_the_survivor_at_the_same_position(data_dir, tmp_path, nodes):
    folder, port = tmp_path / "ckpt", free_port()
    # last_call_timeout: how long a rendezvous waits for more nodes once it has the minimum;
    # long enough here for node 1 to join the first one, as pods started together would.
    elastic = ("--nnodes", "1:2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "elastic", "--max-restarts", "3", "--rdzv-conf", "last_call_timeout=10")
    run = nodes(data_dir, folder, "--epochs", "1", "--limit-train", "3200", "--checkpoint-every-steps",
                "5", launch_args=elastic, store_port=port)

    def two_nodes_checkpointed() -> bool:  # (node 0 may start alone, then both re-rendezvous)
        try:
            return read_checkpoint(None, folder)["world_size"] == 2
        except (OSError, RuntimeError, EOFError):
            return False

    wait_for(two_nodes_checkpointed, run)
    for pid in [*run.workers(1), run.processes[1].pid]:  # node 1 is gone, launcher and worker
        os.kill(pid, signal.SIGKILL)
    status = run.processes[0].wait(timeout=WAIT_S)
    out = run.output(0).replace("\n", " ")
    assert status == 0, out[-3000:]
    assert "batch 64 × 1 processes (the run had 64 × 2): continuing epoch 1 at image" in out
    final = read_checkpoint(None, folder)
    assert final["epoch"] == 1 and final["world_size"] == 1


# ----------------------------------------------------------------------------------------------
# `cnn-job launch` on one node, as `torchrun --nproc-per-node N` is used


@pytest.mark.parametrize("rendezvous", [(), ("--standalone",)])
def test_one_node_launch_needs_no_rendezvous_and_prints_no_torch_log_lines(data_dir, tmp_path, rendezvous,
                                                                           monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # torchrun's banner would be about it
    monkeypatch.delenv("LOGLEVEL", raising=False)
    result = run_cli("launch", *rendezvous, "--nproc-per-node", "2", "train", "mnist", "--data-uri",
                     str(data_dir), "--checkpoint-uri", str(tmp_path / "ckpt"), "--device", "cpu",
                     "--epochs", "1", "--limit-train", "256", "--cache-dir", str(tmp_path / "cache"),
                     timeout=WAIT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "training mnist (--net seed) on 2 × cpu: 256 images/epoch" in output
    assert not re.search(r"^[WE]\d{4} ", output, re.MULTILINE) and "OMP_NUM_THREADS" not in output
    assert "val_acc" in output and "Traceback" not in output


@pytest.mark.parametrize("launcher_args, fragment", [
    (["--nproc-per-node", "0"], "bad launcher option: --nproc-per-node 0: at least 1 worker"),
    (["--bogus-flag"], "bad launcher option: unrecognized arguments: --bogus-flag"),
    (["--nnodes", "0"], "bad launcher option: min_nodes must be > 0"),
    (["--nproc-per-node", "many"], "bad launcher option: Unsupported nproc_per_node value: many"),
])
def test_bad_launcher_options_are_one_line(launcher_args, fragment, tmp_path):
    result = run_cli("launch", *launcher_args, "train", "mnist", "--checkpoint-uri", str(tmp_path / "c"))
    assert_one_line_error(result, fragment, "cnn-job launch [TORCHRUN OPTIONS] train DATASET")
    assert result.stdout == "" and not (tmp_path / "c").exists()


def test_launch_checks_the_train_command_once_before_starting_workers(tmp_path):
    result = run_cli("launch", "--nproc-per-node", "2", "train", "--checkpoint-uri", str(tmp_path / "c"))
    assert_one_line_error(result, "Missing argument", "cnn-job train --help")
    result = run_cli("launch", "--nproc-per-node", "2", "train", "mnist", "--epochs", "0",
                     "--checkpoint-uri", str(tmp_path / "c"))
    assert_one_line_error(result, "--epochs must be at least 1")
    assert not (tmp_path / "c").exists()


def test_torch_log_lines_come_back_with_torchruns_loglevel(data_dir, tmp_path, monkeypatch):
    """Asked for with LOGLEVEL: the OMP_NUM_THREADS banner and the agent's line per failed worker."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    result = run_cli("launch", "--nproc-per-node", "2", "train", "mnist", "--data-uri", str(data_dir),
                     "--checkpoint-uri", str(tmp_path / "ckpt"), "--device", "cpu", "--limit-train", "1",
                     "--cache-dir", str(tmp_path / "cache"), env={"LOGLEVEL": "WARNING"}, timeout=WAIT_S)
    assert result.returncode == 2
    assert "Setting OMP_NUM_THREADS environment variable" in result.stderr
    assert re.search(r"^E\d{4} .*failed \(exitcode: 2\)", result.stderr, re.MULTILINE), result.stderr
