"""The Pods that a manifest folder's controllers create, for `podman kube play` to run.

`podman kube play` runs Pods, not the Jobs, JobSets and TrainJobs that `kubectl apply -f k8s/...`
hands to their controllers; this module is the controllers' step, and the only translation of
Kubernetes that the image tests own. Each Pod is the folder's pod template plus what its
controllers add, as their sources state:

- the Job controller (kubernetes, pkg/controller/job: indexed_job_utils.go, job_controller.go):
  the labels `batch.kubernetes.io/job-name` and `job-name`; for pod i of an Indexed Job the
  annotation and label `batch.kubernetes.io/job-completion-index: i`, `JOB_COMPLETION_INDEX`
  from that annotation (downward API) in every container, the hostname `<job>-<i>` unless the
  template sets one, and the name `<job>-<i>-<5 random characters>` (generateName);
- JobSet (kubernetes-sigs/jobset, pkg/controllers/jobset_controller.go: constructJob,
  labelAndAnnotateObject): the child Job `<jobset>-<replicated job>-<job index>`; its labels and
  annotations `jobset.sigs.k8s.io/jobset-name`, `replicatedjob-name`, `replicatedjob-replicas`,
  `job-index`, `restart-attempt`; the subdomain `spec.network.subdomain`, else the JobSet's name
  (`enableDNSHostnames` defaults to true), which is also its headless Service. No variables;
- the Kubeflow Trainer (kubeflow/trainer, pkg/runtime/framework/plugins/torch/torch.go): the
  JobSet it builds from the runtime and the TrainJob, `PET_NNODES`, `PET_NPROC_PER_NODE`,
  `PET_NODE_RANK` (the completion index), `PET_MASTER_ADDR` and `PET_MASTER_PORT` in the
  container `node` (tests/test_deploy.py's trainer_jobset).

Then `on_this_host` gives each Pod what a kubelet and the cluster's DNS would, and kube play
(podman 4.3) does not: `$(VAR)` in command and args expanded from the container's environment,
the kubelet's /etc/hosts (every pod of the set answers on the host's loopback, as the pods share
the host's network: `kube play --network host`, where a containerPort, which opens nothing on a
node, cannot be published), each pod's own emptyDirs, the kubelet's termination-message file,
and the image built here in place of the registry's.
"""

from __future__ import annotations

import copy
import secrets
import string
from pathlib import Path

from tests.test_deploy import expand, pod_process, the_container, the_job, the_jobset

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
JOBSET = "jobset.sigs.k8s.io/"


def controller_pods(objects: dict) -> list[dict]:
    """Every Pod the folder's controllers create at first: one per completion index of the Job
    (of the JobSet's one child Job), or the Job's one pod."""
    job, jobset = the_job(objects), the_jobset(objects)
    name, spec = job["metadata"]["name"], job["spec"]
    template = copy.deepcopy(spec["template"])
    metadata = template.setdefault("metadata", {})
    labels, annotations = metadata.setdefault("labels", {}), metadata.setdefault("annotations", {})
    if jobset is not None:
        (replicated,) = jobset["spec"]["replicatedJobs"]
        for added in (labels, annotations):
            added.update({f"{JOBSET}jobset-name": jobset["metadata"]["name"],
                          f"{JOBSET}replicatedjob-name": replicated["name"],
                          f"{JOBSET}replicatedjob-replicas": str(replicated.get("replicas", 1)),
                          f"{JOBSET}job-index": "0", f"{JOBSET}restart-attempt": "0"})
        network = jobset["spec"].get("network", {})
        if network.get("enableDNSHostnames", True):
            template["spec"]["subdomain"] = network.get("subdomain", jobset["metadata"]["name"])
    labels.update({"batch.kubernetes.io/job-name": name, "job-name": name})
    if spec.get("completionMode") != "Indexed":
        return [pod_of(template, f"{name}-{random_suffix()}")]
    pods = []
    for index in range(spec.get("completions", 1)):
        pod = pod_of(template, f"{name}-{index}-{random_suffix()}")
        pod["metadata"]["labels"][COMPLETION_INDEX] = str(index)
        pod["metadata"]["annotations"][COMPLETION_INDEX] = str(index)
        for container in pod["spec"]["containers"]:
            container.setdefault("env", []).append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}})
        pod["spec"].setdefault("hostname", f"{name}-{index}")
        pods.append(pod)
    return pods


def pod_of(template: dict, name: str) -> dict:
    pod = {"apiVersion": "v1", "kind": "Pod", **copy.deepcopy(template)}
    pod["metadata"]["name"] = name
    return pod


def random_suffix() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))


def completion_index(pod: dict) -> int | None:
    index = pod["metadata"]["annotations"].get(COMPLETION_INDEX)
    return None if index is None else int(index)


def dns_names(pod: dict) -> list[str]:
    """The names a pod answers to: `<hostname>.<subdomain>` (the headless Service's DNS) and
    its hostname."""
    spec = pod["spec"]
    hostname = spec.get("hostname", pod["metadata"]["name"])
    return [f"{hostname}.{spec['subdomain']}", hostname] if "subdomain" in spec else [hostname]


def hosts_file(pods: list[dict]) -> str:
    """The /etc/hosts of the set's pods on one host's network: each of them on 127.0.0.1."""
    return "".join(f"127.0.0.1\t{' '.join(names)}\n"
                   for names in [["localhost"], *(dns_names(pod) for pod in pods)])


def on_this_host(pod: dict, objects: dict, secret: dict, image: str, hosts: Path,
                 termination_log: Path) -> dict:
    """`pod` as kube play runs it here. `objects` are the folder's, with the ConfigMaps as kube
    play is given them: their variables, the Secret's (`secret`) and the pod's own expand
    `$(VAR)` in command and args as the kubelet would. `hosts` and `termination_log`, files here,
    become the container's /etc/hosts and terminationMessagePath (world-writable, as the kubelet
    makes it for a container of any UID)."""
    pod = copy.deepcopy(pod)
    (container,) = pod["spec"]["containers"]
    assert container["name"] == the_container(the_job(objects))["name"]
    _, env = pod_process(objects, secret, {}, completion_index(pod))
    for field in ("command", "args"):
        if field in container:
            container[field] = [expand(word, env) for word in container[field]]
    container.update(image=image, imagePullPolicy="Never")
    # A containerPort opens nothing on a node (it names a port); kube play 4.3 publishes it on
    # the host, which host networking refuses.
    assert not any(port.get("hostPort") for port in container.get("ports", []))
    container.pop("ports", None)
    # kube play makes an emptyDir a volume named as in the pod spec, which every pod using that
    # name would share: here each pod gets its own, as it does on a node.
    for volume in pod["spec"]["volumes"]:
        if "emptyDir" in volume:
            for mount in container["volumeMounts"]:
                if mount["name"] == volume["name"]:
                    mount["name"] = f"{pod['metadata']['name']}-{volume['name']}"
            volume["name"] = f"{pod['metadata']['name']}-{volume['name']}"
    files = {"kubelet-hosts": (hosts, "/etc/hosts", True),
             "kubelet-termination-log": (termination_log, container.get(
                 "terminationMessagePath", "/dev/termination-log"), False)}
    for name, (path, mount_path, read_only) in files.items():
        pod["spec"]["volumes"].append({"name": name, "hostPath": {"path": str(path), "type": "File"}})
        container["volumeMounts"].append({"name": name, "mountPath": mount_path,
                                          "readOnly": read_only})
    return pod
