"""The combined denoiser: forms, exact limits, the ELBO through the one estimator, the KV cache, contexts."""

from __future__ import annotations

import math

import pytest
import torch

from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.diffusion.ensemble import (
    EnsembleDenoiser,
    LastCall,
    Member,
    check_lambda,
)
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.evaluation.likelihood import elbo, paired_elbo
from dlm_factory.dlm.sampling.sampler import SamplerConfig, sample


@pytest.fixture(scope="module")
def members(tiny_dlm, tiny_specialist):
    return ModelDenoiser(load_model(tiny_dlm)), ModelDenoiser(load_model(tiny_specialist))


def noisy_batch(den, B=3, T=24, seed=0):
    """A left-padded batch [B, T] with about half of the positions masked (never position 0)."""
    g = torch.Generator().manual_seed(seed)
    V = len(den.tokenizer)
    ids = torch.randint(10, V - 10, (B, T), generator=g)
    ids[ids == den.spec.mask_token_id] = 11
    am = torch.ones_like(ids)
    am[1, :5] = 0  # row 1 left-padded
    masked = (torch.rand(B, T, generator=g) < 0.5) & am.bool()
    masked[:, 0] = False
    masked[1, :6] = False
    return ids.masked_fill(masked, den.spec.mask_token_id), am, ids


def test_lambda_zero_is_exactly_the_general_member(members):
    g, s = members
    x, am, _ = noisy_batch(g)
    for form, base in (("product_of_experts", None), ("emulated_finetuning", s)):
        ens = EnsembleDenoiser.combine(form, 0.0, g, s, base)
        assert torch.equal(ens(x, am), g(x, am))


def test_product_of_two_identical_members_at_lambda_one_is_temperature_half(members):
    g, _ = members
    x, am, _ = noisy_batch(g)
    ens = EnsembleDenoiser.combine("product_of_experts", 1.0, g, g)
    expected = (g(x, am) / 0.5).log_softmax(-1)  # p^2, renormalised
    torch.testing.assert_close(ens(x, am), expected, atol=1e-5, rtol=1e-5)


def test_product_of_experts_is_the_renormalised_weighted_sum(members):
    g, s = members
    x, am, _ = noisy_batch(g)
    ens = EnsembleDenoiser.combine("poe", 0.7, g, s)
    out = ens(x, am)
    torch.testing.assert_close(out, (g(x, am) + 0.7 * s(x, am)).log_softmax(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(out.shape[:2]), atol=1e-4, rtol=0)
    assert not torch.allclose(out, g(x, am), atol=1e-3)  # the specialist changed something


def test_emulated_finetuning_with_tuned_equal_to_base_is_the_general_member(members):
    g, s = members
    x, am, _ = noisy_batch(g)
    ens = EnsembleDenoiser.combine("eft", 1.5, g, s, s)
    torch.testing.assert_close(ens(x, am), g(x, am), atol=1e-5, rtol=1e-5)
    shifted = EnsembleDenoiser.combine("eft", 0.5, g, s, g)  # general + 0.5 (spec - general)
    torch.testing.assert_close(shifted(x, am), (0.5 * g(x, am) + 0.5 * s(x, am)).log_softmax(-1), atol=1e-5, rtol=1e-5)


def test_ensemble_elbo_is_the_estimator_on_the_combined_distribution(members):
    g, s = members
    x, am, ids = noisy_batch(g, B=4, T=32, seed=1)

    class Manual:  # the same combination written out by hand
        spec, tokenizer, device = g.spec, g.tokenizer, g.device

        def __call__(self, ids, attention_mask=None):
            return (g(ids, attention_mask) + 0.5 * s(ids, attention_mask)).log_softmax(-1)

    right = torch.ones_like(ids)  # right-padded windows, as the evaluation builds them
    right[2, 20:] = 0
    ens = EnsembleDenoiser.combine("poe", 0.5, g, s)
    a = elbo(ens, ids, attention_mask=right, n=8, seed=3)
    b = elbo(Manual(), ids, attention_mask=right, n=8, seed=3)
    assert a.bits_per_token == pytest.approx(b.bits_per_token, abs=1e-5)
    assert a.stderr == pytest.approx(b.stderr, abs=1e-5) and a.stderr > 0
    zero = elbo(EnsembleDenoiser.combine("poe", 0.0, g, s), ids, attention_mask=right, n=8, seed=3)
    assert zero.bits_per_token == elbo(g, ids, attention_mask=right, n=8, seed=3).bits_per_token


def test_members_run_once_per_draw_and_paired_results_are_unchanged(members):
    g, s = members
    calls = {"g": 0, "s": 0}

    class Counting:
        def __init__(self, den, key):
            self.den, self.key, self.spec, self.tokenizer, self.device = den, key, den.spec, den.tokenizer, den.device

        def __call__(self, ids, attention_mask=None):
            calls[self.key] += 1
            return self.den(ids, attention_mask)

    _, _, ids = noisy_batch(g, B=2, T=20)
    cg, cs = LastCall(Counting(g, "g")), LastCall(Counting(s, "s"))
    dens = {"general": cg, **{f"l{lam}": EnsembleDenoiser.combine("poe", lam, cg, cs) for lam in (0.25, 0.5, 1.0)}}
    shared = paired_elbo(dens, ids, n=4, seed=0)
    assert calls == {"g": 4, "s": 4}  # 4 draws, one forward each, for 4 contenders
    plain = paired_elbo({"general": g, "l0.5": EnsembleDenoiser.combine("poe", 0.5, g, s)}, ids, n=4, seed=0)
    assert shared["l0.5"].bits_per_token == pytest.approx(plain["l0.5"].bits_per_token, abs=1e-6)


def test_block_cache_equals_the_full_forward_on_an_unchanged_sequence(members):
    g, s = members
    x, am, _ = noisy_batch(g, T=40)
    for ctx in (None, [g.tokenizer.eos_token_id, 40, 41, 42]):
        ens = EnsembleDenoiser.combine("eft", 0.8, g, s, g, context=ctx)
        full = ens(x, am)
        for dual in (True, False):
            lp, cache = ens.block_cache(x, am, (16, 24), dual=dual)
            torch.testing.assert_close(lp, full[:, 16:24], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(ens.block_log_probs(cache, x, am), full[:, 16:24], atol=1e-4, rtol=1e-4)


def test_cached_sampling_equals_uncached_where_the_cache_is_exact(members):
    g, s = members
    tok = g.tokenizer
    prompts = [tok("def f(x):\n")["input_ids"], tok("import os\nclass A:\n    def run(self):")["input_ids"]]
    ens = EnsembleDenoiser.combine("poe", 0.6, g, s)
    # tau = 0 commits a whole block at its first step, which the cache computes with a full forward
    for cache in ("dual", "prefix"):
        cfg = dict(sampler="threshold", threshold=0.0, length=16, block_size=8, stop_at_eos=False)
        assert sample(ens, prompts, SamplerConfig(**cfg, cache=cache)) == sample(ens, prompts, SamplerConfig(**cfg, cache="none"))
    # lambda = 0: the ensemble is the general model, cache and all
    cfg = SamplerConfig(length=16, block_size=8, stop_at_eos=False)
    assert sample(EnsembleDenoiser.combine("poe", 0.0, g, s), prompts, cfg) == sample(g, prompts, cfg)


def test_ensemble_plugs_into_every_sampler(members):
    g, s = members
    ens = EnsembleDenoiser.combine("poe", 0.5, g, s)
    prompt = [g.tokenizer("def f(x):\n")["input_ids"]]
    for cfg in (SamplerConfig(sampler="llada", length=8, steps=4, block_size=4, stop_at_eos=False),
                SamplerConfig(length=8, block_size=4, stop_at_eos=False, cfg_weight=1.0),
                SamplerConfig(length=8, block_size=4, stop_at_eos=False, temperature=0.8, top_k=20)):
        out = sample(ens, prompt, cfg)
        assert len(out[0]) == 8 and g.spec.mask_token_id not in out[0]


def test_specialist_context_is_seen_by_the_specialist_only(members):
    g, s = members
    ctx = [g.tokenizer.eos_token_id] + g.tokenizer("import json\n")["input_ids"]
    x, am, _ = noisy_batch(g, T=20)
    ens = EnsembleDenoiser.combine("poe", 1.0, g, s, context=ctx)
    C = len(ctx)
    with_ctx = s(torch.cat([torch.tensor([ctx] * 3), x], 1), torch.cat([torch.ones(3, C, dtype=torch.long), am], 1))
    torch.testing.assert_close(ens(x, am), (g(x, am) + with_ctx[:, C:]).log_softmax(-1), atol=1e-5, rtol=1e-5)
    assert ens.max_positions == g.model.config.max_position_embeddings - C


def test_batched_prompts_with_context_decode_as_each_alone(members):
    g, s = members
    tok = g.tokenizer
    ctx = [tok.eos_token_id] + tok("import json\n")["input_ids"]
    ens = EnsembleDenoiser.combine("poe", 0.8, g, s, context=ctx)
    prompts = [tok("x = 1\n")["input_ids"], tok("def load(path, mode='r'):\n    ")["input_ids"]]
    cfg = SamplerConfig(length=12, block_size=4, stop_at_eos=False)
    together = sample(ens, prompts, cfg)
    assert together == [sample(ens, [p], cfg)[0] for p in prompts]


def test_members_with_different_tokenizers_are_refused_in_one_line(members, foreign_dlm):
    g, _ = members
    other = ModelDenoiser(load_model(foreign_dlm))
    with pytest.raises(FactoryError, match="must share a tokenizer") as err:
        EnsembleDenoiser.combine("poe", 0.5, g, other)
    assert "\n" not in str(err.value)


def test_logarithmic_pool_is_the_weighted_geometric_mean_from_general_to_specialist(members):
    g, s = members
    x, am, _ = noisy_batch(g)
    lg, ls = g(x, am), s(x, am)
    pool = EnsembleDenoiser.combine("pool", 3.0, g, s)(x, am)
    torch.testing.assert_close(pool, ((lg + 3.0 * ls) / 4.0).log_softmax(-1), atol=1e-5, rtol=1e-5)
    # its end points are the members themselves (a renormalised log-prob is itself)
    torch.testing.assert_close(EnsembleDenoiser.combine("pool", 0.0, g, s)(x, am), lg, atol=1e-5, rtol=1e-5)
    near = EnsembleDenoiser.combine("pool", 8.0, g, s)(x, am)
    assert (near - ls).abs().mean() < (pool - ls).abs().mean() < (lg - ls).abs().mean()
    # and, unlike the product at lambda = 1, two identical members pool to that member
    torch.testing.assert_close(EnsembleDenoiser.combine("pool", 1.0, g, g)(x, am), lg, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [-0.1, 8.5, float("nan"), float("inf"), "x"])
def test_lambda_out_of_range_is_refused(bad):
    with pytest.raises(FactoryError, match="lambda"):
        check_lambda(bad)


def test_emulated_finetuning_needs_the_base_and_forms_are_named(members):
    g, s = members
    with pytest.raises(FactoryError, match="base model"):
        EnsembleDenoiser.combine("eft", 0.5, g, s)
    with pytest.raises(FactoryError, match="unknown ensemble form"):
        EnsembleDenoiser.combine("mixture", 0.5, g, s)
    with pytest.raises(FactoryError, match="mask token"):
        Member(g, 1.0, [1, g.spec.mask_token_id])


def test_ar_combination_matches_the_exact_nll_and_its_own_weighted_sum(tiny_ar):
    from dlm_factory.dlm.evaluation.likelihood import ar_combined_nll, ar_nll

    m = load_model(tiny_ar).model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 500, (4, 24), generator=g)
    am = torch.ones_like(ids)
    am[3, 15:] = 0
    out = ar_combined_nll({"g": m}, {"one": {"g": 1.0}, "square": {"g": 2.0}}, ids, attention_mask=am)
    exact = ar_nll(m, ids, attention_mask=am)
    assert out["g"].bits_per_token == pytest.approx(exact.bits_per_token, abs=1e-4)
    assert out["one"].bits_per_token == pytest.approx(exact.bits_per_token, abs=1e-4)
    assert out["one-g"].bits_per_token == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        lp = m(input_ids=ids, attention_mask=am).logits[:, :-1].float().log_softmax(-1)
        sq = (2 * lp).log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = am[:, 1:].bool()
    expected = float(-(sq[mask]).mean()) / math.log(2)
    assert out["square"].bits_per_token == pytest.approx(expected, abs=1e-4)
    assert out["square"].stderr > 0
