"""Samplers: schedules, padding, the block KV cache, CFG, EOS handling, determinism, CLI errors.

A random-weight bidirectional Llama (sharp, context-dependent predictions) stands in
where the 20-step ``tiny_dlm`` would answer whitespace everywhere and make equality
checks vacuous; ``tiny_dlm`` covers loading, ``generate`` and the CLI.
"""

from __future__ import annotations

import pytest
import torch

from dlm_factory.cli import main
from dlm_factory.dlm.checkpoint.io import Loaded, load_model
from dlm_factory.dlm.checkpoint.spec import DiffusionSpec
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.sampling.generate import generate
from dlm_factory.dlm.sampling.sampler import (
    SamplerConfig,
    choose,
    commits_per_step,
    sample,
    steps_per_block,
)
from tests.dlm.helpers import sharp_llama

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/dlm/conftest.py; ``dlm`` comes from there too


@pytest.fixture(scope="module")
def rand(dlm) -> ModelDenoiser:
    """Random bidirectional Llama with the tiny_dlm tokenizer and spec (shift on)."""
    model = sharp_llama(len(dlm.tokenizer))
    return ModelDenoiser(Loaded(model, dlm.tokenizer, dlm.spec))


def cfg(**kw) -> SamplerConfig:
    return SamplerConfig(**{"length": 24, "block_size": 8, "stop_at_eos": False, **kw})


def run(denoiser, prompts, config):
    steps = []
    out = sample(denoiser, prompts, config, on_step=steps.append)
    return out, steps


# ----------------------------------------------------------------------------- schedules


def test_schedules_split_steps_and_tokens():
    assert steps_per_block(64, 32, 64) == [32, 32]
    assert steps_per_block(65, 32, 3) == [1, 1, 1]
    assert sum(steps_per_block(100, 32, 37)) == 37
    assert commits_per_step(8, 3) == [3, 3, 2]
    with pytest.raises(FactoryError, match="number of blocks"):
        steps_per_block(64, 8, 4)


@pytest.mark.parametrize("steps", [24, 12, 3])
def test_llada_respects_the_step_count_and_commits_evenly(rand, steps):
    out, events = run(rand, PROMPTS, cfg(sampler="llada", steps=steps))
    assert len(events) == steps
    per_step = [len(e.committed[0]) for e in events]
    assert sum(per_step) == 24 and max(per_step) - min(per_step) <= 1
    assert all(len(r) == 24 for r in out)


def test_threshold_commits_at_least_one_per_step_and_tau_extremes(rand):
    out1, events = run(rand, PROMPTS, cfg(threshold=1.0))  # nothing exceeds 1: exactly one per row and step
    assert len(events) == 24 and all(len(c) == 1 for e in events for c in e.committed)
    _, events = run(rand, PROMPTS, cfg(threshold=0.0))  # everything exceeds 0: a block per step
    assert len(events) == 3 and all(len(c) == 8 for e in events for c in e.committed)
    _, events = run(rand, PROMPTS, cfg(threshold=0.1, cache="none"))
    assert 3 < len(events) < 24  # some steps commit several tokens, some only the forced one
    before = torch.full((3, 24), rand.spec.mask_token_id)
    for e in events:  # every row with masked positions left in the block commits >= 1
        s = 8 * e.block
        unfinished = (before[:, s : s + 8] == rand.spec.mask_token_id).any(-1)
        assert all(len(c) >= 1 for c, u in zip(e.committed, unfinished, strict=True) if u)
        before = e.response
    assert all(t != rand.spec.mask_token_id for r in out1 for t in r)


def test_streamed_commits_rebuild_the_response(rand):
    out, events = run(rand, PROMPTS, cfg(threshold=0.3))
    rebuilt = [[None] * 24 for _ in PROMPTS]
    for e in events:
        for b, pairs in enumerate(e.committed):
            for off, tok in pairs:
                assert rebuilt[b][off] is None  # a committed token is never revised
                rebuilt[b][off] = tok
    assert rebuilt == out
    assert torch.equal(events[-1].response, torch.tensor(out))


# ----------------------------------------------------------------------------- padding, seeds


@pytest.mark.parametrize("config", [cfg(sampler="llada"), cfg(cache="none"), cfg(cache="dual"), cfg(cache="prefix"),
                                    cfg(cfg_weight=1.0)], ids=["llada", "none", "dual", "prefix", "cfg"])
def test_left_padded_batch_equals_each_prompt_alone(rand, config):
    batch = sample(rand, PROMPTS, config)
    alone = [sample(rand, [p], config)[0] for p in PROMPTS]
    assert batch == alone
    assert len({tuple(r) for r in batch}) == 3  # context-dependent outputs: the check is not vacuous


def test_fixed_seed_gives_identical_output(rand):
    config = cfg(temperature=1.0, top_p=0.95)
    a, b = sample(rand, PROMPTS, config), sample(rand, PROMPTS, config)
    assert a == b
    assert sample(rand, PROMPTS, config.model_copy(update={"seed": 1})) != a


def test_top_k_one_and_tiny_top_p_are_greedy():
    lp = torch.randn(2, 5, 50, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    greedy, conf = choose(lp, SamplerConfig(), None)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(choose(lp, SamplerConfig(temperature=2.0, top_k=1), g)[0], greedy)
    assert torch.equal(choose(lp, SamplerConfig(temperature=2.0, top_p=1e-6), g)[0], greedy)
    assert torch.allclose(conf, lp.max(-1).values.exp())


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("dual", [False, True])
def test_block_cache_matches_the_full_forward_for_an_exact_prefix(rand, dual):
    mask = rand.spec.mask_token_id
    x = torch.full((2, 6 + 16), mask)
    x[0, :6] = torch.tensor([5, 6, 7, 8, 9, 10])
    x[1, :6] = torch.tensor([1, 1, 1, 40, 41, 42])  # left padded
    am = torch.ones_like(x)
    am[1, :3] = 0
    x[:, 6:9] = torch.tensor([100, 101, 102])  # some committed tokens in the block
    block = (6, 14)
    full = rand(x, am)[:, 6:14]
    first, cache = rand.block_cache(x, am, block, dual=dual)
    assert torch.allclose(first, full, atol=1e-4)
    assert torch.allclose(rand.block_log_probs(cache, x, am), full, atol=1e-4)
    # inside the block the approximation only comes from the frozen keys/values outside the window
    y = x.clone()
    y[:, 10] = 77
    changed = rand(y, am)[:, 6:14]
    cached = rand.block_log_probs(cache, y, am)
    assert (cached - changed).abs().max() < (full - changed).abs().max()


class NoCache:
    """A Denoiser without the cache capability (e.g. a third-party combination)."""

    def __init__(self, inner):
        self.inner, self.spec, self.tokenizer, self.model = inner, inner.spec, inner.tokenizer, inner.model

    def __call__(self, ids, attention_mask=None):
        return self.inner(ids, attention_mask)


def test_any_denoiser_works_and_a_missing_cache_falls_back(rand):
    config = cfg(cache="none")
    assert sample(NoCache(rand), PROMPTS, cfg(cache="dual")) == sample(rand, PROMPTS, config)


# ----------------------------------------------------------------------------- CFG


class Recorder:
    """Fake denoiser: cond and uncond predictions differ by a known amount; records its inputs."""

    def __init__(self, spec, vocab=16):
        self.spec, self.vocab, self.calls = spec, vocab, []

    def __call__(self, ids, attention_mask=None):
        self.calls.append(ids.clone())
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab)
        prompt_masked = (ids[:, :4] == self.spec.mask_token_id).any(-1)  # uncond rows
        logits[..., 2] = torch.where(prompt_masked, 1.0, 0.0)[:, None]  # un favours 2 a bit
        logits[..., 3] = torch.where(prompt_masked, 0.0, 0.5)[:, None]  # cond favours 3 a bit
        return logits.log_softmax(-1)


def test_cfg_combines_cond_and_uncond_in_log_space():
    spec = DiffusionSpec(mask_token_id=15, mask_token="[M]", shift=True, tokenizer_digest="x")
    rec = Recorder(spec)
    out = sample(rec, [[4, 5, 6, 7]], SamplerConfig(length=4, block_size=4, threshold=0.0, cfg_weight=0.0,
                                                     stop_at_eos=False))
    assert out == [[3] * 4] and rec.calls[0].shape[0] == 1  # w = 0: no unconditional pass at all
    rec.calls.clear()
    seen = []
    sample(rec, [[4, 5, 6, 7]], SamplerConfig(length=4, block_size=4, threshold=0.0, cfg_weight=1.0,
                                              stop_at_eos=False),
           on_step=lambda e: seen.append(e))
    ids = rec.calls[0]
    assert ids.shape[0] == 2 and ids[0, :4].tolist() == [4, 5, 6, 7]
    assert ids[1, :4].tolist() == [4, 15, 15, 15]  # prompt masked, first token kept under the shift
    cond = torch.tensor([0.0, 0.0, 0.0, 0.5]).log_softmax(-1)
    un = torch.tensor([0.0, 0.0, 1.0, 0.0]).log_softmax(-1)
    guided = (un + 2 * (cond - un)).argmax()
    assert seen[0].committed[0][0][1] == int(guided) == 3


def test_cfg_weight_zero_equals_no_cfg(rand):
    assert sample(rand, PROMPTS, cfg(cfg_weight=0.0)) == sample(rand, PROMPTS, cfg())
    assert sample(rand, PROMPTS, cfg(cfg_weight=2.0)) != sample(rand, PROMPTS, cfg())


# ----------------------------------------------------------------------------- remasking order


class Graded:
    """Fake denoiser whose confidence falls with the response offset: token 3 + offset, certainty 0.9 ... 0.2."""

    def __init__(self, spec, L):
        self.spec, self.L = spec, L

    def __call__(self, ids, attention_mask=None):
        B, T = ids.shape
        probs = torch.full((B, T, 32), 1e-3)
        for j in range(self.L):
            probs[:, T - self.L + j, 3 + j] = 0.9 - 0.1 * j
        return (probs / probs.sum(-1, keepdim=True)).log()


def test_random_remasking_commits_positions_in_a_uniform_order():
    spec = DiffusionSpec(mask_token_id=31, mask_token="[M]", shift=True, tokenizer_digest="x")
    fake, L = Graded(spec, 8), 8
    first = []
    for seed in range(400):
        events = []
        out = sample(fake, [[1, 2]], SamplerConfig(sampler="llada", length=L, block_size=L, steps=L, seed=seed,
                                                   remasking="random", stop_at_eos=False), on_step=events.append)
        assert out == [[3 + j for j in range(L)]]  # same tokens (greedy), only the order differs
        first.append(events[0].committed[0][0][0])
    counts = torch.bincount(torch.tensor(first), minlength=L)
    assert counts.min() > 25 and counts.max() < 75  # ~50 each: uniform over the 8 positions
    events = []
    sample(fake, [[1, 2]], SamplerConfig(sampler="llada", length=L, block_size=L, steps=L, stop_at_eos=False),
           on_step=events.append)
    assert [e.committed[0][0][0] for e in events] == list(range(L))  # low confidence: most confident first
    with pytest.raises(ValueError, match="random remasking needs the llada sampler"):
        SamplerConfig(remasking="random")


# ----------------------------------------------------------------------------- EOS


class Scripted:
    """Fake denoiser that is certain of a scripted response (EOS at offset 5 of row 0, 13 of row 1)."""

    def __init__(self, spec, eos, script):
        self.spec, self.eos_token_id, self.pad_token_id, self.script = spec, eos, None, script

    def __call__(self, ids, attention_mask=None):
        B, T = ids.shape
        L = len(self.script[0])
        logits = torch.full((B, T, 32), -10.0)
        for b in range(B):
            for j, t in enumerate(self.script[b]):
                logits[b, T - L + j, t] = 10.0
        return logits.log_softmax(-1)


def test_eos_strips_and_stops_after_the_first_block_where_every_row_ended():
    spec = DiffusionSpec(mask_token_id=31, mask_token="[M]", shift=True, tokenizer_digest="x")
    script = [[7, 8, 9, 10, 11, 0, 12, 13] + [14] * 24, [7] * 13 + [0] + [9] * 18]
    fake = Scripted(spec, 0, script)
    events = []
    out = sample(fake, [[1, 2], [3, 4]], SamplerConfig(length=32, block_size=8, threshold=0.5), on_step=events.append)
    assert out == [[7, 8, 9, 10, 11], [7] * 13]
    assert {e.block for e in events} == {0, 1}  # block 1 holds row 1's EOS; blocks 2 and 3 never run
    raw = sample(fake, [[1, 2], [3, 4]], SamplerConfig(length=32, block_size=8, threshold=0.5, stop_at_eos=False))
    assert raw == script


def test_rainbow_pad_tokens_of_the_spec_end_a_response():
    """A model tuned with rainbow padding may commit a pad before (or without) its EOS: either ends it."""
    spec = DiffusionSpec(mask_token_id=31, mask_token="[M]", shift=True, tokenizer_digest="x", pad_token_ids=[20, 21])
    script = [[7, 8, 21, 20] + [21, 20] * 14, [7, 8, 9, 0, 20, 21] + [20, 21] * 13]
    fake = Scripted(spec, 0, script)
    events = []
    out = sample(fake, [[1, 2], [3, 4]], SamplerConfig(length=32, block_size=8, threshold=0.5), on_step=events.append)
    assert out == [[7, 8], [7, 8, 9]]
    assert {e.block for e in events} == {0}
    without = Scripted(spec.model_copy(update={"pad_token_ids": []}), 0, script)
    assert sample(without, [[1, 2]], SamplerConfig(length=32, block_size=8, threshold=0.5))[0] == script[0]


# ----------------------------------------------------------------------------- real checkpoint, CLI


def test_generate_on_the_tiny_checkpoint(dlm):
    config = SamplerConfig(length=16, block_size=8)
    texts = generate(dlm, ["def f(x):\n", "import os\n"], config)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert generate(dlm, ["def f(x):\n", "import os\n"], config) == texts


def test_cli_generate_prints_text_and_streams(tiny_dlm, capsys):
    assert main(["generate", "--model", tiny_dlm, "--prompt", "def f(x):", "--length", "8", "--stream",
                 "--sampler", "llada", "--steps", "4", "--block-size", "4", "--no-stop-at-eos"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("[step ") == 4
    assert len(captured.out) > 0


@pytest.mark.parametrize("flags, message", [
    (["--length", "0"], "--length: Input should be greater than 0"),
    (["--steps", "0"], "--steps: Input should be greater than 0"),
    (["--length", "8", "--steps", "9"], "steps (9) must be <= length (8)"),
    (["--length", "200", "--prompt", "x = 1\n" * 40], "exceeds the model's context of 256 positions"),
    (["--length", "64", "--steps", "1", "--sampler", "llada"], "must be >= the number of blocks"),
    (["--remasking", "random"], "random remasking needs the llada sampler"),
    (["--cache", "block"], "cache='block' needs a block-causal model"),
])
def test_cli_bad_input_exits_2(tiny_dlm, capsys, flags, message):
    assert main(["generate", "--model", tiny_dlm, "--prompt", "x", *flags]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after any weight-loading progress bar)
    assert last.startswith("error: ") and message in last


def test_cli_refuses_an_ar_checkpoint(tiny_ar, capsys):
    assert main(["generate", "--model", tiny_ar, "--prompt", "x"]) == 2
    assert "no diffusion.json" in capsys.readouterr().err
    with pytest.raises(FactoryError, match="autoregressive"):
        generate(load_model(tiny_ar), ["x"], SamplerConfig())


def test_generate_formats_prompts_like_sft_for_instruction_tuned_models(tiny_dlm, monkeypatch):
    """An instruction-tuned model sees the chat-template prompt it was trained on; raw stays raw."""
    import dlm_factory.dlm.sampling.generate as sampling
    from dlm_factory.dlm.checkpoint.io import load_model
    from dlm_factory.dlm.checkpoint.record import StageRecord
    from dlm_factory.dlm.data.chat import encode_chat, ensure_chat_template

    seen = []
    monkeypatch.setattr(sampling, "sample", lambda den, prompts, cfg, on_step=None: seen.append(prompts) or [[]])
    loaded = load_model(tiny_dlm)
    cfg = sampling.SamplerConfig(length=8, block_size=8)
    sampling.generate(loaded, ["def f(x):"], cfg)
    assert seen[-1] == sampling.encode_prompts(loaded.tokenizer, ["def f(x):"])  # converted only: raw
    loaded.spec.stages.append(StageRecord(stage="instruct"))
    sampling.generate(loaded, ["def f(x):"], cfg)
    ensure_chat_template(loaded.tokenizer)
    expected = encode_chat(loaded.tokenizer, [[{"role": "user", "content": "def f(x):"}]])
    assert seen[-1] == expected and len(expected[0]) > len(seen[0][0])
    sampling.generate(loaded, ["def f(x):"], cfg, chat=False)
    assert seen[-1] == seen[0]
