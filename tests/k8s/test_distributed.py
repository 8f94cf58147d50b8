"""The multi-node job of tasks/kubernetes.py: an Indexed Job plus a headless Service whose rank
and rendezvous wiring is right for N = 1, 2, 4 pods, strictly valid, GPU pods that mount /dev/shm
and run as non-root; and the rendered torchrun command really forms one process group."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from pydantic import ValidationError

from dlm_factory.tasks.kubernetes import (
    INDEX_ANNOTATION,
    DistributedJobSpec,
    attempt_name,
    render,
    render_job,
    render_service,
)
from tests.k8s.conftest import assert_restricted, round_trip, validate_strict

GPUS = 4


def spec_for(nodes: int, **kw) -> DistributedJobSpec:
    return DistributedJobSpec(name="rung-7", namespace="dlm-factory", image="reg/dlm-factory-trainer:0123456789ab",
                              nodes=nodes, gpus_per_node=kw.pop("gpus", GPUS), gpu_type="NVIDIA-H100-80GB-HBM3",
                              args=["scale-rung", "--rung", "7"], **kw)


def pod_view(job: dict, index: int) -> tuple[list[str], dict[str, str], str]:
    """What the kubelet runs in pod ``index``: the command with $(VAR) expanded, the env, the hostname.

    The downward API fills NODE_RANK from the completion-index annotation the Job controller sets;
    an Indexed Job's pod is named (hostname) <job>-<index>.
    """
    c = job["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.annotations['{INDEX_ANNOTATION}']"
            env[e["name"]] = str(index)
    command = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], arg) for arg in c["command"]]
    return command, env, f"{job['metadata']['name']}-{index}"


def torchrun_args(command: list[str]):
    from torch.distributed.run import get_args_parser

    assert command[0] == "torchrun"
    return get_args_parser().parse_args(command[1:])


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_rendered_objects_are_valid_kubernetes(nodes):
    objs = render(spec_for(nodes))
    assert [o["kind"] for o in objs] == (["Job"] if nodes == 1 else ["Service", "Job"])
    for obj in objs:
        validate_strict(obj)
        round_trip(obj)


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_pods_request_gpus_mount_shm_and_run_as_non_root(nodes):
    job = render_job(spec_for(nodes, shm_size="32Gi"))
    pod = job["spec"]["template"]["spec"]
    assert_restricted(pod)
    assert pod["automountServiceAccountToken"] is False  # training pods need no API access
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == str(GPUS)
    assert c["resources"]["requests"]["nvidia.com/gpu"] == str(GPUS)
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_rank_and_master_wiring(nodes):
    spec = spec_for(nodes)
    job, service = render_job(spec), render_service(spec)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
    assert job["spec"]["backoffLimit"] == 0  # one lost rank fails the group: relaunch it whole
    global_ranks = []
    masters = set()
    for index in range(nodes):
        command, env, hostname = pod_view(job, index)
        args = torchrun_args(command)
        assert args.module and args.training_script == "dlm_factory.cli"
        assert args.training_script_args == ["scale-rung", "--rung", "7"]
        assert args.nnodes == str(nodes) and args.nproc_per_node == str(GPUS)
        if nodes == 1:
            assert args.standalone and service is None
            assert "subdomain" not in job["spec"]["template"]["spec"]
            global_ranks += list(range(GPUS))
            continue
        assert args.rdzv_backend == "static" and not args.standalone
        assert args.node_rank == index
        assert args.master_port == spec.master_port
        masters.add(args.master_addr)
        global_ranks += [args.node_rank * GPUS + local for local in range(GPUS)]  # torchrun's RANK
        # Pod 0's DNS name through the headless Service: <hostname>.<subdomain>.<namespace>.svc
        if index == 0:
            subdomain = job["spec"]["template"]["spec"]["subdomain"]
            assert args.master_addr == f"{hostname}.{subdomain}.{spec.namespace}.svc"
            assert subdomain == service["metadata"]["name"]
    if nodes > 1:
        assert len(masters) == 1  # every pod meets at the same address
    assert sorted(global_ranks) == list(range(nodes * GPUS))  # each global rank exactly once


@pytest.mark.parametrize("nodes", [2, 4])
def test_headless_service_selects_exactly_the_job_pods(nodes):
    spec = spec_for(nodes)
    service, job = render_service(spec), render_job(spec)
    s = service["spec"]
    assert s["clusterIP"] == "None"
    assert s["publishNotReadyAddresses"] is True  # rank 0 must resolve before anything is "ready"
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert s["selector"].items() <= labels.items()
    other = render_job(spec.model_copy(update={"name": "rung-8"}))["spec"]["template"]["metadata"]["labels"]
    assert not s["selector"].items() <= other.items()  # another job's pods are not in this Service
    assert s["ports"][0]["port"] == spec.master_port
    assert labels["app.kubernetes.io/component"] == "trainer"  # the NetworkPolicy opens trainer<->trainer


def test_nccl_settings_and_raised_collective_timeout():
    env = pod_view(render_job(spec_for(2, collective_timeout_min=90)), 1)[1]
    assert int(env["DEEPSPEED_TIMEOUT"]) == 90  # deepspeed.init_distributed reads minutes; its default is 10
    assert int(env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) == 90 * 60  # the watchdog waits as long
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["NCCL_SOCKET_IFNAME"] == "eth0"
    assert env["FACTORY_DEVICE"] == "auto" and env["FACTORY_HOME"].startswith("/cache/")
    override = pod_view(render_job(spec_for(2, env={"NCCL_SOCKET_IFNAME": "ib0"})), 0)[1]
    assert override["NCCL_SOCKET_IFNAME"] == "ib0"


def test_cpu_ranks_and_pvc_cache():
    job = render_job(spec_for(2, gpus=0, cache_claim="dlm-cache"))
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert torchrun_args(pod_view(job, 0)[0]).nproc_per_node == "1"
    cache = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "cache")
    assert cache == {"name": "cache", "persistentVolumeClaim": {"claimName": "dlm-cache"}}
    validate_strict(job)


def test_names_are_dns_labels_and_attempts_are_unique():
    for bad in ("Rung-7", "rung_7", "7rung", "rung-", "r" * 48):
        with pytest.raises(ValidationError):
            DistributedJobSpec(name=bad, image="i")
    names = {attempt_name("r" * 60) for _ in range(20)}
    assert len(names) == 20
    for n in names:
        DistributedJobSpec(name=n, image="i")  # still a valid spec name
        assert len(f"{n}-255-abcde") <= 63  # pod names stay DNS labels


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROBE = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.tensor([dist.get_rank()])
    dist.all_reduce(t)
    with open(os.path.join(os.environ["PROBE_OUT"], f"rank{dist.get_rank()}"), "w") as f:
        f.write(f"{os.environ['RANK']} {os.environ['LOCAL_RANK']} {dist.get_world_size()} {int(t)}")
    dist.destroy_process_group()
""")


def test_rendered_torchrun_forms_one_process_group(tmp_path):
    """Two "pods" as local processes: each runs its rendered command, with pod 0's DNS name
    mapped to 127.0.0.1 (what the headless Service resolves to in a cluster) and one CPU rank."""
    (tmp_path / "rank_probe.py").write_text(PROBE)
    port = _free_port()
    spec = DistributedJobSpec(name="probe", image="i", nodes=2, gpus_per_node=0, module="rank_probe",
                              master_port=port)
    job = render_job(spec)
    procs = []
    for index in range(2):
        command, env, _ = pod_view(job, index)
        command = [os.path.join(os.path.dirname(sys.executable), "torchrun")] + \
            [("127.0.0.1" if a == spec.master_addr else a) for a in command[1:]]
        env = {**os.environ, **env, "PROBE_OUT": str(tmp_path), "PYTHONPATH": str(tmp_path),
               "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        env.pop("NCCL_SOCKET_IFNAME")
        procs.append(subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + 120
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=max(1, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    results = sorted((tmp_path / f"rank{r}").read_text() for r in range(2))
    # RANK LOCAL_RANK WORLD_SIZE sum-of-ranks: two distinct global ranks in one group of two
    assert results == ["0 0 2 1", "1 0 2 1"]
