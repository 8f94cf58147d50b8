"""The ELBO's error bar is valid: over 40 seeds the reported standard error matches the observed
spread of the estimates (within 30%), for a trained denoiser, a uniform one, one whose loss varies
smoothly with t (where the old spread-across-strata estimate was 17x too large) and on short rows;
paired differences share draws and cancel their noise."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.data.corpus import read_documents, rolling_windows
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.evaluation.likelihood import elbo, paired_elbo
from tests.dlm.test_diffusion import Uniform, spec

SEEDS = 40


class Smooth(Uniform):
    """Loss that grows smoothly with the masking rate: p(clean) = 1 - 0.9 * (masked share of the row)."""

    def __init__(self, clean, vocab, s):
        super().__init__(vocab, s)
        self.clean = clean

    def __call__(self, ids, attention_mask=None):
        masked_share = (ids == self.spec.mask_token_id).float().mean(-1, keepdim=True)  # [B, 1]
        p = (1 - 0.9 * masked_share).clamp(min=1e-3)[..., None]  # [B, 1, 1]
        out = torch.log((1 - p) / (self.vocab - 1)).expand(*ids.shape, self.vocab).clone()
        return out.scatter_(-1, self.clean[: ids.shape[0], :, None], torch.log(p).expand(*ids.shape, 1))


def coverage(make_estimate) -> tuple[float, float]:
    """(RMS of the reported stderr, observed std of the estimates) over SEEDS seeds."""
    runs = [make_estimate(seed) for seed in range(SEEDS)]
    reported = math.sqrt(statistics.fmean(r.stderr**2 for r in runs))
    return reported, statistics.stdev(r.bits_per_token for r in runs)


def assert_valid(reported: float, observed: float) -> None:
    assert 0.7 < reported / observed < 1.3, f"reported {reported:.4f} vs observed {observed:.4f}"


def test_stderr_covers_a_uniform_denoiser():
    ids = torch.randint(10, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    assert_valid(*coverage(lambda seed: elbo(Uniform(64, spec()), ids, n=16, seed=seed)))


def test_stderr_covers_a_smooth_in_t_denoiser_and_short_rows():
    ids = torch.randint(10, 64, (8, 32), generator=torch.Generator().manual_seed(1))
    assert_valid(*coverage(lambda seed: elbo(Smooth(ids, 64, spec()), ids, n=16, seed=seed)))
    short = torch.randint(10, 64, (6, 4), generator=torch.Generator().manual_seed(2))
    assert_valid(*coverage(lambda seed: elbo(Uniform(64, spec()), short, n=16, seed=seed)))


def test_stderr_covers_a_trained_denoiser(tiny_dlm):
    loaded = load_model(tiny_dlm)
    w = rolling_windows(loaded.tokenizer, read_documents("stdlib:heldout")[:4], 32, max_windows=4)
    den = ModelDenoiser(loaded)
    assert_valid(*coverage(lambda seed: elbo(den, w.ids, attention_mask=w.attention_mask, keep=w.keep,
                                             n=8, seed=seed)))


def test_paired_difference_shares_draws():
    ids = torch.randint(10, 64, (8, 32), generator=torch.Generator().manual_seed(3))
    same = paired_elbo({"a": Uniform(64, spec()), "b": Uniform(64, spec())}, ids, n=8)
    assert same["b-a"].bits_per_token == 0.0 and same["b-a"].stderr == 0.0
    assert same["a"].bits_per_token == same["b"].bits_per_token == elbo(Uniform(64, spec()), ids, n=8).bits_per_token
    res = paired_elbo({"small": Uniform(64, spec()), "big": Uniform(128, spec())}, ids, n=8)
    diff = res["big-small"]
    assert diff.bits_per_token == pytest.approx(res["big"].bits_per_token - res["small"].bits_per_token)
    # log2(128) - log2(64) = 1 bit per masked token; the paired error is a fraction of either estimate's own
    assert abs(diff.bits_per_token - 1.0) < 4 * diff.stderr + 0.02
    assert diff.stderr < 0.5 * math.hypot(res["big"].stderr, res["small"].stderr)


def test_odd_sample_counts_round_up_and_one_sample_is_refused():
    from dlm_factory.dlm.errors import FactoryError

    ids = torch.randint(10, 64, (2, 8), generator=torch.Generator().manual_seed(4))
    assert elbo(Uniform(64, spec()), ids, n=5).samples == 6
    with pytest.raises(FactoryError, match="at least 2"):
        elbo(Uniform(64, spec()), ids, n=1)


def test_paired_elbo_pairs_shift_and_no_shift_on_the_draws_each_sees_alone():
    from dlm_factory.dlm.errors import FactoryError

    ids = torch.randint(10, 64, (4, 16), generator=torch.Generator().manual_seed(5))
    shifted, plain = Uniform(64, spec(shift=True)), Uniform(128, spec(shift=False))
    res = paired_elbo({"shift": shifted, "no_shift": plain}, ids, n=8, seed=3)
    assert res["no_shift"].bits_per_token == elbo(plain, ids, n=8, seed=3).bits_per_token
    assert res["shift"].bits_per_token == elbo(shifted, ids, n=8, seed=3).bits_per_token
    with pytest.raises(FactoryError, match="one mask token"):
        paired_elbo({"a": shifted, "b": Uniform(64, spec(mask=4))}, ids, n=8)
