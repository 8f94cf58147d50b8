"""Block-causal attention (experimental): groups and masks, the BD3 training forward, the exact block
KV cache against the full block-causal forward, the sampler option, block-causal distillation.

A random-weight Llama (sharp, context-dependent predictions) makes the equality checks non-vacuous,
as in test_sampling.py.
"""

from __future__ import annotations

import pytest
import torch

from dlm_factory.dlm.checkpoint.io import Loaded, load_model
from dlm_factory.dlm.checkpoint.record import StageRecord
from dlm_factory.dlm.diffusion.block_causal import (
    BlockCausalCache,
    block_causal_bias,
    block_causal_logits,
    block_diffusion_loss,
    block_noise,
    groups,
    trained_block_size,
    training_states,
)
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.sampling.sampler import SamplerConfig, sample
from tests.dlm.helpers import sharp_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/dlm/conftest.py; ``dlm`` comes from there too


def block_spec(spec, size: int | None):
    """``spec`` with one more training record: block-causal with blocks of ``size`` (None: bidirectional)."""
    config = {"block_causal": size} if size else {}
    return spec.model_copy(update={"stages": [*spec.stages, StageRecord(stage="distill", config=config)]})


@pytest.fixture(scope="module")
def rand(dlm):
    """Random Llama (attention set by the 4D masks passed in) with the tiny tokenizer."""
    return sharp_llama(len(dlm.tokenizer))


def test_groups_and_mask_golden():
    # prompt of 3, blocks of 2, T = 8: tokens 3-4 block 1, 5-6 block 2, 7 block 3
    assert groups(8, 3, 2, shift=False).tolist() == [0, 0, 0, 1, 1, 2, 2, 3]
    # shift: a position belongs to the block of the token it predicts (position 2 predicts token 3)
    assert groups(8, 3, 2, shift=True).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    bias = block_causal_bias(groups(5, 2, 2, shift=False), None, torch.float32)
    allowed = (bias[0, 0] == 0).int().tolist()
    assert allowed == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    am = torch.tensor([[0, 1, 1, 1, 1]])  # a padded key is never visible, a padded query sees itself
    padded = (block_causal_bias(groups(5, 2, 2, shift=False), am, torch.float32)[0, 0] == 0).int()
    assert padded[:, 0].tolist() == [1, 0, 0, 0, 0] and padded[2].tolist() == [0, 1, 1, 1, 0]
    with pytest.raises(FactoryError, match="block size"):
        groups(8, 3, 0, shift=True)
    with pytest.raises(FactoryError, match="prompt length"):
        groups(8, 0, 2, shift=True)


@pytest.mark.parametrize("shift", [True, False])
def test_cache_equals_the_full_block_causal_forward(rand, shift):
    """Every step of a decode (two left-padded rows, three blocks, tokens committed between steps): the
    cached log-probs of the block equal one full block-causal forward over the whole sequence."""
    P, N, L, mask = 7, 4, 12, 2
    torch.manual_seed(1)
    ids = torch.randint(3, 200, (2, P + L))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    x = ids.clone()
    x[:, P:] = mask
    cache = BlockCausalCache(rand, am, N, shift)
    for bi in range(3):
        s, e = P + bi * N, P + (bi + 1) * N
        for step in range(3):
            lp = cache(x, (s, e))
            with torch.no_grad():
                full = block_causal_logits(rand, x, am, P, N, shift).float().log_softmax(-1)
            assert lp.shape == (2, N, rand.config.vocab_size)
            torch.testing.assert_close(lp, full[:, s - shift : e - shift], atol=1e-4, rtol=0)
            x[:, s + step] = ids[:, s + step]  # commit one token
        x[:, s:e] = ids[:, s:e]  # the block finishes
    assert cache.forwards == 9 and cache.cached == P + 2 * N - shift  # the last block is never cached
    # the cache holds only finished blocks: the first call processed the prompt and the first window,
    # later first calls the finished window and the new one, the others the window alone
    assert cache.positions == (P - shift + N) + 2 * N + 2 * (2 * N + 2 * N)


def test_cache_refuses_blocks_out_of_order(rand):
    x = torch.randint(3, 200, (1, 20))
    cache = BlockCausalCache(rand, torch.ones_like(x), 4, True)
    cache(x, (6, 10))
    cache(x, (10, 14))
    with pytest.raises(FactoryError, match="does not follow"):
        cache(x, (6, 10))  # already cached
    with pytest.raises(FactoryError, match="does not follow"):
        cache(x, (15, 19))  # not on the block grid


@pytest.mark.parametrize("shift", [True, False])
def test_training_forward_sees_what_the_decoder_sees(rand, dlm, shift):
    """The BD3 forward (noisy windows + clean copy) gives, for each window, the block-causal forward of a
    sequence whose earlier windows are clean and whose own window holds the noisy tokens."""
    spec = dlm.spec.model_copy(update={"shift": shift})
    P, N, T = 5, 4, 17
    ids = torch.randint(3, 200, (2, T))
    noisy, masked, rate = block_noise(ids, spec, P, N, torch.Generator().manual_seed(3))
    assert not masked[:, :P].any() and masked.any() and (rate[:, P:] > 0).all()
    if shift:  # the first position of each window reads the previous block's last token clean
        for s in range(P, T, N):
            assert torch.equal(noisy[:, s - 1], ids[:, s - 1])
    with torch.no_grad():
        states = rand.lm_head(training_states(rand, noisy, ids, P, N, shift)).float()  # hidden states -> logits
        group = groups(T, P, N, shift)
        for g in range(1, int(group.max()) + 1):
            x = torch.where(group[None] < g, ids, noisy)  # earlier windows clean, this window noisy
            ref = block_causal_logits(rand, x, None, P, N, shift).float()
            torch.testing.assert_close(states[:, group == g], ref[:, group == g], atol=1e-4, rtol=0)


def test_block_loss_is_finite_and_trains(tiny_dlm, dlm):
    model = load_model(tiny_dlm).model
    ids = torch.randint(3, 200, (4, 24))
    loss, n = block_diffusion_loss(model, dlm.spec, ids, 8, 8, torch.Generator().manual_seed(0))
    assert n == 4 * 16 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad()


class FullBlockCausal:
    """Reference denoiser without a cache: one full block-causal forward per step (knows the prompt length)."""

    def __init__(self, model, spec, prompt_len, block_size):
        self.model, self.spec, self.P, self.N = model, spec, prompt_len, block_size

    def __call__(self, ids, attention_mask=None):
        with torch.no_grad():
            lp = block_causal_logits(self.model, ids, attention_mask, self.P, self.N, self.spec.shift).float()
        lp = lp.log_softmax(-1)
        first = torch.full_like(lp[:, :1], -1e4).scatter_(-1, ids[:, :1, None], 0.0)
        return torch.cat([first, lp[:, :-1]], 1)


@pytest.mark.parametrize("kw", [dict(sampler="threshold", threshold=0.3), dict(sampler="llada", steps=12)])
def test_sampler_block_cache_equals_the_uncached_block_causal_decode(rand, dlm, kw):
    spec = block_spec(dlm.spec, 8)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21]]
    cfg = SamplerConfig(length=24, block_size=8, stop_at_eos=False, **kw)
    cached = sample(ModelDenoiser(Loaded(rand, dlm.tokenizer, spec)), prompts, cfg.model_copy(update={"cache": "block"}))
    reference = sample(FullBlockCausal(rand, spec, 7, 8), prompts, cfg.model_copy(update={"cache": "none"}))
    assert cached == reference and all(len(r) == 24 for r in cached)
    dual = sample(ModelDenoiser(Loaded(rand, dlm.tokenizer, spec)), prompts, cfg.model_copy(update={"cache": "dual"}))
    assert dual != cached  # bidirectional attention decodes otherwise: the comparison is not vacuous


def test_sampler_refuses_block_cache_on_the_wrong_model(rand, dlm):
    cfg = SamplerConfig(length=16, block_size=8, cache="block")
    with pytest.raises(FactoryError, match="needs a block-causal model"):
        sample(ModelDenoiser(Loaded(rand, dlm.tokenizer, block_spec(dlm.spec, None))), [[5, 6]], cfg)
    with pytest.raises(FactoryError, match="blocks of 4; decode with block_size 4, not 8"):
        sample(ModelDenoiser(Loaded(rand, dlm.tokenizer, block_spec(dlm.spec, 4))), [[5, 6]], cfg)
    with pytest.raises(FactoryError, match="single model denoiser"):
        sample(FullBlockCausal(rand, block_spec(dlm.spec, 8), 2, 8), [[5, 6]], cfg)
    # only the last training stage counts: a bidirectional stage after a block-causal one undoes it
    assert trained_block_size(block_spec(block_spec(dlm.spec, 8), None)) is None
    assert trained_block_size(block_spec(dlm.spec, 8)) == 8


def test_block_causal_distill_records_its_block_size(tiny_dlm, tiny_ar, tmp_path):
    from dlm_factory.dlm.checkpoint.record import is_done, read_record
    from dlm_factory.dlm.stages.distill import DistillConfig, distill, distill_key
    from dlm_factory.dlm.train.config import TrainConfig

    cfg = DistillConfig(data="stdlib:train", max_chars=100_000, prompts=8, prompt_len=16, length=16, block_causal=8,
                        train=TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, log_every=100))
    out = tmp_path / "bc"
    distill(tiny_dlm, tiny_ar, out, cfg, progress=False)
    loaded = load_model(out)
    assert trained_block_size(loaded.spec) == 8 and read_record(out).config["block_causal"] == 8
    assert is_done(out, distill_key(tiny_dlm, tiny_ar, cfg))
    # the key of a bidirectional distillation leaves the field out (outputs made before it stay done)
    assert "block_causal" not in distill_key(tiny_dlm, tiny_ar, cfg.model_copy(update={"block_causal": 0})).config
    text = sample(ModelDenoiser(loaded), [[5, 6, 7]], SamplerConfig(length=16, block_size=8, cache="block",
                                                                     stop_at_eos=False))
    assert len(text[0]) == 16
    with pytest.raises(FactoryError, match="no certainty term"):
        distill(tiny_dlm, tiny_ar, tmp_path / "c", cfg.model_copy(update={"certainty": 0.5}), progress=False)
