"""The image users run, built from the repo's Dockerfile and run in a real OCI runtime.

`make image-test` (pytest -m image; `make test` leaves these out). The test run builds the image
once with `make image` (docker or podman, whichever answers; IMAGE_ENGINE= picks), on
python:3.11-slim-bookworm or, where that cannot be pulled, on a stand-in base built with
debootstrap and kept in the engine's store. Then each check runs containers as a user or a
cluster would: real datasets mounted read-only, no network unless S3 or DDP needs the host's
loopback, named volumes, a read-only root, an arbitrary UID, the manifests' own commands,
environment and securityContext. Where no engine answers it skips, with one line saying why.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import types
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import boto3
import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from job.preemption import PREEMPTED_EXIT_CODE
from requirements.sbom import locked
from tests.conftest import CNN_JOB, REPO, SECRET, run_cli, start_s3_server
from tests.kube_pods import completion_index, controller_pods, hosts_file, on_this_host
from tests.test_deploy import (
    FOLDERS,
    LOCK,
    SECRET_NAME,
    load_folder,
    s3_keys,
    sweep_source,
    the_container,
    the_job,
)
from tests.test_preemption import assert_same_weights, read_checkpoint
from tests.test_storage import push_mnist
from tests.wandb_records import OfflineRun, offline_runs

pytestmark = pytest.mark.image

TAG = os.environ.get("IMAGE", "cnn-job:test")
PYTHON_IMAGE = os.environ.get("PYTHON_IMAGE", "python:3.11-slim-bookworm")
# Kept in the engine's store between runs: debootstrap takes minutes, importing it seconds.
STANDIN_BASE = "localhost/cnn-job-python-standin:bookworm"
STANDIN_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
STOP_TIMEOUT_S = 60
FIGURES_KEY = "cnn-job/image-figures"  # `pytest --cache-show 'cnn-job/*'` prints them
# Lines of W&B's own service log ("2026/11/26 15:04:05 INFO handleInformTeardown ...") must
# never reach the job's console.
WANDB_SERVICE_LOG = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARN|ERROR)", re.M)


# ----------------------------------------------------------------------------------------------
# the engine, the base and the build


def answering_engine() -> str | None:
    wanted = os.environ.get("IMAGE_ENGINE")
    for name in [wanted] if wanted else ["docker", "podman"]:
        if shutil.which(name) and subprocess.run([name, "info"], capture_output=True,
                                                 timeout=120).returncode == 0:
            return name
    return None


def ulimits() -> list[str]:
    # podman asks for 1048576 open files and processes by default, which a host with lower hard
    # limits refuses ("setrlimit: Operation not permitted"; this one takes 20000 files and no more
    # than 20000 processes). 4096 of each fits common hosts and is far more than the job needs.
    return ["--ulimit=nofile=4096:4096", "--ulimit=nproc=4096:4096"]


def has_image(engine: str, name: str) -> bool:
    return subprocess.run([engine, "image", "inspect", name], capture_output=True).returncode == 0


def python_base(engine: str) -> str:
    """PYTHON_IMAGE when it is here or can be pulled; else the debootstrap stand-in."""
    if has_image(engine, PYTHON_IMAGE) or subprocess.run(
            [engine, "pull", PYTHON_IMAGE], capture_output=True, timeout=600).returncode == 0:
        return PYTHON_IMAGE
    if has_image(engine, STANDIN_BASE):
        return STANDIN_BASE
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        pytest.skip(f"{PYTHON_IMAGE} cannot be pulled, and a stand-in base needs debootstrap as "
                    "root (.ci/run installs it)")
    # The stand-in trusts Debian's CA list only, as the real base does: a proxy's CA comes to the
    # build as a secret (PIP_CA), never into an image.
    with tempfile.TemporaryDirectory(dir="/var/tmp") as root:
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={STANDIN_PACKAGES}",
                        "bookworm", root], check=True, capture_output=True, timeout=1800)
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run([engine, "import", "-", STANDIN_BASE], stdin=tar.stdout, check=True,
                       capture_output=True, timeout=600)
        tar.wait()
    return STANDIN_BASE


@dataclass
class Image:
    engine: str
    tag: str
    base: str = PYTHON_IMAGE  # what it was built FROM
    built_at: datetime | None = None  # when the build began (UTC)
    names: list[str] = field(default_factory=list)  # containers and volumes to remove
    pods: list[str] = field(default_factory=list)  # kube play's pods, then their volumes
    volumes: list[str] = field(default_factory=list)

    def name(self, what: str) -> str:
        self.names.append(f"cnn-job-test-{what}-{uuid.uuid4().hex[:8]}")
        return self.names[-1]

    def command(self, *args: str, name: str | None = None, rm: bool = True,
                network: str = "none", user: str | None = None, entrypoint: str | None = None,
                env: dict | None = None, mounts: tuple[str, ...] = (), flags: tuple[str, ...] = (),
                detach: bool = False) -> list[str]:
        return [
            self.engine, "run", *(["--rm"] if rm else []), *(["--detach"] if detach else []),
            *(["--name", name] if name else []), f"--network={network}", *ulimits(),
            *([f"--user={user}"] if user else []),
            *([f"--entrypoint={entrypoint}"] if entrypoint else []),
            *[f"--env={key}={value}" for key, value in (env or {}).items()],
            *[f"--volume={mount}" for mount in mounts], *flags, self.tag, *args,
        ]

    def run(self, *args: str, timeout_s: float = 600, **options) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args, **options), capture_output=True, text=True,
                              timeout=timeout_s)

    def start(self, *args: str, what: str = "run", **options) -> str:
        name = self.name(what)
        subprocess.run(self.command(*args, name=name, rm=False, detach=True, **options),
                       check=True, capture_output=True, text=True, timeout=120)
        return name

    def engine_output(self, *args: str) -> str:
        result = subprocess.run([self.engine, *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def logs(self, name: str) -> str:
        result = subprocess.run([self.engine, "logs", name], capture_output=True, text=True,
                                timeout=60)
        return result.stdout + result.stderr

    def wait(self, name: str) -> int:
        return int(self.engine_output("wait", name).split()[-1])

    def stop(self, name: str, grace_s: int = STOP_TIMEOUT_S) -> tuple[int, float]:
        """`stop -t 60` (SIGTERM, then SIGKILL after grace_s, 60 s unless told): the exit status
        and seconds taken."""
        started = time.monotonic()
        self.engine_output("stop", "-t", str(grace_s), name)
        return self.wait(name), time.monotonic() - started

    def is_running(self, name: str) -> bool:
        return self.engine_output("inspect", "--format", "{{.State.Running}}", name).strip() == "true"

    def volume(self) -> str:
        name = self.name("volume")
        self.engine_output("volume", "create", name)
        return name

    def volume_path(self, volume: str) -> Path:
        """Where the (local) engine keeps a named volume's files: this test runs as root."""
        return Path(self.engine_output("volume", "inspect", "--format", "{{.Mountpoint}}",
                                       volume).strip())

    def clean(self) -> None:
        for name in self.pods:
            subprocess.run([self.engine, "pod", "rm", "--force", name], capture_output=True)
        for name in self.volumes:  # not --force, which would remove another pod using it
            subprocess.run([self.engine, "volume", "rm", name], capture_output=True)
        self.pods.clear()
        self.volumes.clear()
        for name in reversed(self.names):
            subprocess.run([self.engine, "rm", "--force", "--volumes", name], capture_output=True)
            subprocess.run([self.engine, "volume", "rm", "--force", name], capture_output=True)
        self.names.clear()


@pytest.fixture(scope="session")
def built(data_dir, tmp_path_factory, request) -> Image:
    engine = answering_engine()
    if engine is None:
        pytest.skip("no container engine answers here (docker or podman; .ci/run installs podman "
                    "from Debian as root)")
    base = python_base(engine)
    started, built_at = time.monotonic(), datetime.now(timezone.utc).replace(microsecond=0)
    result = subprocess.run(["make", "-C", str(REPO), "image", f"IMAGE={TAG}",
                             f"IMAGE_ENGINE={engine}", f"PYTHON_IMAGE={base}"],
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    image = Image(engine, TAG, base, built_at)
    figures = {"engine": engine, "base": base, "build_minutes": (time.monotonic() - started) / 60}
    # The first run after a build, before any other container of this test run has run.
    figures["container_first_run"] = container_throughput(image, data_dir,
                                                          tmp_path_factory.mktemp("first"))
    save_figures(request, figures)
    yield image
    image.clean()


def save_figures(request, figures: dict) -> None:
    print(json.dumps(figures, indent=2))  # shown with -s, and with a failure
    if hasattr(request.config, "cache"):  # not under -p no:cacheprovider
        request.config.cache.set(FIGURES_KEY, figures)


@pytest.fixture
def image(built) -> Image:
    yield built
    built.clean()  # this test's containers and volumes


def writable_dir(path: Path) -> Path:
    """A host folder the container's user (10001, or any UID) can write into."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


def wait_until(what: str, condition, timeout_s: float = 300, still=lambda: True) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        assert still(), f"stopped before {what}"
        time.sleep(0.05)


DATA = "/data"
ENGINE_FILES = ("/etc/passwd", "/etc/group", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf",
                "/run/.containerenv")
MNIST = ("train", "mnist", "--device", "cpu", "--epochs", "1")
NO_WANDB = {"CNN_JOB_WANDB_MODE": "disabled", "WANDB_MODE": "disabled"}


def data_mount(data_dir: Path) -> str:
    return f"{data_dir}:{DATA}:ro"


def owners(folder: Path) -> set[int]:
    return {path.stat().st_uid for path in [folder, *folder.rglob("*")]}


# ----------------------------------------------------------------------------------------------
# 1. who runs, as which process, with no network


def test_runs_as_uid_10001_with_cnn_job_as_pid_1_and_answers_help_offline(image, data_dir):
    result = image.run("--help", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "launch" in result.stdout
    ids = image.run("-c", "import os; print(os.getuid(), os.getgid(), os.getcwd())",
                    entrypoint="python")
    assert ids.stdout.split() == ["10001", "0", "/work"], ids.stderr
    # A run in progress: PID 1 is the console script itself (no shell to swallow SIGTERM).
    name = image.start(*MNIST, "--epochs", "50", "--data-uri", DATA, env=NO_WANDB,
                       mounts=(data_mount(data_dir),))
    pid_1 = image.engine_output("exec", name, "cat", "/proc/1/cmdline").split("\0")
    assert pid_1[1:4] == ["/opt/venv/bin/cnn-job", "train", "mnist"], pid_1
    status = image.engine_output("exec", name, "cat", "/proc/1/status")
    assert re.search(r"^Uid:\s+10001\s", status, re.M), status


# ----------------------------------------------------------------------------------------------
# 2. read-only data, no network, a named volume for checkpoints, the summary in a mounted folder


def test_trains_from_read_only_data_to_a_named_volume_with_no_network(image, data_dir, tmp_path):
    runs, out = image.volume(), writable_dir(tmp_path / "out")
    name = image.name("train")
    result = image.run(*MNIST, "--limit-train", "2000", "--data-uri", DATA,
                       "--summary-json", "/out/summary.json", name=name, rm=False, env=NO_WANDB,
                       mounts=(data_mount(data_dir), f"{runs}:/work/runs", f"{out}:/out"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    # The default checkpoint folder, runs/mnist/checkpoints, is relative to WORKDIR /work.
    assert Path("/work", summary["checkpoint"]).parent == Path("/work/runs/mnist/checkpoints")
    assert summary["final_val_acc"] > 0.8
    checkpoints = image.volume_path(runs) / "mnist" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == Path(summary["checkpoint"]).name
    assert owners(checkpoints) == {10001} and (out / "summary.json").stat().st_uid == 10001
    # Nothing written outside the volumes but /tmp (a tmpfs or emptyDir on a cluster), beside
    # what the engine itself makes: mount points, and the user and network files in /etc.
    changed = image.engine_output("diff", name).split()[1::2]
    engines = {"/data", "/out", "/work/runs", "/etc", "/run", *ENGINE_FILES}
    assert [path for path in changed if path not in engines and not path.startswith("/tmp")] == []


# ----------------------------------------------------------------------------------------------
# 3. stop mid-epoch, then the same command resumes, bit for bit


def test_stop_mid_epoch_exits_75_and_the_same_run_resumes_bit_identical(image, data_dir, tmp_path):
    # 94 steps (6000 / 64), a checkpoint every 10: stopped after the first, well before the end.
    command = (*MNIST, "--limit-train", "6000", "--checkpoint-every-steps", "10", "--data-uri", DATA)
    straight, split = writable_dir(tmp_path / "straight"), writable_dir(tmp_path / "split")
    result = image.run(*command, env=NO_WANDB, mounts=(data_mount(data_dir), f"{straight}:/work/runs"))
    assert result.returncode == 0, result.stderr

    options = {"env": NO_WANDB, "mounts": (data_mount(data_dir), f"{split}:/work/runs")}
    name = image.start(*command, **options)
    checkpoints = split / "mnist" / "checkpoints"
    wait_until("checkpoint", (checkpoints / "latest").exists, still=lambda: image.is_running(name))
    status, seconds = image.stop(name)
    log = image.logs(name)
    assert status == PREEMPTED_EXIT_CODE, log
    assert seconds < STOP_TIMEOUT_S and "preempted by SIGTERM" in log
    stopped = read_checkpoint(None, checkpoints)
    assert stopped["epoch"] == 0 and 0 < stopped["epoch_step"] < 94  # mid-epoch

    resumed = image.run(*command, **options)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step-{stopped['step']:09d}.pt" in resumed.stdout.replace("\n", "")
    assert_same_weights(read_checkpoint(None, checkpoints),
                        read_checkpoint(None, straight / "mnist" / "checkpoints"))


# ----------------------------------------------------------------------------------------------
# 4. a read-only root filesystem (readOnlyRootFilesystem, with an emptyDir at /tmp)


def read_only_root(engine: str) -> tuple[str, ...]:
    # podman's --read-only mounts its own tmpfs at /tmp, /var/tmp and /run unless told not to;
    # Kubernetes mounts only what the pod declares: here an emptyDir at /tmp.
    podman = ("--read-only-tmpfs=false",) if engine == "podman" else ()
    return ("--read-only", *podman, "--tmpfs=/tmp:rw,exec,mode=1777")


def assert_quiet_wandb(output: str) -> None:
    assert not WANDB_SERVICE_LOG.search(output), output
    assert "W&B did not" not in output and "W&B logging failed" not in output, output
    assert "Error" not in output, output


def test_read_only_root_trains_logs_to_wandb_offline_and_exports(image, data_dir, tmp_path):
    runs = writable_dir(tmp_path / "runs")
    options = {"mounts": (data_mount(data_dir), f"{runs}:/work/runs"),
               "flags": read_only_root(image.engine)}
    name = image.name("read-only")
    result = image.run(*MNIST, "--limit-train", "2000", "--data-uri", DATA, name=name, rm=False,
                       env={"WANDB_MODE": "offline", "WANDB_PROJECT": "image-test"}, **options)
    assert result.returncode == 0, result.stderr
    assert_quiet_wandb(result.stdout + result.stderr)
    (run,) = offline_runs(runs)  # WANDB_DIR is /work/runs: in the volume
    assert [row["_step"] for row in run.history if "train/loss" in row][:2] == [10, 20]
    assert run.summary["final_val_acc"] > 0.8 and run.artifacts
    assert [path for path in image.engine_output("diff", name).split()[1::2]
            if path not in (DATA, "/etc", "/run", *ENGINE_FILES)] == []  # the mount point

    exported = image.run("export", "/work/runs/mnist/checkpoints", "--format", "onnx",
                         "--output", "/work/runs/mnist.onnx", **options)
    assert exported.returncode == 0, exported.stderr
    assert (runs / "mnist.onnx").stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------
# 5. an arbitrary UID in group 0, as OpenShift runs containers


def test_an_arbitrary_uid_in_group_0_trains_with_a_writable_home(image, data_dir):
    runs = image.volume()
    options = {"user": "123456:0", "mounts": (data_mount(data_dir), f"{runs}:/work/runs")}
    home = image.run("-c", "import pathlib; (pathlib.Path.home() / 'x').write_text('x'); "
                     "print(pathlib.Path.home())", entrypoint="python", **options)
    assert home.returncode == 0 and home.stdout.strip() == "/home/cnn", home.stderr
    result = image.run(*MNIST, "--limit-train", "2000", "--data-uri", DATA,
                       env={"WANDB_MODE": "offline"}, **options)
    assert result.returncode == 0, result.stderr
    assert_quiet_wandb(result.stdout + result.stderr)
    folder = image.volume_path(runs)
    assert (folder / "mnist" / "checkpoints" / "latest").exists()
    assert owners(folder / "mnist") == {123456}
    (run,) = offline_runs(folder)
    assert run.summary["final_val_acc"] > 0.8


# ----------------------------------------------------------------------------------------------
# 6. the README's `docker run --rm` keeps the W&B offline run, and its sync line works


def readme_docker_run() -> list[str]:
    """The README's documented command: docker run --rm ... cnn-job train cifar10."""
    (line,) = re.findall(r"^docker run --rm .* cnn-job train cifar10$",
                         (REPO / "README.md").read_text(), re.M)
    return shlex.split(line)


def test_a_wandb_offline_run_survives_rm_in_the_readmes_command(image, data_dir):
    words = readme_docker_run()
    assert "--rm" in words
    gpus = words.index("--gpus")
    del words[gpus:gpus + 2]  # no GPU here
    volumes = {}
    for index, word in enumerate(words):
        if word == "-v":  # a named volume per test for each of the README's
            target = words[index + 1].partition(":")[2]
            volumes[target] = image.volume()
            words[index + 1] = f"{volumes[target]}:{target}"
    assert "/work/runs" in volumes, "the README's command must keep /work/runs in a volume"
    options = words[2:words.index("cnn-job")]
    command = [image.engine, "run", "--network=none", *ulimits(), "-v", data_mount(data_dir),
               *options, image.tag, *MNIST, "--limit-train", "2000", "--data-uri", DATA]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (sync,) = re.findall(r"sync it later with `(wandb sync (\S+))`", result.stdout)
    folder = Path(sync[1])
    assert folder.is_relative_to("/work/runs")
    # The container is gone (--rm); its run is in the volume, whole, and `wandb sync` reads it.
    run = OfflineRun(image.volume_path(volumes["/work/runs"]) / folder.relative_to("/work/runs"))
    assert run.summary["final_val_acc"] > 0.8
    listed = image.run(*shlex.split(sync[0])[1:], "--dry-run", entrypoint="wandb",
                       mounts=(f"{volumes['/work/runs']}:/work/runs",))
    assert listed.returncode == 0 and run.run_id in listed.stdout + listed.stderr, listed


# ----------------------------------------------------------------------------------------------
# 7. the manifests' pods, from their own YAML, under `podman kube play`


# kube play has no --ulimit: podman's default (1048576 files and processes), which this host's
# hard limits refuse (ulimits() above), is lowered in a containers.conf of the tests' own; and
# the host's proxy variables stay out of the pods, as a kubelet keeps its own.
KUBE_CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
http_proxy = false
"""
# The run's size, made as a user would make it: keys of the settings ConfigMap (a sweep's: its
# file's `fixed`). 640 CIFAR-10 images: 10 steps of 64 on one pod, 5 a rank on two.
SMALL_RUN = {"CNN_JOB_EPOCHS": "1", "CNN_JOB_LIMIT_TRAIN": "640"}
# Podman keeps Secrets by name for the whole host: one test at a time creates the manifests'.
SECRET_LOCK = Path(tempfile.gettempdir(), "cnn-job-test-kube-secret.lock")


def settings_name(objects: dict) -> str:
    """The ConfigMap the training container takes its environment from."""
    (name,) = [source["configMapRef"]["name"] for source in the_container(the_job(objects))["envFrom"]
               if "configMapRef" in source]
    return name


@pytest.fixture(scope="module")
def cluster_s3(data_dir):
    """The manifests' S3, on loopback: a moto server holding their bucket, with CIFAR-10 pushed
    where they read it, by the command k8s/README.md gives."""
    objects = load_folder(FOLDERS["single"])
    data_uri = objects["ConfigMap", settings_name(objects)]["data"]["CNN_JOB_DATA_URI"]
    bucket, _, data_prefix = data_uri.removeprefix("s3://").partition("/")
    process, endpoint = start_s3_server()
    try:
        env = {"AWS_ACCESS_KEY_ID": "cnn-job-test-key", "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=SECRET, region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        # 189 MB into moto: minutes when the tests' niced processes share a loaded host.
        pushed = run_cli("data", "push", "cifar10", data_uri, "--from", str(data_dir), env=env,
                         timeout=1800)
        assert pushed.returncode == 0, pushed.stderr
        yield types.SimpleNamespace(endpoint=endpoint, client=client, bucket=bucket, env=env,
                                    data_prefix=data_prefix)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def cluster(cluster_s3):
    """The bucket as a fresh cluster's: the data, and no run of an earlier test."""
    for key in s3_keys(cluster_s3, ""):
        if not key.startswith(f"{cluster_s3.data_prefix}/"):
            cluster_s3.client.delete_object(Bucket=cluster_s3.bucket, Key=key)
    return cluster_s3


@contextlib.contextmanager
def podman_secret(engine: str, name: str, values: dict, folder: Path):
    """The Secret `name` as podman 4.3's kube play reads one: a JSON object of base64 values,
    kept only while the pods are created (their environment takes its values then)."""
    data = folder / f"secret-{name}.json"
    data.write_text(json.dumps({key: base64.b64encode(value.encode()).decode()
                                for key, value in values.items()}))
    with open(SECRET_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run([engine, "secret", "rm", name], capture_output=True)
        subprocess.run([engine, "secret", "create", name, str(data)], check=True,
                       capture_output=True)
        try:
            yield
        finally:
            subprocess.run([engine, "secret", "rm", name], capture_output=True)
            data.unlink()


@dataclass
class PlayedPod:
    pod: dict  # the controller's Pod (kube_pods.controller_pods)
    container: str  # podman's name for its one container
    termination_log: Path  # the file at its terminationMessagePath

    def message(self) -> str:
        return self.termination_log.read_text()


class Manifests:
    """One folder's pods under `podman kube play --network host`, from the YAML as shipped:
    only the S3 endpoint (this module's moto server) and the run's size (`settings` added to the
    settings ConfigMap, `fixed` to a sweep file's) differ. The ConfigMaps go to kube play as
    they are given, the Secret with this server's keys."""

    def __init__(self, image: Image, name: str, s3, folder: Path, settings: dict,
                 fixed: dict | None = None):
        if image.engine != "podman":
            pytest.skip(f"kube play is podman's; the image tests run on {image.engine}")
        self.image, self.folder = image, folder
        self.objects = load_folder(FOLDERS[name])
        data = self.objects["ConfigMap", settings_name(self.objects)]["data"]
        assert data["AWS_ENDPOINT_URL"]  # the cluster's S3: here, the loopback server
        data.update(AWS_ENDPOINT_URL=s3.endpoint, **settings)
        self.settings = data
        if fixed is not None:
            _, config_map, key = sweep_source(self.objects)
            sweep = yaml.safe_load(self.objects["ConfigMap", config_map]["data"][key])
            sweep["fixed"] = {**sweep.get("fixed", {}), **fixed}
            self.objects["ConfigMap", config_map]["data"][key] = yaml.safe_dump(sweep, sort_keys=False)
            self.sweep = sweep
        self.config_maps = []
        for (kind, config_map), document in self.objects.items():
            if kind == "ConfigMap":  # kube play 4.3 reads the first document of a file
                self.config_maps.append(folder / f"configmap-{config_map}.yaml")
                self.config_maps[-1].write_text(yaml.safe_dump(document, sort_keys=False))
                image.volumes.append(config_map)  # kube play keeps a ConfigMap volume by its name
        self.secret = {"AWS_ACCESS_KEY_ID": s3.env["AWS_ACCESS_KEY_ID"],
                       "AWS_SECRET_ACCESS_KEY": s3.env["AWS_SECRET_ACCESS_KEY"],
                       "WANDB_API_KEY": "test-key-of-no-wandb-account"}
        self.pods = controller_pods(self.objects)
        self.hosts = folder / "hosts"
        self.hosts.write_text(hosts_file(self.pods))
        self.hosts.chmod(0o644)

    def play(self, pod: dict) -> PlayedPod:
        name = pod["metadata"]["name"]
        termination_log = self.folder / f"termination-log-{name}"
        termination_log.touch()
        termination_log.chmod(0o666)  # as the kubelet makes it, for a container of any UID
        played = on_this_host(pod, self.objects, self.secret, self.image.tag, self.hosts,
                              termination_log)
        path = self.folder / f"pod-{name}.yaml"
        path.write_text(yaml.safe_dump(played, sort_keys=False))
        self.image.pods.append(name)
        self.image.volumes += [volume["name"] for volume in played["spec"]["volumes"]
                               if "emptyDir" in volume]
        with podman_secret(self.image.engine, SECRET_NAME, self.secret, self.folder):
            result = subprocess.run(
                [self.image.engine, "kube", "play", "--network", "host",
                 *[f"--configmap={config_map}" for config_map in self.config_maps], str(path)],
                capture_output=True, text=True, timeout=300,
                env={**os.environ, "CONTAINERS_CONF": str(kube_containers_conf(self.folder))})
        assert result.returncode == 0, result.stdout + result.stderr
        (container,) = played["spec"]["containers"]
        return PlayedPod(pod, f"{name}-{container['name']}", termination_log)

    def assert_as_declared(self, played: PlayedPod) -> None:
        """What the pod declares took effect in kube play's container: its user, environment,
        volumes, read-only root, capabilities, hostname."""
        spec, (container,) = played.pod["spec"], played.pod["spec"]["containers"]
        (inspected,) = json.loads(self.image.engine_output("inspect", played.container))
        context = {**spec["securityContext"], **container["securityContext"]}
        assert inspected["Config"]["User"] == f"{context['runAsUser']}:{context['runAsGroup']}"
        assert inspected["HostConfig"]["ReadonlyRootfs"] is context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]} and not inspected["EffectiveCaps"]
        assert context["allowPrivilegeEscalation"] is False
        assert "no-new-privileges" in inspected["HostConfig"]["SecurityOpt"]
        env = dict(item.partition("=")[::2] for item in inspected["Config"]["Env"])
        assert self.settings.items() <= env.items() and self.secret.items() <= env.items()
        index = completion_index(played.pod)
        assert env.get("JOB_COMPLETION_INDEX") == (None if index is None else str(index))
        mounts = {mount["Destination"]: mount for mount in inspected["Mounts"]}
        for mount in container["volumeMounts"]:
            assert mounts[mount["mountPath"]]["RW"] is not mount.get("readOnly", False), mount
        pod_inspected = json.loads(self.image.engine_output("pod", "inspect", played.pod["metadata"]["name"]))
        assert pod_inspected["Hostname"] == spec.get("hostname", played.pod["metadata"]["name"])
        assert pod_inspected["InfraConfig"]["HostNetwork"] is True


def kube_containers_conf(folder: Path) -> Path:
    path = folder / "containers.conf"
    if not path.exists():
        path.write_text(KUBE_CONTAINERS_CONF)
    return path


def running_or_failed(image: Image, played: PlayedPod) -> bool:
    """True while the pod's container runs; else the test fails with its log's tail."""
    if not image.is_running(played.container):
        pytest.fail(f"{played.container} ended:\n{image.logs(played.container)[-3000:]}")
    return True


def exit_code(image: Image, played: PlayedPod) -> int:
    # A CIFAR-10 pod on 2 shared CPUs: minutes, at worst tens of them.
    subprocess.run([image.engine, "wait", played.container], capture_output=True, check=True,
                   timeout=3600)
    return int(image.engine_output("inspect", "--format", "{{.State.ExitCode}}", played.container))


@pytest.mark.parametrize("name", [name for name in FOLDERS if name != "sweep"])
def test_every_manifests_pods_run_under_kube_play(name, image, cluster, tmp_path):
    manifests = Manifests(image, name, cluster, tmp_path, SMALL_RUN)
    played = [manifests.play(pod) for pod in manifests.pods]  # every index at once
    for pod in played:
        assert exit_code(image, pod) == 0, image.logs(pod.container)[-3000:]
        manifests.assert_as_declared(pod)
    checkpoint_uri = manifests.settings["CNN_JOB_CHECKPOINT_URI"]
    state = read_checkpoint(cluster, checkpoint_uri)
    assert state["world_size"] == len(played) and state["epoch"] == 1
    assert state["config"]["data_uri"] == manifests.settings["CNN_JOB_DATA_URI"]
    assert f"training cifar10 (--net seed) on {len(played)} × cpu" in image.logs(played[0].container)
    # Rank 0's last line is the pod's termination message; another rank's is empty, so that
    # Kubernetes shows its log's tail instead (FallbackToLogsOnError).
    assert re.fullmatch(rf"done: val_acc \d+\.\d\d% at step {state['step']}, model "
                        rf"{checkpoint_uri}/step-{state['step']:09d}\.pt", played[0].message())
    assert [pod.message() for pod in played[1:]] == [""] * (len(played) - 1)


# ----------------------------------------------------------------------------------------------
# 7b. the sweep's pods: a trial per index, the settings ConfigMap's data URI and cadence


def trial_record(s3, root: str, index: int) -> dict:
    bucket, _, prefix = root.removeprefix("s3://").partition("/")
    key = f"{prefix}/trial-{index:03d}/trial.json"
    return json.loads(s3.client.get_object(Bucket=bucket, Key=key)["Body"].read())


# Trial 1 (batch 64): one epoch of 625 steps, stopped once the settings ConfigMap's cadence
# (CNN_JOB_CHECKPOINT_EVERY_STEPS, 200) has put its first checkpoint in S3: the stop comes on a
# state, with 400 steps to go, and the resumed run checkpoints at the cadence again.
SWEEP_STEPS = 625


def test_a_sweep_pod_trains_from_the_configmaps_data_at_its_cadence_and_resumes_when_stopped(
        image, cluster, tmp_path):
    manifests = Manifests(image, "sweep", cluster, tmp_path, {},
                          fixed={"epochs": 1, "limit_train": SWEEP_STEPS * 64})
    settings, root = manifests.settings, manifests.sweep["checkpoint_uri"]
    every_steps = int(settings["CNN_JOB_CHECKPOINT_EVERY_STEPS"])
    assert settings["CNN_JOB_DATA_URI"].startswith("s3://") and every_steps > 0
    assert not {"data_uri", "checkpoint_every_steps"} & set(manifests.sweep["fixed"])
    grace_s = the_job(manifests.objects)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    (index_1,) = [pod for pod in manifests.pods if completion_index(pod) == 1]
    # Stopped as Kubernetes stops a pod (SIGTERM, then SIGKILL after the grace period) once it
    # trains: as its process, PID 1, it runs the command of the YAML as user 10001, with no
    # capability and the runtime's seccomp filter.
    stopped_pod = manifests.play(index_1)
    trial = f"{root}/trial-001"
    prefix = trial.removeprefix(f"s3://{cluster.bucket}/")

    def saved_steps() -> list[int]:
        return sorted(int(key.rpartition("/step-")[2].removesuffix(".pt"))
                      for key in s3_keys(cluster, prefix) if key.endswith(".pt"))

    wait_until("trial 1's checkpoint at the ConfigMap's cadence",
               lambda: every_steps in saved_steps(), timeout_s=600,
               still=lambda: running_or_failed(image, stopped_pod))
    process = image.engine_output("exec", stopped_pod.container, "cat", "/proc/1/cmdline")
    assert process.split("\0")[1:5] == ["/opt/venv/bin/cnn-job", "sweep", "run",  # after python
                                         "/etc/cnn-job/sweep.yaml"], process
    status = image.engine_output("exec", stopped_pod.container, "cat", "/proc/1/status")
    assert re.search(r"^Uid:\s+10001\s", status, re.M) and re.search(r"^CapEff:\s+0+$", status, re.M)
    assert re.search(r"^Seccomp:\s+2$", status, re.M), status  # RuntimeDefault: a filter
    code, seconds = image.stop(stopped_pod.container, grace_s)
    assert code == PREEMPTED_EXIT_CODE and seconds < grace_s, image.logs(stopped_pod.container)[-3000:]
    manifests.assert_as_declared(stopped_pod)
    stopped = trial_record(cluster, root, 1)
    assert stopped["status"] == "stopped" and every_steps <= stopped["steps"] < SWEEP_STEPS, stopped
    assert stopped_pod.message() == (
        f"trial 001 stopped at epoch 0, step {stopped['steps']} (val_acc -): run it again to "
        f"resume (exit status {PREEMPTED_EXIT_CODE})")

    # The replacement pod for index 1 resumes the trial where it stopped and finishes it.
    (replacement,) = [pod for pod in controller_pods(manifests.objects) if completion_index(pod) == 1]
    again = manifests.play(replacement)
    assert exit_code(image, again) == 0, image.logs(again.container)[-3000:]
    assert (f"resumed from {root}/trial-001/step-{stopped['steps']:09d}.pt"
            in image.logs(again.container).replace("\n", ""))
    finished = trial_record(cluster, root, 1)
    assert finished["status"] == "finished" and finished["steps"] == SWEEP_STEPS, finished
    assert re.fullmatch(r"trial 001 finished: val_acc \d+\.\d\d%, epochs 1 \(.*\bseed 1\)",
                        again.message()), again.message()
    # The ConfigMap's settings, which the sweep file leaves to the pod: the data from its s3://
    # URI, its checkpoint cadence (the checkpoints: every 200 steps, at the stop and at the end,
    # the newest 3 kept).
    state = read_checkpoint(cluster, trial)
    assert state["config"]["data_uri"] == settings["CNN_JOB_DATA_URI"]
    assert state["config"]["checkpoint_every_steps"] == every_steps
    assert {name: str(finished["sources"]["environment"].get(name)) for name in (
        "CNN_JOB_DATA_URI", "CNN_JOB_CHECKPOINT_EVERY_STEPS")} == {
        name: settings[name] for name in ("CNN_JOB_DATA_URI", "CNN_JOB_CHECKPOINT_EVERY_STEPS")}
    written = {*range(every_steps, SWEEP_STEPS, every_steps), stopped["steps"], SWEEP_STEPS}
    assert saved_steps() == sorted(written)[-3:], saved_steps()

    report = image.run("sweep", "report", root, "--json", network="host", env=cluster.env)
    assert report.returncode == 0, report.stderr
    rows = {row["trial"]: row for row in json.loads(report.stdout)}
    assert rows[1]["status"] == "finished" and rows[1]["epochs"] == 1, rows[1]
    assert cluster.env["AWS_SECRET_ACCESS_KEY"] not in report.stdout + report.stderr


def test_a_sweep_pod_refuses_a_result_changing_setting_of_its_configmap(image, cluster, tmp_path):
    # CNN_JOB_LR beside a sweep file whose trials each draw their own lr: the run would not be
    # the trial the file names.
    manifests = Manifests(image, "sweep", cluster, tmp_path, {"CNN_JOB_LR": "0.01"},
                          fixed={"epochs": 1, "limit_train": 640})
    assert "lr" in manifests.sweep["random"]
    played = manifests.play(manifests.pods[0])
    assert exit_code(image, played) == 2
    output = image.logs(played.container)
    assert "Traceback" not in output
    line = output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "CNN_JOB_LR" in line, output[-3000:]
    assert played.message() == line


# ----------------------------------------------------------------------------------------------
# 8. S3 from inside the container: data in, checkpoints out, SIGTERM → 75 → resume from S3


def test_s3_from_the_container_stop_and_resume(image, s3, data_dir):
    data_uri = push_mnist(s3, data_dir)
    checkpoint_uri = f"s3://{s3.bucket}/runs/mnist"
    command = (*MNIST, "--limit-train", "6000", "--checkpoint-every-steps", "10",
               "--data-uri", data_uri, "--checkpoint-uri", checkpoint_uri)
    options = {"network": "host", "env": {**s3.env, **NO_WANDB}}
    name = image.start(*command, **options)

    def checkpointed() -> bool:
        return "Contents" in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="runs/mnist/latest")

    wait_until("checkpoint in S3", checkpointed, still=lambda: image.is_running(name))
    status, seconds = image.stop(name)
    assert status == PREEMPTED_EXIT_CODE and seconds < STOP_TIMEOUT_S, image.logs(name)
    stopped = read_checkpoint(s3, checkpoint_uri)
    assert 0 < stopped["step"] < 94
    resumed = image.run(*command, **options)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {checkpoint_uri}/step-{stopped['step']:09d}.pt" in resumed.stdout.replace("\n", "")
    assert read_checkpoint(s3, checkpoint_uri)["step"] == 94
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in resumed.stdout + resumed.stderr


# ----------------------------------------------------------------------------------------------
# 9. `launch --nproc-per-node 2` in one container: stop ends every worker, exit 75 in time


def test_launch_two_workers_then_stop_ends_every_one(image, data_dir, tmp_path):
    runs = writable_dir(tmp_path / "runs")
    # The rendezvous on the container's own loopback (`launch --standalone` fails on torch 2.15:
    # "rendezvous endpoint '127.0.0.1:None'").
    single_node = ("--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", "29500")
    name = image.start("launch", *single_node, "--nproc-per-node", "2", "--", *MNIST,
                       "--limit-train", "6000", "--checkpoint-every-steps", "5", "--data-uri", DATA,
                       env=NO_WANDB,
                       mounts=(data_mount(data_dir), f"{runs}:/work/runs"),
                       flags=("--shm-size=1g",))
    wait_until("checkpoint", (runs / "mnist" / "checkpoints" / "latest").exists,
               still=lambda: image.is_running(name))
    # The host's PIDs of the launcher and its workers, to look for after the stop.
    processes = image.engine_output("top", name, "hpid", "args").splitlines()[1:]
    host_pids = [int(line.split()[0]) for line in processes]
    assert sum("job train" in line for line in processes) == 2, processes
    status, seconds = image.stop(name)
    assert status == PREEMPTED_EXIT_CODE, image.logs(name)[-3000:]
    assert seconds < STOP_TIMEOUT_S
    assert [pid for pid in host_pids if Path(f"/proc/{pid}").exists()] == []
    assert 0 < read_checkpoint(None, runs / "mnist" / "checkpoints")["step"] < 47  # 3000 per rank


# ----------------------------------------------------------------------------------------------
# what the image leaves out, on purpose


def dockerfile_omitted() -> list[str]:
    (omitted,) = re.findall(r'^ARG OMITTED="([^"]*)"$', (REPO / "Dockerfile").read_text(), re.M)
    return omitted.split()


def test_pip_check_accepts_exactly_the_stated_omissions_and_torch_imports(image):
    checked = image.run("check", entrypoint="pip")
    lines = sorted(checked.stdout.splitlines())
    version = str(locked(LOCK.read_text())["torch"][0])
    assert lines == sorted(f"torch {version} requires {name}, which is not installed."
                           for name in dockerfile_omitted()), checked.stdout
    imported = image.run("-c", "import torch, torchvision, onnxruntime, wandb, job.cli; "
                         "print(torch.__version__, torch.version.cuda)", entrypoint="python")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.split()[0].partition("+")[0] == version  # 2.15.0+cu132: CUDA's build


# ----------------------------------------------------------------------------------------------
# 11. where the image comes from: its labels, SBOM, licences and `cnn-job --version`


IMAGE_DOC = "/usr/share/doc/cnn-job"  # the SBOM and the third-party licences (Makefile: IMAGE_DOC)


def git(*args: str) -> str:
    result = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO)
    return result.stdout.strip() if result.returncode == 0 else ""


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_oci_labels_say_what_the_image_is_and_where_it_comes_from(image):
    labels = json.loads(image.engine_output("image", "inspect", "--format",
                                            "{{json .Config.Labels}}", image.tag))
    oci = {key.removeprefix("org.opencontainers.image."): value for key, value in labels.items()
           if key.startswith("org.opencontainers.image.")}
    assert oci["title"] == project()["name"] and oci["description"]
    assert oci["version"] == project()["version"] and oci["licenses"] == project()["license"]
    assert oci["revision"] == git("rev-parse", "HEAD") != ""
    assert oci["source"] == (git("remote", "get-url", "origin") or f"file://{REPO}")
    assert oci["base.name"] == image.base
    created = datetime.strptime(oci["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert image.built_at <= created <= datetime.now(timezone.utc), oci["created"]


def image_file(image: Image, path: str) -> str:
    result = image.run(path, entrypoint="cat")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_sbom_is_valid_cyclonedx_and_lists_what_pip_lists_with_the_locks_hashes(image, tmp_path):
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator
    from packaging.utils import canonicalize_name

    text = image_file(image, f"{IMAGE_DOC}/sbom.cdx.json")
    sbom = json.loads(text)
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.6"
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    # What pip in the image lists, no more, no less: the job is the SBOM's subject.
    listed = json.loads(image.run("list", "--format", "json", entrypoint="pip").stdout)
    root = sbom["metadata"]["component"]
    components = [root, *sbom["components"]]
    assert sorted((canonicalize_name(c["name"]), c["version"]) for c in components) == sorted(
        (canonicalize_name(p["name"]), p["version"]) for p in listed)
    assert (root["name"], root["version"]) == (project()["name"], project()["version"])
    # Each one with a purl, a licence, and the sha256 of the wheel installed: one the lock lists.
    pins = locked(LOCK.read_text())
    for component in components:
        name = canonicalize_name(component["name"])
        assert component["purl"] == f"pkg:pypi/{name}@{component['version']}"
        # NVIDIA's cuda-toolkit meta-package declares no licence; another package that declares
        # none is to be looked at before it ships.
        assert component.get("licenses") or name in {"cuda-toolkit"}, name
        (digest,) = component["hashes"]
        assert digest["alg"] == "SHA-256" and re.fullmatch(r"[0-9a-f]{64}", digest["content"])
        if component is not root:
            assert str(pins[name][0]) == component["version"] and digest["content"] in pins[name][1]
    (torch,) = [c for c in components if c["name"] == "torch"]
    assert torch["version"] == str(pins["torch"][0])
    # `make sbom` writes the same two files out of the image.
    result = subprocess.run(["make", "-C", str(REPO), "sbom", f"IMAGE={image.tag}",
                             f"IMAGE_ENGINE={image.engine}", f"SBOM_DIR={tmp_path}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "sbom.cdx.json").read_text() == text
    licences = (tmp_path / "third-party-licenses.txt").read_text().splitlines()
    assert len(licences) == len(components)
    assert licences[0] == f"cnn-job {project()['version']}: Apache-2.0 (this image's job)"
    (torch_licence,) = [line for line in licences if line.startswith(f"torch {torch['version']}: ")]
    assert "BSD-3-Clause" in torch_licence


def test_the_image_carries_the_licence_and_not_the_tools_that_made_its_sbom(image):
    assert image_file(image, "/usr/share/licenses/cnn-job/LICENSE") == (REPO / "LICENSE").read_text()
    listed = {p["name"].lower() for p in json.loads(
        image.run("list", "--format", "json", entrypoint="pip").stdout)}
    assert not {name for name in listed if "cyclonedx" in name}
    absent = image.run("-c", "import os, importlib.util; print(os.path.exists('/opt/sbom-tool'), "
                       "importlib.util.find_spec('cyclonedx'))", entrypoint="python")
    assert absent.stdout.split() == ["False", "None"], absent.stderr


def test_version_in_the_image_names_its_commit_and_cuda_build(image):
    result = image.run("--version", "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["git_commit"] == git("rev-parse", "HEAD")
    assert facts["cnn_job"] == project()["version"]
    assert facts["torch"].partition("+")[0] == str(locked(LOCK.read_text())["torch"][0])
    assert facts["cuda"] and facts["cudnn"]  # PyPI's CUDA build, cuDNN from its nvidia wheel
    assert facts["gpu_visible"] is False and facts["gpus"] == []  # no --gpus here
    text = image.run("--version")
    assert text.stdout.splitlines()[0] == f"cnn-job {project()['version']}", text.stderr


# ----------------------------------------------------------------------------------------------
# 10. container against host throughput, one after the other (a figure, not a timed test)


THROUGHPUT = ("--limit-train", "6000", "--checkpoint-uri", "/tmp/runs")


def container_throughput(image: Image, data_dir: Path, out: Path) -> dict:
    writable_dir(out)
    result = image.run(*MNIST, *THROUGHPUT, "--data-uri", DATA, "--summary-json", "/out/s.json",
                       env=NO_WANDB, mounts=(data_mount(data_dir), f"{out}:/out"))
    assert result.returncode == 0, result.stderr
    return speed(json.loads((out / "s.json").read_text()))


def speed(summary: dict) -> dict:
    return {key: round(summary[key], 2) for key in
            ("train_images_per_second", "seconds_to_first_step", "seconds_to_summary")}


def test_container_and_host_throughput_side_by_side(image, data_dir, tmp_path, request):
    host = subprocess.run([str(CNN_JOB), *MNIST, *THROUGHPUT[:2], "--checkpoint-uri",
                           str(tmp_path / "host"), "--data-uri", str(data_dir), "--summary-json",
                           str(tmp_path / "host.json")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **NO_WANDB, "CNN_JOB_CACHE_DIR": str(tmp_path / "cache")})
    assert host.returncode == 0, host.stderr
    figures = request.config.cache.get(FIGURES_KEY, {}) if hasattr(request.config, "cache") else {}
    figures["host"] = speed(json.loads((tmp_path / "host.json").read_text()))
    figures["container"] = container_throughput(image, data_dir, tmp_path / "container")
    save_figures(request, figures)
    assert figures["host"]["train_images_per_second"] > 0
    assert figures["container"]["train_images_per_second"] > 0

