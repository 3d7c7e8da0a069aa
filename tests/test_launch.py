"""`cnn-job launch` before its workers start: a node waiting for the others says so, stops at
once on a signal, and gives up after --rdzv-timeout in one line; a malformed rendezvous endpoint
is one line before anything starts. Every wait is on the output or a listening port, bounded."""

import os
import re
import signal
import subprocess
import threading
import time

import pytest

from job.errors import JobError
from job.launch import torchrun_config
from tests.conftest import CNN_JOB, run_cli
from tests.test_cli import assert_one_line_error
from tests.test_multinode import free_port, listening

TRAIN = ("train", "mnist", "--checkpoint-uri", "ckpt", "--device", "cpu")
START_S = 60  # to the waiting line: imports (torch) on a loaded machine
STOP_S = 5  # from the signal to the launcher's exit


class Launcher:
    """`cnn-job launch ...` with its stdout and stderr read as they come."""

    def __init__(self, tmp_path, *launch_args: str, env: dict | None = None) -> None:
        self.process = subprocess.Popen(
            [str(CNN_JOB), "launch", "--nproc-per-node", "1", *launch_args, *TRAIN],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.stdout: list[str] = []
        threading.Thread(target=lambda: self.stdout.extend(self.process.stdout), daemon=True).start()

    def wait_for(self, done, what: str) -> None:
        deadline = time.monotonic() + START_S
        while not done():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"no {what}: {self.stdout} {self.process.stderr.read()}")
            time.sleep(0.02)

    def ended(self, timeout_s: float) -> tuple[int, str]:
        """Exit status and stderr, within `timeout_s` (or the test fails)."""
        try:
            status = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"still waiting {timeout_s} s on: {self.stdout}") from None
        return status, self.process.stderr.read()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_node_waiting_for_the_others_says_so_and_stops_at_once_on_a_signal(tmp_path,
                                                                              stop_signal):
    port = free_port()
    launcher = Launcher(tmp_path, "--nnodes", "2", "--master-port", str(port))
    launcher.wait_for(lambda: launcher.stdout, "waiting line")
    assert re.fullmatch(rf"waiting for 2 nodes \(this one included\) to join the rendezvous at "
                        rf"127\.0\.0\.1:{port}, until \d\d:\d\d:\d\d \S+ \(--rdzv-timeout 600 s\)\n",
                        launcher.stdout[0]), launcher.stdout
    # The store it hosts is up: the launcher's main thread waits in it (C++), which a Python
    # signal handler cannot interrupt.
    launcher.wait_for(lambda: listening(port), "rendezvous store")
    launcher.process.send_signal(stop_signal)
    status, stderr = launcher.ended(STOP_S)
    assert status == 75, stderr
    assert stderr == (f"error: stopped by {stop_signal.name} before any worker started, while "
                      "waiting for the other nodes: nothing was lost; run the same command again "
                      "(exit status 75)\n")
    assert len(launcher.stdout) == 1 and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("backend_args, env", [
    (("--rdzv-timeout", "2"), {}),  # static: node rank 0 hosts the store and waits
    (("--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:{port}"),
     {"CNN_JOB_RDZV_TIMEOUT_S": "2"}),
], ids=["static", "c10d"])
def test_a_rendezvous_that_times_out_is_one_line(tmp_path, backend_args, env):
    port = free_port()
    backend_args = [arg.format(port=port) for arg in backend_args]
    launcher = Launcher(tmp_path, "--nnodes", "2", "--master-port", str(port), *backend_args,
                        env=env)
    status, stderr = launcher.ended(START_S)
    assert status == 69, stderr
    assert launcher.stdout[0].startswith("waiting for 2 nodes") and len(launcher.stdout) == 1
    assert re.fullmatch(rf"error: no rendezvous at 127\.0\.0\.1:{port} within 2 s, the other "
                        r"nodes did not all join \(.+\): start them with the same rendezvous "
                        r"options, then run the same command again \(exit status 69\)\n",
                        stderr), stderr


def test_a_malformed_rendezvous_endpoint_is_one_line_before_anything_starts(tmp_path):
    result = run_cli("launch", "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                     "127.0.0.1:abc", *TRAIN, cwd=tmp_path)
    assert_one_line_error(result, "bad launcher option: --rdzv-endpoint '127.0.0.1:abc': not "
                          "HOST:PORT (a host name or IP address, and a port from 0 to 65535)")
    assert result.stdout == "" and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("launch_args, fragment", [
    (["--rdzv-endpoint", "localhost:-5"], "--rdzv-endpoint 'localhost:-5': not HOST:PORT"),
    (["--rdzv-endpoint", "localhost:65536"], "--rdzv-endpoint 'localhost:65536': not HOST:PORT"),
    (["--rdzv-endpoint", ":29400"], "--rdzv-endpoint ':29400': not HOST:PORT"),
    (["--rdzv-backend", "static", "--master-port", "70000"],
     "--master-addr/--master-port '127.0.0.1:70000': not HOST:PORT"),
    (["--rdzv-timeout", "-1"], "--rdzv-timeout -1 is not a number of seconds: it takes a finite "
                               "number, 0 or more"),
    (["--rdzv-timeout", "nan"], "--rdzv-timeout nan is not a number of seconds"),
    (["--rdzv-timeout", "soon"], "argument --rdzv-timeout/--rdzv_timeout: invalid float value"),
])
def test_bad_rendezvous_settings_are_refused(launch_args, fragment):
    with pytest.raises(JobError, match=re.escape(fragment)):
        torchrun_config(["--nnodes", "2", *launch_args], list(TRAIN))


def test_a_bad_rendezvous_timeout_in_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("CNN_JOB_RDZV_TIMEOUT_S", "ten")
    with pytest.raises(JobError, match="CNN_JOB_RDZV_TIMEOUT_S='ten' is not a number of seconds"):
        torchrun_config(["--nnodes", "2"], list(TRAIN))


def test_the_rendezvous_timeout_reaches_either_backend_unless_rdzv_conf_names_it(monkeypatch):
    monkeypatch.delenv("CNN_JOB_RDZV_TIMEOUT_S", raising=False)
    static, _, _ = torchrun_config(["--nnodes", "2"], list(TRAIN))
    assert static.rdzv_configs["timeout"] == 600  # torchrun's own default would be 900
    c10d, _, _ = torchrun_config(["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                  "node0:29400", "--rdzv-timeout", "30.5"], list(TRAIN))
    assert c10d.rdzv_configs["join_timeout"] == 31
    # 0: the least the backends take (torch refuses a timeout of 0 s); empty: the default
    monkeypatch.setenv("CNN_JOB_RDZV_TIMEOUT_S", "0")
    assert torchrun_config(["--nnodes", "2"], list(TRAIN))[0].rdzv_configs["timeout"] == 1
    monkeypatch.setenv("CNN_JOB_RDZV_TIMEOUT_S", "")
    assert torchrun_config(["--nnodes", "2"], list(TRAIN))[0].rdzv_configs["timeout"] == 600
    named, _, _ = torchrun_config(["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-conf",
                                   "join_timeout=45"], list(TRAIN))
    assert named.rdzv_configs["join_timeout"] == "45"
