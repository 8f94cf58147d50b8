"""Scaling: function-preserving growth, ladder planning and its refusals, memory estimates, the fits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.evaluation.corpus import EvalConfig
from dlm_factory.dlm.evaluation.scaling import (
    Point,
    compute_multiplier,
    compute_optimal,
    curve_points,
    fit_loss_surface,
    fit_power_law,
    frontier,
)
from dlm_factory.dlm.stages.grow import Shape, compute_params, config_params, depth_map, grow
from dlm_factory.dlm.stages.scale import ScaleConfig, parse_ladder, plan_ladder
from dlm_factory.dlm.train.config import TrainConfig
from dlm_factory.dlm.train.memory import GIB, estimate_memory


def tiny_model(arch: str = "llama", **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, **extra)
    if arch == "qwen2":  # q/k/v biases, tied embeddings
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def logits(model, ids, bidirectional: bool = False):
    from dlm_factory.dlm.diffusion.forward import attention_bias

    with torch.no_grad():
        if not bidirectional:
            return model(input_ids=ids).logits
        mask = attention_bias(None, ids.shape, dtype=torch.float32, device=ids.device)
        return model(input_ids=ids, attention_mask=mask).logits


# --- growth --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("shape", ["4x32", "3x48", "5x64"])
def test_growth_leaves_logits_unchanged(arch, shape):
    """Depth (zeroed output projections) and width (zero writers, random readers, rescaled RMSNorm): the grown
    model's logits equal the original's (max abs diff < 1e-5), causal and bidirectional (a DLM's forward)."""
    model = tiny_model(arch)
    ids = torch.randint(0, 100, (3, 17), generator=torch.Generator().manual_seed(1))
    grown = grow(model, Shape.parse(shape))
    assert (grown.config.num_hidden_layers, grown.config.hidden_size) == (Shape.parse(shape).layers, Shape.parse(shape).hidden)
    assert compute_params(grown)[0] > compute_params(model)[0]
    for bidirectional in (False, True):
        diff = (logits(grown, ids, bidirectional) - logits(model, ids, bidirectional)).abs().max().item()
        assert diff < 1e-5, (arch, shape, bidirectional, diff)


def test_grown_blocks_and_dimensions_learn():
    """The zeroed matrices are not a dead end: one backward gives them gradients."""
    grown = grow(tiny_model(), Shape(4, 48)).train()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    grown(input_ids=ids, labels=ids).loss.backward()
    source, added = depth_map(2, 4)
    new = added.index(True)
    assert grown.model.layers[new].self_attn.o_proj.weight.abs().sum() == 0  # zeroed at init ...
    assert grown.model.layers[new].self_attn.o_proj.weight.grad.abs().sum() > 0  # ... but learning
    assert grown.model.layers[new].mlp.down_proj.weight.grad.abs().sum() > 0
    assert grown.model.layers[0].self_attn.o_proj.weight.grad[32:].abs().sum() > 0  # rows of the new dims
    assert grown.model.embed_tokens.weight.grad[:, 32:].abs().sum() > 0


def test_depth_map_spreads_the_new_blocks():
    assert depth_map(2, 4) == ([0, 0, 1, 1], [False, True, False, True])
    assert depth_map(3, 4)[0] == [0, 1, 2, 2]  # one copy: on top
    assert depth_map(2, 2) == ([0, 1], [False, False])


def test_growth_refuses_shrinking_odd_widths_and_other_families():
    model = tiny_model()
    with pytest.raises(FactoryError, match="only adds"):
        grow(model, Shape(1, 32))
    with pytest.raises(FactoryError, match="whole number"):
        grow(model, Shape(2, 40))  # 40 is not a whole number of 8-dim heads in groups of 2
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(FactoryError, match="Llama-style"):
        grow(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)), Shape(2, 32))
    with pytest.raises(FactoryError, match="LAYERSxHIDDEN"):
        Shape.parse("4by64")


def test_config_params_match_the_built_model():
    model = grow(tiny_model(), Shape(3, 48))
    assert config_params(model.config) == compute_params(model)
    total, n = compute_params(model)
    assert total - n == 100 * 48  # the input embedding is the only parameter without per-token compute


# --- planning and its refusals -------------------------------------------------------------------------------


def small(**kw) -> ScaleConfig:
    values = dict(ladder="2x64,3x64,3x96", max_chars=100_000, seq_len=32, budget=2e9, min_steps=5, zero=None,
                  train=TrainConfig(steps=1, batch_size=4, lr=3e-3, log_every=5, checkpoint_every=1000),
                  eval=EvalConfig(mc_samples=4, max_windows=4, seq_len=32))
    values.update(kw)
    return ScaleConfig(**values)


def test_ladder_parsing():
    assert parse_ladder("2x64, 4x64 ,4x128") == ["2x64", "4x64", "4x128"]
    for bad in ("", "2x64,,4x64", "2x64,2x64"):
        with pytest.raises(FactoryError, match="ladder"):
            parse_ladder(bad)


def test_plan_gives_every_rung_the_same_compute(tiny_ar):
    plan = plan_ladder(tiny_ar, small())
    assert [r.shape for r in plan.rungs] == ["2x64", "3x64", "3x96"]
    assert [r.kind for r in plan.rungs] == ["grow"] * 3
    ns = [r.compute_params for r in plan.rungs]
    assert ns == sorted(ns) and len(set(ns)) == 3
    for r in plan.rungs:  # C = 6 N D within one step of the budget
        assert r.flops == pytest.approx(6 * r.compute_params * r.tokens)
        assert 2e9 - 6 * r.compute_params * plan.tokens_per_step < r.flops <= 2e9
    assert plan.rungs[0].steps > plan.rungs[-1].steps  # small rungs see more tokens
    assert plan.rungs[0].anneal_steps == round(0.2 * plan.rungs[0].steps)  # converted from AR: annealed


def test_plan_refuses_a_ladder_that_is_not_increasing(tiny_ar):
    with pytest.raises(FactoryError, match="not increasing"):
        plan_ladder(tiny_ar, small(ladder="3x64,2x64"))  # 2x64 is the model itself: fewer parameters


def test_plan_refuses_a_rung_that_cannot_fit_with_the_numbers(tiny_ar):
    with pytest.raises(FactoryError, match=r"cannot fit: needs an estimated .* GiB per rank .*0.00 GiB available"):
        plan_ladder(tiny_ar, small(memory_limit_gb=0.001))


def test_plan_refuses_more_processes_than_the_machine_has(tiny_ar):
    import os

    cores = len(os.sched_getaffinity(0))
    with pytest.raises(FactoryError, match=f"at most {cores}"):
        plan_ladder(tiny_ar, small(zero=2, nproc=cores + 1))


def test_unsupported_zero_stage_and_offload_without_zero_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="ZeRO stage 4"):
        small(zero=4)
    with pytest.raises(ValidationError, match="offload needs"):
        small(zero=0, offload=True)
    with pytest.raises(ValidationError, match="need"):
        small(zero=None, nproc=2)


def test_family_with_another_tokenizer_is_refused(tiny_ar, tmp_path):
    from dlm_factory.dlm.data.corpus import stdlib_documents
    from tests.dlm.helpers import plain_tokenizer, save_random_checkpoint

    other = save_random_checkpoint("llama", plain_tokenizer([d.text for d in stdlib_documents("train", max_chars=20_000)]),
                                   tmp_path / "other")
    with pytest.raises(FactoryError, match="tokenizer differs"):
        plan_ladder(tiny_ar, small(ladder=f"{tiny_ar},{other}"))


def test_a_budget_too_small_for_a_rung_is_refused(tiny_ar):
    with pytest.raises(FactoryError, match="raise --budget"):
        plan_ladder(tiny_ar, small(budget=1e6))


# --- memory ----------------------------------------------------------------------------------------------


def test_memory_estimate_follows_the_zero_stages():
    kw = dict(layers=24, hidden=2048, heads=16, vocab=32000, seq_len=2048, micro_batch=1, ranks=8)
    n = 1_300_000_000
    plain = estimate_memory(n, zero=None, **kw)
    z1, z2, z3 = (estimate_memory(n, zero=z, **kw) for z in (1, 2, 3))
    assert plain.weights + plain.gradients + plain.optimizer == 16 * n  # fp32 weights + grads + Adam
    assert z1.optimizer < plain.optimizer and z2.gradients < z1.gradients and z3.weights < z2.weights
    assert plain.per_rank > z1.per_rank > z2.per_rank > z3.per_rank
    off = estimate_memory(n, zero=3, offload=True, **kw)
    assert off.optimizer == 0 and off.weights == 0 and off.host_offload > 0
    assert "GiB per rank" in z3.describe() and z3.per_rank / GIB < plain.per_rank / GIB


# --- fits ------------------------------------------------------------------------------------------------


def law_points(a, b, c, noise, seed):
    rng = np.random.default_rng(seed)
    return [Point(compute=float(x), loss=float(a * x**-b + c + rng.normal(0, noise)), stderr=noise)
            for x in np.geomspace(1e12, 1e15, 20)]


def test_power_law_fit_recovers_a_known_law_with_honest_errors():
    a, b, c = 2 * 1e12**0.3, 0.3, 2.0
    fit = fit_power_law(law_points(a, b, c, 0.005, 0))
    err = fit.stderr()
    assert abs(fit.b - b) < 3 * err["b"] + 1e-3 and abs(fit.c - c) < 3 * err["c"] + 1e-3
    assert abs(math.log(fit.a / a)) < 0.2
    assert 0.3 < fit.chi2_per_dof < 3


def test_multiplier_recovers_16x_between_two_laws():
    """The DLM law is the AR law shifted 16x in compute: the multiplier comes out near 16, the truth inside."""
    b, c, a_ar = 0.3, 2.0, 2 * 1e12**0.3
    dlm, ar = law_points(a_ar * 16**b, b, c, 0.003, 1), law_points(a_ar, b, c, 0.003, 2)
    m = compute_multiplier(fit_power_law(dlm), fit_power_law(ar), 1e15, dlm_frontier=dlm, ar_frontier=ar)
    lo, hi = m.interval
    assert 8 < m.value < 32 and lo < 16 < hi * 1.5
    assert m.observed == pytest.approx(16, rel=0.5)  # no fit: where the AR curve reached the DLM's best loss


def test_unreachable_ar_loss_gives_an_infinite_multiplier():
    dlm = fit_power_law(law_points(2 * 1e12**0.3, 0.3, 3.0, 0.003, 3))  # floor 3.0 ...
    ar = fit_power_law(law_points(2 * 1e12**0.3, 0.3, 2.0, 0.003, 4))  # ... above the AR loss at 1e15
    m = compute_multiplier(dlm, ar, 1e15)
    assert math.isinf(m.value) and m.unreachable_fraction > 0.9


def test_frontier_and_compute_optimal_size_on_a_synthetic_surface():
    """Curves drawn from L(N, D) = E + A N^-a + B D^-b at equal budget: the fit finds N_opt."""
    E, A, alpha, B, beta = 1.5, 400.0, 0.34, 410.0, 0.28
    rng = np.random.default_rng(5)
    rungs = {}
    for n in (2e5, 6e5, 1.5e6):
        steps = int(6e13 / (6 * n * 4096))
        curve = [(s, E + A * n**-alpha + B * (s * 4096) ** -beta + rng.normal(0, 0.02)) for s in range(1, steps + 1)]
        rungs[str(n)] = curve_points(curve, params=int(n), tokens_per_step=4096, rung=str(n))
    front = frontier(rungs)
    assert len(front) >= 8 and front[0].loss > front[-1].loss
    for p in front:  # the frontier is the lowest rung at each compute
        for pts in rungs.values():
            if pts[0].compute <= p.compute <= pts[-1].compute:
                x = np.log([q.compute for q in pts])
                assert p.loss <= np.interp(np.log(p.compute), x, [q.loss for q in pts]) + 1e-12
    surface = fit_loss_surface([p for pts in rungs.values() for p in pts])
    opt = compute_optimal(surface, 1e15)
    k = 1e15 / 6
    truth = (alpha * A / (beta * B)) ** (1 / (alpha + beta)) * k ** (beta / (alpha + beta))
    assert opt["params"] == pytest.approx(truth, rel=0.25)
    assert opt["params_interval"][0] <= opt["params"] <= opt["params_interval"][1]


def test_plot_writes_a_png(tmp_path):
    from dlm_factory.dlm.evaluation.scaling import fit_objective, plot

    pts = {"r0": law_points(2 * 1e12**0.3, 0.3, 2.0, 0.003, 6)}
    for p in pts["r0"]:
        p.params, p.tokens = 1000, p.compute / 6000
    f = fit_objective("diffusion", pts, target_compute=1e16)
    plot([f], tmp_path / "p.png", title="t")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- upload with a marker ---------------------------------------------------------------------------------


def test_upload_writes_its_marker_last(tmp_path):
    from dlm_factory.dlm.paths import UPLOAD_MARKER, upload_complete, upload_dir

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "stage.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"x" * 10)
    url = (tmp_path / "dest").as_uri()
    assert not upload_complete(url)
    upload_dir(src, url, last=("stage.json",))
    assert upload_complete(url)
    manifest = json.loads((tmp_path / "dest" / UPLOAD_MARKER).read_text())["files"]
    assert list(manifest) == ["sub/w.bin", "stage.json"] and manifest["sub/w.bin"] == 10


# --- the CLI: bad input is one error line, exit code 2, nothing written ---------------------------------------


def cli(capsys, *argv):
    from dlm_factory.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_refused(code, err, out, *needles):
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize("argv,needles", [
    (["--zero", "4"], ["ZeRO stage 4 is not supported"]),
    (["--ladder", "3x64,2x64"], ["not increasing"]),
    (["--ladder", "2x64,2x64"], ["appears twice"]),
    (["--memory-limit", "0.001"], ["cannot fit", "GiB per rank", "available"]),
    (["--nproc", "999"], ["--nproc 999", "at most"]),
    (["--ladder", "2x64,2x80"], ["whole number"]),
])
def test_cli_refuses_bad_input_without_writing(capsys, tmp_path, tiny_ar, argv, needles):
    out = tmp_path / "ladder"
    base = {"--ladder": "2x64,3x64", "--budget": "1e10", "--seq-len": "32", "--max-chars": "50000"}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        base[flag] = value
    args = [x for kv in base.items() for x in kv]
    code, err = cli(capsys, "scale", "--model", tiny_ar, "--output", str(out), "--device", "cpu", *args)
    assert_refused(code, err, out, *needles)


def test_cli_refuses_a_family_with_mismatched_tokenizers(capsys, tmp_path, tiny_ar):
    from dlm_factory.dlm.data.corpus import stdlib_documents
    from tests.dlm.helpers import plain_tokenizer, save_random_checkpoint

    other = save_random_checkpoint("llama", plain_tokenizer([d.text for d in stdlib_documents("train", max_chars=20_000)]),
                                   tmp_path / "other")
    out = tmp_path / "ladder"
    code, err = cli(capsys, "scale", "--model", tiny_ar, "--ladder", f"{tiny_ar},{other}", "--output", str(out),
                    "--device", "cpu", "--budget", "1e10", "--seq-len", "32")
    assert_refused(code, err, out, "tokenizer differs")


def test_cli_refuses_an_output_holding_another_ladder(capsys, tmp_path, tiny_ar):
    out = tmp_path / "ladder"
    out.mkdir()
    (out / "something").write_text("x")
    code, err = cli(capsys, "scale", "--model", tiny_ar, "--ladder", "2x64,3x64", "--output", str(out),
                    "--device", "cpu", "--budget", "1e10", "--seq-len", "32", "--max-chars", "50000")
    assert code == 2 and "output already exists" in err
    assert sorted(p.name for p in out.iterdir()) == ["something"]


@pytest.mark.slow
def test_ladder_on_two_processes_under_zero2_uploads_to_a_url(tiny_ar, tmp_path, monkeypatch):
    """The whole stage through torchrun (2 ranks, ZeRO-2), written to a URL output: staged, uploaded, marker last."""
    from dlm_factory.dlm.checkpoint.io import load_model
    from dlm_factory.dlm.paths import upload_complete
    from dlm_factory.dlm.stages.scale import scale

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    url = (tmp_path / "bucket" / "ladder").as_uri()
    cfg = small(ladder="2x64,3x64", zero=2, nproc=2, budget=1e10, max_chars=60_000)
    report = scale(tiny_ar, url, cfg)
    assert upload_complete(url)
    assert {r["world_size"] for r in report["rows"]} == {2}
    local = tmp_path / "bucket" / "ladder"
    assert (local / "stage.json").is_file() and (local / "scaling.png").is_file()
    dlm = load_model(local / "rungs" / "r1-3x64" / "diffusion")
    assert dlm.is_diffusion and dlm.model.config.num_hidden_layers == 3


def test_a_nearly_flat_law_gives_an_infinite_multiplier_not_an_overflow():
    from dlm_factory.dlm.evaluation.scaling import PowerLaw

    flat = PowerLaw(A=1.0, b=1e-4, c=2.0, c0=1e12, cov=[[1e-4, 0, 0], [0, 1e-10, 0], [0, 0, 1e-4]], points=8,
                    chi2_per_dof=1.0)
    ar = fit_power_law(law_points(2 * 1e12**0.3, 0.3, 2.0, 0.003, 7))
    assert math.isinf(flat.compute_for(2.1))  # (1 / 0.1)^(1e4): beyond any float
    m = compute_multiplier(flat, ar, 1e15)
    assert math.isinf(m.value) or m.value > 1e6
