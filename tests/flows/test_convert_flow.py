"""The `convert` flow on a real (temporary) Prefect API: outputs, artifact, idempotent re-run."""

from __future__ import annotations

import asyncio

from dlm_factory.dlm.checkpoint.spec import DiffusionSpec
from dlm_factory.dlm.evaluation.corpus import EvalConfig
from dlm_factory.dlm.train.config import TrainConfig
from tests.conftest import tiny_convert_config
from tests.dlm.helpers import leftovers


def test_convert_flow_converts_evaluates_and_reuses(prefect_harness, tiny_ar, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    from dlm_factory.flows.convert import convert_flow

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path))
    cfg = tiny_convert_config(train=TrainConfig(steps=4, batch_size=4, warmup_steps=1), seq_len=32, max_chars=50_000,
                              anneal_steps=2)
    ev = EvalConfig(seq_len=32, max_windows=4, mc_samples=4)
    out = convert_flow(base_model=tiny_ar, name="flow-dlm", convert_config=cfg, eval_config=ev)
    model = tmp_path / "models" / "flow-dlm"
    assert out["model"] == str(model) and (model / "diffusion.json").is_file()
    assert out["ar"]["kind"] == "nll" and out["dlm"]["kind"] == "elbo"
    assert out["ar"]["tokens"] == out["dlm"]["tokens"] == 31 + 3 * 16  # rolling windows of 32, stride 16
    mtime = (model / "model.safetensors").stat().st_mtime_ns

    again = convert_flow(base_model=tiny_ar, name="flow-dlm", convert_config=cfg, eval_config=ev)
    assert again["model"] == str(model)
    assert (model / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not retrained
    assert again["dlm"]["bits_per_token"] == out["dlm"]["bits_per_token"]  # seeded estimate

    async def artifact():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    keys = {a.key for a in asyncio.run(artifact())}
    assert "convert-flow-dlm" in keys

    # A scheduled re-run with another config replaces the flow-owned model (swapped in when complete).
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 5})})
    replaced = convert_flow(base_model=tiny_ar, name="flow-dlm", convert_config=changed, eval_config=ev)
    assert replaced["model"] == str(model)
    assert DiffusionSpec.read(model).stages[0].config["train"]["steps"] == 5
    assert leftovers(model.parent) == []
