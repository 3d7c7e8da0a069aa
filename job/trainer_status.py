"""Progress where Kubeflow Trainer shows it: the TrainJob's `status.trainerStatus` (KEP-2779).

Kubeflow Trainer (v2.2 or later, its `TrainJobStatus` feature gate on) gives every trainer pod
the address of its status server and the files that let a pod talk to it:
KUBEFLOW_TRAINER_SERVER_URL (https://.../namespaces/NS/trainjobs/NAME/status),
KUBEFLOW_TRAINER_SERVER_CA_CERT (the CA the server's certificate is checked against) and
KUBEFLOW_TRAINER_SERVER_TOKEN (a projected service-account token, sent as a Bearer token and
read again for every report, as the kubelet rotates it). Where the first is set, rank 0 POSTs

    {"trainerStatus": {"progressPercentage": 45, "estimatedRemainingSeconds": 120,
                       "metrics": [{"name": "train_loss", "value": "0.2347"}, ...],
                       "lastUpdatedTime": "2026-12-07T10:30:45Z"}}

at a log step (every --log-every-steps), at most once every CNN_JOB_TRAINER_STATUS_INTERVAL_S
seconds (default 5, what the Trainer's docs ask of a client), and once more at the end: 100 for
a finished run, where it stopped for a stopped one.

The reports ride along the tracker (job/tracking.py's interface): they read what the loop already
logs. None ever holds up a step: each is sent on a thread of its own, with a timeout
(CNN_JOB_TRAINER_STATUS_TIMEOUT_S, default 5 s), and while one is in flight the next ones are
skipped, not queued. The final one gets at most WAIT_AT_CLOSE_S, alongside W&B's close. A
failure (no answer, a refused token, a certificate that does not verify) is one warning line
for the whole run, and the reports go on; the run's outcome never depends on them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from job.errors import seconds_from_env
from job.tracking import NullTracker

if TYPE_CHECKING:
    from job.evaluation import Evaluation

SERVER_URL_ENV = "KUBEFLOW_TRAINER_SERVER_URL"
CA_CERT_ENV = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
TOKEN_ENV = "KUBEFLOW_TRAINER_SERVER_TOKEN"
INTERVAL_ENV = "CNN_JOB_TRAINER_STATUS_INTERVAL_S"
DEFAULT_INTERVAL_S = 5.0
TIMEOUT_ENV = "CNN_JOB_TRAINER_STATUS_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 5.0
# The final report's wait at the end of the run, in flight ones included: a stopped pod's grace
# period is shared with the checkpoint upload and W&B's close.
WAIT_AT_CLOSE_S = 5.0
INT32_MAX = 2**31 - 1  # the status fields are int32
RESPONSE_MAX_BYTES = 1 << 16


class StatusServer:
    """The Trainer's status server as the pod's environment names it: one POST per report."""

    def __init__(self, url: str, ca_file: str | None, token_file: str | None, timeout_s: float):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"{SERVER_URL_ENV} {url!r} is not an https:// URL")
        self.url, self.host, self.port = url, parts.hostname, parts.port
        self.path = parts.path + (f"?{parts.query}" if parts.query else "")
        # Verified against the CA given, the host name included; the system's CAs without one.
        self.context = ssl.create_default_context(cafile=ca_file or None)
        self.token_file, self.timeout_s = token_file, timeout_s

    def post(self, body: bytes, timeout_s: float) -> None:
        """Send one report; raises OSError (ssl's and http.client's errors among them) or
        RuntimeError with the server's reason where it did not take it."""
        headers = {"Content-Type": "application/json"}
        if self.token_file:
            headers["Authorization"] = f"Bearer {Path(self.token_file).read_text().strip()}"
        connection = http.client.HTTPSConnection(self.host, self.port, timeout=timeout_s,
                                                 context=self.context)
        try:
            connection.request("POST", self.path, body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read(RESPONSE_MAX_BYTES)
        finally:
            connection.close()
        if not 200 <= response.status < 300:
            message = response.reason
            with contextlib.suppress(ValueError, AttributeError):  # a metav1.Status, if JSON
                message = json.loads(answer).get("message") or message
            raise RuntimeError(f"HTTP {response.status}: {message}")


def alongside(tracker: NullTracker, *, enabled: bool, epochs: int,
              say: Callable[[str], None]) -> NullTracker:
    """`tracker`, also reporting the run's progress to Kubeflow Trainer where this is rank 0
    (`enabled`) of a pod whose environment names the Trainer's status server."""
    url = os.environ.get(SERVER_URL_ENV, "").strip()
    if not enabled or not url:
        return tracker
    try:
        server = StatusServer(url, os.environ.get(CA_CERT_ENV), os.environ.get(TOKEN_ENV),
                              timeout_s())
    except (ValueError, OSError) as error:  # ssl.SSLError is an OSError: a CA file unreadable
        say(f"warning: no progress reports to Kubeflow Trainer ({type(error).__name__}: {error}); "
            "training goes on without them")
        return tracker
    return ReportingTracker(tracker, server, epochs, interval_s(), say)


def interval_s() -> float:
    """CNN_JOB_TRAINER_STATUS_INTERVAL_S: the least time between two reports (0: one at every
    log step). TrainConfig reads it too, so a bad value is refused before any work."""
    return seconds_from_env(INTERVAL_ENV, DEFAULT_INTERVAL_S)


def timeout_s() -> float:
    """CNN_JOB_TRAINER_STATUS_TIMEOUT_S: how long one report may take (0: no waiting, so no
    report gets through: one warning). TrainConfig reads it too."""
    return seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


class ReportingTracker(NullTracker):
    """`inner` (W&B or the no-op) plus the reports: each call goes to `inner` first, then what
    the reports need is taken from it (the W&B keys the loop logs: `epoch`, the fraction of
    epochs done, `train/loss`, `train/epoch_loss`, `val/loss`, `val/acc`)."""

    def __init__(self, inner: NullTracker, server: StatusServer, epochs: int, interval_s: float,
                 say: Callable[[str], None]) -> None:
        self.inner, self.server, self.epochs, self.interval_s = inner, server, epochs, interval_s
        self.say = say
        self.epochs_done = 0.0
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.first: tuple[float, float] | None = None  # (time, epochs done) at the first log
        self.last_sent_at = -float("inf")
        self.in_flight = threading.Lock()  # held while a report is being sent
        self.warned = threading.Lock()  # taken by the one warning line, never given back

    @property
    def run_id(self) -> str | None:
        return self.inner.run_id

    def log(self, metrics: dict, step: int) -> None:
        self.inner.log(metrics, step)
        now = time.monotonic()
        self.step = step
        if "epoch" in metrics:
            self.epochs_done = float(metrics["epoch"])
            if self.first is None:
                self.first = (now, self.epochs_done)
        for key, name in (("train/loss", "train_loss"), ("train/epoch_loss", "train_loss"),
                          ("val/loss", "val_loss"), ("val/acc", "val_acc")):
            if key in metrics:
                self.metrics[name] = float(metrics[key])
        if now - self.last_sent_at >= self.interval_s and self.in_flight.acquire(blocking=False):
            self.last_sent_at = now
            threading.Thread(target=self._send, args=(self._body(now), self.server.timeout_s),
                             name="trainer-status", daemon=True).start()

    def log_evaluation(self, evaluation: Evaluation, step: int) -> None:
        self.inner.log_evaluation(evaluation, step)

    def log_checkpoint(self, location: str, aliases: list[str], metadata: dict) -> None:
        self.inner.log_checkpoint(location, aliases, metadata)

    def close(self, summary: dict | None, wait_s: float | None = None) -> None:
        """The final report (none for a failed run), sent while `inner` closes: W&B's wait and
        this one overlap."""
        if summary is None:
            self.inner.close(summary, wait_s)
            return
        finished = not summary.get("preempted_by")
        if finished:
            self.epochs_done = float(self.epochs)
        for key, name in (("final_train_loss", "train_loss"), ("final_val_loss", "val_loss"),
                          ("final_val_acc", "val_acc")):
            if summary.get(key) is not None:
                self.metrics[name] = float(summary[key])
        deadline = time.monotonic() + WAIT_AT_CLOSE_S
        final = threading.Thread(target=self._send_final,
                                 args=(self._body(time.monotonic(), finished), deadline),
                                 name="trainer-status-final", daemon=True)
        final.start()
        self.inner.close(summary, wait_s)
        final.join(max(0.0, deadline - time.monotonic()))
        if final.is_alive():
            self._warn(f"no answer within {WAIT_AT_CLOSE_S:g} s at the end of the run, so the "
                       "final report was not taken")

    def _body(self, now: float, finished: bool = False) -> bytes:
        fraction = min(self.epochs_done / self.epochs, 1.0) if self.epochs else 1.0
        status: dict = {"progressPercentage": 100 if finished else min(int(fraction * 100), 99)}
        if finished:
            status["estimatedRemainingSeconds"] = 0
        elif self.first and self.epochs_done > self.first[1] and now > self.first[0]:
            # the pace since this process's first log step, evaluations included
            seconds_per_epoch = (now - self.first[0]) / (self.epochs_done - self.first[1])
            status["estimatedRemainingSeconds"] = min(
                int((self.epochs - self.epochs_done) * seconds_per_epoch), INT32_MAX)
        # Counted from 1 as the progress lines count them ("epoch 2/5"): the one under way.
        current = self.epochs if finished else min(int(self.epochs_done) + 1, self.epochs)
        metrics = {"currentEpoch": str(current), "totalEpochs": str(self.epochs),
                   "step": str(self.step),
                   **{name: f"{value:.6g}" for name, value in self.metrics.items()}}
        status["metrics"] = [{"name": name, "value": value} for name, value in metrics.items()]
        status["lastUpdatedTime"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return json.dumps({"trainerStatus": status}).encode()

    def _send(self, body: bytes, timeout_s: float) -> None:
        """One report, on its own thread, which holds `in_flight` and lets it go at the end."""
        try:
            self.server.post(body, timeout_s)
        except (OSError, RuntimeError) as error:
            self._warn(f"{type(error).__name__}: {error}" if isinstance(error, OSError)
                       else str(error))
        finally:
            self.in_flight.release()

    def _send_final(self, body: bytes, deadline: float) -> None:
        """The last report, once the one in flight (if any) is done, within `deadline`."""
        remaining_s = deadline - time.monotonic()
        if remaining_s > 0 and self.in_flight.acquire(timeout=remaining_s):
            self._send(body, max(min(self.server.timeout_s, deadline - time.monotonic()), 0.01))

    def _warn(self, reason: str) -> None:
        if self.warned.acquire(blocking=False):
            self.say(f"warning: a progress report to Kubeflow Trainer ({self.server.url}) failed "
                     f"({reason}); training goes on, and later failures are not reported")
