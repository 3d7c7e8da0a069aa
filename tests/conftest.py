"""Shared fixtures: the real archives in ../shared/datasets, a loopback HTTP mirror of them,
and a runner for the real `cnn-job` console script."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from job.config import preset
from job.data import fetch_archives, load_splits

# Tests that do not look at W&B keep it off; tests/test_tracking.py turns it on where it looks.
os.environ["WANDB_MODE"] = "disabled"
os.environ.pop("WANDB_API_KEY", None)

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("CNN_JOB_TEST_DATA", REPO.parent / "shared" / "datasets"))
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
