"""Diffusion samplers: low-confidence remasking, confidence-threshold parallel decoding, CFG.

References (see shared/DESIGN.md, "Sampling"):
- LLaDA (Nie et al., 2025): the response of length L starts all [MASK]; each of S
  steps predicts every masked position and commits the k most confident (k = L/S
  per block); semi-autoregressive blocks of size B go left to right.
- Fast-dLLM (Wu et al., 2025): commit every masked position of the current block
  whose top probability exceeds tau (0.9), at least one per step; block-wise
  approximate KV cache of the prefix ("prefix") or of prefix and suffix ("dual"),
  refreshed at block boundaries.
- MDLM (Sahoo et al., 2024) / SMDM ancestral sampling: the positions unmasked at a step
  are a uniformly random subset (LLaDA's ``random`` remasking); with temperature 1 it
  samples the model's joint distribution in a random order, the unbiased reference.
- SMDM (Nie et al., 2024), unsupervised classifier-free guidance: un = the
  prediction with the prompt replaced by [MASK]; logits = un + (w+1)(cond - un).

Any ``dlm.diffusion.Denoiser`` works: ``denoiser(ids [B, T], attention_mask [B, T]) ->
log_probs [B, T, V]`` with ``.spec`` (mask id, shift). Optional capabilities, used
when present:
- ``block_cache(ids, attention_mask, (s, e), dual=...) -> (log_probs [B, e-s, V], cache)``
  and ``block_log_probs(cache, ids, attention_mask) -> log_probs [B, e-s, V]``: the
  KV cache (``ModelDenoiser`` has them; an ensemble can delegate to its members).
- ``tokenizer`` (or ``eos_token_id``/``pad_token_id``): which tokens end a response, with
  ``spec.pad_token_ids`` (rainbow padding of an instruction-tuned model).
- ``max_positions`` (or ``model.config``): the context length, checked up front.

Shapes: B batch, P padded prompt length, L response length, T = P + L, V vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, Field, model_validator

from dlm_factory.dlm.data.batching import left_pad
from dlm_factory.dlm.diffusion.denoiser import denoiser_device
from dlm_factory.dlm.errors import FactoryError

log = logging.getLogger(__name__)


class SamplerConfig(BaseModel):
    """How to decode a response (defaults: Fast-dLLM threshold decoding with the dual cache)."""

    sampler: Literal["llada", "threshold"] = Field("threshold", description="llada: low-confidence remasking with a fixed step count; threshold: Fast-dLLM confidence-threshold parallel decoding")
    length: int = Field(64, gt=0, description="response length L in tokens (generated after each prompt)")
    steps: int | None = Field(None, gt=0, description="llada: denoising steps S <= length (default: length, one token per step); threshold: unused")
    remasking: Literal["low_confidence", "random"] = Field("low_confidence", description="llada: which masked positions each step commits: the most confident (LLaDA's default) or uniformly random ones (LLaDA's random remasking = MDLM/SMDM random-order ancestral sampling at temperature 1)")
    block_size: int = Field(32, gt=0, description="semi-autoregressive block size; blocks are decoded left to right")
    threshold: float = Field(0.9, ge=0.0, le=1.0, description="threshold sampler: commit every masked position whose confidence exceeds tau (at least one per step)")
    cache: Literal["none", "prefix", "dual", "block"] = Field("dual", description="threshold sampler: approximate KV cache refreshed at block boundaries (prefix, or prefix + suffix); used when the denoiser supports it. block (experimental, either sampler): exact cache of finished blocks for a block-causal model (docs/sampling.md)")
    cfg_weight: float = Field(0.0, ge=0.0, description="unsupervised classifier-free guidance weight w (SMDM: 0.5..1.6); 0 disables the unconditional pass")
    temperature: float = Field(0.0, ge=0.0, description="0: greedy; > 0: sample from the tempered distribution")
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens only (0: all)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: smallest set of tokens with this much probability")
    seed: int = Field(0, description="seed of the sampling generator: same seed, same output")
    stop_at_eos: bool = Field(True, description="stop after the first block where every row has committed EOS and strip EOS and what follows; False: always decode all L tokens and return them raw")

    @model_validator(mode="after")
    def _steps_fit(self):
        if self.steps is not None and self.steps > self.length:
            raise ValueError(f"steps ({self.steps}) must be <= length ({self.length})")
        if self.remasking == "random" and self.sampler != "llada":
            raise ValueError("random remasking needs the llada sampler (the threshold sampler commits by confidence)")
        return self

    def n_steps(self) -> int:
        return self.steps if self.steps is not None else self.length


def random_order(length: int) -> SamplerConfig:
    """Random-order ancestral sampling at temperature 1 (MDLM; LLaDA's ``random`` remasking), one block
    of ``length``: the unbiased reference for sample quality (docs/sampling.md, the collapse study)."""
    return SamplerConfig(sampler="llada", length=length, block_size=length, remasking="random", temperature=1.0)


@dataclass
class Step:
    """What one denoising step committed (passed to ``on_step`` for streaming).

    step: 0-based step count over the whole response; block: index of the block;
    committed[b]: (response offset, token id) pairs committed for row b this step;
    response: the current response [B, L], still-masked positions hold the mask id.
    """

    step: int
    block: int
    committed: list[list[tuple[int, int]]]
    response: torch.Tensor


def _token_ids(denoiser, *names: str) -> list[int]:
    tok = getattr(denoiser, "tokenizer", None)
    found = []
    for name in names:
        value = getattr(denoiser, name, None)
        if value is None and tok is not None:
            value = getattr(tok, name, None)
        if value is not None:
            found.append(int(value))
    return found


def _max_positions(denoiser) -> int | None:
    value = getattr(denoiser, "max_positions", None)
    if value is None and getattr(denoiser, "model", None) is not None:
        from dlm_factory.dlm.checkpoint.io import max_positions

        value = max_positions(denoiser.model.config)
    return value


def blocks(length: int, block_size: int) -> list[tuple[int, int]]:
    """Response offsets [start, end) of the semi-autoregressive blocks (the last may be shorter)."""
    return [(s, min(s + block_size, length)) for s in range(0, length, block_size)]


def steps_per_block(length: int, block_size: int, steps: int) -> list[int]:
    """LLaDA: split S steps over the blocks in proportion to their length (each >= 1)."""
    spans = blocks(length, block_size)
    if steps < len(spans):
        raise FactoryError(f"steps ({steps}) must be >= the number of blocks ({len(spans)} = ceil(length "
                           f"{length} / block size {block_size})); raise the steps or the block size")
    out = []
    for s, e in spans:  # difference of floors of the cumulative share: sums to S, each in [1, block length]
        out.append(steps * e // length - steps * s // length)
    return out


def commits_per_step(n: int, steps: int) -> list[int]:
    """LLaDA: n tokens over ``steps`` steps, as even as possible (earlier steps take the remainder)."""
    base, rem = divmod(n, steps)
    return [base + (i < rem) for i in range(steps)]


def choose(log_probs: torch.Tensor, cfg: SamplerConfig, generator: torch.Generator | None):
    """Pick a token per position and its confidence. log_probs [B, n, V] -> (tokens [B, n], conf [B, n]).

    Greedy when temperature is 0; otherwise sample from the tempered distribution
    restricted by top-k/top-p. The confidence is the (untempered) probability of the
    chosen token, as in LLaDA's low-confidence remasking and Fast-dLLM.
    """
    if cfg.temperature == 0:
        tokens = log_probs.argmax(-1)
    else:
        logits = log_probs / cfg.temperature
        if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
            kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1.0:
            sorted_logits, order = logits.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        flat = probs.reshape(-1, probs.shape[-1])
        tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    conf = log_probs.gather(-1, tokens[..., None])[..., 0].exp()
    return tokens, conf


class _Predictor:
    """Block log-probs [B, e-s, V] from a denoiser, with CFG and the optional block KV cache."""

    def __init__(self, denoiser, attention_mask: torch.Tensor, prompt_region: torch.Tensor, cfg: SamplerConfig):
        self.denoiser, self.cfg = denoiser, cfg
        self.mask_id = denoiser.spec.mask_token_id
        self.guided = cfg.cfg_weight > 0
        self.am = torch.cat([attention_mask, attention_mask]) if self.guided else attention_mask
        # unconditional pass (SMDM): the prompt replaced by [MASK]; under the shift the first
        # real token stays (it is never masked in training and plays the role of BOS)
        self.blank = prompt_region.clone()
        if denoiser.spec.shift:
            first = attention_mask.long().argmax(-1)  # first real position of each row
            self.blank[torch.arange(len(first)), first] = False
        self.block_causal = cfg.cache == "block"
        if self.block_causal:
            self._check_block_causal(denoiser, cfg)
        wants_cache = cfg.sampler == "threshold" and cfg.cache in ("prefix", "dual")
        self.use_cache = wants_cache and callable(getattr(denoiser, "block_cache", None))
        if wants_cache and not self.use_cache:
            log.info("denoiser %s has no block_cache(): sampling without a KV cache", type(denoiser).__name__)
        self.state = None

    @staticmethod
    def _check_block_causal(denoiser, cfg: SamplerConfig) -> None:
        from dlm_factory.dlm.diffusion.block_causal import trained_block_size

        if not callable(getattr(denoiser, "causal_blocks", None)):
            raise FactoryError(f"cache='block' needs a single model denoiser, not {type(denoiser).__name__}")
        size = trained_block_size(denoiser.spec)
        if size is None:
            raise FactoryError("cache='block' needs a block-causal model (factory distill --block-causal N); "
                               "this one was trained with bidirectional attention")
        if size != cfg.block_size:
            raise FactoryError(f"the model was trained block-causal with blocks of {size}; "
                               f"decode with block_size {size}, not {cfg.block_size}")

    def _inputs(self, x):
        if not self.guided:
            return x
        return torch.cat([x, x.masked_fill(self.blank, self.mask_id)])

    def _finish(self, lp):  # [B or 2B, n, V] -> [B, n, V]
        if self.guided:
            cond, un = lp.chunk(2)
            lp = (un + (self.cfg.cfg_weight + 1) * (cond - un)).log_softmax(-1)
        lp[..., self.mask_id] = float("-inf")  # never "predict" the mask itself
        return lp

    def __call__(self, x: torch.Tensor, block: tuple[int, int], first: bool) -> torch.Tensor:
        s, e = block
        inputs = self._inputs(x)
        if self.block_causal:
            if self.state is None:
                self.state = self.denoiser.causal_blocks(self.am, self.cfg.block_size)
            return self._finish(self.state(inputs, block))
        if not self.use_cache:
            return self._finish(self.denoiser(inputs, self.am)[:, s:e])
        if first:  # block boundary: full forward, refresh the cache
            lp, self.state = self.denoiser.block_cache(inputs, self.am, block, dual=self.cfg.cache == "dual")
        else:
            lp = self.denoiser.block_log_probs(self.state, inputs, self.am)
        return self._finish(lp)


@torch.no_grad()
def sample(denoiser, prompts: list[list[int]], cfg: SamplerConfig, *,
           on_step: Callable[[Step], None] | None = None) -> list[list[int]]:
    """Generate ``cfg.length`` tokens after each prompt; returns the generated ids per prompt.

    Prompts are left-padded into one batch (padded keys masked, positions starting at 0
    at the first real token). With ``stop_at_eos`` the response is cut at its first
    end token (EOS, PAD or one of ``spec.pad_token_ids``) and decoding stops after the
    first block in which every row has committed one. ``on_step`` receives a ``Step``
    after every denoising step.
    """
    if not prompts:
        return []
    spec = denoiser.spec
    mask_id = spec.mask_token_id
    pad_id = (_token_ids(denoiser, "pad_token_id", "eos_token_id") or [mask_id])[0]
    end_ids = _token_ids(denoiser, "eos_token_id", "pad_token_id") + list(getattr(spec, "pad_token_ids", []))
    if spec.shift and any(len(p) == 0 for p in prompts):  # position i-1 predicts token i: need one token
        start = _token_ids(denoiser, "bos_token_id", "eos_token_id")
        if not start:
            raise FactoryError("empty prompt: the shifted model needs at least one prompt token (no BOS/EOS known)")
        prompts = [list(p) or start[:1] for p in prompts]
    if any(mask_id in p for p in prompts):
        raise FactoryError(f"a prompt contains the mask token (id {mask_id})")
    L = cfg.length
    limit = _max_positions(denoiser)
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + L > limit:
        raise FactoryError(f"prompt ({longest} tokens) + length ({L}) exceeds the model's context of {limit} positions")
    spans = blocks(L, cfg.block_size)
    if cfg.sampler == "llada":
        block_steps = steps_per_block(L, cfg.block_size, cfg.n_steps())

    prompt_ids, prompt_am = left_pad(prompts, pad_id)
    B, P = prompt_ids.shape
    device = denoiser_device(denoiser)
    x = torch.cat([prompt_ids, torch.full((B, L), mask_id, dtype=torch.long)], 1).to(device)  # [B, T]
    am = torch.cat([prompt_am, torch.ones(B, L, dtype=torch.long)], 1).to(device)  # [B, T]
    prompt_region = torch.zeros_like(x, dtype=torch.bool)
    prompt_region[:, :P] = prompt_am.bool()
    predict = _Predictor(denoiser, am, prompt_region, cfg)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    rows = torch.arange(B, device=device)
    step = 0

    for bi, (bs, be) in enumerate(spans):
        s, e = P + bs, P + be  # block in sequence coordinates
        budget = block_steps[bi] if cfg.sampler == "llada" else be - bs
        schedule = commits_per_step(be - bs, budget) if cfg.sampler == "llada" else None
        for k in range(budget):
            masked = x[:, s:e] == mask_id  # [B, n]
            if not masked.any():
                break
            lp = predict(x, (s, e), first=k == 0)  # [B, n, V]
            tokens, conf = choose(lp, cfg, gen)
            if cfg.remasking == "random":  # every masked position equally likely to be committed next
                conf = torch.rand(conf.shape, generator=gen, device=conf.device)
            conf = conf.masked_fill(~masked, -1.0)
            if cfg.sampler == "llada":
                top = conf.topk(min(schedule[k], int(masked.sum(-1).min())), dim=-1).indices  # [B, k]
                commit = torch.zeros_like(masked).scatter_(-1, top, True) & masked
            else:
                commit = masked & (conf > cfg.threshold)
                best = conf.argmax(-1)  # at least one per step in every unfinished row
                commit[rows, best] |= masked[rows, best]
            x[:, s:e] = torch.where(commit, tokens, x[:, s:e])
            if on_step is not None:
                pos = commit.nonzero().tolist()
                committed = [[] for _ in range(B)]
                for b, j in pos:
                    committed[b].append((bs + j, int(tokens[b, j])))
                on_step(Step(step=step, block=bi, committed=committed, response=x[:, P:].clone()))
            step += 1
        if cfg.stop_at_eos and end_ids:
            done = torch.isin(x[:, P:e], torch.tensor(end_ids, device=device)).any(-1)
            if bool(done.all()):
                break

    out = []
    for row in x[:, P:].tolist():
        if cfg.stop_at_eos:
            cut = next((i for i, t in enumerate(row) if t in end_ids or t == mask_id), len(row))
            row = row[:cut]
        out.append(row)
    return out


