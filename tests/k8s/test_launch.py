"""launch_distributed against a fake Kubernetes API on 127.0.0.1 (tests/k8s/fake_kube.py):
create, watch, stream logs, surface failures (a crashed pod, an evicted one, a preempted one,
one that cannot start, one never scheduled), and always clean up. Plus the Prefect task: it
retries an eviction with a fresh job and does not retry a crash."""

from __future__ import annotations

import time

import pytest

from dlm_factory.tasks.kubernetes import (
    DistributedJobSpec,
    JobFailed,
    LaunchTimeout,
    PodEvicted,
    launch_distributed,
    render_job,
    render_service,
)
from tests.k8s.fake_kube import FakeKube

pytestmark = pytest.mark.timeout(120)


def spec_for(nodes: int = 2) -> DistributedJobSpec:
    return DistributedJobSpec(name="rung-3", image="reg/trainer:abc", nodes=nodes, gpus_per_node=4,
                              args=["scale-rung"])


def run(kube: FakeKube, spec: DistributedJobSpec, **kw):
    logs: list[str] = []
    kw.setdefault("timeout_s", 30)
    kw.setdefault("pending_timeout_s", 20)
    result = launch_distributed(spec, kube.api_client(), on_log=logs.append, **kw)
    return result, logs


def assert_cleaned_up(kube: FakeKube, spec: DistributedJobSpec, service: bool = True):
    assert not kube.jobs, "job left behind"
    job_deletes = [d for d in kube.deleted if d[0] == "job"]
    assert [d[1] for d in job_deletes] == [spec.name]
    # Background propagation: the job's pods are deleted with it.
    assert job_deletes[0][2].get("propagationPolicy") == "Background"
    assert [d[1] for d in kube.deleted if d[0] == "service"] == ([spec.name] if service else [])
    assert not kube.services


def test_success_streams_rank0_logs_and_cleans_up():
    spec = spec_for(2)
    with FakeKube(["succeed"]) as kube:
        result, logs = run(kube, spec)
        assert result.pods == ["rung-3-0-abcde", "rung-3-1-abcde"]
        assert result.world_size == 8 and result.log_lines == 5
        rank0 = [line for line in logs if line.startswith("[rung-3-0-abcde]")]
        assert rank0 == [f"[rung-3-0-abcde] rank 0: step {k} loss {3.0 - k / 10:.2f}" for k in range(5)]
        assert not [line for line in logs if "rank 1:" in line]  # only rank 0 is streamed
        posts = kube.paths("POST")
        assert posts == ["/api/v1/namespaces/dlm-factory/services", "/apis/batch/v1/namespaces/dlm-factory/jobs"]
        # The API received exactly what render_* produced.
        assert kube.created == [render_service(spec), render_job(spec)]
        watches = [q for m, p, q in kube.requests if p.endswith("/pods") and q.get("watch")]
        assert watches and all(q["labelSelector"] == "dlm-factory/job=rung-3" for q in watches)
        assert_cleaned_up(kube, spec)


def test_created_job_is_the_rendered_one():
    spec = spec_for(4)
    with FakeKube(["pending"]) as kube:
        with pytest.raises(LaunchTimeout):
            run(kube, spec, pending_timeout_s=0.5, keep=True)
        assert kube.created == [render_service(spec), render_job(spec)]
        assert spec.name in kube.jobs and spec.name in kube.services
        assert not kube.deleted  # keep=True leaves everything for kubectl


def test_single_pod_job_needs_no_service():
    spec = spec_for(1)
    with FakeKube(["succeed"]) as kube:
        result, _ = run(kube, spec)
        assert result.pods == ["rung-3-0-abcde"]
        assert kube.paths("POST") == ["/apis/batch/v1/namespaces/dlm-factory/jobs"]
        assert_cleaned_up(kube, spec, service=False)


def test_failing_pod_surfaces_exit_code_and_log_tail():
    spec = spec_for(2)
    with FakeKube(["fail"]) as kube:
        with pytest.raises(JobFailed) as err:
            run(kube, spec)
        e = err.value
        assert not isinstance(e, PodEvicted)  # a crash is not retried
        assert e.pod == "rung-3-1-abcde" and e.exit_code == 1 and e.reason == "Error"
        assert e.log_tail.endswith("RuntimeError: CUDA error: boom")
        assert "rank 1" in str(e) and "RuntimeError: CUDA error: boom" in str(e)
        tails = [q for m, p, q in kube.requests if p.endswith("rung-3-1-abcde/log")]
        assert tails and tails[0].get("tailLines") and not tails[0].get("follow")
        assert_cleaned_up(kube, spec)


@pytest.mark.parametrize("scenario", ["evict", "preempt"])
def test_evicted_or_preempted_pod_raises_pod_evicted(scenario):
    spec = spec_for(2)
    with FakeKube([scenario]) as kube:
        with pytest.raises(PodEvicted) as err:
            run(kube, spec)
        assert err.value.pod == "rung-3-0-abcde"
        if scenario == "evict":
            assert err.value.reason == "Evicted" and "low on resource: memory" in str(err.value)
        assert_cleaned_up(kube, spec)


def test_pod_that_cannot_start_fails_fast():
    spec = spec_for(2)
    with FakeKube(["bad-config"]) as kube:
        started = time.monotonic()
        with pytest.raises(JobFailed, match="CreateContainerConfigError"):
            run(kube, spec, pending_timeout_s=20)
        assert time.monotonic() - started < 10  # not after the pending deadline
        assert_cleaned_up(kube, spec)


def test_never_scheduled_pods_time_out_and_are_cleaned_up():
    spec = spec_for(2)
    with FakeKube(["pending"]) as kube:
        started = time.monotonic()
        with pytest.raises(LaunchTimeout, match="0/2 pods started"):
            run(kube, spec, pending_timeout_s=1.5)
        assert 1.5 <= time.monotonic() - started < 10
        assert_cleaned_up(kube, spec)


def test_watch_resumes_from_the_last_resource_version():
    """Short watch responses (as a real API server ends them) must neither lose nor repeat events."""
    spec = spec_for(4)
    with FakeKube(["succeed"], step_s=0.15, watch_max_s=0.1) as kube:
        result, logs = run(kube, spec, watch_timeout_s=1)
        assert len(result.pods) == 4
        watches = [q for m, p, q in kube.requests if p.endswith("/pods") and q.get("watch")]
        assert len(watches) > 2
        assert "resourceVersion" not in watches[0]
        versions = [int(q["resourceVersion"]) for q in watches[1:] if "resourceVersion" in q]
        assert versions and versions == sorted(versions)
        assert len([line for line in logs if line.startswith("[rung-3-0-abcde]")]) == 5


def test_overall_timeout_bounds_a_job_that_never_ends():
    spec = spec_for(2)
    with FakeKube(["pending"]) as kube:
        started = time.monotonic()
        with pytest.raises(LaunchTimeout):
            run(kube, spec, timeout_s=1, pending_timeout_s=60)
        assert time.monotonic() - started < 10
        assert_cleaned_up(kube, spec)


# --- the Prefect task -----------------------------------------------------------------------


@pytest.fixture
def kubeconfig(tmp_path, monkeypatch):
    """Point the client's ordinary configuration (kubeconfig) at a fake API server."""

    def point_at(kube: FakeKube) -> None:
        path = tmp_path / "kubeconfig"
        path.write_text(f"""
apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{kube.url}"}}}}]
users: [{{name: nobody, user: {{}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: nobody}}}}]
current-context: fake
""")
        monkeypatch.setenv("KUBECONFIG", str(path))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    return point_at


def _in_flow(spec):
    from prefect import flow

    from dlm_factory.tasks.kubernetes import launch_distributed_task

    @flow
    def scale_like():
        return launch_distributed_task.with_options(retry_delay_seconds=0)(spec, timeout_s=30, pending_timeout_s=20)

    return scale_like()


def test_task_relaunches_an_evicted_job_under_a_new_name(prefect_api, kubeconfig):
    with FakeKube(["evict", "succeed"]) as kube:
        kubeconfig(kube)
        result = _in_flow(spec_for(2))
        created = [p for p in kube.paths("POST") if p.endswith("/jobs")]
        assert len(created) == 2
        first, second = [d[1] for d in kube.deleted if d[0] == "job"]
        assert first != second and first.startswith("rung-3-") and second.startswith("rung-3-")
        assert result["name"] == second and len(result["pods"]) == 2
        assert not kube.jobs and not kube.services


def test_task_does_not_retry_a_crash(prefect_api, kubeconfig):
    with FakeKube(["fail", "succeed"]) as kube:
        kubeconfig(kube)
        with pytest.raises(JobFailed):
            _in_flow(spec_for(2))
        assert len([p for p in kube.paths("POST") if p.endswith("/jobs")]) == 1
        assert not kube.jobs
