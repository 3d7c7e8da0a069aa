"""Shared fixtures: the real archives in ../shared/datasets, a loopback HTTP mirror of them,
and a runner for the real `cnn-job` console script; the image checks' figures in the report."""

from __future__ import annotations

import os

# Under `make test`'s workers (pytest-xdist), every process, and every process it starts, keeps
# to one compute thread: torch's pool otherwise starts a thread per core in each of them, and two
# workers' runs on two cores spend their time switching between spinning threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import contextlib
import functools
import hashlib
import http.client
import http.server
import re
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.parse
from pathlib import Path

import pytest

from job.data import fetch_archives, load_splits
from job.datasets import preset

pytest_plugins = ["pytester"]  # tests/test_newcomer.py runs pytest on a conftest's hooks

# Tests that do not look at W&B keep it off; tests/test_tracking.py turns it on where it looks.
os.environ["WANDB_MODE"] = "disabled"
os.environ.pop("WANDB_API_KEY", None)

REPO = Path(__file__).resolve().parent.parent
# ../shared/datasets beside the checkout as its path was given, where a checkout reached through a
# symlink finds it (/tmp/x/wt -> /work/wt-i29d beside /tmp/x/shared), else beside the checkout
# itself; CNN_JOB_TEST_DATA names another folder. Either may be a symlink: a test that compares a
# path with one the kernel reports (/proc) resolves both.
_BESIDE = [Path(os.path.abspath(__file__)).parents[2] / "shared" / "datasets",
           REPO.parent / "shared" / "datasets"]
DATA_DIR = Path(os.environ.get("CNN_JOB_TEST_DATA")
                or next((folder for folder in _BESIDE if (folder / "mnist").is_dir()), _BESIDE[-1]))
CNN_JOB = Path(sys.executable).parent / "cnn-job"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "mnist").is_dir():
        pytest.fail(f"no datasets at {DATA_DIR}: the tests need ../shared/datasets")
    return DATA_DIR


def archive_sha256(data_dir: Path, dataset: str, name: str) -> str:
    """The checksum of the copy the tests run on (the shared copy's differ from upstream's)."""
    return hashlib.sha256((data_dir / dataset / name).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def mnist(data_dir):
    p = preset("mnist")
    return load_splits(p, fetch_archives(p, str(data_dir), data_dir))


@pytest.fixture(scope="session")
def cifar10(data_dir):
    p = preset("cifar10")
    return load_splits(p, fetch_archives(p, str(data_dir), data_dir))


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def http_mirror(tmp_path):
    """Serve a folder on 127.0.0.1; yields (base_url, folder, list of requested paths)."""

    def serve(folder: Path):
        handler = functools.partial(_CountingHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.requests = []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}", server.requests

    servers = []
    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def run_cli(*args: str, env: dict | None = None, timeout: int = 300, prefix=(), **kwargs):
    """The installed console script, as a user (or a pod) runs it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [*prefix, str(CNN_JOB), *args], capture_output=True, text=True, env=full_env,
        timeout=timeout, **kwargs,
    )


# ----------------------------------------------------------------------------------------------
# a real S3-compatible server process on loopback (moto's), reached through boto3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3_server(extra_env: dict | None = None):
    port = _free_port()
    server = Path(sys.executable).parent / "moto_server"
    process = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(extra_env or {})},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto_server did not start")


RELAY_WAIT_S = 60  # bound on how long the relay holds a transfer

SECRET = "cnn-job-test-secret-Zq8Wv3"  # must never show up in output, summaries or checkpoints


@pytest.fixture(scope="session")
def s3_server():
    process, endpoint = start_s3_server()
    yield endpoint
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """Credentials and endpoint in the environment, as a pod would have them; yields a helper
    with a boto3 client and a fresh bucket for this test."""
    env = {"AWS_ACCESS_KEY_ID": "cnn-job-test-key", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    bucket = "t-" + re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    client.create_bucket(Bucket=bucket)
    return types.SimpleNamespace(endpoint=s3_server, client=client, bucket=bucket, env=env)


# ----------------------------------------------------------------------------------------------
# a relay that holds a transfer it has started


class Relay(http.server.ThreadingHTTPServer):
    """Relays each request to `upstream` (a real server on loopback: the HTTP mirror, or moto's
    S3). The first GET whose path ends with `hold_get` is held after the response's headers and
    first chunk; a PUT of a multipart part numbered `hold_parts_from` or above is held before it
    is forwarded, and so is the first PUT whose path holds `hold_put`. All until `release` is
    set; `holding` is set once one is held."""

    daemon_threads = False  # so that close() joins the request threads
    block_on_close = True

    def __init__(self, upstream: str, hold_get: str | None = None,
                 hold_parts_from: int | None = None, hold_put: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _RelayHandler)
        self.upstream = urllib.parse.urlsplit(upstream).netloc
        self.hold_get, self.hold_parts_from, self.hold_put = hold_get, hold_parts_from, hold_put
        self.holding, self.release = threading.Event(), threading.Event()
        self.url = f"http://127.0.0.1:{self.server_port}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def holds(self, method: str, path: str) -> bool:
        url = urllib.parse.urlsplit(path)
        if method == "GET" and self.hold_get:
            return url.path.endswith(self.hold_get) and not self.holding.is_set()
        if method == "PUT" and self.hold_put:
            return self.hold_put in url.path and not self.holding.is_set()
        part = urllib.parse.parse_qs(url.query).get("partNumber", ["0"])[0]
        return method == "PUT" and self.hold_parts_from is not None and int(part) >= self.hold_parts_from

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a stopped client is expected
            super().handle_error(request, client_address)

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class _RelayHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and the "100 Continue" boto3 waits for on PUTs

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        try:
            self._relay()
        except (ConnectionError, TimeoutError):  # the client was stopped: that is the point
            self.close_connection = True

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _relay(self) -> None:
        relay: Relay = self.server
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if length and len(body) < length:  # its client was killed while sending it
            self.close_connection = True
            return
        held = relay.holds(self.command, self.path)
        if held and self.command != "GET":
            relay.holding.set()
            relay.release.wait(RELAY_WAIT_S)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
        upstream = http.client.HTTPConnection(relay.upstream, timeout=RELAY_WAIT_S)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = None
            if response.getheader("Content-Length") is None and self.command != "HEAD":
                data = response.read()  # a chunked answer goes on with a length
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "keep-alive"):
                    self.send_header(name, value)
            if data is not None:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data is not None:
                self.wfile.write(data)
            elif self.command != "HEAD":
                self._stream(response, held)
        finally:
            upstream.close()

    def _stream(self, response: http.client.HTTPResponse, held: bool) -> None:
        while chunk := response.read(64 << 10):
            self.wfile.write(chunk)
            if held:  # the transfer has started: hold it, then drop it (its client is gone)
                self.server.holding.set()
                self.server.release.wait(RELAY_WAIT_S)
                self.close_connection = True
                return


@pytest.fixture
def relay():
    started = []

    def start(upstream: str, **holds) -> Relay:
        started.append(Relay(upstream, **holds))
        return started[-1]

    yield start
    for server in started:
        server.close()


def process_tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


# ----------------------------------------------------------------------------------------------
# the figures the image checks measured, in the run's report


_FIGURES_BEFORE = pytest.StashKey[object]()


def _image_figures(config: pytest.Config):
    """What tests/test_image.py keeps in pytest's cache (build minutes, images/s, ...); None
    unless its module was collected in this test run."""
    image_tests = sys.modules.get("tests.test_image")
    if image_tests is None or not hasattr(config, "cache"):  # or under -p no:cacheprovider
        return None
    return config.cache.get(image_tests.FIGURES_KEY, None)


def pytest_collection_finish(session: pytest.Session) -> None:
    session.config.stash[_FIGURES_BEFORE] = _image_figures(session.config)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """A short section, before the final counts, when this test run measured new figures."""
    figures = _image_figures(config)
    if not figures or figures == config.stash.get(_FIGURES_BEFORE, None):
        return
    terminalreporter.write_sep("-", "image figures")
    for name, value in figures.items():
        if isinstance(value, dict):
            value = ", ".join(f"{key} {number}" for key, number in value.items())
        elif isinstance(value, float):
            value = round(value, 2)
        terminalreporter.write_line(f"{name}: {value}")


# ----------------------------------------------------------------------------------------------
# small filesystems: full, read-only


@pytest.fixture
def tmpfs():
    """Mount a small tmpfs at a folder (`size_mb`), as a full or read-only disk is made; each is
    unmounted at teardown. Skips, with one line, where mounting is not allowed (not root)."""
    mounted = []

    def mount(folder: Path, size_mb: int = 20) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                                 str(folder)], capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], check=True)  # still busy: detach it


def read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)


def fill(folder: Path) -> None:
    """Fill `folder`'s filesystem to the last byte."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0" * 4096):
                pass
    finally:
        os.close(fd)
