"""Progress reports to Kubeflow Trainer's status server (KEP-2779), against a loopback HTTPS
server with a CA made here, that checks the Bearer token and each body against the published
TrainJob API (kubeflow-trainer-api's models) and the limits of the Trainer's Go types."""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import json
import os
import re
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509  # moto[server], the tests' S3, depends on it
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubeflow_trainer_api.models.trainer_v1alpha1_update_train_job_status_request import (
    TrainerV1alpha1UpdateTrainJobStatusRequest,
)

from job import trainer_status
from job.tracking import NullTracker
from tests.conftest import CNN_JOB, run_cli

TOKEN = "eyJhbGciOiJSUzI1NiJ9.trainer-status-test-token.c2lnbmF0dXJl"
STATUS_PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/default/trainjobs/cnn-job/status"
TRAINER_STATUS_KEYS = {"progressPercentage", "estimatedRemainingSeconds", "metrics",
                       "lastUpdatedTime"}
INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# a CA, and a server certificate it signed for 127.0.0.1


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer_key.public_key()), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """ca.crt (what the Trainer mounts), the server's certificate and key, and another CA."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    files = {
        "ca.crt": _certificate("trainer-test-ca", ca_key, "trainer-test-ca", ca_key, True),
        "other-ca.crt": _certificate("other-ca", other_key, "other-ca", other_key, True),
        "server.crt": _certificate("kubeflow-trainer-controller-manager", server_key,
                                   "trainer-test-ca", ca_key, False),
    }
    paths = {}
    for name, certificate in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths["server.key"] = folder / "server.key"
    paths["server.key"].write_bytes(_pem_key(server_key))
    paths["token"] = folder / "token"
    paths["token"].write_text(TOKEN + "\n")  # as the kubelet writes it: the newline is not sent
    return paths


# ----------------------------------------------------------------------------------------------
# the status server


def schema_problems(body: bytes) -> list[str]:
    """What the Trainer's status server would refuse or drop in `body`: the published model's
    types (StrictInt, StrictStr, datetime), and the Go types' limits (progressPercentage 0-100,
    estimatedRemainingSeconds 0 or more, at most 256 metrics, names and values of 1-64
    characters, lastUpdatedTime required); a key it does not know would be dropped silently."""
    try:
        document = json.loads(body)
        request = TrainerV1alpha1UpdateTrainJobStatusRequest.from_dict(document)
    except Exception as error:  # the model's validation error, or not JSON
        return [f"{type(error).__name__}: {error}"]
    problems = [f"unknown key {key}" for key in set(document) - {"trainerStatus"}]
    status = document.get("trainerStatus")
    if request.trainer_status is None or not isinstance(status, dict):
        return [*problems, "no trainerStatus"]
    problems += [f"unknown key trainerStatus.{key}" for key in set(status) - TRAINER_STATUS_KEYS]
    fields = request.trainer_status
    if fields.progress_percentage is not None and not 0 <= fields.progress_percentage <= 100:
        problems.append(f"progressPercentage {fields.progress_percentage}")
    remaining = fields.estimated_remaining_seconds
    if remaining is not None and not 0 <= remaining <= INT32_MAX:
        problems.append(f"estimatedRemainingSeconds {remaining}")
    metrics = fields.metrics or []
    if len(metrics) > 256:
        problems.append(f"{len(metrics)} metrics")
    problems += [f"metric {m.name!r}: {m.value!r}" for m in metrics
                 if not (1 <= len(m.name) <= 64 and 1 <= len(m.value) <= 64)]
    if fields.last_updated_time is None or fields.last_updated_time.tzinfo is None:
        problems.append(f"lastUpdatedTime {status.get('lastUpdatedTime')!r}")
    return problems


class StatusHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        server = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        server.received.append((time.monotonic(), self.path, self.headers.get("Authorization"),
                                body))
        server.arrived.set()
        if server.hang:  # accepts, reads, and never answers
            server.released.wait()
            return
        if self.headers.get("Authorization") != f"Bearer {server.token}":
            return self._answer(403, {"kind": "Status", "status": "Failure",
                                      "message": "Forbidden", "reason": "Forbidden", "code": 403})
        if self.path != STATUS_PATH or (problems := schema_problems(body)):
            server.problems.append((self.path, problems, body))
            return self._answer(422, {"kind": "Status", "status": "Failure", "code": 422,
                                      "message": "Invalid payload", "reason": "Invalid"})
        self._answer(200, json.loads(body))

    def _answer(self, code: int, document: dict) -> None:
        data = json.dumps(document).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def status_server(pki):
    """start(token=..., hang=False) -> the server: its URL, and what it received."""
    servers = []

    def start(token: str = TOKEN, hang: bool = False):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StatusHandler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki["server.crt"], pki["server.key"])
        # The handshake happens in the request's thread, so a hanging one holds up no other.
        server.socket = context.wrap_socket(server.socket, server_side=True,
                                            do_handshake_on_connect=False)
        server.daemon_threads = True
        server.token, server.hang = token, hang
        server.received, server.problems = [], []
        server.arrived, server.released = threading.Event(), threading.Event()
        server.url = f"https://127.0.0.1:{server.server_port}{STATUS_PATH}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.released.set()
        server.shutdown()
        server.server_close()


def trainer_env(pki, server, **extra) -> dict:
    """What the Trainer's TrainJobStatus plugin puts in a trainer pod's environment."""
    return {trainer_status.SERVER_URL_ENV: server.url,
            trainer_status.CA_CERT_ENV: str(pki["ca.crt"]),
            trainer_status.TOKEN_ENV: str(pki["token"]), **extra}


def reports(server) -> list[dict]:
    return [json.loads(body)["trainerStatus"] for _, _, _, body in server.received]


def metrics_of(report: dict) -> dict[str, str]:
    return {metric["name"]: metric["value"] for metric in report["metrics"]}


def train_args(tmp_path: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["train", "mnist", "--data-uri", str(data_dir), "--limit-train", "1280", "--epochs",
            "2", "--device", "cpu", "--log-every-steps", "2", "--checkpoint-uri",
            str(tmp_path / "ckpt"), "--summary-json", str(tmp_path / "summary.json"), *extra]


WARNING = re.compile(r"^warning: a progress report to Kubeflow Trainer .*$", re.MULTILINE)


# ----------------------------------------------------------------------------------------------
# a real training run


def test_a_run_reports_rising_progress_then_100(tmp_path, data_dir, pki, status_server):
    server = status_server()
    result = run_cli(*train_args(tmp_path, data_dir),
                     env=trainer_env(pki, server, CNN_JOB_TRAINER_STATUS_INTERVAL_S="0"))
    assert result.returncode == 0, result.stderr
    assert not WARNING.search(result.stdout), result.stdout
    assert not server.problems, server.problems  # every body the Trainer's schema takes
    assert {auth for _, _, auth, _ in server.received} == {f"Bearer {TOKEN}"}

    sent = reports(server)
    percentages = [report["progressPercentage"] for report in sent]
    assert len(sent) >= 4 and percentages == sorted(percentages), percentages
    assert any(0 < p < 100 for p in percentages) and percentages.count(100) == 1
    during = [metrics_of(report) for report in sent[:-1]]
    assert {m["currentEpoch"] for m in during} == {"1", "2"}
    assert all(m["totalEpochs"] == "2" and float(m["train_loss"]) > 0 for m in during)
    assert "val_acc" in during[-1] and "val_acc" not in during[0]  # after epoch 1's evaluation
    assert any("estimatedRemainingSeconds" in report for report in sent[:-1])

    summary = json.loads((tmp_path / "summary.json").read_text())
    final = sent[-1]
    assert final["progressPercentage"] == 100 and final["estimatedRemainingSeconds"] == 0
    assert metrics_of(final) == {
        "currentEpoch": "2", "totalEpochs": "2", "step": str(summary["steps"]),
        "train_loss": f"{summary['final_train_loss']:.6g}",
        "val_loss": f"{summary['final_val_loss']:.6g}",
        "val_acc": f"{summary['final_val_acc']:.6g}"}


def test_a_hanging_status_server_holds_up_no_step(tmp_path, data_dir, pki, status_server):
    """The server takes the first report and never answers. With a request timeout (600 s)
    longer than the test allows the run, a step that waited on a report could never finish;
    the run finishes, and makes no second connection behind the one in flight, and its exit
    waits for the final report WAIT_AT_CLOSE_S at most."""
    server = status_server(hang=True)
    env = trainer_env(pki, server, CNN_JOB_TRAINER_STATUS_INTERVAL_S="0",
                      CNN_JOB_TRAINER_STATUS_TIMEOUT_S="600")
    process = subprocess.Popen([str(CNN_JOB), *train_args(tmp_path, data_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
    lines, last_epoch_at = [], None
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("epoch 2/2  train_loss"):
                last_epoch_at = time.monotonic()
        status = process.wait(timeout=300)
        exited_at = time.monotonic()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    output = "".join(lines)
    assert status == 0, process.stderr.read()
    assert last_epoch_at is not None, output
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 2
    assert len(server.received) == 1  # skipped while in flight, the final one included
    assert WARNING.findall(output) == [WARNING.search(output).group(0)]
    assert "no answer within 5 s at the end of the run" in output
    # The final report's wait, and the exit's own work (W&B is off), on a loaded machine.
    assert exited_at - last_epoch_at < trainer_status.WAIT_AT_CLOSE_S + 25


def test_a_refused_token_is_one_warning_and_the_run_goes_on(tmp_path, data_dir, pki,
                                                            status_server):
    server = status_server(token="another-pods-token")
    result = run_cli(*train_args(tmp_path, data_dir),
                     env=trainer_env(pki, server, CNN_JOB_TRAINER_STATUS_INTERVAL_S="0"))
    assert result.returncode == 0, result.stderr
    warnings = WARNING.findall(result.stdout)
    assert len(warnings) == 1, result.stdout
    assert "(HTTP 403: Forbidden)" in warnings[0] and "training goes on" in warnings[0]
    assert TOKEN not in result.stdout + result.stderr
    assert len(server.received) > 2  # the reports went on after the first refusal
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 2


# ----------------------------------------------------------------------------------------------
# the reporter on its own, in this process, against the same server


def reporter(pki, server, interval_s: float = 0.0, ca: str = "ca.crt", epochs: int = 4):
    said: list[str] = []
    status = trainer_status.StatusServer(server.url, str(pki[ca]), str(pki["token"]), 5.0)
    tracker = trainer_status.ReportingTracker(NullTracker(), status, epochs, interval_s,
                                              said.append)
    return tracker, said


def wait_for_reports(server, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(server.received) < count and time.monotonic() < deadline:
        server.arrived.wait(0.1)
        server.arrived.clear()


def test_at_most_one_report_per_interval_and_a_rotated_token_is_read_again(pki, status_server,
                                                                           tmp_path):
    server = status_server()
    tracker, said = reporter(pki, server, interval_s=0.5)
    started = time.monotonic()
    calls = 0
    while (elapsed := time.monotonic() - started) < 1.6:
        tracker.log({"epoch": elapsed / 4, "train/loss": 1.0}, calls)
        calls += 1
    assert calls > 100
    wait_for_reports(server, 1)
    # One at the first call, then one each time 0.5 s have passed: 4 at most in 1.6 s.
    assert 1 <= len(server.received) <= 4

    rotated = tmp_path / "rotated-token"
    rotated.write_text("rotated-token\n")
    server.token = "rotated-token"
    pki_rotated = {**pki, "token": rotated}
    tracker, said = reporter(pki_rotated, server)
    before = len(server.received)
    tracker.close({"preempted_by": "SIGTERM", "final_val_acc": None})
    assert len(server.received) == before + 1 and not said
    assert server.received[-1][2] == "Bearer rotated-token"
    assert reports(server)[-1]["progressPercentage"] < 100  # stopped: where it stopped


def test_a_certificate_of_another_ca_is_refused_with_one_warning(pki, status_server):
    server = status_server()
    tracker, said = reporter(pki, server, ca="other-ca.crt")
    for step in range(20):
        tracker.log({"epoch": step / 10}, step)
        with tracker.in_flight:  # each report's attempt over before the next
            pass
    tracker.close({"preempted_by": None, "final_val_acc": 0.5})
    assert server.received == []  # nothing was sent unverified
    assert len(said) == 1 and "CERTIFICATE_VERIFY_FAILED" in said[0], said


def test_reports_need_rank_0_an_https_url_and_a_readable_ca(pki, status_server, monkeypatch):
    server = status_server()
    inner, said = NullTracker(), []
    for name, value in trainer_env(pki, server).items():
        monkeypatch.setenv(name, value)
    assert isinstance(trainer_status.alongside(inner, enabled=True, epochs=2, say=said.append),
                      trainer_status.ReportingTracker)
    assert trainer_status.alongside(inner, enabled=False, epochs=2, say=said.append) is inner
    monkeypatch.setenv(trainer_status.SERVER_URL_ENV, server.url.replace("https:", "http:"))
    assert trainer_status.alongside(inner, enabled=True, epochs=2, say=said.append) is inner
    monkeypatch.setenv(trainer_status.SERVER_URL_ENV, server.url)
    monkeypatch.setenv(trainer_status.CA_CERT_ENV, str(pki["ca.crt"]) + ".missing")
    assert trainer_status.alongside(inner, enabled=True, epochs=2, say=said.append) is inner
    assert len(said) == 2 and all(line.startswith("warning: no progress reports to Kubeflow "
                                                  "Trainer") for line in said), said
    assert "is not an https:// URL" in said[0] and "FileNotFoundError" in said[1]
    monkeypatch.delenv(trainer_status.SERVER_URL_ENV)
    assert trainer_status.alongside(inner, enabled=True, epochs=2, say=said.append) is inner
    assert server.received == []
