"""The `distill` Prefect task on a real (temporary) Prefect API: it distils, reuses by digest, replaces."""

from __future__ import annotations

from dlm_factory.dlm.checkpoint.record import read_record
from dlm_factory.dlm.stages.distill import DistillConfig
from dlm_factory.dlm.train.config import TrainConfig
from tests.dlm.helpers import leftovers


def test_distill_task_distils_then_reuses(prefect_harness, tiny_dlm, tiny_ar, tmp_path, monkeypatch):
    from prefect import flow

    from dlm_factory.tasks.distill import distill_task

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path))
    cfg = DistillConfig(max_chars=50_000, prompts=8, prompt_len=16, length=16, teacher_batch=8,
                        train=TrainConfig(steps=2, batch_size=4, warmup_steps=1))

    @flow
    def run(config: DistillConfig) -> str:
        return distill_task(tiny_dlm, tiny_ar, str(tmp_path / "distilled"), config)

    out = tmp_path / "distilled"
    assert run(cfg) == str(out)
    first = read_record(out)
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert first.stage == "distill" and first.result["trajectories"] == 8
    assert run(cfg) == str(out)
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime  # same inputs and config: reused
    changed = cfg.model_copy(update={"certainty": 0.5})
    assert run(changed) == str(out)
    assert read_record(out).config["certainty"] == 0.5  # another config: replaced
    assert leftovers(out.parent) == []
