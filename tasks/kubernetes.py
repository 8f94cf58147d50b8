"""Multi-node training on Kubernetes: render an Indexed Job and a headless Service, launch, watch, clean up.

Plain functions over the official ``kubernetes`` client (no Prefect), plus one thin Prefect
task, ``launch_distributed_task``, for the ``scale`` flow. Where the flow run itself runs in a
pod of the ``k8s-gpu`` work pool, it uses that pod's ServiceAccount (``dlm-flow-run``,
k8s/base/rbac.yaml); elsewhere the usual kubeconfig.

Topology for N pods of G GPUs each (one torchrun per pod, G ranks per torchrun)::

    Service <name>    headless (clusterIP None), selects the job's pods, publishes them
                      before they are ready: rank 0's name must resolve while it starts
    Job <name>        completionMode Indexed, completions = parallelism = N, backoffLimit 0
      pod i           hostname <name>-i, subdomain <name>  ->  <name>-i.<name>.<ns>.svc
                      NODE_RANK = i from the completion-index annotation (downward API)
      torchrun --nnodes N --nproc-per-node G --node-rank $(NODE_RANK)
               --master-addr <name>-0.<name>.<ns>.svc --master-port 29500 -m <module> <args>
    N = 1             torchrun --standalone: no Service, no DNS

World size = N * G; global rank = node rank * G + local rank (torchrun sets RANK, LOCAL_RANK,
WORLD_SIZE, which ``dlm.runtime`` reads). One lost rank stalls every collective, so the group
fails as a whole (backoffLimit 0) and is relaunched whole; an evicted or preempted pod raises
``PodEvicted``, which the task retries (training resumes from its checkpoint), while a crash
raises ``JobFailed``, which it does not: a bug does not get better by running again.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from prefect import get_run_logger, task
from pydantic import BaseModel, Field, field_validator

from dlm_factory.tasks.retry import retry_on

INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_LABEL = "dlm-factory/job"  # on the Job, its pods and its Service: the selector of all three
CONTAINER = "trainer"
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# A Job's pods are named <job>-<index>-<5 random>, their hostname <job>-<index>, both <= 63
# characters: 47 leaves room for a 3-digit index. The task appends 7 characters per attempt
# (attempt_name) to at most 40 of the name it is given.
MAX_NAME = 47
# Pod states that do not resolve by waiting: fail at once instead of at the pending deadline.
_FATAL_WAITING = {"InvalidImageName", "CreateContainerConfigError", "ErrImageNeverPull", "CreateContainerError"}


class DistributedJobSpec(BaseModel):
    """One multi-node training launch: N pods of G GPUs, each running torchrun on ``module``."""

    name: str = Field(description=f"Job and Service name (DNS label, <= {MAX_NAME} characters)")
    namespace: str = Field("dlm-factory", description="namespace of the job (where dlm-flow-run may create jobs)")
    image: str = Field(description="the trainer image (images/trainer), tagged with the git SHA")
    module: str = Field("dlm_factory.cli", description="Python module every rank runs (torchrun -m)")
    args: list[str] = Field(default_factory=list, description="arguments after the module")
    nodes: int = Field(1, ge=1, le=256, description="pods (N); more than 1 rendezvous through the headless Service")
    gpus_per_node: int = Field(1, ge=0, le=16, description="GPUs per pod (G), one rank each; 0 = one CPU rank per pod")
    gpu_type: str | None = Field(None, description="node label nvidia.com/gpu.product (GPU operator); None = any")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="GPU nodes are usually tainted so that only GPU work lands there")
    cpu: str = Field("8", description="CPU request per pod")
    memory: str = Field("64Gi", description="memory request = limit per pod, /dev/shm included")
    shm_size: str = Field("16Gi", description="/dev/shm (memory emptyDir): NCCL and DataLoader workers need more "
                                              "than the runtime's 64 MiB")
    cache_claim: str | None = Field(None, description="PVC mounted at /cache; None = node-local emptyDir")
    cache_size: str = Field("200Gi", description="size limit of the emptyDir cache")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment (no secrets: use the Secret)")
    object_store_secret: str | None = Field("dlm-object-store", description="Secret whose keys become env "
                                                                            "(object-store credentials)")
    config_map: str | None = Field("dlm-factory-config", description="ConfigMap whose keys become env (settings)")
    service_account: str = Field("dlm-trainer", description="pod identity; dlm-trainer has no API access")
    master_port: int = Field(29500, ge=1024, le=65535, description="torchrun rendezvous port on pod 0")
    collective_timeout_min: int = Field(
        60, ge=1, description="NCCL collective timeout: the first step compiles kernels and a checkpoint save of a "
                              "large model can keep rank 0 away from collectives for longer than the default 10 min")
    ttl_seconds_after_finished: int = Field(3600, ge=0, description="Kubernetes deletes a job left behind "
                                                                   "(a killed launcher) after this long")
    active_deadline_seconds: int | None = Field(None, ge=1, description="hard wall-clock limit of the job")

    @field_validator("name")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        if len(v) > MAX_NAME or not _NAME.match(v):
            raise ValueError(f"{v!r}: lowercase letters, digits and '-', starting with a letter, <= {MAX_NAME} chars")
        return v

    @property
    def procs_per_node(self) -> int:
        """Ranks per pod: one per GPU, or one CPU rank."""
        return max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def master_addr(self) -> str:
        """Pod 0's stable DNS name through the headless Service (hostname.subdomain.namespace.svc)."""
        return f"{self.name}-0.{self.name}.{self.namespace}.svc" if self.nodes > 1 else "127.0.0.1"

    @property
    def selector(self) -> str:
        return f"{JOB_LABEL}={self.name}"


# --- rendering -------------------------------------------------------------------------------------------


def _labels(spec: DistributedJobSpec) -> dict[str, str]:
    # component=trainer is what the NetworkPolicy trainer-peers opens between pods.
    return {"app.kubernetes.io/part-of": "dlm-factory", "app.kubernetes.io/component": "trainer",
            JOB_LABEL: spec.name}


def launcher_command(spec: DistributedJobSpec) -> list[str]:
    """torchrun with the rendezvous of the topology in the module docstring.

    ``$(NODE_RANK)`` is expanded by the kubelet from the container's env, which the downward API
    fills from the pod's completion index.
    """
    cmd = ["torchrun", "--nnodes", str(spec.nodes), "--nproc-per-node", str(spec.procs_per_node)]
    if spec.nodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += ["--node-rank", "$(NODE_RANK)", "--master-addr", spec.master_addr,
                "--master-port", str(spec.master_port), "--rdzv-backend", "static"]
    return cmd + ["-m", spec.module, *spec.args]


def _env(spec: DistributedJobSpec) -> list[dict[str, Any]]:
    timeout_s = str(spec.collective_timeout_min * 60)
    fixed = {
        "FACTORY_HOME": "/cache/factory",
        "HF_HOME": "/cache/huggingface",
        "FACTORY_DEVICE": "auto",
        "PYTHONUNBUFFERED": "1",
        # Collective timeout, read by deepspeed.init_distributed (minutes).
        "DEEPSPEED_TIMEOUT": str(spec.collective_timeout_min),
        # A hung collective becomes an error (and the pod fails) instead of a silent stall ...
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        # ... but not before the collective timeout: the watchdog's heartbeat monitor would
        # otherwise kill the process first (its default is 8 min).
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": timeout_s,
        # eth0 is the pod network; NCCL may otherwise pick an interface the peer cannot reach.
        "NCCL_SOCKET_IFNAME": "eth0",
        "NCCL_DEBUG": "WARN",
    }
    env = [{"name": k, "value": v} for k, v in {**fixed, **spec.env}.items()]
    env.append({"name": "NODE_RANK",
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}})
    return env


def render_service(spec: DistributedJobSpec) -> dict[str, Any] | None:
    """The headless Service that gives pod i the DNS name <name>-i.<name>.<ns>.svc (None for one pod)."""
    if spec.nodes == 1:
        return None
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": _labels(spec)},
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_LABEL: spec.name},
            # Pods have no readiness probe to pass before rank 0 must be reachable by name.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": spec.master_port, "targetPort": spec.master_port}],
        },
    }


def render_job(spec: DistributedJobSpec) -> dict[str, Any]:
    """The Indexed Job: N pods, each one torchrun with G ranks (see the module docstring)."""
    resources: dict[str, dict[str, str]] = {"requests": {"cpu": spec.cpu, "memory": spec.memory},
                                            "limits": {"memory": spec.memory}}
    if spec.gpus_per_node:
        gpus = str(spec.gpus_per_node)  # a quantity: strict validation wants a string
        resources["requests"]["nvidia.com/gpu"] = gpus
        resources["limits"]["nvidia.com/gpu"] = gpus
    env_from = []
    if spec.config_map:
        env_from.append({"configMapRef": {"name": spec.config_map, "optional": True}})
    if spec.object_store_secret:
        env_from.append({"secretRef": {"name": spec.object_store_secret, "optional": True}})
    cache = ({"persistentVolumeClaim": {"claimName": spec.cache_claim}} if spec.cache_claim
             else {"emptyDir": {"sizeLimit": spec.cache_size}})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": spec.service_account,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "tolerations": spec.tolerations,
        "containers": [{
            "name": CONTAINER,
            "image": spec.image,
            "command": launcher_command(spec),
            "env": _env(spec),
            "envFrom": env_from,
            "ports": [{"name": "rendezvous", "containerPort": spec.master_port}],
            "resources": resources,
            "securityContext": {"allowPrivilegeEscalation": False, "privileged": False,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "cache", "mountPath": "/cache"}],
        }],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
                    {"name": "cache", **cache}],
    }
    if spec.nodes > 1:
        pod_spec["subdomain"] = spec.name  # with the Indexed Job's hostname <name>-i: a DNS name per pod
    if spec.gpu_type:
        pod_spec["nodeSelector"] = {"nvidia.com/gpu.product": spec.gpu_type}
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": spec.nodes,
        "parallelism": spec.nodes,
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
        "template": {"metadata": {"labels": _labels(spec)}, "spec": pod_spec},
    }
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": _labels(spec)},
            "spec": job_spec}


def render(spec: DistributedJobSpec) -> list[dict[str, Any]]:
    """Every object one launch creates, in creation order (Service first: pod 0's name must resolve)."""
    service = render_service(spec)
    return ([service] if service else []) + [render_job(spec)]


# --- launching and watching ------------------------------------------------------------------------------


class LaunchError(RuntimeError):
    """The distributed job did not complete."""


class JobFailed(LaunchError):
    """A pod of the job failed: ``pod``, ``reason``, ``exit_code`` and the tail of its log."""

    def __init__(self, message: str, pod: str = "", reason: str = "", exit_code: int | None = None,
                 log_tail: str = ""):
        super().__init__(message + (f"\n--- last lines of {pod} ---\n{log_tail}" if log_tail else ""))
        self.pod, self.reason, self.exit_code, self.log_tail = pod, reason, exit_code, log_tail


class PodEvicted(JobFailed):
    """A pod was evicted or preempted: not the code's fault, so relaunching (from the checkpoint) may succeed."""


class LaunchTimeout(LaunchError):
    """The job did not finish (or a pod did not start) within the allotted time."""


class JobResult(BaseModel):
    """A completed launch."""

    name: str
    namespace: str
    nodes: int
    world_size: int
    pods: list[str]
    seconds: float
    log_lines: int


def api_client_from_environment():
    """The in-cluster identity when running in a pod, else the current kubeconfig context.

    $KUBECONFIG is read now: the client reads it once, when it is imported.
    """
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return client.ApiClient()


def launch_distributed(spec: DistributedJobSpec, api_client=None, *, timeout_s: float | None = None,
                       pending_timeout_s: float = 900, watch_timeout_s: int = 300,
                       on_log: Callable[[str], None] = print, keep: bool = False) -> JobResult:
    """Create the Service and the Job, stream rank 0's log, wait for every index, then delete both.

    Raises ``PodEvicted`` (retryable), ``JobFailed`` (with the failed pod's exit code and log tail)
    or ``LaunchTimeout`` (``timeout_s`` for the whole job; ``pending_timeout_s`` for a pod to start:
    image pulls and GPU node scale-up take minutes). The Job is deleted with its pods in every case
    unless ``keep`` (for debugging a failure with kubectl).
    """
    api_client = api_client or api_client_from_environment()
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    started = time.monotonic()
    service, job = render_service(spec), render_job(spec)
    created: list[str] = []
    logs = _LogStreamer(core, spec, on_log)
    try:
        if service:
            core.create_namespaced_service(spec.namespace, service)
            created.append("service")
        batch.create_namespaced_job(spec.namespace, job)
        created.append("job")
        on_log(f"launched job {spec.namespace}/{spec.name}: {spec.nodes} pod(s) x {spec.procs_per_node} "
               f"rank(s), world size {spec.world_size}")
        pods = _watch_until_done(core, spec, logs, started, timeout_s, pending_timeout_s, watch_timeout_s)
        logs.stop()  # rank 0 has exited: its log drains to the end
    finally:
        if not keep:
            _cleanup(core, batch, spec, created, on_log)
        logs.stop(timeout_s=5)  # after a failure rank 0 may still run until the cleanup ends it
    return JobResult(name=spec.name, namespace=spec.namespace, nodes=spec.nodes, world_size=spec.world_size,
                     pods=pods, seconds=round(time.monotonic() - started, 3), log_lines=logs.lines)


def _watch_until_done(core, spec: DistributedJobSpec, logs: _LogStreamer, started: float,
                      timeout_s: float | None, pending_timeout_s: float, watch_timeout_s: int) -> list[str]:
    """Watch the job's pods until every completion index has succeeded; raise on the first failure.

    Each watch request is bounded (``watch_timeout_s``, and the time left) and resumes from the
    last resource version seen, so the loop ends by a result, a failure or a deadline.
    """
    succeeded: dict[int, str] = {}
    started_pods: set[int] = set()
    resource_version: str | None = None
    while True:
        elapsed = time.monotonic() - started
        if timeout_s is not None and elapsed > timeout_s:
            raise LaunchTimeout(f"job {spec.name}: not finished after {timeout_s:.0f} s "
                                f"({len(succeeded)}/{spec.nodes} pods done)")
        waiting_for_start = len(started_pods) < spec.nodes
        if waiting_for_start and elapsed > pending_timeout_s:
            raise LaunchTimeout(f"job {spec.name}: only {len(started_pods)}/{spec.nodes} pods started "
                                f"within {pending_timeout_s:.0f} s (no free GPU node? image pull?)")
        limits = [watch_timeout_s]
        if timeout_s is not None:
            limits.append(timeout_s - elapsed)
        if waiting_for_start:
            limits.append(pending_timeout_s - elapsed)
        limit = max(1, math.ceil(min(limits)))
        w = watch.Watch()
        kwargs: dict[str, Any] = {"label_selector": spec.selector, "timeout_seconds": limit,
                                  "_request_timeout": limit + 30}
        if resource_version:
            kwargs["resource_version"] = resource_version
        try:
            for event in w.stream(core.list_namespaced_pod, spec.namespace, **kwargs):
                pod = event["object"]
                resource_version = pod.metadata.resource_version or resource_version
                index = _index(pod)
                if index is None or index in succeeded:
                    continue
                name, phase = pod.metadata.name, (pod.status.phase if pod.status else None) or "Pending"
                if event["type"] == "DELETED":
                    raise PodEvicted(f"pod {name} (rank {index}) was deleted before it finished "
                                     "(preempted or drained)", pod=name, reason="Deleted")
                if _disrupted(pod):
                    reason = pod.status.reason or "DisruptionTarget"
                    raise PodEvicted(f"pod {name} (rank {index}) was evicted: {pod.status.message or reason}",
                                     pod=name, reason=reason, log_tail=_log_tail(core, spec, name))
                if phase == "Failed":
                    code, reason = _termination(pod)
                    raise JobFailed(f"pod {name} (rank {index}) failed: {reason}, exit code {code}",
                                    pod=name, reason=reason, exit_code=code, log_tail=_log_tail(core, spec, name))
                waiting = _fatal_waiting(pod)
                if waiting:
                    raise JobFailed(f"pod {name} (rank {index}) cannot start: {waiting}", pod=name, reason=waiting)
                if phase in ("Running", "Succeeded"):
                    started_pods.add(index)
                    if index == 0:
                        logs.start(name)
                if phase == "Succeeded":
                    succeeded[index] = name
                    if len(succeeded) == spec.nodes:
                        w.stop()
                        return [succeeded[i] for i in sorted(succeeded)]
        except ApiException as e:
            if e.status != 410:  # 410 Gone: our resource version expired; list afresh
                raise
            resource_version = None


def _index(pod) -> int | None:
    value = (pod.metadata.annotations or {}).get(INDEX_ANNOTATION) or (pod.metadata.labels or {}).get(INDEX_ANNOTATION)
    return int(value) if value is not None and str(value).isdigit() else None


def _disrupted(pod) -> bool:
    """Evicted by the kubelet (node pressure) or by the API (drain, preemption, taint manager)."""
    status = pod.status
    if status is None:
        return False
    if status.reason == "Evicted":
        return True
    return any(c.type == "DisruptionTarget" and c.status == "True" for c in status.conditions or [])


def _termination(pod) -> tuple[int | None, str]:
    for cs in pod.status.container_statuses or []:
        term = cs.state.terminated if cs.state else None
        if term is not None:
            return term.exit_code, term.reason or "Error"
    return None, pod.status.reason or "Failed"


def _fatal_waiting(pod) -> str | None:
    for cs in (pod.status.container_statuses or []) if pod.status else []:
        waiting = cs.state.waiting if cs.state else None
        if waiting is not None and waiting.reason in _FATAL_WAITING:
            return f"{waiting.reason}: {waiting.message or ''}".strip()
    return None


def _log_tail(core, spec: DistributedJobSpec, pod: str, lines: int = 40) -> str:
    """The last lines of a failed pod's log (empty when the log is gone)."""
    try:
        return core.read_namespaced_pod_log(pod, spec.namespace, container=CONTAINER, tail_lines=lines,
                                            _request_timeout=30).rstrip("\n")
    except (ApiException, OSError):
        return ""


class _LogStreamer:
    """Follows rank 0's log in a thread while the main thread watches the pods."""

    def __init__(self, core, spec: DistributedJobSpec, on_log: Callable[[str], None]):
        self.core, self.spec, self.on_log = core, spec, on_log
        self.lines = 0
        self._thread: threading.Thread | None = None
        self._watch = None

    def start(self, pod: str) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, args=(pod,), name=f"logs-{pod}", daemon=True)
            self._thread.start()

    def _follow(self, pod: str) -> None:
        self._watch = watch.Watch()
        try:
            for line in self._watch.stream(self.core.read_namespaced_pod_log, pod, self.spec.namespace,
                                           container=CONTAINER, follow=True):
                self.lines += 1
                self.on_log(f"[{pod}] {line}")
        except Exception as e:  # noqa: BLE001 - a lost log stream must not fail the training
            self.on_log(f"[{pod}] log stream ended: {type(e).__name__}: {e}")

    def stop(self, timeout_s: float = 10) -> None:
        """Let the stream drain (the container has exited), then give up on it."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive() and self._watch is not None:
                self._watch.stop()


def _cleanup(core, batch, spec: DistributedJobSpec, created: list[str], on_log: Callable[[str], None]) -> None:
    """Delete the Job with its pods, then the Service; what is already gone is fine.

    Never raises: a cleanup error must not hide the failure that brought us here (the Job's
    ttlSecondsAfterFinished removes what is left).
    """
    deletions = []
    if "job" in created:
        deletions.append(("job", lambda: batch.delete_namespaced_job(
            spec.name, spec.namespace, propagation_policy="Background", _request_timeout=30)))
    if "service" in created:
        deletions.append(("service", lambda: core.delete_namespaced_service(
            spec.name, spec.namespace, _request_timeout=30)))
    for kind, delete in deletions:
        try:
            delete()
        except ApiException as e:
            if e.status != 404:
                on_log(f"could not delete {kind} {spec.name}: {e.status} {e.reason}")
        except Exception as e:  # noqa: BLE001 - see the docstring
            on_log(f"could not delete {kind} {spec.name}: {type(e).__name__}: {e}")


# --- Prefect -----------------------------------------------------------------------------------------------


def attempt_name(base: str) -> str:
    """``base`` plus a fresh suffix: a relaunch must not meet the pods of the attempt before it."""
    return f"{base[:40].rstrip('-')}-{secrets.token_hex(3)}"


# Retry evictions and preemptions only; a crashed rank or a timeout will not get better.
_retry_on_eviction = retry_on(PodEvicted)


@task(name="launch-distributed", retries=2, retry_delay_seconds=30, retry_condition_fn=_retry_on_eviction,
      task_run_name="train {spec.name}: {spec.nodes} pod(s) x {spec.gpus_per_node} GPU(s)")
def launch_distributed_task(spec: DistributedJobSpec, timeout_s: float | None = None,
                            pending_timeout_s: float = 900) -> dict:
    """Run ``spec`` as a multi-node job under a fresh name per attempt; rank 0's log goes to the run log."""
    logger = get_run_logger()
    attempt = spec.model_copy(update={"name": attempt_name(spec.name)})
    result = launch_distributed(attempt, timeout_s=timeout_s, pending_timeout_s=pending_timeout_s,
                                on_log=logger.info)
    logger.info("job %s done in %.0f s on %d pod(s)", result.name, result.seconds, result.nodes)
    return result.model_dump()
