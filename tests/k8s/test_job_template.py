"""k8s/base-job-template.json, rendered exactly as the Prefect Kubernetes worker renders it
(prefect-kubernetes' KubernetesWorkerJobConfiguration: template + job variables, then
prepare_for_flow_run), for several variable sets: strictly valid Kubernetes 1.33, GPU pods
that request nvidia.com/gpu, mount /dev/shm and run as non-root."""

from __future__ import annotations

import asyncio
import copy
import uuid

import pytest

from tests.k8s.conftest import assert_restricted, round_trip, validate_strict

VARIABLE_SETS = {
    "defaults": {},
    "8xH100-pvc-cache": {
        "image": "registry.example/dlm-factory-trainer:0123456789ab", "gpu_count": "8",
        "gpu_type": "NVIDIA-H100-80GB-HBM3", "memory": "900Gi", "cpu": "96", "shm_size": "256Gi",
        "cache_volume": {"name": "cache", "persistentVolumeClaim": {"claimName": "dlm-cache"}},
    },
    "cpu-only-publish": {"gpu_count": "0", "tolerations": [], "memory": "8Gi", "cpu": "2"},
    "custom-env-and-labels": {
        "env": {"FACTORY_CATALOG": "s3://other/catalog", "NCCL_DEBUG": "INFO"},
        "labels": {"team": "research"}, "backoff_limit": 0, "finished_job_ttl": 600,
        "pod_watch_timeout_seconds": 300, "image_pull_policy": "Always",
    },
}


class _NoAPI:
    """Rendering must need no Prefect API: our template references no blocks or variables."""

    def __getattr__(self, name):
        raise AssertionError(f"the template needed the Prefect API ({name})")


def render(template: dict, values: dict):
    """The worker's path: from_template_and_values, then prepare_for_flow_run for a flow run."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    cfg = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        copy.deepcopy(template), values, client=_NoAPI()))
    cfg.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="brave-fox", flow_id=uuid.uuid4()))
    return cfg


def _container(manifest):
    return manifest["spec"]["template"]["spec"]["containers"][0]


def test_template_passes_prefect_server_validation(job_template):
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.schema_tools import is_valid_schema

    validate_base_job_template(job_template)  # every placeholder is a declared variable
    is_valid_schema(job_template["variables"], preprocess=True)
    broken = copy.deepcopy(job_template)
    del broken["variables"]["properties"]["shm_size"]
    with pytest.raises(ValueError, match="shm_size"):
        validate_base_job_template(broken)


@pytest.mark.parametrize("values", VARIABLE_SETS.values(), ids=VARIABLE_SETS.keys())
def test_rendered_job_is_valid_kubernetes(job_template, values):
    manifest = render(job_template, values).job_manifest
    validate_strict(manifest)
    round_trip(manifest)
    assert_restricted(manifest["spec"]["template"]["spec"])


@pytest.mark.parametrize("values", VARIABLE_SETS.values(), ids=VARIABLE_SETS.keys())
def test_rendered_job_requests_gpus_mounts_shm_and_cache(job_template, values):
    cfg = render(job_template, values)
    pod = cfg.job_manifest["spec"]["template"]["spec"]
    c = _container(cfg.job_manifest)
    gpus = values.get("gpu_count", "1")
    assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert isinstance(c["resources"]["limits"]["nvidia.com/gpu"], str)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"] == values.get("shm_size", "16Gi")
    cache = volumes[mounts["/cache"]]
    assert cache == values.get("cache_volume", {"name": "cache", "emptyDir": {"sizeLimit": "200Gi"}})
    assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"]
    if "gpu_type" in values:
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": values["gpu_type"]}
    else:
        assert pod["nodeSelector"] == {}  # no GPU type: any node that has the GPUs
    assert pod["tolerations"] == values.get(
        "tolerations", [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])


def test_completions_and_parallelism_sit_on_the_job_spec(job_template):
    """Prefect's default template puts them in the PodSpec, which strict validation rejects; ours
    puts them on the Job spec, and the worker's own manifest check still accepts the result."""
    import kubernetes_validate
    from prefect_kubernetes.worker import KubernetesWorker

    manifest = render(job_template, {}).job_manifest
    assert manifest["spec"]["completions"] == 1 and manifest["spec"]["parallelism"] == 1
    assert "completions" not in manifest["spec"]["template"]["spec"]
    assert "parallelism" not in manifest["spec"]["template"]["spec"]

    default = render(KubernetesWorker.get_default_base_job_template(), {"image": "x"}).job_manifest
    with pytest.raises(kubernetes_validate.ValidationError, match="completions|parallelism"):
        validate_strict(default)


def test_worker_settings_from_the_template(job_template):
    cfg = render(job_template, {})
    assert cfg.pod_watch_timeout_seconds >= 300  # CUDA image pulls and GPU node scale-up take minutes
    assert cfg.stream_output is True
    assert cfg.namespace == "dlm-factory"
    spec = cfg.job_manifest["spec"]
    assert spec["ttlSecondsAfterFinished"] == 86400
    assert spec["backoffLimit"] == 2
    # Eviction and preemption do not use up the backoff limit.
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    assert spec["template"]["spec"]["serviceAccountName"] == "dlm-flow-run"
    env = {e["name"]: e.get("value") for e in _container(cfg.job_manifest)["env"]}
    # Kubernetes owns the retries (backoffLimit > 0): Prefect must not finalize an evicted run.
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "relinquish"


def test_job_variables_are_checked_against_the_schema(job_template):
    """What the Prefect server checks before a run: a GPU count is a string, the pod watch >= 300 s."""
    from prefect.utilities.schema_tools import ValidationError, validate

    schema = job_template["variables"]

    def check(values):
        validate(values, schema, raise_on_error=True, preprocess=True, ignore_required=True)

    check({"gpu_count": "4", "pod_watch_timeout_seconds": 300})
    for bad in ({"gpu_count": 4}, {"gpu_count": "four"}, {"pod_watch_timeout_seconds": 299},
                {"cache_volume": {"name": "scratch", "emptyDir": {}}}, {"backoff_limit": -1}):
        with pytest.raises(ValidationError):
            check(bad)


def test_deployment_env_merges_over_factory_defaults(job_template):
    c = _container(render(job_template, VARIABLE_SETS["custom-env-and-labels"]).job_manifest)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["FACTORY_HOME"] == "/cache/factory" and env["HF_HOME"] == "/cache/huggingface"
    assert env["FACTORY_CATALOG"] == "s3://other/catalog" and env["NCCL_DEBUG"] == "INFO"
    # Credentials only by reference: a Secret's keys become env, nothing inline.
    assert {"secretRef": {"name": "dlm-object-store", "optional": True}} in c["envFrom"]
    assert not any("SECRET" in name or "ACCESS_KEY" in name for name in env)
