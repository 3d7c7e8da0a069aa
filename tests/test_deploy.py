"""The deployment files: Dockerfile, Kubernetes manifests, GitHub workflow, dependency lock.

Each passes its own linter or schema. Then the commands they declare are run here as plain
processes on CPU, with the environment a pod would get (image ENV, ConfigMap, Secret, env,
JOB_COMPLETION_INDEX), against a real S3-compatible server on loopback: one process for
k8s/job.yaml, two concurrent ones (ranks 0 and 1) for the Indexed Job in k8s/multinode/.
"""

import contextlib
import importlib.metadata
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from job.preemption import PREEMPTED_EXIT_CODE
from tests.conftest import CNN_JOB, REPO, _free_port
from tests.test_preemption import read_checkpoint
from tests.test_storage import push_mnist

BIN = Path(sys.executable).parent
MANIFEST_FOLDERS = (REPO / "k8s", REPO / "k8s" / "multinode")
MANIFESTS = sorted(path for folder in MANIFEST_FOLDERS for path in folder.glob("*.yaml"))
WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
LOCK = REPO / "requirements" / "constraints.txt"
SECRET_NAME = "cnn-job-credentials"  # what the README's `kubectl create secret` makes


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    """A linter from the test extra, installed beside this Python."""
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------------------------
# linters and schemas


def test_manifests_pass_strict_kubernetes_validation(tmp_path):
    assert len(MANIFESTS) == 5, MANIFESTS
    result = tool("kubernetes-validate", "--strict", *map(str, MANIFESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed ") == len(MANIFESTS), result.stdout
    # Strict means strict: a misspelt field fails (without --strict it would pass).
    misspelt = tmp_path / "job.yaml"
    misspelt.write_text((REPO / "k8s" / "job.yaml").read_text().replace(
        "ttlSecondsAfterFinished", "ttlSecondsAfterFinish"))
    result = tool("kubernetes-validate", "--strict", str(misspelt))
    assert result.returncode != 0 and "ttlSecondsAfterFinish" in result.stdout + result.stderr


def test_dockerfile_passes_hadolint():
    result = tool("hadolint", str(REPO / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_matches_github_schema():
    result = tool("check-jsonschema", "--builtin-schema", "vendor.github-workflows", str(WORKFLOW))
    assert result.returncode == 0, result.stdout + result.stderr


def test_lock_pins_the_runtime_dependencies_and_theirs():
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(text) for text in project["dependencies"]]
    for requirement in wanted:  # each dependency pinned, at a version pyproject.toml accepts
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin is not None and pin in requirement.specifier, requirement
    # ... and so is everything they need here, found through the installed packages' metadata.
    seen, todo = set(), [r.name for r in wanted]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        assert name in pins, f"{name} is needed at run time but not in {LOCK.name}"
        for text in importlib.metadata.distribution(name).requires or ():
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)


# ----------------------------------------------------------------------------------------------
# the Dockerfile's image, as far as it can be run without Docker


def dockerfile_final_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the last stage, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    instructions = [tuple(line.strip().split(None, 1)) for line in joined.splitlines() if line.strip()]
    last_from = max(i for i, (word, _) in enumerate(instructions) if word.upper() == "FROM")
    return [(word.upper(), rest) for word, rest in instructions[last_from:]]


def image_config() -> dict:
    """ENTRYPOINT, CMD, ENV, VOLUME, USER and WORKDIR of the final stage; ENV values get the
    ARG defaults and earlier ENVs substituted (references to the base image's, like $PATH, stay)."""
    config, variables = {"ENV": {}, "VOLUME": []}, {}
    for word, rest in dockerfile_final_stage():
        if word in ("ENTRYPOINT", "CMD"):
            config[word] = json.loads(rest)  # exec form only: a shell would swallow SIGTERM
        elif word == "ARG":
            name, _, default = rest.partition("=")
            variables[name] = "".join(shlex.split(default))
        elif word == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                value = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], m[0]), value)
                config["ENV"][name] = variables[name] = value
        elif word == "VOLUME":
            config["VOLUME"] += json.loads(rest) if rest.startswith("[") else rest.split()
        elif word in ("USER", "WORKDIR"):
            config[word] = rest
    return config


IMAGE = image_config()


def test_image_runs_cnn_job_as_a_non_root_user_with_a_cache_volume():
    assert IMAGE["ENTRYPOINT"] == ["cnn-job"]
    assert IMAGE["ENTRYPOINT"] + IMAGE["CMD"] == ["cnn-job", "train", "cifar10"]
    assert IMAGE["USER"].isdigit() and int(IMAGE["USER"]) != 0  # numeric: runAsNonRoot checks it
    assert IMAGE["ENV"]["CNN_JOB_CACHE_DIR"] in IMAGE["VOLUME"]
    assert IMAGE["ENV"]["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert IMAGE["ENV"]["PATH"].startswith("/opt/venv/bin:")


def test_image_entrypoint_and_cmd_run():
    entrypoint = [str(CNN_JOB), *IMAGE["ENTRYPOINT"][1:]]  # the venv's cnn-job stands in
    result = subprocess.run([*entrypoint, "--help"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "data" in result.stdout
    result = subprocess.run([*entrypoint, *IMAGE["CMD"], "--help"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "Usage: cnn-job train" in result.stdout


def test_nothing_in_the_image_context_is_missing():
    # .dockerignore keeps only what the Dockerfile copies: each COPY source must survive it.
    kept = [line[1:] for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.startswith("!")]
    build_copies = re.findall(r"^COPY (?!--from)(.+) \S+$", (REPO / "Dockerfile").read_text(), re.M)
    for sources in build_copies:
        for source in sources.split():
            assert any(source.rstrip("/") == k.rstrip("/") for k in kept), source
            assert (REPO / source).exists(), source


# ----------------------------------------------------------------------------------------------
# the manifests: what they promise Kubernetes


def load_folder(folder: Path) -> dict[tuple[str, str], dict]:
    """(kind, name) → object, for every manifest file in one `kubectl apply -f` folder."""
    objects = {}
    for path in sorted(folder.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                objects[document["kind"], document["metadata"]["name"]] = document
    return objects


def the_job(objects: dict) -> dict:
    (job,) = [obj for (kind, _), obj in objects.items() if kind == "Job"]
    return job


@pytest.mark.parametrize("folder", MANIFEST_FOLDERS, ids=lambda folder: folder.name)
def test_job_retries_preemption_fails_on_bad_input_and_fits_a_gpu(folder):
    spec = the_job(load_folder(folder))["spec"]
    rules = spec["podFailurePolicy"]["rules"]
    on_exit = {code: rule["action"] for rule in rules if "onExitCodes" in rule
               for code in rule["onExitCodes"]["values"] if rule["onExitCodes"]["operator"] == "In"}
    assert on_exit == {2: "FailJob", PREEMPTED_EXIT_CODE: "Ignore"}
    assert {"type": "DisruptionTarget"} in [c for rule in rules if rule["action"] == "Ignore"
                                           for c in rule.get("onPodConditions", [])]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert all(rule["onExitCodes"]["containerName"] == container["name"]
               for rule in rules if "onExitCodes" in rule)
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 60
    assert spec["backoffLimit"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    assert IMAGE["ENV"]["CNN_JOB_CACHE_DIR"] in mounts
    assert {"secretRef": {"name": SECRET_NAME}} in container["envFrom"]


def test_both_jobs_run_the_same_image():
    images = {the_job(load_folder(folder))["spec"]["template"]["spec"]["containers"][0]["image"]
              for folder in MANIFEST_FOLDERS}
    assert len(images) == 1, images


def test_indexed_job_finds_rank_0_through_the_headless_service():
    objects = load_folder(REPO / "k8s" / "multinode")
    job = the_job(objects)
    (service,) = [obj for (kind, _), obj in objects.items() if kind == "Service"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    env = {item["name"]: item["value"] for item in pod["containers"][0]["env"]}
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NNODES"]) >= 2
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["subdomain"] == service["metadata"]["name"]
    # An Indexed Job's pod i is named and DNS-resolvable as <job>-i.<subdomain>.
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{pod['subdomain']}"


# ----------------------------------------------------------------------------------------------
# the manifests, run: kubelet's part done here by hand


def expand(text: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values; $$ escapes a $."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


def pod_process(objects: dict, secret: dict, overrides: dict, index: int | None = None):
    """The argv and environment the Job's container would start with, plus `overrides`.

    Environment order as in Kubernetes: the image's ENV, then envFrom (ConfigMap, Secret), then
    env, with JOB_COMPLETION_INDEX for an Indexed Job; `overrides` go on top of it all.
    """
    job = the_job(objects)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = dict(IMAGE["ENV"])
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(objects["ConfigMap", source["configMapRef"]["name"]]["data"])
        else:
            assert source["secretRef"]["name"] == SECRET_NAME
            env.update(secret)
    for item in container.get("env", []):
        env[item["name"]] = expand(item["value"], env)
    if job["spec"].get("completionMode") == "Indexed":
        env["JOB_COMPLETION_INDEX"] = str(index)
    env.update(overrides)
    # Without `command` the image's ENTRYPOINT runs; `args` replace its CMD.
    argv = container.get("command", IMAGE["ENTRYPOINT"]) + container.get(
        "args", [] if "command" in container else IMAGE["CMD"])
    return [expand(arg, env) for arg in argv], env


def local_overrides(manifest_env: dict, s3, pod_dir: Path, run: str) -> dict:
    """What changes between a GPU cluster and this test, as env on top of the manifests'."""
    # The manifests train CIFAR-10 from s3:// through a configured endpoint: the overrides
    # below only point those same settings at this test's server and bucket.
    assert manifest_env["CNN_JOB_DATASET"] == "cifar10"
    for name in ("CNN_JOB_DATA_URI", "CNN_JOB_CHECKPOINT_URI"):
        assert manifest_env[name].startswith("s3://"), name
    assert manifest_env["AWS_ENDPOINT_URL"]
    return {
        "AWS_ENDPOINT_URL": s3.endpoint,
        "CNN_JOB_DATA_URI": f"s3://{s3.bucket}/datasets",
        "CNN_JOB_CHECKPOINT_URI": f"s3://{s3.bucket}/runs/{run}",
        # Seconds on CPU instead of minutes on a GPU.
        "CNN_JOB_DATASET": "mnist", "CNN_JOB_EPOCHS": "1", "CNN_JOB_LIMIT_TRAIN": "640",
        "CNN_JOB_DEVICE": "cpu",
        "CNN_JOB_WANDB_MODE": "disabled", "WANDB_MODE": "disabled",  # no W&B account here
        # The image's venv, cache volume and home, per pod, and the base image's LANG; nothing
        # else of this process's environment.
        "PATH": f"{BIN}:{os.environ['PATH']}", "LANG": "C.UTF-8",
        "CNN_JOB_CACHE_DIR": str(pod_dir / "cache"),
        "HOME": str(pod_dir / "home"), "TMPDIR": str(pod_dir / "tmp"),
    }


class Pod:
    """One container's process, started as kubelet would: its own session, output to a file."""

    def __init__(self, objects: dict, secret: dict, s3, tmp_path: Path, run: str,
                 index: int | None = None, **extra_env: str):
        self.dir = tmp_path / f"{run}-pod{'' if index is None else index}"
        for sub in ("home", "tmp"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        _, manifest_env = pod_process(objects, secret, {}, index)
        overrides = {**local_overrides(manifest_env, s3, self.dir, run), **extra_env}
        self.argv, self.env = pod_process(objects, secret, overrides, index)
        if self.argv[0] == "cnn-job":  # the image's console script is the venv's here
            self.argv[0] = str(CNN_JOB)
        self.log = self.dir / "log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, cwd=self.dir, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout_s: float = 240, hint: str = "") -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.argv} did not finish in {timeout_s} s{hint}:\n"
                        f"{self.output()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL to the container's processes, torchrun's workers (own sessions) included."""
        if self.process.poll() is not None:
            return
        for pid in process_tree(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()


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


@pytest.fixture
def secret(s3):
    """The Secret cnn-job-credentials with the keys the README's `kubectl create secret` gives
    it, holding the loopback server's credentials."""
    return {"AWS_ACCESS_KEY_ID": s3.env["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": s3.env["AWS_SECRET_ACCESS_KEY"],
            "WANDB_API_KEY": "unused-wandb-is-disabled-in-tests"}


@pytest.fixture
def pods():
    started = []
    yield started
    for pod in started:
        pod.kill()


def test_single_job_trains_from_s3_and_checkpoints_to_s3(s3, secret, data_dir, tmp_path, pods):
    push_mnist(s3, data_dir)
    pod = Pod(load_folder(REPO / "k8s"), secret, s3, tmp_path, "single")
    pods.append(pod)
    assert pod.argv[:2] == [str(CNN_JOB), "train"]
    assert pod.wait() == 0, pod.output()[-3000:]
    assert "training mnist on 1 × cpu" in pod.output()
    state = read_checkpoint(s3, f"s3://{s3.bucket}/runs/single")
    assert state["world_size"] == 1 and state["epoch"] == 1 and state["step"] == 10  # 640 / 64


def start_indexed_job(s3, secret, tmp_path, run, pods, **extra_env) -> list[Pod]:
    """Every index of the Indexed Job at once, rank 0's address on loopback."""
    objects = load_folder(REPO / "k8s" / "multinode")
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), **extra_env}
    started = [Pod(objects, secret, s3, tmp_path, run, index, **rendezvous)
               for index in range(the_job(objects)["spec"]["completions"])]
    pods.extend(started)
    return started


def test_indexed_job_trains_as_two_ranks(s3, secret, data_dir, tmp_path, pods):
    push_mnist(s3, data_dir)
    started = start_indexed_job(s3, secret, tmp_path, "ddp", pods)
    assert started[0].argv[:2] == ["sh", "-c"] and "torchrun" in started[0].argv[2]
    for pod in started:
        assert pod.wait() == 0, pod.output()[-3000:]
    assert "training mnist on 2 × cpu" in started[0].output()
    state = read_checkpoint(s3, f"s3://{s3.bucket}/runs/ddp")
    assert state["world_size"] == 2 and state["epoch"] == 1 and state["step"] == 5  # 320 / 64


def test_indexed_job_pod_preempted_exits_75_and_the_retried_pods_resume(
        s3, secret, data_dir, tmp_path, pods):
    push_mnist(s3, data_dir)
    more_steps = {"CNN_JOB_LIMIT_TRAIN": "12800"}  # 100 steps per rank: time to be preempted
    rank_0, rank_1 = start_indexed_job(s3, secret, tmp_path, "pre", pods, **more_steps)
    deadline = time.monotonic() + 180
    while "training mnist on 2" not in rank_0.output():
        assert time.monotonic() < deadline and rank_0.process.poll() is None, rank_0.output()
        time.sleep(0.1)
    time.sleep(1)
    rank_1.process.send_signal(signal.SIGTERM)  # kubelet signals the container's PID 1: sh
    assert rank_1.wait() == PREEMPTED_EXIT_CODE, rank_1.output()[-3000:]
    # Its peer stops after the same step, and must not report success: the Job would count its
    # index as done. (torchrun reports the worker's 75 as 1.)
    status = rank_0.wait(timeout_s=60, hint=" (a worker that exits 0 here leaves torchrun waiting "
                         "at its exit barrier for the preempted pod's agent)")
    assert status != 0, rank_0.output()[-3000:]
    stopped = read_checkpoint(s3, f"s3://{s3.bucket}/runs/pre")
    assert stopped["world_size"] == 2 and 0 < stopped["step"] < 100
    # The Job controller replaces both pods; they resume from that checkpoint and finish.
    retried = start_indexed_job(s3, secret, tmp_path, "pre", pods, **more_steps)
    for pod in retried:
        assert pod.wait() == 0, pod.output()[-3000:]
    assert f"resumed from s3://{s3.bucket}/runs/pre/step-{stopped['step']:09d}.pt" in (
        retried[0].output().replace("\n", ""))
    final = read_checkpoint(s3, f"s3://{s3.bucket}/runs/pre")
    assert final["world_size"] == 2 and final["step"] == 100

