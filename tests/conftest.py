"""Shared fixtures: the real archives in ../shared/datasets, a loopback HTTP mirror of them,
and a runner for the real `cnn-job` console script."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from job.config import preset
from job.data import fetch_archives, load_splits

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("CNN_JOB_TEST_DATA", REPO.parent / "shared" / "datasets"))
CNN_JOB = Path(sys.executable).parent / "cnn-job"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "mnist").is_dir():
        pytest.fail(f"no datasets at {DATA_DIR}: the tests need ../shared/datasets")
    return DATA_DIR


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
