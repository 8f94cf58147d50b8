"""The ``instruct`` flow on the tiny fixtures: tune the DLM and its judge, evaluate tuned vs untuned, reuse on re-run."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_instruct_flow(tiny_ar, tiny_dlm, tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from dlm_factory.dlm.checkpoint.record import read_record
    from dlm_factory.dlm.evaluation.instruct import InstructEvalConfig
    from dlm_factory.dlm.stages.instruct import InstructConfig
    from dlm_factory.dlm.train.config import TrainConfig
    from dlm_factory.flows.instruct import instruct_flow

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Implement `add{i}(x)`: Return x plus {i}.",
                                        "response": f"return x + {i}"}) + "\n" for i in range(16)))
    cfg = InstructConfig(data=str(data), response_len=16,
                         train=TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=1))
    ecfg = InstructEvalConfig(data=str(data), response_len=16, max_examples=4, gen_examples=2, mc_samples=2)
    with prefect_test_harness():
        out = instruct_flow(model=tiny_dlm, name="tiny-instruct", config=cfg, eval_config=ecfg)
        assert out["model"] == str(tmp_path / "home" / "models" / "tiny-instruct")
        assert out["tuned"]["kind"] == out["untuned"]["kind"] == "diffusion"
        judge = tmp_path / "home" / "models" / "tiny-instruct-judge"
        assert out["judge"] == out["tuned"]["judge"] == out["untuned"]["judge"] == str(judge)
        assert out["tuned"]["judge_tuned"] is True  # an AR SFT of the DLM's source model, with its own seed
        report = read_record(judge)
        assert report.result["objective"] == "ar" and report.sources["base"] == tiny_ar == report.ar_root
        assert report.config["train"]["seed"] == 1 != cfg.train.seed
        stamp = (tmp_path / "home" / "models" / "tiny-instruct" / "model.safetensors").stat().st_mtime_ns
        again = instruct_flow(model=tiny_dlm, name="tiny-instruct", config=cfg, eval_config=ecfg)
        assert (tmp_path / "home" / "models" / "tiny-instruct" / "model.safetensors").stat().st_mtime_ns == stamp
        assert again["tuned"]["likelihood"] == out["tuned"]["likelihood"]
