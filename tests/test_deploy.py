"""The deployment files: Dockerfile, Kubernetes manifests, GitHub workflow, dependency lock.

Each passes its own linter or schema: the built-in Kubernetes objects (and the Jobs that a
JobSet or a TrainJob makes) Kubernetes' schemas for every minor from 1.31 to 1.37, the JobSet
and Kubeflow Trainer objects the models of their projects' published API; checkov passes on all
of them and on the Dockerfile, and every pod meets Pod Security "restricted", with a read-only
root and a volume wherever the image writes. The failure handling
each manifest declares is then read the way its controllers read it. Last, the commands the
pods would run are run here as plain processes on CPU, with the environment a pod would get
(image ENV, ConfigMap, Secret, env, JOB_COMPLETION_INDEX, the Trainer's PET_* variables),
against a real S3-compatible server on loopback: one process for k8s/job.yaml, one per node,
all at once, for each multi-node manifest.
"""

import contextlib
import copy
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubeflow_trainer_api import models as published_models
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from job.errors import JobError
from job.preemption import PREEMPTED_EXIT_CODE
from requirements.sbom import locked
from tests.conftest import CNN_JOB, REPO, _free_port, process_tree
from tests.test_preemption import read_checkpoint
from tests.test_storage import push_mnist

BIN = Path(sys.executable).parent
FOLDERS = {  # one `kubectl apply -f` each
    "single": REPO / "k8s",
    "indexed-job": REPO / "k8s" / "multinode",  # for clusters with neither JobSet nor the Trainer
    "jobset": REPO / "k8s" / "jobset",
    "trainjob": REPO / "k8s" / "trainjob",
    "sweep": REPO / "k8s" / "sweep",  # an Indexed Job of independent trials, one GPU each
}
MULTI_NODE = ("indexed-job", "jobset", "trainjob")
MANIFESTS = sorted(path for folder in FOLDERS.values() for path in folder.glob("*.yaml"))
# What managed clusters run today, up to the newest release kubernetes-validate knows.
KUBERNETES_VERSIONS = [f"1.{minor}.0" for minor in range(31, 38)]
# Custom resources → their model in kubeflow-trainer-api, which is generated from the Trainer's
# published OpenAPI and carries JobSet v1alpha2 with it.
CUSTOM_RESOURCES = {
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): published_models.JobsetV1alpha2JobSet,
    ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"): published_models.TrainerV1alpha1TrainingRuntime,
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): published_models.TrainerV1alpha1TrainJob,
}
WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
LOCK = REPO / "requirements" / "constraints.txt"
SECRET_NAME = "cnn-job-credentials"  # what the README's `kubectl create secret` makes
CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"  # a venv of its own: `make checkov`
# The checks that do not apply here, each skipped in the file it concerns with its reason, and
# explained in k8s/README.md.
CHECKOV_SKIPS = {"CKV_K8S_21", "CKV_K8S_35", "CKV_K8S_43", "CKV_DOCKER_2", "CKV_DOCKER_7"}


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    """A linter from the test extra, installed beside this Python."""
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, timeout=120)


def load_folder(folder: Path) -> dict[tuple[str, str], dict]:
    """(kind, name) → object, for every manifest file in one `kubectl apply -f` folder."""
    objects = {}
    for path in sorted(folder.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                objects[document["kind"], document["metadata"]["name"]] = document
    return objects


def is_custom(document: dict) -> bool:
    return (document["apiVersion"], document["kind"]) in CUSTOM_RESOURCES


# ----------------------------------------------------------------------------------------------
# linters and schemas


def child_jobs(objects: dict) -> list[dict]:
    """The batch/v1 Jobs that a folder's JobSet, or the one the Trainer makes of its TrainJob,
    will have the API server create: they must pass its validation too."""
    jobset = the_jobset(objects)
    return [] if jobset is None else [
        {"apiVersion": "batch/v1", "kind": "Job",
         "metadata": {"name": f"{jobset['metadata']['name']}-{replicated['name']}-0",
                      **replicated["template"].get("metadata", {})},
         "spec": replicated["template"]["spec"]}
        for replicated in jobset["spec"]["replicatedJobs"]]


def test_kubernetes_objects_pass_strict_validation_on_every_minor_from_1_31(tmp_path):
    built_in = [path for path in MANIFESTS
                if not any(is_custom(doc) for doc in yaml.safe_load_all(path.read_text()))]
    for name, folder in FOLDERS.items():
        for job in child_jobs(load_folder(folder)):
            built_in.append(tmp_path / f"{name}-{job['metadata']['name']}.yaml")
            built_in[-1].write_text(yaml.safe_dump(job))
    assert len(built_in) == len(MANIFESTS) - 3 + 2  # less JobSet, TrainJob, runtime; plus 2 Jobs
    versions = [arg for version in KUBERNETES_VERSIONS for arg in ("-k", version)]
    result = tool("kubernetes-validate", "--strict", *versions, *map(str, built_in))
    assert result.returncode == 0, result.stdout + result.stderr
    objects = sum(1 for path in built_in for doc in yaml.safe_load_all(path.read_text()) if doc)
    for version in KUBERNETES_VERSIONS:  # every object of every file, every version: none skipped
        passed = re.findall(rf" passed for .* against version {version.rsplit('.', 1)[0]}$",
                            result.stdout, re.M)
        assert len(passed) == objects, (version, result.stdout)
    # Strict means strict: a misspelt field fails (without --strict it would pass).
    job = (REPO / "k8s" / "job.yaml").read_text()
    misspelt = write(tmp_path / "job.yaml", job.replace("ttlSecondsAfterFinished", "ttlSecondsAfterFinish"))
    result = tool("kubernetes-validate", "--strict", *versions, str(misspelt))
    assert result.returncode != 0 and "ttlSecondsAfterFinish" in result.stdout + result.stderr
    # And each version by its own schemas: before 1.35 a pod condition pattern needed `status`.
    no_status = write(tmp_path / "no-status.yaml", job.replace('status: "True"', ""))
    result = tool("kubernetes-validate", "--strict", "-k", "1.34.0", "-k", "1.35.0", str(no_status))
    assert re.search(r"version 1.34: spec.podFailurePolicy.rules.2.onPodConditions.0: 'status' is "
                     r"a required property\n.* passed for .* against version 1.35", result.stdout)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def not_kept(given, kept, path: tuple = ()) -> list[tuple]:
    """The paths of `given` that `kept` lacks or holds another value at."""
    if isinstance(given, dict) and isinstance(kept, dict):
        return [lost for key, value in given.items()
                for lost in ([(*path, key)] if key not in kept else not_kept(value, kept[key], (*path, key)))]
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        return [lost for i, (g, k) in enumerate(zip(given, kept)) for lost in not_kept(g, k, (*path, i))]
    return [] if given == kept else [path]


def value_at(document, path: tuple):
    for key in path:
        document = document[key]
    return document


def published_api_errors(document: dict) -> list[str]:
    """What the published API's model of a custom resource does not accept in `document`.

    The generated models are lenient: their from_dict reads only the fields they know (an
    unknown or misspelt one is dropped without a word) and puts "" for a required field left
    out. So the document is parsed and given back, and whatever did not survive the round trip
    (an unknown field), or came back as "" (a missing required one), is an error; a value of
    the wrong type fails the parse itself.
    """
    model = CUSTOM_RESOURCES[document["apiVersion"], document["kind"]]
    try:
        kept = model.from_dict(document).to_dict()
    except ValueError as error:  # pydantic's ValidationError is one
        return [str(error)]
    errors = []
    for path in not_kept(document, kept):
        where = ".".join(map(str, path))
        try:
            errors.append(f"{where}: {value_at(document, path)!r} came back as {value_at(kept, path)!r}")
        except (KeyError, IndexError):
            errors.append(f"unknown field {where}")
    return errors + [f"required field {'.'.join(map(str, path))} missing"
                     for path in not_kept(kept, document) if value_at(kept, path) == ""]


def test_jobset_and_trainer_objects_match_their_published_api():
    documents = [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text())
                 if is_custom(doc)]
    assert sorted(doc["kind"] for doc in documents) == ["JobSet", "TrainJob", "TrainingRuntime"]
    for document in documents:
        assert published_api_errors(document) == [], document["kind"]


@pytest.mark.parametrize(("file", "field", "misspelt", "error"), [
    ("jobset/jobset.yaml", "maxRestarts:", "maxRestart:",
     "unknown field spec.failurePolicy.maxRestart"),
    ("jobset/jobset.yaml", "onJobFailureMessagePatterns:", "onJobFailureMessagePattern:",
     "unknown field spec.failurePolicy.rules.0.onJobFailureMessagePattern"),
    ("jobset/jobset.yaml", "terminationGracePeriodSeconds:", "terminationGracePeriod:",
     "unknown field spec.replicatedJobs.0.template.spec.template.spec.terminationGracePeriod"),
    ("jobset/jobset.yaml", "- name: BadInput\n        action:", "- action:",
     "required field spec.failurePolicy.rules.0.name missing"),
    ("trainjob/runtime.yaml", "restartStrategy:", "restartstrategy:",
     "unknown field spec.template.spec.failurePolicy.restartstrategy"),
    ("trainjob/trainjob.yaml", "numProcPerNode:", "numProcsPerNode:",
     "unknown field spec.trainer.numProcsPerNode"),
    ("trainjob/trainjob.yaml", "numNodes: 2", 'numNodes: "2"', "Input should be a valid integer"),
])
def test_a_misspelt_or_mistyped_jobset_or_trainjob_is_rejected(file, field, misspelt, error):
    text = (REPO / "k8s" / file).read_text()
    assert field in text
    errors = published_api_errors(yaml.safe_load(text.replace(field, misspelt, 1)))  # the first
    assert any(error in line for line in errors), errors


def test_dockerfile_passes_hadolint():
    result = tool("hadolint", str(REPO / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_passes_on_the_manifests_and_the_dockerfile(tmp_path):
    if not CHECKOV.exists():
        pytest.skip(f"no checkov at {CHECKOV.relative_to(REPO)}: `make checkov` makes it (`make test` does)")
    # One folder, so that checkov links every pod to its NetworkPolicy: k8s/ as it is, the
    # Dockerfile, and the Jobs that the JobSet and the Trainer will make (checkov reads neither a
    # JobSet nor a TrainingRuntime, so their pods are checked in these).
    scanned = tmp_path / "scanned"
    shutil.copytree(REPO / "k8s", scanned / "k8s")
    shutil.copy(REPO / "Dockerfile", scanned)
    for name, folder in FOLDERS.items():
        for job in child_jobs(load_folder(folder)):
            write(scanned / f"{name}-child-job.yaml", yaml.safe_dump(job))
    result = subprocess.run(
        [str(CHECKOV), "--directory", str(scanned), "--framework", "kubernetes", "dockerfile",
         "--output", "json", "--compact", "--skip-download"],  # nothing from the internet
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "BC_SKIP_MAPPING": "true"})
    reports = {report["check_type"]: report["results"] for report in json.loads(result.stdout)}
    assert set(reports) == {"kubernetes", "dockerfile"}, result.stderr
    failed = [(check["check_id"], check["resource"])
              for results in reports.values() for check in results["failed_checks"]]
    assert failed == [] and result.returncode == 0, failed
    assert not any(results["parsing_errors"] for results in reports.values())
    # Every pod template was checked, and found behind a NetworkPolicy (CKV2_K8S_6).
    jobs = {the_job(load_folder(folder))["metadata"]["name"] for folder in FOLDERS.values()}
    passed = {(check["check_id"], check["resource"].split(".")[0], check["resource"].split(".")[2])
              for check in reports["kubernetes"]["passed_checks"]}
    for job in jobs:
        assert {("CKV_K8S_22", "Job", job), ("CKV2_K8S_6", "Pod", job)} <= passed, job
    # What is skipped is skipped for a reason, written where it applies, and explained.
    skipped = [check for results in reports.values() for check in results["skipped_checks"]]
    assert {check["check_id"] for check in skipped} == CHECKOV_SKIPS
    readme = (REPO / "k8s" / "README.md").read_text()
    for check in skipped:
        assert check["check_result"]["suppress_comment"] not in ("", None, "No comment provided")
        assert f"`{check['check_id']}`" in readme, check["check_id"]
    # CKV_DOCKER_7's reason holds: every base is the ARG, and its default is a version tag.
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", dockerfile, re.M | re.I)
    assert {base for base, _ in stages} - {name for _, name in stages} == {"${PYTHON_IMAGE}"}
    tag = re.search(r"^ARG PYTHON_IMAGE=[^:\s]+:(\S+)$", dockerfile, re.M)[1]
    assert tag != "latest"


def test_workflow_matches_github_schema():
    result = tool("check-jsonschema", "--builtin-schema", "vendor.github-workflows", str(WORKFLOW))
    assert result.returncode == 0, result.stdout + result.stderr


def test_lock_pins_the_runtime_dependencies_and_theirs():
    pins = {name: version for name, (version, _) in locked(LOCK.read_text()).items()}
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
    """(INSTRUCTION, arguments) of the stages the image is made of (the last, the stage it is
    FROM, and so on down to the base), in order; continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    instructions = [tuple(line.strip().split(None, 1)) for line in joined.splitlines() if line.strip()]
    starts = [i for i, (word, _) in enumerate(instructions) if word.upper() == "FROM"]
    stages = []  # (its base, its name or None, its instructions)
    for start, end in zip(starts, [*starts[1:], len(instructions)]):
        base, *name = re.split(r"\s+AS\s+", instructions[start][1], flags=re.I)
        stages.append((base, name[0] if name else None, instructions[start:end]))
    named = {name: (base, stage) for base, name, stage in stages if name}
    base, _, chain = stages[-1]
    while base in named:  # FROM an earlier stage: its instructions come first
        base, below = named[base]
        chain = below + chain
    return [(word.upper(), rest) for word, rest in chain]


def image_config() -> dict:
    """ENTRYPOINT, CMD, ENV, VOLUME, USER and WORKDIR of the image's stages; ENV values get the
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


ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
TRAINER_PORT = 29500  # the port the Trainer gives torchrun's rendezvous


def trainer_jobset(objects: dict, trainjob: dict) -> dict:
    """The JobSet the Kubeflow Trainer makes of a TrainJob on a torch runtime, as its pods see it
    (kubeflow/trainer, pkg/runtime/framework/plugins: jobset/builder.go and torch/torch.go).

    The runtime's JobSet template, named after the TrainJob; in the replicated Job labelled as
    the trainer, numNodes pods; in its container `node`, the trainer's image, command, args,
    env and resources, and torchrun's options as PET_* variables, rank 0 at
    <trainjob>-node-0-0.<trainjob>.
    """
    name, trainer = trainjob["metadata"]["name"], trainjob["spec"]["trainer"]
    ref = trainjob["spec"]["runtimeRef"]
    runtime = objects[ref["kind"], ref["name"]]  # the folder brings its runtime
    jobset = {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
              "metadata": {"name": name}, "spec": copy.deepcopy(runtime["spec"]["template"]["spec"])}
    (replicated,) = [job for job in jobset["spec"]["replicatedJobs"]
                     if job["template"]["metadata"]["labels"][ANCESTOR_LABEL] == "trainer"]
    nodes = trainer.get("numNodes", runtime["spec"]["mlPolicy"].get("numNodes", 1))
    replicated["replicas"] = 1
    replicated["template"]["spec"].update(parallelism=nodes, completions=nodes)
    (container,) = [c for c in replicated["template"]["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "node"]
    container.update({field: trainer[field] for field in ("image", "command", "args")
                      if field in trainer})
    if "resourcesPerNode" in trainer:
        container["resources"] = trainer["resourcesPerNode"]
    container["env"] = [*container.get("env", []), *trainer.get("env", []),
                        {"name": "PET_NNODES", "value": str(nodes)},
                        {"name": "PET_NPROC_PER_NODE", "value": str(trainer.get("numProcPerNode", "auto"))},
                        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
                        {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0-0.{name}"},
                        {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)}]
    container.setdefault("ports", []).append({"containerPort": TRAINER_PORT})
    return jobset


def the_jobset(objects: dict) -> dict | None:
    """The JobSet a folder runs as: its own, or the one the Trainer makes of its TrainJob."""
    for (kind, _), obj in objects.items():
        if kind == "JobSet":
            return obj
        if kind == "TrainJob":
            return trainer_jobset(objects, obj)
    return None


def the_job(objects: dict) -> dict:
    """The Job whose pods train: the folder's Job, or the one child Job of its JobSet."""
    jobset = the_jobset(objects)
    if jobset is None:
        (job,) = [obj for (kind, _), obj in objects.items() if kind == "Job"]
        return job
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated.get("replicas", 1) == 1
    return {"metadata": {"name": f"{jobset['metadata']['name']}-{replicated['name']}-0"},
            "spec": replicated["template"]["spec"]}


def the_container(job: dict) -> dict:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def pod_failure_action(job_spec: dict, exit_code: int, conditions=()) -> tuple[str, str]:
    """What the Job controller does with a failed pod: (action, the Job's failure message).

    The first podFailurePolicy rule that matches: FailJob (with the message the controller
    writes), FailIndex (that index fails, no message: the Job goes on unless maxFailedIndexes
    is passed), Ignore, or Count when none does (kubernetes, pkg/controller/job/
    pod_failure_policy.go). `exit_code` is the container's, 128+N for a kill by signal N.
    """
    container = the_container({"spec": job_spec})["name"]
    for index, rule in enumerate(job_spec.get("podFailurePolicy", {}).get("rules", [])):
        action, on_exit = rule["action"], rule.get("onExitCodes")
        if action == "FailIndex":  # the API server refuses it without per-index retries
            assert "backoffLimitPerIndex" in job_spec, "FailIndex needs backoffLimitPerIndex"
        if on_exit and on_exit.get("containerName", container) == container and exit_code != 0 \
                and (exit_code in on_exit["values"]) == (on_exit["operator"] == "In"):
            return action, (f"Container {container} for pod ns/pod failed with exit code "
                            f"{exit_code} matching {action} rule at index {index}"
                            if action == "FailJob" else "")
        for pattern in rule.get("onPodConditions", []):
            if pattern["type"] in conditions and pattern.get("status", "True") == "True":
                return action, (f"Pod ns/pod has condition {pattern['type']} matching {action} "
                                f"rule at index {index}" if action == "FailJob" else "")
    return "Count", ""


def jobset_action(jobset: dict, exit_code: int, conditions=()) -> str:
    """What the JobSet controller does when a pod of its child Job fails: the action of the
    first failurePolicy rule that matches the failed Job's reason and message, RestartJobSet if
    none does (kubernetes-sigs/jobset, pkg/controllers/failure_policy.go)."""
    (replicated,) = jobset["spec"]["replicatedJobs"]
    action, message = pod_failure_action(replicated["template"]["spec"], exit_code, conditions)
    if action == "FailJob":
        reason = "PodFailurePolicy"
    else:  # with no retries of its own, the Job fails on any counted failure
        assert action == "Count" and replicated["template"]["spec"]["backoffLimit"] == 0, action
        reason, message = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    for rule in jobset["spec"]["failurePolicy"].get("rules", []):
        patterns = rule.get("onJobFailureMessagePatterns", [])
        if reason in rule.get("onJobFailureReasons", [reason]) and (
                not patterns or any(re.search(pattern, message) for pattern in patterns)):
            return rule["action"]
    return "RestartJobSet"


# How a pod can end (the container's exit code, and the pod's conditions), and what each kind
# of manifest must do about it.
POD_ENDS = {
    "bad input": (2, ()),
    "preempted": (PREEMPTED_EXIT_CODE, ()),           # SIGTERM: the job checkpoints and exits 75
    "evicted": (PREEMPTED_EXIT_CODE, ("DisruptionTarget",)),
    "evicted, killed at the grace period": (128 + signal.SIGKILL, ("DisruptionTarget",)),
    "crashed, or lost a peer": (1, ()),
    "killed (out of memory)": (128 + signal.SIGKILL, ()),
}
JOB_ACTIONS = {  # per pod: the Job controller replaces pods one at a time
    "bad input": "FailJob", "preempted": "Ignore", "evicted": "Ignore",
    "evicted, killed at the grace period": "Ignore",
    "crashed, or lost a peer": "Count", "killed (out of memory)": "Count",
}
TRIAL_ACTIONS = {**JOB_ACTIONS, "bad input": "FailIndex"}  # a sweep's: that trial, not the rest
JOBSET_ACTIONS = {  # the whole set
    "bad input": "FailJobSet", "preempted": "RestartJobSetAndIgnoreMaxRestarts",
    "evicted": "RestartJobSetAndIgnoreMaxRestarts",
    "evicted, killed at the grace period": "RestartJobSetAndIgnoreMaxRestarts",
    "crashed, or lost a peer": "RestartJobSet", "killed (out of memory)": "RestartJobSet",
}


@pytest.mark.parametrize("name", FOLDERS)
def test_failures_are_handled_by_exit_code_and_pods_fit_a_gpu(name):
    objects = load_folder(FOLDERS[name])
    job, jobset = the_job(objects), the_jobset(objects)
    if jobset is None:  # the Job's own podFailurePolicy decides, pod by pod
        assert {end: pod_failure_action(job["spec"], *how)[0] for end, how in POD_ENDS.items()} \
            == (TRIAL_ACTIONS if name == "sweep" else JOB_ACTIONS)
        retries = job["spec"].get("backoffLimitPerIndex", job["spec"].get("backoffLimit"))
        assert retries > 0 and job["spec"]["podReplacementPolicy"] == "Failed"
        assert job["spec"]["ttlSecondsAfterFinished"] > 0
    else:  # the JobSet's failurePolicy decides, for every pod at once
        assert {end: jobset_action(jobset, *how) for end, how in POD_ENDS.items()} == JOBSET_ACTIONS
        policy = jobset["spec"]["failurePolicy"]
        assert policy["maxRestarts"] > 0 and policy["restartStrategy"] == "BlockingRecreate"
    pod = job["spec"]["template"]["spec"]
    container = the_container(job)
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 60
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    assert IMAGE["ENV"]["CNN_JOB_CACHE_DIR"] in mounts
    assert {"secretRef": {"name": SECRET_NAME}} in container["envFrom"]


# Pod Security Standards, the "restricted" profile: the volume types it allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}
# The image's ENV that names a folder the job writes to (the cache, W&B's and XDG folders).
WRITTEN_FOLDER = re.compile(r"^(TMPDIR|XDG_\w+_HOME|\w+_DIR)$")


def under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@pytest.mark.parametrize("name", FOLDERS)
def test_pods_are_restricted_and_write_only_to_their_volumes(name):
    objects = load_folder(FOLDERS[name])
    job = the_job(objects)
    pod, container = job["spec"]["template"]["spec"], the_container(job)
    # Pod Security "restricted": what its admission check looks at, for this one container.
    settings = {**pod["securityContext"], **container["securityContext"]}  # the container's win
    assert not any(pod.get(host) for host in ("hostNetwork", "hostPID", "hostIPC"))
    assert {kind for volume in pod["volumes"] for kind in volume if kind != "name"} <= RESTRICTED_VOLUMES
    assert not any(port.get("hostPort") for port in container.get("ports", []))
    assert settings["runAsNonRoot"] is True and settings["allowPrivilegeEscalation"] is False
    assert settings.get("runAsUser") == int(IMAGE["USER"])  # the image's user, not root
    assert settings["seccompProfile"]["type"] == "RuntimeDefault" and not settings.get("privileged")
    assert settings["capabilities"] == {"drop": ["ALL"]}
    # Beyond it: no API token, and a read-only root, so every folder the image writes to (its
    # WORKDIR, VOLUMEs, /tmp, the folders its ENV names) and /dev/shm must be a volume, bounded.
    assert pod["automountServiceAccountToken"] is False and settings["readOnlyRootFilesystem"] is True
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    writable = [mount["mountPath"] for mount in container["volumeMounts"] if not mount.get("readOnly")]
    written = [IMAGE["WORKDIR"], *IMAGE["VOLUME"], "/tmp", "/dev/shm",
               *(value for key, value in IMAGE["ENV"].items() if WRITTEN_FOLDER.match(key))]
    for folder in written:
        assert any(under(folder, mount) for mount in writable), folder
    assert all(volume["emptyDir"].get("sizeLimit") for volume in volumes.values() if "emptyDir" in volume)
    # A version tag, never latest, checked against the registry at every start.
    tag = container["image"].rpartition(":")[2]
    assert "/" not in tag and tag not in ("", "latest") and container["imagePullPolicy"] == "Always"
    # Guaranteed QoS: limits equal to the requests; as many torch threads as CPUs in the limit.
    resources = container["resources"]
    assert all(resources["limits"][kind] == resources["requests"][kind] for kind in ("cpu", "memory"))
    assert pod_process(objects, {}, {}, 0)[1]["OMP_NUM_THREADS"] == resources["limits"]["cpu"]


def test_every_manifest_runs_the_same_image_on_its_own_settings_and_checkpoints():
    images, config_maps, checkpoints = set(), [], set()
    for folder in FOLDERS.values():
        objects = load_folder(folder)
        container = the_container(the_job(objects))
        images.add(container["image"])
        # Applying one folder must not change another's settings (or sweep file)...
        config_maps += [name for kind, name in objects if kind == "ConfigMap"]
        (settings,) = [source["configMapRef"]["name"] for source in container["envFrom"]
                       if "configMapRef" in source]
        # ... nor resume its run: a run's checkpoints, or a sweep's, each trial's below it.
        uri = objects["ConfigMap", settings]["data"].get("CNN_JOB_CHECKPOINT_URI")
        checkpoints.add(uri or yaml.safe_load(sweep_file(objects)[1])["checkpoint_uri"])
    assert len(images) == 1, images
    assert len(set(config_maps)) == len(config_maps) and len(checkpoints) == len(FOLDERS)


def sweep_source(objects: dict) -> tuple[str, str, str]:
    """Where the pod's `cnn-job sweep run PATH` reads its sweep file: PATH, and the ConfigMap
    and key mounted, read-only, on PATH's folder."""
    job = the_job(objects)
    container = the_container(job)
    path = pod_process(objects, {}, {}, 0)[0][-1]
    folder, _, file_name = path.rpartition("/")
    (mount,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == folder]
    (volume,) = [volume for volume in job["spec"]["template"]["spec"]["volumes"]
                 if volume["name"] == mount["name"]]
    assert mount["readOnly"] is True
    keys = {item["path"]: item["key"] for item in volume["configMap"].get("items", [])}
    return path, volume["configMap"]["name"], keys.get(file_name, file_name)


def sweep_file(objects: dict) -> tuple[str, str]:
    """The sweep file the pod reads: its PATH, and its text from the ConfigMap."""
    path, config_map, key = sweep_source(objects)
    return path, objects["ConfigMap", config_map]["data"][key]


def test_sweep_runs_one_trial_per_index_of_the_sweep_file_it_mounts(tmp_path):
    objects = load_folder(FOLDERS["sweep"])
    job = the_job(objects)
    spec = job["spec"]
    argv, env = pod_process(objects, {}, {}, 5)
    path, text = sweep_file(objects)
    # `cnn-job sweep run FILE` without --trial: the trial is JOB_COMPLETION_INDEX, the pod's index.
    assert argv == ["cnn-job", "sweep", "run", path] and env["JOB_COMPLETION_INDEX"] == "5"
    assert spec["completionMode"] == "Indexed"
    # One index per trial, as `cnn-job sweep plan` counts them (the file checked as it would be).
    from job.sweep import load_plan

    sweep = yaml.safe_load(text)
    (tmp_path / "sweep.yaml").write_text(text)
    assert spec["completions"] == len(load_plan(str(tmp_path / "sweep.yaml")).trials) == 16
    assert 1 <= spec["parallelism"] <= spec["completions"]
    assert the_container(job)["resources"]["limits"]["nvidia.com/gpu"] == 1  # a trial per GPU
    assert sweep["dataset"] == "cifar10" and sweep["checkpoint_uri"].startswith("s3://")
    # Each trial retried on its own: bad input fails that trial only, a stop or an eviction is
    # not counted, and too many failed trials end the sweep.
    assert pod_failure_action(spec, 2)[0] == "FailIndex"
    assert pod_failure_action(spec, PREEMPTED_EXIT_CODE)[0] == "Ignore"
    assert pod_failure_action(spec, 1, ("DisruptionTarget",))[0] == "Ignore"
    assert spec["backoffLimitPerIndex"] > 0 and "backoffLimit" not in spec
    assert 0 < spec["maxFailedIndexes"] < spec["completions"]
    assert spec["podReplacementPolicy"] == "Failed"
    # Kueue is optional: its label is there to uncomment, not set.
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    assert re.search(r"^ +# kueue\.x-k8s\.io/queue-name: \S+$",
                     (FOLDERS["sweep"] / "job.yaml").read_text(), re.M)


@pytest.mark.parametrize("name", FOLDERS)
def test_every_training_container_says_how_it_ended(name):
    # The job's last line from /dev/termination-log, or the log's tail when it failed without
    # one: in `kubectl describe pod` and the pod's status.
    container = the_container(the_job(load_folder(FOLDERS[name])))
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_the_readme_exit_statuses_are_what_every_manifest_acts_on():
    # The README's table of exit statuses; what the code exits with; what each manifest does.
    rows = dict(re.findall(r"^\| (\d+) \| ([^|]+) \|$", (REPO / "README.md").read_text(), re.M))
    assert rows["2"].startswith("bad input") and JobError.exit_code == 2
    assert rows[str(PREEMPTED_EXIT_CODE)].startswith("preempted") and "resume" in rows["75"]
    for name, folder in FOLDERS.items():
        objects = load_folder(folder)
        jobset = the_jobset(objects)
        if jobset is None:  # never retried; retried, not counted
            assert pod_failure_action(the_job(objects)["spec"], 2)[0] in ("FailJob", "FailIndex")
            assert pod_failure_action(the_job(objects)["spec"], PREEMPTED_EXIT_CODE)[0] == "Ignore"
        else:
            assert jobset_action(jobset, 2) == "FailJobSet", name
            assert jobset_action(jobset, PREEMPTED_EXIT_CODE) == "RestartJobSetAndIgnoreMaxRestarts"


# What a meaning in the README's exit-status table asks of Kubernetes, by its first words: never
# retried ("fail"), retried without counting ("free"), or retried within the retry limit
# ("counted"); a pod that succeeded (0) is no failure.
README_MEANINGS = {"done": None, "bad input": "fail", "preempted": "free",
                   "unavailable": "counted", "a worker crashed": "counted",
                   "interrupted": "counted"}
ACTION_KINDS = {"FailJob": "fail", "FailIndex": "fail", "FailJobSet": "fail", "Ignore": "free",
                "RestartJobSetAndIgnoreMaxRestarts": "free", "Count": "counted",
                "RestartJobSet": "counted"}


def test_the_readme_exit_status_table_and_every_pod_failure_policy_agree():
    from job.errors import StorageUnavailable

    rows = dict(re.findall(r"^\| (\d+) \| ([^|]+) \|$", (REPO / "README.md").read_text(), re.M))
    wanted = {}
    for status, meaning in rows.items():
        kinds = [kind for lead, kind in README_MEANINGS.items() if meaning.startswith(lead)]
        assert len(kinds) == 1, f"README exit status {status}: what does {meaning!r} ask for?"
        wanted[int(status)] = kinds[0]
    # The statuses the code exits with mean what the table says.
    assert wanted[JobError.exit_code] == "fail" and wanted[PREEMPTED_EXIT_CODE] == "free"
    assert wanted.get(StorageUnavailable.exit_code) == "counted", "the README has no exit 69"
    for name, folder in FOLDERS.items():
        objects = load_folder(folder)
        job, jobset = the_job(objects), the_jobset(objects)
        rules = job["spec"]["podFailurePolicy"]["rules"]
        named = {status for rule in rules for status in rule.get("onExitCodes", {}).get("values", [])}
        assert named <= set(wanted), f"{name}: rules for statuses the README lacks: {named - set(wanted)}"
        # Storage out of reach is retried, counted: by a rule of its own, so that no broader
        # rule added later can fail the Job on it.
        assert StorageUnavailable.exit_code in named, name
        for status, kind in wanted.items():
            if kind is None:
                continue
            action = (jobset_action(jobset, status) if jobset
                      else pod_failure_action(job["spec"], status)[0])
            assert ACTION_KINDS[action] == kind, (name, status, action)


def test_indexed_job_finds_rank_0_through_the_headless_service():
    objects = load_folder(FOLDERS["indexed-job"])
    job = the_job(objects)
    (service,) = [obj for (kind, _), obj in objects.items() if kind == "Service"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    env = {item["name"]: item["value"] for item in the_container(job)["env"]}
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NNODES"]) >= 2
    assert spec["maxFailedIndexes"] == 0  # one index out of retries ends the run
    assert spec["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}  # rank 0 writes
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["subdomain"] == service["metadata"]["name"]
    # An Indexed Job's pod i is named and DNS-resolvable as <job>-i.<subdomain>.
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{pod['subdomain']}"


def test_jobset_finds_rank_0_through_its_own_service():
    jobset = load_folder(FOLDERS["jobset"])["JobSet", "cnn-job-jobset"]
    job = the_job(load_folder(FOLDERS["jobset"]))
    env = {item["name"]: item["value"] for item in the_container(job)["env"]}
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(env["NNODES"]) >= 2
    # JobSet names the child Job <jobset>-<replicated job>-<job index> and its headless Service
    # (the pods' subdomain) after itself, unless spec.network says otherwise.
    subdomain = jobset["spec"].get("network", {}).get("subdomain", jobset["metadata"]["name"])
    assert jobset["spec"].get("network", {}).get("enableDNSHostnames", True)
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{subdomain}"


def test_trainjob_runs_on_its_runtime_as_the_trainer_expects():
    objects = load_folder(FOLDERS["trainjob"])
    (trainjob,) = [obj for (kind, _), obj in objects.items() if kind == "TrainJob"]
    runtime = objects[trainjob["spec"]["runtimeRef"]["kind"], trainjob["spec"]["runtimeRef"]["name"]]
    assert trainjob["spec"]["runtimeRef"]["apiGroup"] == "trainer.kubeflow.org"
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    assert "torch" in runtime["spec"]["mlPolicy"]  # the plugin that sets PET_*
    job = the_job(objects)
    assert job["spec"]["completionMode"] == "Indexed"  # PET_NODE_RANK is the completion index
    assert job["spec"]["completions"] == trainjob["spec"]["trainer"]["numNodes"] >= 2
    assert trainjob["spec"]["trainer"]["numProcPerNode"] == 1  # not "auto": one GPU per pod
    # The Trainer sets these itself and refuses a TrainJob that sets them.
    assert not {item["name"] for item in trainjob["spec"]["trainer"].get("env", [])
                if item["name"].startswith("PET_")}


# ----------------------------------------------------------------------------------------------
# the manifests, run: kubelet's part done here by hand


def expand(text: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values; $$ escapes a $."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


def pod_process(objects: dict, secret: dict, overrides: dict, index: int | None = None):
    """The argv and environment the training container would start with, plus `overrides`.

    Environment order as in Kubernetes: the image's ENV, then envFrom (ConfigMap, Secret), then
    env (values, ConfigMap and Secret keys, the completion index), with JOB_COMPLETION_INDEX for
    an Indexed Job; `overrides` go on top of it all.
    """
    job = the_job(objects)
    container = the_container(job)
    config_maps = {name: obj["data"] for (kind, name), obj in objects.items() if kind == "ConfigMap"}
    env = dict(IMAGE["ENV"])
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]])
        else:
            assert source["secretRef"]["name"] == SECRET_NAME
            env.update(secret)
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == COMPLETION_INDEX
            env[item["name"]] = str(index)
        elif "configMapKeyRef" in source:
            key = source["configMapKeyRef"]
            env[item["name"]] = config_maps[key["name"]][key["key"]]
        else:
            assert source["secretKeyRef"]["name"] == SECRET_NAME
            env[item["name"]] = secret[source["secretKeyRef"]["key"]]
    if job["spec"].get("completionMode") == "Indexed":
        env["JOB_COMPLETION_INDEX"] = str(index)
    env.update(overrides)
    # Without `command` the image's ENTRYPOINT runs; `args` replace its CMD.
    argv = container.get("command", IMAGE["ENTRYPOINT"]) + container.get(
        "args", [] if "command" in container else IMAGE["CMD"])
    return [expand(arg, env) for arg in argv], env


def pod_volumes(objects: dict, pod_dir: Path) -> dict[str, Path]:
    """The training container's mount paths → a new empty folder each, standing in for its
    volume (the root filesystem is read-only: these are the only places a pod can write)."""
    container = the_container(the_job(objects))
    volumes = {mount["mountPath"]: pod_dir / "volumes" / mount["name"]
               for mount in container["volumeMounts"]}
    for folder in volumes.values():
        folder.mkdir(parents=True)
    return volumes


def on_volumes(path: str, volumes: dict[str, Path]) -> str:
    """A path in the container → the same place here, if a volume holds it (the deepest one)."""
    for mount in sorted(volumes, key=len, reverse=True):
        if under(path, mount):
            return str(volumes[mount]) + path[len(mount.rstrip("/")):]
    return path


def local_overrides(manifest_env: dict, s3, volumes: dict[str, Path], home: Path, run: str) -> dict:
    """What changes between a GPU cluster and this test, as env on top of the manifests'."""
    # The manifests train CIFAR-10 from s3:// through a configured endpoint: the overrides
    # below only point those same settings at this test's server and bucket.
    assert manifest_env["CNN_JOB_DATASET"] == "cifar10"
    for name in ("CNN_JOB_DATA_URI", "CNN_JOB_CHECKPOINT_URI"):
        assert manifest_env[name].startswith("s3://"), name
    assert manifest_env["AWS_ENDPOINT_URL"]
    return {
        # Every folder the settings name in the pod's volumes (the cache, ...) at its stand-in;
        # /tmp's through TMPDIR (in the pod, /tmp itself is the volume).
        **{name: on_volumes(value, volumes) for name, value in manifest_env.items()
           if on_volumes(value, volumes) != value},
        "TMPDIR": str(volumes["/tmp"]),
        # The home of the image's user is on the read-only root: a folder that must stay empty.
        "HOME": str(home),
        "AWS_ENDPOINT_URL": s3.endpoint,
        "CNN_JOB_DATA_URI": f"s3://{s3.bucket}/datasets",
        "CNN_JOB_CHECKPOINT_URI": f"s3://{s3.bucket}/runs/{run}",
        # Seconds on CPU instead of minutes on a GPU.
        "CNN_JOB_DATASET": "mnist", "CNN_JOB_EPOCHS": "1", "CNN_JOB_LIMIT_TRAIN": "640",
        "CNN_JOB_DEVICE": "cpu",
        "CNN_JOB_WANDB_MODE": "disabled", "WANDB_MODE": "disabled",  # no W&B account here
        # The image's venv and the base image's LANG; nothing else of this process's environment.
        "PATH": f"{BIN}:{os.environ['PATH']}", "LANG": "C.UTF-8",
    }


class Pod:
    """One container's process, started as kubelet would: its own session, output to a file."""

    def __init__(self, objects: dict, secret: dict, s3, tmp_path: Path, run: str,
                 index: int | None = None, **extra_env: str):
        # A new pod, a replacement too, starts with empty volumes: a folder of its own.
        name, attempt = f"{run}-pod{'' if index is None else index}", 0
        while (tmp_path / f"{name}-{attempt}").exists():
            attempt += 1
        self.dir = tmp_path / f"{name}-{attempt}"
        self.volumes, self.home = pod_volumes(objects, self.dir), self.dir / "home"
        self.home.mkdir()
        # The kubelet's empty /dev/termination-log, here: the container's termination message.
        self.termination_log = self.dir / "termination-log"
        self.termination_log.touch()
        _, manifest_env = pod_process(objects, secret, {}, index)
        overrides = {**local_overrides(manifest_env, s3, self.volumes, self.home, run),
                     "CNN_JOB_TERMINATION_LOG": str(self.termination_log), **extra_env}
        self.argv, self.env = pod_process(objects, secret, overrides, index)
        if self.argv[0] == "cnn-job":  # the image's console script is the venv's here
            self.argv[0] = str(CNN_JOB)
        self.log = self.dir / "log"
        with open(self.log, "ab") as log:
            # The image's WORKDIR, a volume too.
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                            cwd=on_volumes(IMAGE["WORKDIR"], self.volumes),
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check_it_wrote_only_to_volumes(self) -> None:
        """It wrote into the volumes its settings name (the cache), and not into its home
        folder, which is on the pod's read-only root."""
        cache = Path(on_volumes(IMAGE["ENV"]["CNN_JOB_CACHE_DIR"], self.volumes))
        assert any(cache.iterdir()), f"nothing in the cache volume {cache}"
        assert not any(self.home.iterdir()), list(self.home.rglob("*"))

    def wait(self, timeout_s: float = 240, hint: str = "") -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.argv} did not finish in {timeout_s} s{hint}:\n"
                        f"{self.output()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL to the container's processes, torchrun's workers (own process groups) included."""
        if self.process.poll() is not None:
            return
        for pid in process_tree(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()


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
    pod = Pod(load_folder(FOLDERS["single"]), secret, s3, tmp_path, "single")
    pods.append(pod)
    assert pod.argv[:2] == [str(CNN_JOB), "train"]
    assert pod.wait() == 0, pod.output()[-3000:]
    assert "training mnist (--net seed) on 1 × cpu" in pod.output()
    pod.check_it_wrote_only_to_volumes()
    state = read_checkpoint(s3, f"s3://{s3.bucket}/runs/single")
    assert state["world_size"] == 1 and state["epoch"] == 1 and state["step"] == 10  # 640 / 64
    assert re.fullmatch(rf"done: val_acc \d+\.\d\d% at step 10, model s3://{s3.bucket}/runs/single/"
                        r"step-000000010\.pt", pod.termination_log.read_text())


def start_pods(name: str, s3, secret, tmp_path, run, pods, **extra_env) -> list[Pod]:
    """Every pod of a multi-node manifest at once, as its Job (or JobSet) starts or restarts
    them, with rank 0's address and port, wherever the manifest sets them, on loopback."""
    objects = load_folder(FOLDERS[name])
    _, manifest_env = pod_process(objects, secret, {}, 0)
    port, rendezvous = str(_free_port()), {}
    for prefix in ("", "PET_"):  # MASTER_ADDR for the launcher's flags; PET_* from the Trainer
        if f"{prefix}MASTER_ADDR" in manifest_env:
            rendezvous.update({f"{prefix}MASTER_ADDR": "127.0.0.1", f"{prefix}MASTER_PORT": port})
    assert rendezvous, manifest_env
    started = [Pod(objects, secret, s3, tmp_path, run, index, **rendezvous, **extra_env)
               for index in range(the_job(objects)["spec"]["completions"])]
    pods.extend(started)
    return started


def wait_until_training(pod: Pod) -> None:
    deadline = time.monotonic() + 180
    while "training mnist (--net seed) on 2" not in pod.output():
        assert time.monotonic() < deadline and pod.process.poll() is None, pod.output()[-3000:]
        time.sleep(0.1)


@pytest.mark.parametrize("name", MULTI_NODE)
def test_multi_node_manifest_trains_as_two_ranks(name, s3, secret, data_dir, tmp_path, pods):
    push_mnist(s3, data_dir)
    started = start_pods(name, s3, secret, tmp_path, name, pods)
    assert len(started) == 2
    for pod in started:  # no shell in between: `cnn-job launch` is the container's process
        assert pod.argv[:2] == [str(CNN_JOB), "launch"] and pod.argv[-2:] == ["--", "train"]
    for pod in started:
        assert pod.wait() == 0, pod.output()[-3000:]
    assert "training mnist (--net seed) on 2 × cpu" in started[0].output()
    for pod in started:
        pod.check_it_wrote_only_to_volumes()
    state = read_checkpoint(s3, f"s3://{s3.bucket}/runs/{name}")
    assert state["world_size"] == 2 and state["epoch"] == 1 and state["step"] == 5  # 320 / 64


# 25 steps per rank, a checkpoint every 5: time to be stopped mid-run, and a step to resume at.
MORE_STEPS = {"CNN_JOB_LIMIT_TRAIN": "3200", "CNN_JOB_CHECKPOINT_EVERY_STEPS": "5"}
ALL_STEPS = 25


@pytest.mark.parametrize("name", ["indexed-job", "jobset"])
def test_preempted_pod_stops_every_rank_with_75_and_the_set_resumes(
        name, s3, secret, data_dir, tmp_path, pods):
    push_mnist(s3, data_dir)
    run = f"pre-{name}"  # the parametrized tests' names, cut to a bucket name, are the same
    rank_0, rank_1 = start_pods(name, s3, secret, tmp_path, run, pods, **MORE_STEPS)
    wait_until_training(rank_0)
    time.sleep(1)
    rank_1.process.send_signal(signal.SIGTERM)  # kubelet signals the container's PID 1
    # Every rank stops after the same step; rank 0 checkpoints; every pod says "retry me".
    statuses = [pod.wait(timeout_s=90) for pod in (rank_1, rank_0)]
    assert statuses == [PREEMPTED_EXIT_CODE] * 2, rank_0.output()[-3000:]
    assert "Traceback" not in rank_0.output() + rank_1.output()
    stopped = read_checkpoint(s3, f"s3://{s3.bucket}/runs/{run}")
    assert stopped["world_size"] == 2 and 0 < stopped["step"] < ALL_STEPS
    assert rank_0.termination_log.read_text() == (
        f"stopped at epoch 1, step {stopped['step']}: run the same command to resume")
    objects = load_folder(FOLDERS[name])
    jobset = the_jobset(objects)
    if jobset is None:  # each pod replaced, none counted
        assert {pod_failure_action(the_job(objects)["spec"], code)[0] for code in statuses} == {"Ignore"}
    else:  # the set restarted, not counted
        assert {jobset_action(jobset, code) for code in statuses} == {"RestartJobSetAndIgnoreMaxRestarts"}
    retried = start_pods(name, s3, secret, tmp_path, run, pods, **MORE_STEPS)
    for pod in retried:
        assert pod.wait() == 0, pod.output()[-3000:]
    assert f"resumed from s3://{s3.bucket}/runs/{run}/step-{stopped['step']:09d}.pt" in (
        retried[0].output().replace("\n", ""))
    final = read_checkpoint(s3, f"s3://{s3.bucket}/runs/{run}")
    assert final["world_size"] == 2 and final["step"] == ALL_STEPS


def test_jobset_restarts_every_pod_when_one_is_killed(s3, secret, data_dir, tmp_path, pods):
    push_mnist(s3, data_dir)
    settings = {**MORE_STEPS, "CNN_JOB_COLLECTIVE_TIMEOUT_S": "30"}
    rank_0, rank_1 = start_pods("jobset", s3, secret, tmp_path, "crash", pods, **settings)
    wait_until_training(rank_0)
    deadline = time.monotonic() + 120  # until a checkpoint to come back to
    while not any(key.endswith(".pt") for key in s3_keys(s3, "runs/crash/")):
        assert time.monotonic() < deadline and rank_0.process.poll() is None, rank_0.output()
        time.sleep(0.2)
    rank_1.kill()  # a lost node: SIGKILL to every process of the pod, no warning
    assert rank_1.process.returncode == -signal.SIGKILL
    # The peer does not wait for a timeout: its worker fails on the dropped connection (or
    # after CNN_JOB_COLLECTIVE_TIMEOUT_S), and the pod says "crashed" in one line.
    assert rank_0.wait(timeout_s=90) == 1, rank_0.output()[-3000:]
    assert "ChildFailedError" not in rank_0.output()
    jobset = the_jobset(load_folder(FOLDERS["jobset"]))
    assert jobset_action(jobset, 128 + signal.SIGKILL) == jobset_action(jobset, 1) == "RestartJobSet"
    stopped = read_checkpoint(s3, f"s3://{s3.bucket}/runs/crash")
    assert 0 < stopped["step"] < ALL_STEPS
    retried = start_pods("jobset", s3, secret, tmp_path, "crash", pods, **settings)
    for pod in retried:
        assert pod.wait() == 0, pod.output()[-3000:]
    assert f"resumed from s3://{s3.bucket}/runs/crash/step-{stopped['step']:09d}.pt" in (
        retried[0].output().replace("\n", ""))
    assert read_checkpoint(s3, f"s3://{s3.bucket}/runs/crash")["step"] == ALL_STEPS


def s3_keys(s3, prefix: str) -> list[str]:
    listing = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    return [item["Key"] for item in listing.get("Contents", [])]


@pytest.mark.parametrize("name", MULTI_NODE)
def test_bad_input_fails_the_run_at_once(name, s3, secret, data_dir, tmp_path, pods):
    # The ConfigMap names a dataset folder the bucket does not have: a retry would fail alike.
    started = start_pods(name, s3, secret, tmp_path, f"bad-{name}", pods,
                         CNN_JOB_DATA_URI=f"s3://{s3.bucket}/no-datasets-here")
    statuses = [pod.wait(timeout_s=120) for pod in started]
    assert statuses == [2, 2], [pod.output()[-2000:] for pod in started]
    assert "Traceback" not in started[0].output()
    # Rank 0's one line is pod 0's termination message; the other pods write none, so that
    # Kubernetes shows their log's last lines (FallbackToLogsOnError), ending in the same line.
    assert started[0].termination_log.read_text().startswith("error: ")
    assert started[0].termination_log.read_text() in started[0].output()
    assert started[1].termination_log.read_text() == ""
    objects = load_folder(FOLDERS[name])
    jobset = the_jobset(objects)
    if jobset is None:
        assert pod_failure_action(the_job(objects)["spec"], 2)[0] == "FailJob"
    else:
        assert jobset_action(jobset, 2) == "FailJobSet"
