"""Metrics behind a tiny logger interface: W&B on rank 0, a no-op on every other rank.

The interface is four calls: log(metrics, step), log_evaluation(evaluation, step),
log_checkpoint(location, aliases, metadata), close(summary). A W&B failure (no network, a bad
key, a server outage) prints one warning and turns the tracker into the no-op: training never
stops for its dashboard. Nor does it wait for it: W&B starts (1-3 s, a service process and,
online, the server's answer) and logs on a thread of its own, in call order, while training
runs; only close() waits for it to finish, and that for at most WAIT_AT_CLOSE_S.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import queue
import secrets
import signal
import string
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from job.errors import seconds_from_env, strip_userinfo
from job.storage import local_path, uri_kind

if TYPE_CHECKING:
    from job.evaluation import Evaluation

DEFAULT_PROJECT = "cnn-job"
INIT_TIMEOUT_ENV = "WANDB_INIT_TIMEOUT"
DEFAULT_INIT_TIMEOUT_S = 90.0  # W&B's own default
# At close, W&B's last records get at most this long, then its service process is stopped: a
# stopped pod has a grace period (Kubernetes: 30 s by default) that a slow or absent W&B server
# must not eat, and a finished run must not wait out W&B's retries (90 s and more) either.
WAIT_AT_CLOSE_S = 10.0
# How long W&B's service process gets to exit on SIGTERM before SIGKILL, and its teardown after.
SERVICE_STOP_S = 1.0


class NullTracker:
    run_id: str | None = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:  # the run failed; a finished run was closed with its summary
            self.close(None)

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_evaluation(self, evaluation: Evaluation, step: int) -> None:
        pass

    def log_checkpoint(self, location: str, aliases: list[str], metadata: dict) -> None:
        pass

    def close(self, summary: dict | None, wait_s: float | None = None) -> None:
        """Finish the run: with the final summary, or as failed (None); wait for W&B at most
        `wait_s` seconds (None: WAIT_AT_CLOSE_S)."""


def resolve_mode(mode: str | None) -> tuple[str, bool]:
    """--wandb-mode, else WANDB_MODE, else online with an API key and offline without one.
    Returns (mode, whether it fell back to offline for want of a key)."""
    mode = mode or os.environ.get("WANDB_MODE")
    if mode:
        return ("disabled" if mode == "dryrun" else mode), False
    return ("online", False) if _has_api_key() else ("offline", True)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker(NullTracker):
    def __init__(self, run, class_names: tuple[str, ...], warn: Callable[[str], None]) -> None:
        self.run = run
        self.run_id = run.id
        self.class_names = class_names
        self.warn = warn
        self.failed = False

    def _guard(self, action: Callable[[], None]) -> None:
        if self.failed:
            return
        try:
            action()
        except Exception as error:  # W&B must never stop training
            self.failed = True
            self.warn(f"W&B logging failed ({type(error).__name__}: {error}); training goes on "
                      "without it")

    def log(self, metrics: dict, step: int) -> None:
        self._guard(lambda: self.run.log(metrics, step=step))

    def log_evaluation(self, evaluation: Evaluation, step: int) -> None:
        def log():
            import wandb

            names = list(self.class_names)
            rows = [[names[t], names[p], int(evaluation.confusion[t, p])]
                    for t in range(len(names)) for p in range(len(names))]
            panel = [wandb.Image(image.numpy().squeeze(),
                                 caption=f"true {names[true]}, predicted {names[predicted]}")
                     for image, true, predicted in evaluation.misclassified]
            per_class = {f"val/acc/{name}": accuracy
                         for name, accuracy in zip(names, evaluation.per_class_accuracy())}
            self.run.log({
                **per_class,
                "val/confusion_matrix": wandb.plot_table(
                    "wandb/confusion_matrix/v1",
                    wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=rows),
                    {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                    {"title": "confusion matrix (test split)"},
                ),
                "val/misclassified": panel,
            }, step=step)

        self._guard(log)

    def log_checkpoint(self, location: str, aliases: list[str], metadata: dict) -> None:
        def log():
            import wandb

            artifact = wandb.Artifact(f"model-{self.run_id}", type="model", metadata=metadata)
            uri = location if "://" in location else Path(location).resolve().as_uri()
            # A reference, not a copy: the checkpoint stays where the job wrote it.
            try:
                artifact.add_reference(uri, name=Path(location).name, checksum=False)
            except ValueError:
                # Retention (--keep-checkpoints) deleted a local checkpoint before this thread
                # came to it: there is no model left to point at, and W&B must go on logging.
                if "://" in location or Path(location).exists():
                    raise
                return
            self.run.log_artifact(artifact, aliases=aliases)

        self._guard(log)

    def close(self, summary: dict | None, wait_s: float | None = None) -> None:
        def finish():
            if summary is not None:
                self.run.summary.update(summary)
                if summary.get("pruned"):  # a sweep's trial its early stopping ended
                    self.run.tags = (*self.run.tags, "pruned")
            self.run.finish(exit_code=0 if summary is not None else 1)
            # finish() returns once W&B's service has the run's last records, not once they
            # are in the run's files: its writer may still hold some, and a rank exits with
            # os._exit (distributed.exit_process), skipping W&B's own atexit teardown. Shut
            # the service down here, which waits for it to close every file.
            import wandb

            wandb.teardown(exit_code=0 if summary is not None else 1)

        self._guard(finish)


def start(
    *, enabled: bool, mode: str | None, project: str | None, run_name: str | None,
    run_id: str | None, config: dict, class_names: tuple[str, ...], say: Callable[[str], None],
    folder: Path | None = None,
) -> NullTracker:
    """A W&B run on rank 0 (resuming `run_id` when given), else the no-op. It starts in the
    background: the returned tracker takes calls at once. W&B's run folders go under
    `folder`/wandb/ (default: run_folder(config))."""
    if not enabled:
        return NullTracker()
    for name in [n for n, value in os.environ.items() if n.startswith("WANDB_") and not value]:
        del os.environ[name]  # an empty value (a ConfigMap's placeholder) means unset
    mode, for_want_of_key = resolve_mode(mode)
    if mode == "disabled":
        return NullTracker()
    os.environ.setdefault("WANDB_SILENT", "true")  # our own lines say what matters
    if not _wandb_folders_writable():
        say("warning: W&B has no writable folder (WANDB_CACHE_DIR, WANDB_DATA_DIR, "
            "WANDB_CONFIG_DIR, nor the temporary folder); training goes on without it")
        return NullTracker()
    # The id is chosen here, before W&B is up, so that checkpoints written meanwhile name the
    # run a resume continues; resume="allow" makes a new run of a new id.
    run_id = run_id or new_run_id()
    folder = folder or run_folder(config)

    def init():
        import wandb

        _no_sdk_analytics()
        return wandb.init(
            project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            name=run_name, id=run_id, resume="allow", mode=mode, dir=folder,
            config={key: strip_userinfo(value) for key, value in config.items()},
            settings=wandb.Settings(
                init_timeout=init_timeout_s(),
                console="off", silent=True,
            ),
        )

    return BackgroundTracker(run_id, init, class_names, say, for_want_of_key)


def init_timeout_s() -> float:
    """WANDB_INIT_TIMEOUT, W&B's own: how long its start may take before the run goes on without
    it (0: no time at all). TrainConfig reads it too, so a bad value is refused before any work,
    not by W&B's thread once training runs."""
    return seconds_from_env(INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT_S)


def _no_sdk_analytics() -> None:
    """W&B's SDK sends usage analytics of its own (not the run's data) to the server, and its
    exit hook flushes them, waiting up to 10 s for a server that accepts and never answers: the
    job leaves them off. (Absent in other W&B versions: nothing to do.)"""
    with contextlib.suppress(ImportError, AttributeError):
        from wandb.analytics.opentelemetry import opentelemetry_proxy

        opentelemetry_proxy.disable()


def run_folder(config: dict) -> Path | None:
    """The folder W&B makes its wandb/ folder of run folders in: WANDB_DIR when set (the image
    sets /work/runs); else the run's own folder, the checkpoint folder's parent (runs/mnist/ for
    runs/mnist/checkpoints), or runs/<dataset>/ for s3:// checkpoints. Not W&B's default, the
    current folder: that is often a checkout, where a wandb/ folder at the root makes ruff sort
    `import wandb` as the project's own. None (W&B's default after all) without the settings."""
    if os.environ.get("WANDB_DIR"):
        return Path(os.environ["WANDB_DIR"])
    uri, dataset = config.get("checkpoint_uri"), config.get("dataset")
    if uri and uri_kind(uri, "--checkpoint-uri") == "local":
        return local_path(uri).absolute().parent
    return Path("runs", dataset).absolute() if dataset else None


# Where W&B keeps its service log, artifact staging and settings unless told otherwise.
_WANDB_FOLDERS = {"WANDB_CACHE_DIR": "~/.cache/wandb", "WANDB_DATA_DIR": "~/.local/share/wandb",
                  "WANDB_CONFIG_DIR": "~/.config/wandb"}


def _wandb_folders_writable() -> bool:
    """Point each of W&B's folders that cannot be written (a read-only root, a HOME the UID does
    not own) at the temporary folder, an emptyDir in a pod. Without this W&B fails to stage
    artifacts, and its service, with no log file, logs onto the job's console. False when even
    the temporary folder is not writable."""
    for name, default in _WANDB_FOLDERS.items():
        if not _writable(Path(os.environ.get(name) or default).expanduser()):
            try:
                fallback = Path(tempfile.gettempdir(), "wandb", name.lower())
            except FileNotFoundError:  # no writable temporary folder at all
                return False
            if not _writable(fallback):
                return False
            os.environ[name] = str(fallback)
    return True


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def new_run_id() -> str:
    """Eight lowercase letters and digits, as W&B's own ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class BackgroundTracker(NullTracker):
    """W&B on a thread of its own: it starts the run, then makes the calls queued here in
    order. The loop never waits for W&B; close() does, for the run's last records, at most
    `wait_s`, then stops W&B's service process and says so in one line."""

    def __init__(self, run_id: str, init: Callable, class_names: tuple[str, ...],
                 say: Callable[[str], None], for_want_of_key: bool) -> None:
        self.run_id, self.say = run_id, say
        self.run_folder: Path | None = None  # set once W&B's run is up
        self.given_up = False  # close() stopped waiting: the thread's own lines are moot
        self.calls: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, args=(init, class_names,
                                                                for_want_of_key),
                                       name="wandb", daemon=True)
        self.thread.start()

    def _say(self, line: str) -> None:
        if not self.given_up:
            self.say(line)

    def _work(self, init: Callable, class_names: tuple[str, ...], for_want_of_key: bool) -> None:
        try:
            run = init()
        except Exception as error:
            self._say(f"warning: W&B did not start ({type(error).__name__}: "
                      f"{str(error).splitlines()[0][:160] if str(error) else ''}); "
                      "training goes on without it")
            run = None
        if run is not None:
            self.run_folder = Path(run.dir).parent
            if for_want_of_key:
                self._say(f"W&B is offline (no WANDB_API_KEY): sync it later with "
                          f"`wandb sync {self.run_folder}`")
        tracker = WandbTracker(run, class_names, self._say) if run is not None else NullTracker()
        while (call := self.calls.get()) is not None:
            call(tracker)

    def log(self, metrics: dict, step: int) -> None:
        self.calls.put(lambda tracker: tracker.log(metrics, step))

    def log_evaluation(self, evaluation: Evaluation, step: int) -> None:
        self.calls.put(lambda tracker: tracker.log_evaluation(evaluation, step))

    def log_checkpoint(self, location: str, aliases: list[str], metadata: dict) -> None:
        self.calls.put(lambda tracker: tracker.log_checkpoint(location, aliases, metadata))

    def close(self, summary: dict | None, wait_s: float | None = None) -> None:
        if not self.thread.is_alive():
            return
        wait_s = WAIT_AT_CLOSE_S if wait_s is None else wait_s
        self.calls.put(lambda tracker: tracker.close(summary))
        self.calls.put(None)
        self.thread.join(wait_s)
        if not self.thread.is_alive():
            return
        # W&B is still starting or sending: its server is slow or absent. W&B's service process
        # would go on retrying for minutes, and the job's exit would wait for it (W&B's exit
        # hook joins it) or leave it holding the job's stdout and stderr, so that whatever reads
        # them (a pipe, `sweep run`) sees the job end only when W&B gives up.
        self.given_up = True
        stop_service()
        if self.run_folder is None:
            self.say(f"warning: W&B did not finish within {wait_s:g} s: its server never "
                     "answered, so the run's metrics were not recorded (the checkpoint and "
                     "summary are written)")
        else:
            self.say(f"warning: W&B did not finish within {wait_s:g} s; its last records may "
                     "not have reached its server: `wandb sync "
                     f"{self.run_folder}` sends what it wrote (the checkpoint and summary are "
                     "written)")


def stop_service(timeout_s: float = SERVICE_STOP_S) -> None:
    """Stop W&B's service process (wandb-core, a child of this process) at once: SIGTERM, then
    SIGKILL after `timeout_s`. Asked to shut down, it would first wait until it gives up on the
    server; it writes each record into the run's transaction log before it sends it. W&B's
    teardown then finds it stopped, and takes away W&B's exit hook, which would otherwise fail
    on it with a traceback."""
    pids = [pid for pid, name in _children() if name == "wandb-core"]
    for stop_signal in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, stop_signal)
        deadline = time.monotonic() + timeout_s
        while (pids := [pid for pid in pids if _running(pid)]) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not pids:
            break
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        teardown = threading.Thread(target=_quietly, args=(wandb.teardown,),
                                    name="wandb-teardown", daemon=True)
        teardown.start()
        teardown.join(timeout_s)


def _quietly(action: Callable[[], None]) -> None:
    with contextlib.suppress(BaseException):  # the service is being stopped under it
        action()


def _children() -> list[tuple[int, str]]:
    """(pid, name) of this process's child processes, from /proc (Linux; elsewhere none)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it ended meanwhile
            continue
        name, fields = text[text.find("(") + 1:text.rfind(")")], text[text.rfind(")") + 2:].split()
        if int(fields[1]) == os.getpid():
            children.append((int(stat.parent.name), name))
    return children


def _running(pid: int) -> bool:
    """Not exited: neither gone nor a zombie waiting for W&B's teardown to reap it."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rfind(")") + 2:].split()[0] != "Z"
