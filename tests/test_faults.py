"""Storage faults, for real: an S3 endpoint that goes away (a relay on loopback in front of the
moto server, which closes its listening socket and drops its connections), a filesystem that is
full or read-only (a tmpfs), and URIs that would map files outside their folder."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from job.errors import JobError, StorageUnavailable
from job.lease import LocalLock, S3Lease
from job.storage import LocalStore, S3Store, open_object, parse_s3_uri, request_timeout_s, uri_kind
from tests.conftest import CNN_JOB, SECRET

# ----------------------------------------------------------------------------------------------
# an endpoint that goes down


class FlakyEndpoint:
    """A TCP relay on 127.0.0.1 to `upstream` that can go down: it then refuses connections (its
    listening socket is closed) and drops the ones it had; or, `silent`, it hangs: it accepts
    connections and holds them, open, never answering, and holds the ones it had the same way.
    It goes down by itself at the `nth` request whose bytes hold `down_on` (that request never
    reaches the server), and comes back on `restore()`, on the same port."""

    def __init__(self, upstream: str, down_on: bytes, nth: int = 1, silent: bool = False) -> None:
        url = urllib.parse.urlsplit(upstream)
        self.upstream = (url.hostname, url.port)
        self.down_on, self.nth, self.seen = down_on, nth, 0
        self.silent, self.hung = silent, False
        self.held: list[socket.socket] = []  # the connections a silent endpoint holds
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.went_down = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))  # SO_REUSEADDR: rebound later
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._serve(self.listener)

    @property
    def down(self) -> bool:
        return self.listener is None

    def _serve(self, listener: socket.socket) -> None:
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # shut down: the endpoint went away
                return
            with self.lock:
                if self.hung:
                    self.held.append(client)
                    continue
                if self.down:
                    client.close()
                    continue
                server = socket.create_connection(self.upstream)
                self.sockets |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, dest: socket.socket, from_client: bool) -> None:
        tail = b""  # shorter than the pattern: a match across two reads is counted once
        try:
            while data := source.recv(1 << 16):
                if from_client:
                    with self.lock:
                        self.seen += (tail + data).count(self.down_on)
                        tail = (tail + data)[-(len(self.down_on) - 1):]
                        if self.seen >= self.nth and not self.went_down.is_set():
                            self._go_down()
                        if self.down or self.hung:  # hung: never answered, never closed
                            return
                dest.sendall(data)
        except OSError:
            pass
        finally:
            with self.lock:
                if self.hung:  # the connection stays open, silent, until restore()
                    self.held += [end for end in (source, dest) if end not in self.held]
                else:
                    for end in (source, dest):
                        with contextlib.suppress(OSError):
                            end.close()

    def _go_down(self) -> None:
        """(Under the lock.) Refuse connections from now on, and drop the open ones; silent,
        hold them all, unanswered."""
        if self.silent:
            self.hung = True
            self.went_down.set()
            return
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes its accept(): new connects are refused
        self.listener.close()
        self.listener = None
        for end in self.sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        self.sockets.clear()
        self.went_down.set()

    def hang(self) -> None:
        """Go down now (silent: every request from now on is held, unanswered)."""
        with self.lock:
            self._go_down()

    def restore(self) -> None:
        with self.lock:
            self._drop_held()
            if self.down:
                self.listener = socket.create_server(("127.0.0.1", self.port))
                self._serve(self.listener)

    def _drop_held(self) -> None:
        self.hung = False
        for end in self.held:
            with contextlib.suppress(OSError):
                end.close()
        self.held.clear()

    def close(self) -> None:
        with self.lock:
            self._drop_held()
            self.silent = False
            if not self.down:
                self._go_down()


@pytest.fixture
def flaky():
    started = []

    def start(upstream: str, down_on: bytes, nth: int = 1, silent: bool = False) -> FlakyEndpoint:
        started.append(FlakyEndpoint(upstream, down_on, nth, silent))
        return started[-1]

    yield start
    for endpoint in started:
        endpoint.close()


class Running:
    """A `cnn-job` process whose output is read as it comes, to wait on what it says."""

    def __init__(self, *args: str, env: dict) -> None:
        self.process = subprocess.Popen(
            [str(CNN_JOB), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                        for stream, lines in ((self.process.stdout, self.out),
                                              (self.process.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def wait_for(self, text: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.out + self.err):
            assert self.process.poll() is None, f"exited {self.process.returncode} before saying " \
                f"{text!r}:\n{''.join(self.out)}{''.join(self.err)}"
            assert time.monotonic() < deadline, f"never said {text!r}:\n{''.join(self.out)}"
            time.sleep(0.05)

    def finish(self, timeout_s: float = 180) -> tuple[int, str, str]:
        try:
            self.process.wait(timeout=timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        for reader in self.readers:
            reader.join(timeout=10)
        return self.process.returncode, "".join(self.out), "".join(self.err)


def wait_until(condition, timeout_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# Three steps of 64 images: checkpoints after steps 1 and 2 (inside the epoch) and after the
# epoch's evaluation (step 3). The faults hit the upload of step 2's.
STEP_2 = "step-000000002.pt"


def train_args(s3, data_dir: Path, tmp_path: Path, run: str, *extra: str) -> list[str]:
    return ["train", "mnist", "--data-uri", str(data_dir), "--checkpoint-uri",
            f"s3://{s3.bucket}/{run}", "--limit-train", "192", "--batch-size", "64", "--epochs",
            "1", "--checkpoint-every-steps", "1", "--device", "cpu", "--cache-dir",
            str(tmp_path / "cache"), *extra]


def stored(s3, run: str) -> tuple[list[str], str | None]:
    """The run's objects (by name) and what `latest` names, read from the server directly."""
    listing = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{run}/").get("Contents", [])
    names = sorted(item["Key"].removeprefix(f"{run}/") for item in listing)
    latest = None
    if "latest" in names:
        latest = s3.client.get_object(Bucket=s3.bucket, Key=f"{run}/latest")["Body"].read().decode()
    return names, latest and latest.strip()


def put_of(s3, run: str, name: str) -> bytes:
    return f"PUT /{s3.bucket}/{run}/{name} HTTP/1.1".encode()


def test_an_outage_during_a_checkpoint_upload_is_waited_out(s3, data_dir, tmp_path, flaky):
    endpoint = flaky(s3.endpoint, put_of(s3, "run", STEP_2))
    job = Running(*train_args(s3, data_dir, tmp_path, "run"), env={"AWS_ENDPOINT_URL": endpoint.url})
    job.wait_for(f"S3 endpoint {endpoint.url} unreachable (")
    assert endpoint.down and "retrying for up to" in "".join(job.out)
    endpoint.restore()
    status, out, err = job.finish()
    assert status == 0, out + err
    names, latest = stored(s3, "run")
    assert [n for n in names if n.startswith("step-")] == [
        "step-000000001.pt", "step-000000002.pt", "step-000000003.pt"]
    assert latest == "step-000000003.pt"


def test_an_outage_past_the_retry_budget_exits_69_and_the_same_command_resumes(
        s3, data_dir, tmp_path, flaky):
    endpoint = flaky(s3.endpoint, put_of(s3, "run", STEP_2))
    args = train_args(s3, data_dir, tmp_path, "run", "--lease-seconds", "1")
    env = {"AWS_ENDPOINT_URL": endpoint.url, "CNN_JOB_STORAGE_RETRY_S": "2"}
    started = time.monotonic()
    status, out, err = Running(*args, env=env).finish()
    assert status == 69, out + err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: S3 endpoint {endpoint.url} unreachable for ")
    assert f"at s3://{s3.bucket}/run/{STEP_2}" in line
    assert "the checkpoints are intact: run the same command to resume" in line
    assert SECRET not in out + err and time.monotonic() - started < 90
    names, latest = stored(s3, "run")
    assert STEP_2 not in names and latest == "step-000000001.pt"  # the earlier one, intact

    endpoint.restore()
    status, out, err = Running(*args, env=env).finish()
    assert status == 0, out + err
    assert f"resumed from s3://{s3.bucket}/run/step-000000001.pt" in out.replace("\n", "")
    assert stored(s3, "run")[1] == "step-000000003.pt"


def lease_age_s(s3, run: str) -> float:
    """How long ago the run's lease was last written, by the server's clock."""
    response = s3.client.get_object(Bucket=s3.bucket, Key=f"{run}/.lease")
    now = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
    return (now - response["LastModified"]).total_seconds()


def test_an_outage_longer_than_the_lease_is_no_lease_lost(s3, data_dir, tmp_path, flaky):
    # Down at the lease's first renewal (its second write), and back only once the lease has
    # expired three times over: nobody else took it, so the run goes on and ends normally.
    endpoint = flaky(s3.endpoint, put_of(s3, "run", ".lease"), nth=2)
    job = Running(*train_args(s3, data_dir, tmp_path, "run", "--lease-seconds", "1"),
                  env={"AWS_ENDPOINT_URL": endpoint.url})
    assert endpoint.went_down.wait(120)
    wait_until(lambda: lease_age_s(s3, "run") > 3, what="the lease to expire")
    endpoint.restore()
    status, out, err = job.finish()
    assert status == 0, out + err
    assert "lost the lease" not in out + err and "another job" not in out + err
    assert stored(s3, "run")[1] == "step-000000003.pt"


def test_renewals_failing_past_the_budget_recover_once_storage_answers(s3, flaky):
    # Lease 1 s, budget 1 s: renewals fail for several budgets. The check before a checkpoint
    # write then waits out one budget and ends the run (69) while storage is still away; once
    # it answers, the check renews the lease, which is still ours.
    endpoint = flaky(s3.endpoint, put_of(s3, "run", ".lease"), nth=2)
    lease = S3Lease(S3Store(f"s3://{s3.bucket}/run", endpoint.url, retry_s=1), 1, print)
    lease.acquire()
    try:
        assert endpoint.went_down.wait(30)
        wait_until(lambda: lease_age_s(s3, "run") > 4, what="renewals to fail past the budget")
        with pytest.raises(StorageUnavailable, match=r"unreachable for \d+ s \(Connection refused"):
            lease.check()
        lease.check_held()  # an outage is no lost lease: the run trains on meanwhile
        endpoint.restore()
        lease.check()
        assert s3.client.head_object(Bucket=s3.bucket, Key="run/.lease")["ETag"] == lease.etag
    finally:
        lease.release()
    assert "Contents" not in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="run/.lease")


def test_a_lease_another_job_took_stops_the_run_at_its_next_step(s3):
    lease = S3Lease(S3Store(f"s3://{s3.bucket}/run", retry_s=1), 1, print)
    lease.acquire()
    try:
        lease.check_held()
        s3.client.put_object(Bucket=s3.bucket, Key="run/.lease",
                             Body=json.dumps({"holder": "pod-b pid 7", "nonce": "b"}).encode())
        wait_until(lambda: lease.ended is not None, what="a renewal to find the lease taken")
        with pytest.raises(JobError, match=f"lost the lease on s3://{s3.bucket}/run to pod-b pid 7"):
            lease.check_held()  # no request: what the training loop asks at every step
    finally:
        lease.release()


def test_a_stop_signal_during_a_retry_wait_is_a_preemption(s3, data_dir, tmp_path, flaky):
    endpoint = flaky(s3.endpoint, put_of(s3, "run", STEP_2))
    job = Running(*train_args(s3, data_dir, tmp_path, "run"), env={"AWS_ENDPOINT_URL": endpoint.url})
    job.wait_for(f"S3 endpoint {endpoint.url} unreachable (")
    signalled = time.monotonic()
    job.process.send_signal(signal.SIGTERM)
    status, out, err = job.finish()
    assert status == 75, out + err
    assert time.monotonic() - signalled < 15
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM")
    names, latest = stored(s3, "run")
    assert STEP_2 not in names and latest == "step-000000001.pt"


# ----------------------------------------------------------------------------------------------
# an endpoint that accepts connections and never answers

HANG_BUDGET_S = 10  # --storage-retry-s
# A hang ends the job at most one request's timeout past the budget (the process's exit: a few
# seconds more, on a loaded machine), not after botocore's tries of 60 s each.
HANG_BOUND_S = HANG_BUDGET_S + request_timeout_s(HANG_BUDGET_S)
EXIT_S = 8  # a PUT's 1 s wait for "100 Continue", the lease's release, the exit: on a loaded machine


def exits_69_within(job: Running, endpoint: FlakyEndpoint, bound_s: float, source: str) -> str:
    """The job's exit, 69, within `bound_s` (and its exit's seconds) of the first request the
    silent endpoint held; its one line, which names the endpoint."""
    wait_until(lambda: endpoint.held, timeout_s=120, what="a request the endpoint holds")
    held = time.monotonic()
    status, out, err = job.finish()
    assert status == 69, out + err
    assert time.monotonic() - held < bound_s + EXIT_S
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: {source} {endpoint.url} unreachable for "), line
    return line


def test_a_silent_endpoint_at_start_up_exits_69_one_timeout_past_the_budget(s3, tmp_path, flaky):
    endpoint = flaky(s3.endpoint, b"never sent", silent=True)
    endpoint.hang()
    job = Running("train", "mnist", "--data-uri", f"s3://{s3.bucket}/datasets", "--device", "cpu",
                  "--storage-retry-s", str(HANG_BUDGET_S), "--cache-dir", str(tmp_path / "cache"),
                  "--checkpoint-uri", str(tmp_path / "ckpt"), env={"AWS_ENDPOINT_URL": endpoint.url})
    line = exits_69_within(job, endpoint, HANG_BOUND_S, "S3 endpoint")
    assert f"(read timeout) at s3://{s3.bucket}/datasets" in line


def test_a_silent_http_mirror_exits_69_one_timeout_past_the_budget(s3, tmp_path, flaky):
    endpoint = flaky(s3.endpoint, b"never sent", silent=True)
    endpoint.hang()
    budget_s = 3
    job = Running("train", "mnist", "--data-uri", endpoint.url, "--device", "cpu",
                  "--storage-retry-s", str(budget_s), "--cache-dir", str(tmp_path / "cache"),
                  "--checkpoint-uri", str(tmp_path / "ckpt"), env={})
    line = exits_69_within(job, endpoint, budget_s + request_timeout_s(budget_s), "HTTP mirror")
    assert f"(timed out) at {endpoint.url}/SHA256SUMS" in line


def hung_upload(s3, data_dir, tmp_path, flaky) -> tuple[FlakyEndpoint, list[str], dict, Running]:
    """A run whose upload of step 2's checkpoint gets no answer, nor does anything after it."""
    endpoint = flaky(s3.endpoint, put_of(s3, "run", STEP_2), silent=True)
    args = train_args(s3, data_dir, tmp_path, "run", "--lease-seconds", "1",
                      "--storage-retry-s", str(HANG_BUDGET_S))
    env = {"AWS_ENDPOINT_URL": endpoint.url}
    return endpoint, args, env, Running(*args, env=env)


def latest_loads(s3, run: str) -> str:
    """What `latest` names, loaded (read from the server directly)."""
    import io

    import torch

    latest = stored(s3, run)[1]
    data = s3.client.get_object(Bucket=s3.bucket, Key=f"{run}/{latest}")["Body"].read()
    assert torch.load(io.BytesIO(data), weights_only=True)["step"] == int(latest[5:14])
    return latest


def test_a_silent_endpoint_during_a_checkpoint_upload_exits_69_and_the_same_command_resumes(
        s3, data_dir, tmp_path, flaky):
    endpoint, args, env, job = hung_upload(s3, data_dir, tmp_path, flaky)
    line = exits_69_within(job, endpoint, HANG_BOUND_S, "S3 endpoint")
    assert f") at s3://{s3.bucket}/run/{STEP_2}" in line  # a send or a read timed out
    assert latest_loads(s3, "run") == "step-000000001.pt"

    endpoint.restore()
    status, out, err = Running(*args, env=env).finish()
    assert status == 0, out + err
    assert f"resumed from s3://{s3.bucket}/run/step-000000001.pt" in out.replace("\n", "")
    assert latest_loads(s3, "run") == "step-000000003.pt"


def test_a_stop_signal_during_a_silent_upload_exits_75_within_seconds(s3, data_dir, tmp_path, flaky):
    endpoint, args, env, job = hung_upload(s3, data_dir, tmp_path, flaky)
    assert endpoint.went_down.wait(120)
    signalled = time.monotonic()
    job.process.send_signal(signal.SIGTERM)
    status, out, err = job.finish()
    assert status == 75, out + err
    assert time.monotonic() - signalled < 10
    assert err.strip().splitlines()[-1] == (
        f"error: stopped by SIGTERM while writing checkpoint s3://{s3.bucket}/run/{STEP_2}, which "
        "storage did not take before the stop: it was not written and latest names the "
        "checkpoint it named before; run the same command to resume from it (exit status 75)")
    assert latest_loads(s3, "run") == "step-000000001.pt"

    endpoint.restore()
    status, out, err = Running(*args, env=env).finish()
    assert status == 0, out + err
    assert latest_loads(s3, "run") == "step-000000003.pt"


# ----------------------------------------------------------------------------------------------
# URIs that would leave their folder


@pytest.mark.parametrize("uri", ["s3://b/a/../x", "s3://b/a//x", "s3://b/./x", "s3://../x",
                                 "s3://b/a/.."])
def test_dot_and_empty_segments_in_s3_uris_are_refused(uri):
    with pytest.raises(JobError, match=r"a path segment is empty, '\.' or '\.\.'"):
        parse_s3_uri(uri)
    with pytest.raises(JobError, match=r"a path segment is empty"):
        open_object(uri, "CHECKPOINT")
    assert parse_s3_uri("s3://b/a/x/") == ("b", "a/x")  # a closing slash is no segment


@pytest.mark.parametrize("uri", ["http://mirror/a/../x", "https://mirror/a//x",
                                 "http://mirror/%2e%2e/x", "https://mirror/./x"])
def test_dot_and_empty_segments_in_mirror_urls_are_refused(uri):
    with pytest.raises(JobError, match=r"a path segment is empty"):
        uri_kind(uri, "--data-uri")
    assert uri_kind("../data/./x", "--data-uri") == "local"  # a local path is the user's own


def test_a_data_uri_climbing_out_of_the_cache_writes_nothing_outside_it(s3, data_dir, tmp_path):
    uri = f"s3://{s3.bucket}/a/../../../../escaped"  # cache/s3/BUCKET/a/../../../.. is tmp_path
    result = subprocess.run(
        [str(CNN_JOB), "train", "mnist", "--data-uri", uri, "--cache-dir", str(tmp_path / "cache"),
         "--checkpoint-uri", str(tmp_path / "ckpt"), "--device", "cpu"],
        capture_output=True, text=True, timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ckpt"]
    assert not (tmp_path / "cache" / "s3").exists()
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line == f"error: {uri}: a path segment is empty, '.' or '..'; write the URI without them"


# ----------------------------------------------------------------------------------------------
# a full or read-only filesystem under the checkpoint folder


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "64k"):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:  # lazily where a file is still open in it (a lock a failing test left held)
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path) -> None:
    with open(folder / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
        while filler.write(b"\0" * 4096):
            pass


def test_a_full_filesystem_under_the_lease_is_one_line(tmp_path):
    with tmpfs(tmp_path / "mnt") as mnt:
        run = mnt / "run"
        run.mkdir()
        fill(mnt)
        lock = LocalLock(LocalStore(str(run)))
        with pytest.raises(JobError) as error:
            lock.acquire()
        assert str(error.value) == (f"cannot write {run}/.holder (No space left on device): "
                                    "free space there, or pass another --checkpoint-uri")
        assert list(run.iterdir()) == []  # no holder file, whole or partial
        assert lock.fd is None and LocalLock(LocalStore(str(run))).is_held() is False


def test_a_read_only_filesystem_under_the_lease_is_one_line(tmp_path):
    with tmpfs(tmp_path / "mnt") as mnt:
        (mnt / "run").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(JobError) as error:
            LocalLock(LocalStore(str(mnt / "run"))).acquire()
        assert str(error.value) == (f"cannot write {mnt}/run/.holder (Read-only file system): "
                                    "pass a writable --checkpoint-uri")
