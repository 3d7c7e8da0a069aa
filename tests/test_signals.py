"""SIGTERM, SIGINT and SIGKILL outside the training loop: during a download, a parse and a push.

The operator's promise: after any of them, the same command run again succeeds, and nothing is
lost or left behind (no temporary file in the cache, no incomplete multipart upload in the
bucket). Each run is stopped at a point the test observes (a relay on loopback that holds a
transfer it has started, a temporary file that appears, a lock being waited on, memory that
grows while the tarball is unpickled), never after a guessed sleep; every wait is bounded.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from job.preemption import PREEMPTED_EXIT_CODE
from job.storage import remove_stale_partials
from tests.conftest import CNN_JOB, REPO, Relay, run_cli

WAIT_S = 60  # bound on every wait for a state; each takes well under that unless something broke
GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds: SIGKILL follows after that
STOPPED = ("error: stopped by {} before it finished, leaving nothing half-written: "
           "run the same command again (exit status 75)")
CIFAR_ARCHIVE = "cifar10/cifar-10-python.tar.gz"  # 189 MB: above the 64 MiB multipart threshold
HELD_MNIST = "mnist/t10k-images-idx3-ubyte.gz"  # the third archive fetched, 1.6 MB


# ----------------------------------------------------------------------------------------------
# running, watching and stopping the real console script


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([str(CNN_JOB), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_for(what: str, condition, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"it exited ({process.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} after {WAIT_S} s")
        time.sleep(0.01)


@dataclass
class Stopped:
    returncode: int
    stdout: str
    stderr: str
    seconds: float  # from the signal to the exit


def stop(process: subprocess.Popen, signum: int, then=lambda: None) -> Stopped:
    """Send `signum`, call `then`, and wait (bounded) for the exit."""
    sent = time.monotonic()
    process.send_signal(signum)
    then()
    out, err = process.communicate(timeout=WAIT_S)
    stopped = Stopped(process.returncode, out, err, time.monotonic() - sent)
    print(f"{signal.Signals(signum).name}: exit {stopped.returncode} after {stopped.seconds:.2f} s")
    return stopped


def assert_stopped_cleanly(stopped: Stopped, signum: int) -> None:
    """Status 75 and the one line on stderr, nothing else (no traceback)."""
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr
    assert stopped.stderr.strip() == STOPPED.format(signal.Signals(signum).name)
    assert stopped.seconds < GRACE_S


def partials(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.partial"))


def assert_nothing_half_written(cache: Path, data_dir: Path, stopped_in: str) -> None:
    """No temporary file; the archive being fetched is absent; the others are whole."""
    assert partials(cache) == []
    for path in cache.rglob("*"):
        if path.is_file() and path.suffix not in (".lock", ".etag"):
            assert path.name != Path(stopped_in).name
            assert path.read_bytes() == (data_dir / "mnist" / path.name).read_bytes(), path


def pull(uri: str, cache: Path) -> tuple[str, ...]:
    return ("data", "pull", "mnist", uri, "--cache-dir", str(cache))


def start_held_pull(uri: str, cache: Path, held_by: Relay, env: dict | None = None):
    """`data pull mnist` from `uri`, once it is inside the download that `held_by` holds."""
    process = start(*pull(uri, cache), env=env)
    wait_for("temporary file of the held download",
             lambda: held_by.holding.is_set() and partials(cache), process)
    return process


def assert_the_same_pull_succeeds(uri: str, cache: Path, env: dict | None = None) -> None:
    again = run_cli(*pull(uri, cache), env=env)
    assert again.returncode == 0, again.stderr
    assert "60000 training and 10000 test images, verified" in again.stdout
    assert partials(cache) == []


# ----------------------------------------------------------------------------------------------
# downloads


@pytest.fixture
def held_mirror(http_mirror, relay, data_dir) -> Relay:
    """The HTTP mirror of ../shared/datasets, behind a relay that holds HELD_MNIST's download."""
    mirror_url, _ = http_mirror(data_dir)
    return relay(mirror_url, hold_get=HELD_MNIST)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_an_http_download_then_the_same_command_succeeds(
    signum, held_mirror, data_dir, tmp_path
):
    cache = tmp_path / "cache"
    process = start_held_pull(held_mirror.url, cache, held_by=held_mirror)

    stopped = stop(process, signum)
    assert_stopped_cleanly(stopped, signum)
    assert_nothing_half_written(cache, data_dir, HELD_MNIST)
    assert_the_same_pull_succeeds(held_mirror.url, cache)


def test_sigterm_during_an_s3_download_then_the_same_command_succeeds(s3, relay, data_dir, tmp_path):
    for archive in (data_dir / "mnist").iterdir():
        s3.client.upload_file(str(archive), s3.bucket, f"datasets/mnist/{archive.name}")
    s3_relay = relay(s3.endpoint, hold_get=HELD_MNIST)
    cache, uri, env = tmp_path / "cache", f"s3://{s3.bucket}/datasets", {"AWS_ENDPOINT_URL": s3_relay.url}
    process = start_held_pull(uri, cache, held_by=s3_relay, env=env)

    stopped = stop(process, signal.SIGTERM)
    assert_stopped_cleanly(stopped, signal.SIGTERM)
    assert_nothing_half_written(cache, data_dir, HELD_MNIST)
    assert not list(cache.rglob(Path(HELD_MNIST).name + ".etag"))
    assert_the_same_pull_succeeds(uri, cache, env=env)


def waits_for_a_lock(pid: int) -> bool:
    """Whether `pid` is blocked in flock() (a "->" line of /proc/locks)."""
    return any(line.split()[1] == "->" and line.split()[5] == str(pid)
               for line in Path("/proc/locks").read_text().splitlines())


def test_a_killed_download_leaves_a_temporary_file_that_the_next_one_removes(held_mirror, tmp_path):
    cache = tmp_path / "cache"
    first = start_held_pull(held_mirror.url, cache, held_by=held_mirror)
    (stale,) = partials(cache)

    # A second pull on the same machine waits for the archive's lock; meanwhile the first one's
    # download is live, and its temporary file is left alone.
    second = start(*pull(held_mirror.url, cache))
    wait_for("second pull waiting for the archive's lock", lambda: waits_for_a_lock(second.pid),
             second)
    assert stale.exists()

    first.kill()  # SIGKILL: no cleanup runs, the temporary file stays behind
    assert first.wait(timeout=WAIT_S) == -signal.SIGKILL
    out, err = second.communicate(timeout=WAIT_S)
    assert second.returncode == 0, err
    assert "60000 training and 10000 test images, verified" in out
    assert not stale.exists()
    assert partials(cache) == []


def test_remove_stale_partials_of_a_writer_killed_mid_write(tmp_path):
    folder = tmp_path / "checkpoints"
    writer = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys; from pathlib import Path; "
         "from job.storage import atomic_output\n"
         "with atomic_output(Path(sys.argv[1])) as out:\n"
         "    out.write(b'half a checkpoint'); out.flush(); signal.pause()",
         str(folder / "step-000000010.pt")], cwd=REPO)
    wait_for("temporary file of the write", lambda: partials(folder), writer)
    writer.kill()
    writer.wait(timeout=WAIT_S)
    (killed,) = partials(folder)
    assert killed.name.startswith(".step-000000010.pt.")
    (folder / "latest").write_text("step-000000000.pt\n")
    (folder / ".latest.x1y2z3w4.partial").write_bytes(b"step-0000")
    (folder / "notes.partial").write_text("not a temporary file of atomic_output")

    assert remove_stale_partials(folder, "latest") == [folder / ".latest.x1y2z3w4.partial"]
    assert remove_stale_partials(folder) == [killed]
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "notes.partial"]
    assert remove_stale_partials(tmp_path / "no such folder") == []


# ----------------------------------------------------------------------------------------------
# parsing


def rss_bytes(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:  # exited
        return 0
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def has_open(pid: int, path: Path) -> bool:
    """`path` is open in process `pid`. /proc's links name the file with every symlink resolved
    (a checkout or ../shared reached through one included), so `path` is resolved too."""
    folder, target = Path(f"/proc/{pid}/fd"), str(path.resolve())
    try:
        return any(os.readlink(fd) == target for fd in folder.iterdir())
    except FileNotFoundError:  # an fd closed while listed, or the process exited
        return False


def test_sigterm_while_unpickling_cifar10(data_dir, tmp_path):
    archive = data_dir / CIFAR_ARCHIVE
    process = start("data", "pull", "cifar10", str(data_dir), "--cache-dir", str(tmp_path))
    wait_for("archive open", lambda: has_open(process.pid, archive), process)
    # Checksumming the archive allocates nothing; each unpickled batch holds on to 30 MB.
    opened_at = rss_bytes(process.pid)
    wait_for("a batch unpickled", lambda: has_open(process.pid, archive)
             and rss_bytes(process.pid) > opened_at + (25 << 20), process)

    assert_stopped_cleanly(stop(process, signal.SIGTERM), signal.SIGTERM)


# ----------------------------------------------------------------------------------------------
# data push


def incomplete_uploads(s3) -> list[dict]:
    return s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])


def start_cifar_push(s3, relay, data_dir) -> tuple[subprocess.Popen, Relay, str]:
    """A push whose part uploads from the third on are held: it cannot finish until released."""
    s3_relay = relay(s3.endpoint, hold_parts_from=3)
    uri = f"s3://{s3.bucket}/datasets"
    process = start("data", "push", "cifar10", uri, "--from", str(data_dir),
                    env={"AWS_ENDPOINT_URL": s3_relay.url})
    wait_for("multipart upload in progress",
             lambda: s3_relay.holding.is_set() and incomplete_uploads(s3), process)
    return process, s3_relay, uri


def test_sigterm_during_a_multipart_push_aborts_the_upload(s3, relay, data_dir):
    process, s3_relay, _ = start_cifar_push(s3, relay, data_dir)
    # The held parts go on once the signal is sent: s3transfer waits for the parts in flight,
    # then aborts the upload, and only then lets Interrupted out of upload_file.
    stopped = stop(process, signal.SIGTERM, then=s3_relay.release.set)
    assert_stopped_cleanly(stopped, signal.SIGTERM)
    assert incomplete_uploads(s3) == []
    assert "Contents" not in s3.client.list_objects_v2(Bucket=s3.bucket)


def test_next_push_aborts_what_a_push_killed_mid_upload_left(s3, relay, data_dir):
    process, s3_relay, uri = start_cifar_push(s3, relay, data_dir)
    process.kill()
    assert process.wait(timeout=WAIT_S) == -signal.SIGKILL
    s3_relay.close()  # the held parts reach the bucket too, as on a real network
    (left,) = incomplete_uploads(s3)
    assert left["Key"] == f"datasets/{CIFAR_ARCHIVE}"

    again = run_cli("data", "push", "cifar10", uri, "--from", str(data_dir))
    assert again.returncode == 0, again.stderr
    assert (f"aborted 1 incomplete multipart upload of {uri}/{CIFAR_ARCHIVE} before uploading it again"
            in again.stdout)
    assert incomplete_uploads(s3) == []
    head = s3.client.head_object(Bucket=s3.bucket, Key=f"datasets/{CIFAR_ARCHIVE}")
    assert head["ContentLength"] == (data_dir / CIFAR_ARCHIVE).stat().st_size
