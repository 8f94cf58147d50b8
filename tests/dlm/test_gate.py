"""The ensemble build (sweep, gate, dir), the validation gate's decisions, and the verified loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dlm_factory.catalog.schema import EnsembleSpec
from dlm_factory.dlm.checkpoint.ensemble import LOCAL_FILE, load_ensemble, read_spec, repin, roles
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.evaluation.gate import (
    GateConfig,
    elbo_checks,
    markdown,
    quality_checks,
)
from dlm_factory.dlm.evaluation.likelihood import Estimate, elbo
from dlm_factory.dlm.sampling.sampler import SamplerConfig
from dlm_factory.dlm.stages.ensemble import (
    EnsembleConfig,
    build_ensemble,
    gate_passed,
    split_windows,
)


def tiny_config(root: str, **gate) -> EnsembleConfig:
    return EnsembleConfig(user="json", data_root=root, seq_len=64, max_windows=8, mc_samples=4, lambdas=[0.5, 1.0],
                          gate=GateConfig(prompts=2, sampler=SamplerConfig(length=8, block_size=8), **gate))


@pytest.fixture(scope="module")
def built(tiny_dlm, tiny_specialist, demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ens") / "json-ensemble"
    result = build_ensemble(tiny_dlm, tiny_specialist, out, tiny_config(demo_root), base=tiny_dlm,
                            names={"general": "tiny-dlm", "specialist": "spec-json", "base": "tiny-base"})
    return result


def test_build_sweeps_every_form_and_lambda_and_writes_the_dir(built):
    out = built.output
    for f in ("ENSEMBLE.json", "tuning.json", "gate.json", "gate.md", "eval_results.json", "stage.json", LOCAL_FILE):
        assert (out / f).is_file(), f
    tuning = json.loads((out / "tuning.json").read_text())
    assert {(c["form"], c["lambda"]) for c in tuning["candidates"]} == {
        (f, lam) for f in ("product_of_experts", "emulated_finetuning", "logarithmic_pool") for lam in (0.5, 1.0)}
    best = min(tuning["candidates"], key=lambda c: c["bits_per_token"])
    assert (built.form, built.lam) == (best["form"], best["lambda"])
    spec = EnsembleSpec.read(out / "ENSEMBLE.json")
    r = roles(spec)
    assert (r.form, r.lam) == (built.form, built.lam) and r.general.name == "tiny-dlm" and r.specialist.name == "spec-json"
    assert spec.router["prefix_tokens"] == 32
    gate = json.loads((out / "gate.json").read_text())
    assert gate["passed"] == built.passed == gate_passed(out)
    assert {c["name"] for c in gate["checks"]} >= {"elbo_beats_tiny-dlm", "elbo_beats_spec-json",
                                                   "judge_nll_not_worse", "parse_rate_not_worse",
                                                   "blank_rate_not_worse"}
    assert ("PASSED" if built.passed else "FAILED") in (out / "gate.md").read_text()
    evals = json.loads((out / "eval_results.json").read_text())
    assert {e["metric"] for e in evals} >= {"elbo_bits_per_token_ensemble", "elbo_bits_per_token_tiny-dlm"}


def test_loaded_ensemble_generates_and_scores_with_the_combined_distribution(built, tiny_dlm, tiny_specialist):
    ens = load_ensemble(built.output)
    assert ens.user == "json" and (ens.form, ens.lam) == (built.form, built.lam)
    texts = ens.generate(["def f(x):\n"], SamplerConfig(length=8, block_size=8))
    assert len(texts) == 1 and isinstance(texts[0], str)
    doc = "import json\n\ndef dump(obj, fp):\n    fp.write(json.dumps(obj))\n"
    est = ens.elbo([doc], seq_len=64, n=8)
    from dlm_factory.dlm.data.corpus import Document, rolling_windows

    w = rolling_windows(ens.tokenizer, [Document("doc-0", doc)], 64)
    direct = elbo(ens.denoiser(), w.ids, attention_mask=w.attention_mask, keep=w.keep, n=8)
    assert est.bits_per_token == pytest.approx(direct.bits_per_token, abs=1e-6)
    general = elbo(ModelDenoiser(ens.general), w.ids, attention_mask=w.attention_mask, keep=w.keep, n=8)
    assert est.bits_per_token != general.bits_per_token


def test_a_modified_member_is_refused(built, tiny_specialist, tmp_path):
    copy = tmp_path / "ens"
    shutil.copytree(built.output, copy)
    spec_copy = tmp_path / "spec"
    shutil.copytree(tiny_specialist, spec_copy)
    local = json.loads((copy / LOCAL_FILE).read_text())
    local["members"]["spec-json"] = str(spec_copy)
    (copy / LOCAL_FILE).write_text(json.dumps(local))
    load_ensemble(copy)  # an identical copy verifies
    cfg = json.loads((spec_copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    (spec_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FactoryError, match="member spec-json: .*unverifiable"):
        load_ensemble(copy)
    (copy / LOCAL_FILE).unlink()
    with pytest.raises(FactoryError, match="member .*: not found"):
        load_ensemble(copy)


def test_inconsistent_weights_and_lambda_out_of_range_are_refused(built, tmp_path):
    copy = tmp_path / "ens"
    shutil.copytree(built.output, copy)
    raw = json.loads((copy / "ENSEMBLE.json").read_text())
    raw["combination"]["lambda"] = 9.0
    (copy / "ENSEMBLE.json").write_text(json.dumps(raw))
    with pytest.raises(FactoryError, match="out of range"):
        load_ensemble(copy)
    raw["combination"]["lambda"] = 0.3  # weights still say the built lambda
    (copy / "ENSEMBLE.json").write_text(json.dumps(raw))
    with pytest.raises(FactoryError, match="do not match"):
        load_ensemble(copy)


def test_an_unknown_user_is_refused_before_any_model_is_loaded(demo_root, tmp_path):
    cfg = tiny_config(demo_root).model_copy(update={"user": "ghost"})
    with pytest.raises(FactoryError, match="ghost"):
        build_ensemble(tmp_path / "no-general", tmp_path / "no-spec", tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_a_failing_gate_is_recorded_and_not_publishable(tiny_dlm, tiny_specialist, demo_root, tmp_path):
    out = tmp_path / "ens"
    result = build_ensemble(tiny_dlm, tiny_specialist, out, tiny_config(demo_root, margin=5.0), form="poe", lam=0.5,
                            names={"specialist": "spec-json"})
    assert not result.passed and not gate_passed(out)
    assert "FAILED" in (out / "gate.md").read_text()
    assert read_spec(out).combination.rule == "product_of_experts"


def test_elbo_check_needs_the_difference_beyond_z_standard_errors():
    def est(v, se):
        return Estimate(v, se, 100, 8, "elbo_difference")

    cfg = GateConfig(margin=0.01, z=2.0)
    checks = elbo_checks({"g-ensemble": est(0.10, 0.02), "s-ensemble": est(0.05, 0.03)}, ["g", "s"], cfg)
    assert [c.passed for c in checks] == [True, False]  # 0.10 - 0.04 >= 0.01; 0.05 - 0.06 < 0.01
    assert checks[0].value == pytest.approx(0.06)


def _q(nll: list, parses: list, blank: float = 0.0, tokens: int = 10) -> dict:
    scores = [(x * tokens, tokens) if x is not None else (0.0, 0) for x in nll]  # (summed NLL, tokens) per prompt
    scored = [x for x in nll if x is not None]
    return {"judge_nll": sum(scored) / len(scored) if scored else float("nan"), "parse_rate": sum(parses) / len(parses),
            "blank_rate": blank, "prompt_scores": scores, "prompt_parses": parses}


def test_sample_checks_are_paired_prompt_by_prompt_with_error_bars():
    cfg = GateConfig(judge_tolerance=0.02, parse_tolerance=0.0, z=2.0)
    general = _q([2.0, 2.2, 1.8, 2.0], [True, False, True, False])
    # worse on every prompt by 0.2 (no spread): the lower bound 0.2 exceeds 2% of 2.0
    q = {"general": general, "ensemble": _q([2.2, 2.4, 2.0, 2.2], [True, False, True, False])}
    checks = quality_checks(q, cfg)
    assert [c.passed for c in checks] == [False, True, True]
    assert checks[0].value == pytest.approx(0.2)
    # worse on average by 0.1 but with a spread that 4 prompts cannot resolve: the guard passes
    q["ensemble"] = _q([2.6, 1.9, 2.1, 1.8], [True, False, True, False])
    d = [0.6, -0.3, 0.3, -0.2]
    se = (sum((x - 0.1) ** 2 for x in d) / 3 / 4) ** 0.5
    assert quality_checks(q, cfg)[0].value == pytest.approx(0.1 - 2 * se)
    assert quality_checks(q, cfg)[0].passed and not quality_checks(q, GateConfig(z=0.0))[0].passed
    # parses lost on half the prompts: 4 prompts cannot resolve it; lost on every prompt: fails
    q["ensemble"] = _q([2.0, 2.2, 1.8, 2.0], [False, False, False, False])
    assert [c.passed for c in quality_checks(q, cfg)] == [True, True, True]
    q["general"] = _q([2.0, 2.2, 1.8, 2.0], [True, True, True, True])
    assert [c.passed for c in quality_checks(q, cfg)] == [True, False, True]
    q["general"] = general
    # only the prompts both contenders answered are paired; none: the judge check fails
    q["ensemble"] = _q([None, None, None, None], [True, False, True, False])
    assert not quality_checks(q, cfg)[0].passed
    # blank continuations score well on both (newlines follow newlines, a prompt that parses still parses):
    # more of them than the general model writes fails on its own
    q["ensemble"] = _q([1.5, 1.5, 1.5, 1.5], [True, False, True, False], blank=1.0)
    assert [c.passed for c in quality_checks(q, cfg)] == [True, True, False]
    assert quality_checks(q, GateConfig(blank_tolerance=1.0))[2].passed


def test_gate_markdown_states_the_verdict():
    report = {"passed": False, "user": "json", "combination": {"rule": "product_of_experts", "lambda": 0.5},
              "checks": [{"name": "elbo_beats_g", "passed": False, "value": -0.1, "threshold": 0.0, "detail": "d"}],
              "elbo": {"ensemble": {"bits_per_token": 5.0, "stderr": 0.1}}, "quality": {}, "windows": 4, "notes": []}
    text = markdown(report)
    assert text.startswith("# Validation gate: FAILED") and "| elbo_beats_g | FAIL |" in text


def test_validation_and_test_windows_never_share_a_row():
    import torch

    from dlm_factory.dlm.data.corpus import Windows

    ids = torch.arange(50).view(5, 10)
    w = Windows(ids=ids, attention_mask=torch.ones_like(ids), keep=torch.zeros_like(ids, dtype=torch.bool),
                documents=2, skipped=0)
    val, test = split_windows(w)
    assert val.ids[:, 0].tolist() == [0, 20, 40] and test.ids[:, 0].tolist() == [10, 30]
    with pytest.raises(FactoryError, match="at least 2"):
        split_windows(Windows(ids=ids[:1], attention_mask=torch.ones_like(ids[:1]),
                              keep=torch.zeros_like(ids[:1], dtype=torch.bool), documents=1, skipped=0))


def test_published_and_pulled_ensemble_loads_with_verified_members(built, tiny_dlm, tiny_specialist, tmp_path):
    from dlm_factory.catalog.core import Catalog

    cat = Catalog(f"file://{tmp_path / 'catalog'}", cache_dir=tmp_path / "cache", sign_key=False, trust=False)
    cat.publish(tiny_dlm, "tiny-dlm", kind="general")
    cat.publish(tiny_specialist, "spec-json", kind="specialist", user="json")
    cat.publish(tiny_dlm, "tiny-base", kind="general")
    staged = tmp_path / "staged"
    shutil.copytree(built.output, staged)
    pinned = cat.ensemble_spec([("tiny-dlm", "general"), ("spec-json", "specialist"), ("tiny-base", "general")])
    repin(staged, {m.name: m for m in pinned.members})
    r = roles(read_spec(staged))
    assert r.general.digest == pinned.members[0].digest  # catalog digests now, not local ones
    cat.publish(staged, "assistant", kind="ensemble", user="json")
    pulled = cat.pull("assistant", tmp_path / "pulled", user="json")
    assert sorted(pulled.members) == sorted(m.name for m in read_spec(staged).members)
    ens = load_ensemble(pulled.path)
    assert ens.user == "json" and (ens.form, ens.lam) == (built.form, built.lam)
    router = ens.router_scorer()  # the user's n-gram router travels with the ensemble, sha256 checked
    assert router.counts == load_ensemble(built.output).router_scorer().counts and router.counts
    weights = Path(pulled.members["spec-json"]) / "model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(FactoryError, match="member spec-json: model.safetensors does not match"):
        load_ensemble(pulled.path)


def test_the_build_is_done_for_the_same_inputs_only(built, tiny_dlm, tiny_specialist, demo_root):
    from dlm_factory.dlm.checkpoint.record import is_done
    from dlm_factory.dlm.stages.ensemble import ensemble_key

    cfg = tiny_config(demo_root)
    assert is_done(built.output, ensemble_key(tiny_dlm, tiny_specialist, cfg, base=tiny_dlm))
    assert not is_done(built.output, ensemble_key(tiny_dlm, tiny_specialist, cfg))  # no base: another ensemble
    other = cfg.model_copy(update={"lambdas": [0.25]})
    assert not is_done(built.output, ensemble_key(tiny_dlm, tiny_specialist, other, base=tiny_dlm))
    private = cfg.model_copy(update={"context": "secret user notes"})
    key = ensemble_key(tiny_dlm, tiny_specialist, private, base=tiny_dlm)
    assert "secret" not in key.model_dump_json()  # a private context enters the record by digest only
