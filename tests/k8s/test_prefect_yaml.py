"""prefect.yaml: each flow deployed twice, on `local` (process, the default) and on `k8s-gpu`
(Kubernetes, trainer image built and pushed first), chosen by one name; parameter schemas
enforced, heavy deployments limited to one run at a time, `retrain` nightly; and the Makefile's
`work-pool` and `deploy` commands accepted by a real Prefect server (the schedule registered)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import pytest
import yaml
from rich.console import Console

from tests.k8s.conftest import K8S, ROOT

FLOWS = {"convert": "dlm_factory.flows.convert.convert_flow", "instruct": "dlm_factory.flows.instruct.instruct_flow",
         "publish": "dlm_factory.flows.publish.publish_flow", "factory": "dlm_factory.flows.factory.factory_flow",
         "retrain": "dlm_factory.flows.retrain.retrain_flow",
         "specialize": "dlm_factory.flows.specialize.specialize_flow",
         "validate": "dlm_factory.flows.validate.validate_flow", "scale": "dlm_factory.flows.scale.scale_flow"}


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def picked(config, name):
    """The deployments `prefect deploy --name NAME` selects (Prefect's own selection, non-interactive)."""
    from prefect.cli.deploy._config import _pick_deploy_configs

    return _pick_deploy_configs(config["deployments"], names=[name], console=Console(quiet=True),
                                is_interactive=lambda: False)


def test_prefect_yaml_parses_and_every_entrypoint_is_its_flow(config):
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    model = PrefectYamlModel.model_validate(config)
    flows = {load_flow_from_entrypoint(d.entrypoint).name: d.entrypoint for d in model.deployments}
    assert flows == FLOWS


@pytest.mark.parametrize("pool", ["local", "k8s-gpu"])
def test_one_name_selects_one_deployment_per_flow_on_that_pool(config, pool):
    chosen = picked(config, pool)
    assert sorted(d["entrypoint"] for d in chosen) == sorted(FLOWS.values())
    assert {d["work_pool"]["name"] for d in chosen} == {pool}


def test_only_k8s_deployments_build_and_push_the_trainer_image(config):
    for d in picked(config, "local"):
        assert not d.get("build") and not d.get("push")
    assert config["pull"] == []  # entrypoints are module paths: nothing is pulled at run time
    for d in picked(config, "k8s-gpu"):
        steps = {next(iter(s)): next(iter(s.values())) for s in d["build"]}
        sha = steps["prefect.deployments.steps.run_shell_script"]
        assert sha["script"].startswith("git describe --always --dirty")
        build = steps["prefect_docker.deployments.steps.build_docker_image"]
        assert build["dockerfile"] == "images/trainer/Dockerfile"
        assert build["tag"] == "{{ " + sha["id"] + ".stdout }}"  # the image tag is the git SHA
        assert set(build["buildargs"]) >= {"CUDA_RUNTIME_DIGEST", "CUDA_DEVEL_DIGEST", "UV_DIGEST"}
        assert d["work_pool"]["job_variables"]["image"] == "{{ " + build["id"] + ".image }}"
        push = next(iter(d["push"][0].values()))
        assert push["tag"] == "{{ " + build["id"] + ".tag }}"
        gpus = d["work_pool"]["job_variables"].get("gpu_count", "1")
        assert isinstance(gpus, str)  # a quantity: the job template's schema wants a string
    publish = next(d for d in picked(config, "k8s-gpu") if d["entrypoint"] == FLOWS["publish"])
    assert publish["work_pool"]["job_variables"]["gpu_count"] == "0"


HEAVY = set(FLOWS) - {"publish"}  # they train: one run at a time per deployment, later ones queue


@pytest.mark.parametrize("pool", ["local", "k8s-gpu"])
def test_schemas_enforced_heavy_runs_limited_tags_and_a_nightly_retrain(config, pool):
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    by_flow = {load_flow_from_entrypoint(d["entrypoint"]).name: d for d in picked(config, pool)}
    for name, d in by_flow.items():
        assert d["enforce_parameter_schema"] is True, name
        assert "factory" in d["tags"], name
        limit = d.get("concurrency_limit")
        assert (limit == {"limit": 1, "collision_strategy": "ENQUEUE"}) is (name in HEAVY), name
        assert bool(d.get("schedules")) is (name == "retrain"), name
    (nightly,) = by_flow["retrain"]["schedules"]
    assert nightly == {"cron": "0 2 * * *", "timezone": "UTC", "active": True}
    PrefectYamlModel.model_validate(config)  # Prefect's own model accepts the limits and the schedule


def test_every_flow_parameter_is_a_form_field_with_a_default():
    """The UI renders each flow's parameters as a form: every one has a default (a run needs none typed in)."""
    from prefect.flows import load_flow_from_entrypoint

    for name, entrypoint in FLOWS.items():
        schema = load_flow_from_entrypoint(entrypoint).parameters.model_dump()
        required = set(schema.get("required") or []) - {"src", "name", "users"}  # publish/validate name their input
        assert not required, (name, required)
    schema = load_flow_from_entrypoint(FLOWS["factory"]).parameters.model_dump()
    stages = schema["definitions"]["FactoryConfig"]["properties"]
    assert {"bootstrap", "convert", "scale", "instruct", "specialize", "ensemble", "users"} <= set(stages)
    assert all(v.get("description") for v in stages.values())  # the form says what each field is


def _cli(api_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_make_work_pool_and_deploy_against_a_real_server(prefect_api):
    """`make work-pool` (the server validates the template) and `make deploy` (the local set)."""
    from prefect.client.orchestration import get_client

    result = _cli(prefect_api, "make", "--no-print-directory", "work-pool")
    assert result.returncode == 0, result.stdout + result.stderr
    result = _cli(prefect_api, str(ROOT / ".venv/bin/prefect"), "work-pool", "create", "local", "--type", "process")
    assert result.returncode == 0, result.stdout + result.stderr
    result = _cli(prefect_api, "make", "--no-print-directory", "deploy")
    assert result.returncode == 0, result.stdout + result.stderr

    async def read():
        async with get_client() as client:
            pool = await client.read_work_pool("k8s-gpu")
            deployments = await client.read_deployments()
            flows = {f.id: f.name for f in await client.read_flows()}
            retrain = next(d for d in deployments if flows[d.flow_id] == "retrain")
            return (pool, [(flows[d.flow_id], d.name, d.work_pool_name, d.entrypoint) for d in deployments],
                    await client.read_deployment_schedules(retrain.id))

    pool, deployments, schedules = asyncio.run(read())
    assert pool.type == "kubernetes"
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in schedules] == [("0 2 * * *", "UTC", True)]
    assert pool.base_job_template == json.loads((K8S / "base-job-template.json").read_text())
    assert sorted(deployments) == sorted((flow, "local", "local", ep) for flow, ep in FLOWS.items())
