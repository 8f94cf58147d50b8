"""Denoisers: a partially masked batch -> log-probs of the clean token at each position.

``Denoiser`` is the one interface the ELBO and every sampler see; the shift is
handled inside. ``ModelDenoiser`` wraps a diffusion checkpoint and adds the
Fast-dLLM block KV cache; an ensemble is one more Denoiser combining members.

Shapes: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch

from dlm_factory.dlm.checkpoint.io import Loaded
from dlm_factory.dlm.checkpoint.spec import DiffusionSpec
from dlm_factory.dlm.diffusion.forward import (
    _compute_dtype,
    attention_bias,
    full_logits,
    output_head,
    position_ids,
)
from dlm_factory.dlm.runtime import inference_autocast, model_device


class Denoiser(Protocol):
    """Maps a partially masked batch to log-probs of the clean token at each position.

    ``__call__(ids [B, T], attention_mask [B, T] | None) -> log_probs [B, T, V]``.
    The shift is handled inside, so samplers and ensembles never see it.
    """

    spec: DiffusionSpec

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor: ...


def denoiser_device(denoiser) -> torch.device:
    """Where a denoiser computes: its ``device``, else its model's, else the CPU."""
    device = getattr(denoiser, "device", None)
    if device is None and getattr(denoiser, "model", None) is not None:
        device = model_device(denoiser.model)
    return torch.device(device or "cpu")


def _inference(method):
    """No autograd, and the runtime's precision policy (bf16 autocast on CUDA) around a denoiser method."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with torch.no_grad(), inference_autocast(self.device):
            return method(self, *args, **kwargs)

    return run


class ModelDenoiser:
    """A diffusion checkpoint as a Denoiser."""

    def __init__(self, loaded: Loaded):
        if loaded.spec is None:
            from dlm_factory.dlm.errors import FactoryError

            raise FactoryError("this is an autoregressive checkpoint (no diffusion.json); convert it first")
        self.model, self.spec, self.tokenizer = loaded.model, loaded.spec, loaded.tokenizer
        self.device = model_device(self.model)

    @_inference
    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = full_logits(self.model, ids, attention_mask).float()  # [B, T, V]
        logp = logits.log_softmax(-1)
        if not self.spec.shift:
            return logp
        # position i is predicted from i-1; position 0 is never masked: certain of its input token
        first = torch.full_like(logp[:, :1], -1e4).scatter_(-1, ids[:, :1, None], 0.0)
        return torch.cat([first, logp[:, :-1]], dim=1)

    # Optional capability used by dlm.sampling when present (Fast-dLLM block-wise KV cache).
    # A denoiser without these two methods is sampled without a cache.

    @_inference
    def block_cache(self, ids, attention_mask, block: tuple[int, int], *, dual: bool = True):
        """Full forward over ``ids`` [B, T]: (log-probs of the block positions [B, e-s, V], BlockCache).

        The cache holds every layer's keys/values outside the window that
        ``block_log_probs`` recomputes: the prefix [0, a) and, with ``dual``, the suffix
        [e, T). Under the shift, position s-1 predicts token s, so a = s - 1 (the last
        prefix position belongs to the window); otherwise a = s.
        """
        from transformers import DynamicCache

        s, e = block
        T = ids.shape[1]
        a = s - int(self.spec.shift)
        mask = attention_bias(attention_mask, ids.shape, dtype=_compute_dtype(self.model), device=ids.device)
        pos = position_ids(attention_mask, ids.shape, ids.device)
        base, _ = output_head(self.model) or (None, None)
        kw = dict(attention_mask=mask, position_ids=pos, use_cache=True, past_key_values=DynamicCache())
        out = base(input_ids=ids, **kw) if base is not None else self.model(input_ids=ids, **kw)
        key_index = torch.cat([torch.arange(0, a), torch.arange(e, T)]) if dual else torch.arange(0, a)
        key_index = key_index.to(ids.device)
        kv = [(layer.keys.index_select(2, key_index), layer.values.index_select(2, key_index))
              for layer in out.past_key_values.layers]
        cache = BlockCache(block=(s, e), window=(a, e if dual else T), key_index=key_index, kv=kv)
        states = out.last_hidden_state if base is not None else out.logits
        return self._window_log_probs(states, cache, offset=0), cache

    @_inference
    def block_log_probs(self, cache: BlockCache, ids, attention_mask) -> torch.Tensor:
        """Log-probs [B, e-s, V] of the block positions, recomputing only the window over the cache.

        ``ids`` [B, T] is the whole current sequence; only its window is read. Exact when
        nothing outside the window changed since ``block_cache`` (Fast-dLLM's approximation
        is to keep the cache for the whole block).
        """
        from transformers import DynamicCache

        a, b = cache.window
        B, T = ids.shape
        am = torch.ones_like(ids) if attention_mask is None else attention_mask
        keys = torch.cat([cache.key_index, torch.arange(a, b, device=ids.device)])  # cache order, window last
        dtype = _compute_dtype(self.model)
        bias = torch.zeros(B, 1, b - a, keys.numel(), dtype=dtype, device=ids.device)
        bias.masked_fill_(~am.bool()[:, keys][:, None, None, :], torch.finfo(dtype).min)
        pos = position_ids(attention_mask, ids.shape, ids.device)[:, a:b]
        base, _ = output_head(self.model) or (None, None)
        kw = dict(attention_mask=bias, position_ids=pos, use_cache=True, past_key_values=DynamicCache(cache.kv))
        out = base(input_ids=ids[:, a:b], **kw) if base is not None else self.model(input_ids=ids[:, a:b], **kw)
        return self._window_log_probs(out.last_hidden_state if base is not None else out.logits, cache, offset=a)

    def causal_blocks(self, attention_mask: torch.Tensor, block_size: int):
        """The exact block KV cache of a block-causal model (``block_causal.BlockCausalCache``), one per decode."""
        from dlm_factory.dlm.diffusion.block_causal import BlockCausalCache

        return BlockCausalCache(self.model, attention_mask, block_size, self.spec.shift)

    def _window_log_probs(self, states, cache: BlockCache, offset: int) -> torch.Tensor:
        """Hidden states (or logits, for exotic heads) whose column 0 is position ``offset`` -> block log-probs."""
        s, e = cache.block
        lo = s - int(self.spec.shift) - offset
        states = states[:, lo : lo + (e - s)]  # the positions that predict the block tokens
        heads = output_head(self.model)
        logits = heads[1](states) if heads is not None else states
        return logits.float().log_softmax(-1)


@dataclass
class BlockCache:
    """Keys/values outside the recomputed window, frozen at a block boundary (Fast-dLLM).

    block: the positions being decoded [s, e); window: the positions recomputed each
    step [a, b); key_index: the sequence positions of the cached entries, in cache
    order; kv: one (keys, values) pair per layer, each [B, heads, len(key_index), d].
    """

    block: tuple[int, int]
    window: tuple[int, int]
    key_index: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
