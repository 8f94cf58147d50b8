"""k8s/: every overlay (as `kubectl kustomize` renders it) and every manifest file is valid
Kubernetes 1.33 under strict validation, round-trips through the official client's models,
and keeps the promises of docs/kubernetes.md (least privilege, non-root, no secrets inline)."""

from __future__ import annotations

import pytest
import yaml

from tests.k8s.conftest import (
    K8S,
    assert_restricted,
    kustomize,
    pod_specs,
    round_trip,
    validate_strict,
)

OVERLAYS = ["base", "overlays/dev", "overlays/prod"]
MANIFEST_FILES = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(K8S / name) for name in OVERLAYS}


def test_strict_validation_is_not_a_no_op():
    """The validator rejects a field in the wrong place (Prefect's default completions in the PodSpec)."""
    import kubernetes_validate

    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"},
           "spec": {"template": {"spec": {"completions": 1, "restartPolicy": "Never",
                                          "containers": [{"name": "c", "image": "i"}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError, match="completions"):
        validate_strict(job)
    del job["spec"]["template"]["spec"]["completions"]
    validate_strict(job)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_valid_objects(rendered, overlay):
    objs = rendered[overlay]
    kinds = sorted(o["kind"] for o in objs)
    for required in ("Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment", "NetworkPolicy",
                     "ConfigMap"):
        assert required in kinds, f"{overlay}: no {required}"
    for obj in objs:
        validate_strict(obj)
        round_trip(obj)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "dlm-factory", obj["metadata"]["name"]


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_file_is_valid(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for obj in docs:
        validate_strict(obj)
        round_trip(obj)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_run_as_restricted_non_root(rendered, overlay):
    pods = [p for o in rendered[overlay] for p in pod_specs(o)]
    assert pods
    for pod in pods:
        assert_restricted(pod)
    ns = next(o for o in rendered[overlay] if o["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def _rules(objs, role):
    r = next(o for o in objs if o["kind"] == "Role" and o["metadata"]["name"] == role)
    return {(group, res): set(rule["verbs"]) for rule in r["rules"]
            for group in rule["apiGroups"] for res in rule["resources"]}


def test_rbac_is_least_privilege(rendered):
    objs = rendered["overlays/prod"]
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for o in objs:
        if o["kind"] == "Role":
            for rule in o["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], o["metadata"]["name"]
                assert "secrets" not in rule["resources"]
    watch = {"get", "list", "watch"}
    assert _rules(objs, "prefect-worker") == {
        ("batch", "jobs"): {"create", "delete"} | watch,
        ("", "pods"): watch,
        ("", "pods/log"): {"get"},
        ("", "events"): watch | {"create"},
        ("events.k8s.io", "events"): watch | {"create"},
    }
    assert _rules(objs, "dlm-flow-run") == {
        ("batch", "jobs"): {"create", "delete"} | watch,
        ("", "services"): {"create", "get", "delete"},
        ("", "pods"): watch,
        ("", "pods/log"): {"get"},
    }
    trainer = next(o for o in objs if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == "dlm-trainer")
    assert trainer["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_role_bindings_bind_this_namespace_accounts_to_existing_roles(rendered, overlay):
    objs = rendered[overlay]
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    bindings = [o for o in objs if o["kind"] == "RoleBinding"]
    assert len(bindings) == 2
    for b in bindings:
        assert ("Role", b["roleRef"]["name"]) in names
        for s in b["subjects"]:
            assert s["kind"] == "ServiceAccount" and ("ServiceAccount", s["name"]) in names
            assert s["namespace"] == b["metadata"]["namespace"]
    worker = next(o for o in objs if o["kind"] == "Deployment")
    assert worker["spec"]["template"]["spec"]["serviceAccountName"] == "prefect-worker"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_only_by_secret_reference(rendered, overlay):
    objs = rendered[overlay]
    assert not [o for o in objs if o["kind"] == "Secret"]
    config = next(o for o in objs if o["kind"] == "ConfigMap")
    for key in config["data"]:
        assert not any(word in key.upper() for word in ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY")), key
    env = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    api_key = next(e for e in env if e["name"] == "PREFECT_API_KEY")
    assert "value" not in api_key and api_key["valueFrom"]["secretKeyRef"]["name"] == "prefect-api"


def test_network_policy_denies_ingress_except_between_trainers(rendered):
    objs = rendered["base"]
    policies = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    deny = policies["default-deny-ingress"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")
    peers = policies["trainer-peers"]
    trainer = {"app.kubernetes.io/component": "trainer"}
    assert peers["podSelector"]["matchLabels"] == trainer
    assert peers["ingress"] == [{"from": [{"podSelector": {"matchLabels": trainer}}]}]


def test_worker_watches_only_its_namespace_and_polls_the_configured_pool(rendered):
    pod = next(o for o in rendered["base"] if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"]["valueFrom"]["fieldRef"]["fieldPath"] \
        == "metadata.namespace"
    assert c["args"][:5] == ["prefect", "worker", "start", "--pool", "$(WORK_POOL)"]
    assert env["WORK_POOL"]["valueFrom"]["configMapKeyRef"]["name"] == "dlm-factory-config"
    assert "--type" in c["args"] and c["args"][c["args"].index("--type") + 1] == "kubernetes"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_overlays_differ_as_documented(rendered):
    def find(objs, kind):
        return next(o for o in objs if o["kind"] == kind)

    dev, prod = rendered["overlays/dev"], rendered["overlays/prod"]
    assert find(dev, "Deployment")["spec"]["replicas"] == 1
    assert find(prod, "Deployment")["spec"]["replicas"] == 2
    pdb = find(prod, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == \
        find(prod, "Deployment")["spec"]["selector"]["matchLabels"]
    assert not [o for o in dev if o["kind"] == "PodDisruptionBudget"]
    assert find(dev, "ConfigMap")["data"]["FACTORY_CATALOG"] == "s3://dlm-factory-dev/catalog"
    assert find(prod, "ConfigMap")["data"]["FACTORY_CATALOG"] == "s3://dlm-factory-prod/catalog"
    assert find(dev, "ConfigMap")["data"]["WORK_POOL"] == "k8s-gpu"  # merged, not replaced
