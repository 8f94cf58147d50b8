"""The `scale` flow on a real (temporary) Prefect API: rungs as parallel tasks, fits, artifacts, reuse."""

from __future__ import annotations

import asyncio
import json

import pytest

from dlm_factory.dlm.evaluation.corpus import EvalConfig
from dlm_factory.dlm.stages.scale import ScaleConfig
from dlm_factory.dlm.train.config import TrainConfig


def tiny_scale(**kw) -> ScaleConfig:
    values = dict(ladder="2x64,3x64,3x96", max_chars=60_000, seq_len=32, budget=3e9, min_steps=5, zero=None,
                  curve_bins=4, skip_fraction=0.0,
                  train=TrainConfig(steps=1, batch_size=4, lr=3e-3, log_every=5, checkpoint_every=1000),
                  eval=EvalConfig(mc_samples=4, max_windows=4, seq_len=32))
    values.update(kw)
    return ScaleConfig(**values)


def test_scale_flow_trains_fits_reports_and_reuses(prefect_harness, tiny_ar, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    from dlm_factory.flows.scale import scale_flow

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path))
    out = tmp_path / "ladder"
    result = scale_flow(model=tiny_ar, output=str(out), config=tiny_scale(), max_parallel=2)
    for name in ("plan.json", "scaling.json", "scaling.png", "REPORT.md", "stage.json"):
        assert (out / name).is_file(), name
    rungs = sorted(p.relative_to(out / "rungs").as_posix() for p in (out / "rungs").glob("*/*"))
    assert rungs == [f"{r}/{o}" for r in ("r0-2x64", "r1-3x64", "r2-3x96") for o in ("ar", "diffusion")]
    assert (out / "rungs" / "r0-2x64" / "diffusion" / "diffusion.json").is_file()
    report = json.loads((out / "scaling.json").read_text())
    assert {r["heldout_kind"] for r in report["rows"]} == {"elbo", "nll"}
    assert all(r["heldout_stderr"] > 0 for r in report["rows"])
    assert set(result["laws"]) == {"diffusion", "ar"}

    async def artifacts():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    arts = {a.key: a for a in asyncio.run(artifacts())}
    assert {"scale-rungs", "scale-report", "scale-plot"} <= set(arts)
    assert arts["scale-plot"].type == "image" and str(arts["scale-plot"].data).startswith("data:image/png;base64,")

    stamp = (out / "rungs" / "r0-2x64" / "ar" / "model.safetensors").stat().st_mtime_ns
    again = scale_flow(model=tiny_ar, output=str(out), config=tiny_scale(), max_parallel=2)
    assert (out / "rungs" / "r0-2x64" / "ar" / "model.safetensors").stat().st_mtime_ns == stamp  # reused
    assert again["laws"] == json.loads(json.dumps(result["laws"]))


def test_scale_flow_refuses_bad_input_before_training(prefect_harness, tiny_ar, tmp_path, monkeypatch):
    from dlm_factory.dlm.errors import FactoryError
    from dlm_factory.flows.scale import scale_flow

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path))
    out = tmp_path / "ladder"
    with pytest.raises(FactoryError, match="not increasing"):
        scale_flow(model=tiny_ar, output=str(out), config=tiny_scale(ladder="3x64,2x64"))
    assert not out.exists()


def test_a_rung_on_kubernetes_is_an_indexed_job_running_the_rung_worker(tiny_ar, tmp_path, monkeypatch):
    """Offline: the rung's job spec renders, every rank runs the worker on the inline job, output is a URL."""
    from dlm_factory.dlm.errors import FactoryError
    from dlm_factory.dlm.stages.scale import RungJob, plan_ladder
    from dlm_factory.tasks.kubernetes import DistributedJobSpec, launcher_command, render_job
    from dlm_factory.tasks.scale import rung_job_spec

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path))
    cfg = tiny_scale(zero=3, nproc=1)
    planned = {"plan": plan_ladder(tiny_ar, cfg).model_dump(), "local": str(tmp_path / "local")}
    template = DistributedJobSpec(name="scale", image="registry/trainer:abc", nodes=2, gpus_per_node=2)
    spec = rung_job_spec(template, planned, 1, "diffusion", cfg, "s3://bucket/ladder")
    cmd = launcher_command(spec)
    assert cmd[:3] == ["torchrun", "--nnodes", "2"] and "dlm_factory.dlm.stages.scale" in cmd
    job = RungJob.model_validate_json(cmd[-1])
    assert job.output == "s3://bucket/ladder/rungs/r1-3x64/diffusion" and job.checkpoint_dir is None
    assert render_job(spec)["spec"]["completions"] == 2 and spec.name.startswith("scale-r1-3x64-diffusion")
    with pytest.raises(FactoryError, match="object-store URL"):
        rung_job_spec(template, planned, 1, "diffusion", cfg, str(tmp_path / "local-out"))
