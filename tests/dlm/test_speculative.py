"""Speculative decoding with the DLM drafter: greedy equals AR greedy token for token; sampling follows
the AR model's distribution (chi-square), whatever the drafter proposes."""

from __future__ import annotations

import math

import pytest
import torch

from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.sampling.generate import ar_generate, encode_prompts
from dlm_factory.dlm.sampling.speculative import (
    SpeculativeConfig,
    SpeculativeStats,
    Speculator,
    accept,
    best_k,
    speculative_generate,
)

PROMPTS = ["def add(a, b):\n", "import os\n\n", "class Config:\n    def __init__(self", "for i in range("]


@pytest.fixture(scope="module")
def pair(tiny_dlm, tiny_ar):
    return load_model(tiny_dlm), load_model(tiny_ar)


@pytest.mark.parametrize("cfg", [SpeculativeConfig(length=24, refresh=0), SpeculativeConfig(length=24, k=8, adaptive=False),
                                 SpeculativeConfig(length=24, k=6, draft_steps=3), SpeculativeConfig(length=24, refresh=4),
                                 SpeculativeConfig(length=24, k=8, refresh=3, temperature=0.0, k_max=8)])
def test_greedy_is_token_for_token_ar_greedy(pair, cfg):
    dlm, ar = pair
    prompts = encode_prompts(ar.tokenizer, PROMPTS)
    expected = [ar_generate(ar, [p], cfg.length)[0] for p in prompts]
    got, stats = speculative_generate(dlm, ar, prompts, cfg)
    assert got == expected
    assert stats.rounds > 0 and stats.tokens == sum(map(len, got))
    assert stats.tokens_per_round >= 1.0  # every round commits at least the verifier's token


def test_drafter_prefix_cache(pair):
    """A full drafter forward gives the denoiser's own log-probs; the stored prefix reproduces them exactly
    while nothing before the window changed, and approximately after; refresh = 8 reads far fewer positions."""
    dlm, ar = pair
    from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser

    den, mask = ModelDenoiser(dlm), dlm.spec.mask_token_id
    context = encode_prompts(ar.tokenizer, ["def add(a, b):\n    return a + b\n\n"])[0]
    spec = Speculator(dlm, ar, SpeculativeConfig(refresh=8))
    stats = SpeculativeStats()
    x = torch.tensor([context + [mask] * 4])
    first = spec._draft_log_probs(x, len(context), stats)
    full = den(x)[0, len(context):]
    assert torch.allclose(first, full, atol=1e-4) and stats.draft_positions == x.shape[1]
    assert spec._prefix[0][0].shape[2] == len(context)  # committed positions stored, masks dropped
    # the same text again: the window is the last committed position (under the shift it predicts the first
    # mask) and the 4 masks, and exact (the stored prefix saw these very masks)
    again = spec._draft_log_probs(x, len(context), stats)
    assert torch.allclose(again, full, atol=1e-4) and stats.draft_positions == x.shape[1] + 5
    # two more committed tokens: a window of 2 + 4, approximate (the stored entries saw masks there)
    y = torch.tensor([context + [17, 18] + [mask] * 4])
    approx = spec._draft_log_probs(y, len(context) + 2, stats)
    exact = den(y)[0, len(context) + 2:]
    assert stats.draft_positions == x.shape[1] + 5 + 6
    assert (approx - exact).abs().max() < 0.5 * (exact - full[:, :]).abs().max() + 1e-3  # close, not unrelated
    outs = {}
    for refresh in (0, 8):
        stats = SpeculativeStats()
        cfg = SpeculativeConfig(length=32, k=4, adaptive=False, refresh=refresh)
        outs[refresh] = ([Speculator(dlm, ar, cfg).generate(p, stats) for p in encode_prompts(ar.tokenizer, PROMPTS)],
                         stats.draft_positions)
    assert outs[0][0] == outs[8][0]  # the verifier decides: the same output whatever the drafts
    assert outs[8][1] < 0.5 * outs[0][1]


def test_adaptive_k_follows_the_running_acceptance():
    cfg = SpeculativeConfig(k_min=1, k_max=16, draft_cost=0.1)
    ks = [best_k(acc, 100 - acc, cfg) for acc in (0, 20, 40, 60, 80, 95, 99)]
    assert ks == sorted(ks) and ks[0] == 1 and ks[-1] == 16  # more acceptance, longer drafts
    a = 0.5  # at a = 1/2 the expected tokens saturate at 2: drafts beyond a few only cost
    assert best_k(1, 1, cfg) == max(range(1, 17), key=lambda k: (1 - a ** (k + 1)) / (1 - a) / (1 + 0.1 * k)) == 2
    assert best_k(10**6, 0, SpeculativeConfig(k_max=8)) == 8 and best_k(0, 10**6, SpeculativeConfig(k_min=3)) == 3


def _chi2_pvalue(observed: torch.Tensor, probs: torch.Tensor, n: int) -> float:
    """Pearson chi-square p-value, bins with expected < 5 merged (Wilson-Hilferty approximation)."""
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_acceptance_rule_outputs_follow_the_verifier_whatever_the_drafter_proposes():
    """The rule alone, on a small vocabulary: outputs at every position follow p, drafts from a very different q."""
    g = torch.Generator().manual_seed(0)
    V, n = 6, 3000
    p_logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    p = torch.softmax(p_logits, -1)
    q = torch.softmax(torch.tensor([-2.0, 0.0, 0.5, 1.5, 0.0, 2.0]), -1)  # the drafter favours what p does not
    logits = p_logits.expand(3, V)  # the verifier's distribution after every prefix (k = 2 drafts)
    firsts, seconds, accepted = [], [], 0
    for _ in range(n):
        drafts = torch.multinomial(q.expand(2, V), 1, generator=g)[:, 0].tolist()
        a, token = accept(drafts, q.expand(2, V), logits, 1.0, g)
        out = drafts[:a] + [token]
        accepted += a
        firsts.append(out[0])
        if len(out) > 1:
            seconds.append(out[1])
    assert _chi2_pvalue(torch.bincount(torch.tensor(firsts), minlength=V).float(), p, n) > 1e-3
    assert _chi2_pvalue(torch.bincount(torch.tensor(seconds), minlength=V).float(), p, len(seconds)) > 1e-3
    assert 0.1 < accepted / (2 * n) < 0.9  # both branches (accept, resample) were exercised
    # the test has power: the drafter's own proposals are refused as samples of p
    drafts = torch.multinomial(q, n, replacement=True, generator=g)
    assert _chi2_pvalue(torch.bincount(drafts, minlength=V).float(), p, n) < 1e-6


@pytest.mark.slow
def test_sampling_with_the_real_pair_preserves_the_ar_distribution(pair):
    dlm, ar = pair
    prompt = encode_prompts(ar.tokenizer, ["def f(x):\n    return"])[0]
    cfg = SpeculativeConfig(length=1, k=1, adaptive=False, temperature=1.0, stop_at_eos=False, seed=1)
    spec = Speculator(dlm, ar, cfg)
    n = 1000
    vocab = len(ar.tokenizer)
    first = torch.bincount(torch.tensor([spec.generate(prompt)[0] for _ in range(n)]), minlength=vocab).float()
    with torch.no_grad():
        p1 = torch.softmax(ar.model(torch.tensor([prompt])).logits[0, -1, :vocab].float(), -1)
    assert _chi2_pvalue(first, p1, n) > 1e-3


def test_bad_pairs_are_refused(pair, tiny_ar):
    dlm, ar = pair
    with pytest.raises(FactoryError, match="verifier must be an autoregressive"):
        Speculator(dlm, dlm, SpeculativeConfig())
    with pytest.raises(FactoryError, match="drafter must be a diffusion"):
        Speculator(ar, ar, SpeculativeConfig())
    with pytest.raises(FactoryError, match="k_min 4 > k_max 2"):
        Speculator(dlm, ar, SpeculativeConfig(k_min=4, k_max=2))
    stats = SpeculativeStats()
    assert stats.acceptance == 0.0 and stats.tokens_per_round == 0.0


def test_cli_speculative_defaults_to_the_lineage_verifier(tiny_dlm, tiny_ar, capsys):
    import json

    from dlm_factory.cli import main

    assert main(["generate", "--model", tiny_dlm, "--prompt", "def f(x):", "--sampler", "speculative",
                 "--length", "8", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["verifier"] == tiny_ar and len(out["texts"]) == 1 and out["tokens_per_round"] >= 1
    assert main(["generate", "--model", tiny_dlm, "--prompt", "x", "--sampler", "speculative", "--draft-refresh", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --draft-refresh:")
    assert main(["generate", "--model", tiny_dlm, "--prompt", "x", "--sampler", "speculative", "--draft", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --draft:")
    assert main(["generate", "--model", tiny_dlm, "--prompt", "x", "--sampler", "speculative",
                 "--verifier", tiny_dlm]) == 2
    assert "must be an autoregressive" in capsys.readouterr().err
