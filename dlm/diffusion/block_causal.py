"""Block-causal attention (experimental): bidirectional inside a block, causal across blocks.

References: BD3-LM (Arriola et al., 2025), SDAR, D2F (Wang et al., 2025), Fast-dLLM v2 (Wu et al.,
2025). A finished block never attends to a later one, so its keys/values do not change when
later blocks are decoded: they go into an exact KV cache, computed once, as an AR model's do.

Attention groups ("windows"). The prompt [0, P) is group 0 (bidirectional inside). Response block
k covers tokens [P + k*N, P + (k+1)*N) (N = block size). Under the shift (position i predicts
token i+1) the positions that predict block k are [P + k*N - 1, P + (k+1)*N - 1): a position
belongs to the group of the token it predicts, so the window of block k starts with the last
clean token before it and the block's last token is read only by the next window. Without the
shift a window is the block itself. Query q may attend key k iff group[k] <= group[q] (and k is
not padding).

Training (BD3-LM's vectorised objective): the noisy sequence and a clean copy in one forward of
2T positions with the same position ids. A noisy window attends to itself and to the clean copy
of earlier windows; the clean copy is block-causal on its own, exactly what the decoder's cache
holds. Each block draws its own masking rate t ~ U(eps, 1) (loss weighted 1/t, MDLM), the prompt
is never masked. The first position of a window under the shift holds the previous block's last
token, which is clean when that window is decoded, so it is never masked in its window.

Shapes: B batch, T sequence length, P prompt length (padded), N block size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlm_factory.dlm.checkpoint.spec import DiffusionSpec
from dlm_factory.dlm.diffusion.forward import _compute_dtype, output_head, position_ids
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.runtime import inference_autocast, model_device


def trained_block_size(spec: DiffusionSpec) -> int | None:
    """Block size of the block-causal training the model's last training stage did (``distill`` with
    ``block_causal``); None when that stage trained bidirectionally (every other stage does)."""
    trained = [r for r in spec.stages if r.stage != "ensemble"]  # an ensemble record trains nothing
    return (trained[-1].config.get("block_causal") or None) if trained else None


def groups(T: int, prompt_len: int, block_size: int, shift: bool, device=None) -> torch.Tensor:
    """Attention group of every position [T]: 0 for the prompt window, 1 + k for response block k's window."""
    if block_size <= 0:
        raise FactoryError(f"block size must be > 0, got {block_size}")
    if not 0 < prompt_len <= T:
        raise FactoryError(f"prompt length {prompt_len} must be in [1, {T}]")
    token = torch.arange(T, device=device) + int(shift)  # the token each position predicts
    return torch.where(token < prompt_len, 0, 1 + (token - prompt_len).div(block_size, rounding_mode="floor"))


def token_groups(T: int, prompt_len: int, block_size: int, device=None) -> torch.Tensor:
    """Block of every token [T]: 0 for the prompt, 1 + k for response block k."""
    token = torch.arange(T, device=device)
    return torch.where(token < prompt_len, 0, 1 + (token - prompt_len).div(block_size, rounding_mode="floor"))


def _bias(allowed: torch.Tensor, dtype) -> torch.Tensor:
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


def block_causal_bias(group: torch.Tensor, attention_mask: torch.Tensor | None, dtype) -> torch.Tensor:
    """Additive mask [B, 1, T, T] from the groups [T]: key k visible to query q iff group[k] <= group[q]."""
    T = group.numel()
    allowed = (group[None, :] <= group[:, None])[None, None]  # [1, 1, T(q), T(k)]
    if attention_mask is None:
        return _bias(allowed, dtype)
    allowed = allowed & attention_mask.bool()[:, None, None, :]
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=group.device)  # pad queries: no empty rows
    return _bias(allowed, dtype)


def block_causal_logits(model, ids: torch.Tensor, attention_mask: torch.Tensor | None, prompt_len: int,
                        block_size: int, shift: bool) -> torch.Tensor:
    """Logits [B, T, V] of one forward over ``ids`` under the block-causal mask (the reference the cache equals)."""
    group = groups(ids.shape[1], prompt_len, block_size, shift, ids.device)
    bias = block_causal_bias(group, attention_mask, _compute_dtype(model))
    pos = position_ids(attention_mask, ids.shape, ids.device)
    return model(input_ids=ids, attention_mask=bias, position_ids=pos, use_cache=False).logits


def block_noise(ids: torch.Tensor, spec: DiffusionSpec, prompt_len: int, block_size: int, generator=None):
    """The per-block forward process: (noisy inputs [B, T], masked tokens [B, T] bool, rate of each token [B, T]).

    Every response block draws its own t ~ U(eps, 1) and masks each of its tokens with
    probability t; the prompt is never masked. A masked token is a mask as an input only in its
    own block's window (under the shift the next window reads it clean, as the decoder does).
    """
    B, T = ids.shape
    group = groups(T, prompt_len, block_size, spec.shift, ids.device)
    tgroup = token_groups(T, prompt_len, block_size, ids.device)
    t = spec.eps + (1 - spec.eps) * torch.rand(B, int(tgroup.max()) + 1, generator=generator, device=ids.device)
    rate = t.gather(1, tgroup.expand(B, T))
    masked = (torch.rand(ids.shape, generator=generator, device=ids.device) < rate) & (tgroup > 0)[None]
    if spec.shift:
        masked[:, 0] = False
    noisy = ids.masked_fill(masked & (tgroup == group)[None], spec.mask_token_id)
    return noisy, masked, rate


def training_states(model, noisy: torch.Tensor, clean: torch.Tensor, prompt_len: int, block_size: int,
                    shift: bool) -> torch.Tensor:
    """Final hidden states (logits for a head that is not separable) [B, T, .] of the noisy windows, each
    attending to itself and to the clean copy of the earlier windows: one forward over 2T positions."""
    B, T = noisy.shape
    dev = noisy.device
    g2 = groups(T, prompt_len, block_size, shift, dev).repeat(2)
    is_noisy = torch.arange(2 * T, device=dev) < T
    same, before, upto = g2[None, :] == g2[:, None], g2[None, :] < g2[:, None], g2[None, :] <= g2[:, None]
    qn, kn = is_noisy[:, None], is_noisy[None, :]
    allowed = (qn & kn & same) | (qn & ~kn & before) | (~qn & ~kn & upto)  # [2T (q), 2T (k)]
    kw = dict(input_ids=torch.cat([noisy, clean], 1), attention_mask=_bias(allowed[None, None], _compute_dtype(model)),
              position_ids=torch.arange(T, device=dev).repeat(2).expand(B, 2 * T), use_cache=False)
    heads = output_head(model)
    if heads is None:
        return model(**kw).logits[:, :T]
    return heads[0](**kw).last_hidden_state[:, :T]


def block_diffusion_loss(model, spec: DiffusionSpec, ids: torch.Tensor, prompt_len: int, block_size: int,
                         generator=None) -> tuple[torch.Tensor, int]:
    """BD3-LM masked-diffusion loss (a scalar) on ``ids`` [B, T] with a clean prompt [0, prompt_len),
    and the number of response tokens it covers: sum over masked tokens of -log p / t (t: the
    rate of the token's block), divided by the response tokens."""
    B, T = ids.shape
    noisy, masked, rate = block_noise(ids, spec, prompt_len, block_size, generator)
    states = training_states(model, noisy, ids, prompt_len, block_size, spec.shift)
    sel = masked[:, 1:] if spec.shift else masked  # positions whose prediction is a masked token
    states = (states[:, :-1] if spec.shift else states)[sel]
    heads = output_head(model)
    logits = heads[1](states) if heads is not None else states
    targets = (ids[:, 1:] if spec.shift else ids)[sel]
    weight = (rate[:, 1:] if spec.shift else rate)[sel]
    nll = F.cross_entropy(logits.float(), targets, reduction="none") / weight
    n_tok = (T - prompt_len) * B
    return nll.sum() / max(n_tok, 1), n_tok

class BlockCausalCache:
    """The decoder's exact KV cache for a block-causal model: finished windows computed once, like AR's.

    ``__call__(ids [B, T], (s, e))`` returns the log-probs [B, e-s, V] of block tokens [s, e),
    the first block being the one starting at the prompt's end (s = P). It runs one forward
    over the positions not cached yet: the windows finished since the last call (clean, cached
    afterwards) and the current window [s - shift, e - shift), which attends to the cache and to
    itself only. Equal to ``block_causal_logits`` over the whole sequence (tested to 1e-4).
    """

    def __init__(self, model, attention_mask: torch.Tensor, block_size: int, shift: bool):
        self.model, self.am, self.block_size, self.shift = model, attention_mask, block_size, shift
        self.device = model_device(model)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cached = 0  # positions [0, cached) hold exact keys/values
        self.prompt_len: int | None = None
        self.forwards = 0
        self.positions = 0  # positions processed, over all forwards

    def __call__(self, ids: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
        from transformers import DynamicCache

        s, e = block
        if self.prompt_len is None:
            self.prompt_len = s
        a, b, c = s - int(self.shift), e - int(self.shift), self.cached
        if not (c <= a < b <= ids.shape[1]) or (s - self.prompt_len) % self.block_size:
            raise FactoryError(f"block {block} does not follow the cached positions [0, {c}) in blocks of "
                               f"{self.block_size} after a prompt of {self.prompt_len}")
        T = ids.shape[1]
        group = groups(T, self.prompt_len, self.block_size, self.shift, ids.device)
        dtype = _compute_dtype(self.model)
        new = group[c:b]
        allowed = torch.cat([torch.ones(b - c, c, dtype=torch.bool, device=ids.device),
                             new[None, :] <= new[:, None]], 1)  # [b-c, b]: every cached key is earlier
        allowed = allowed[None, None] & self.am.bool()[:, None, None, :b]
        pos = position_ids(self.am, ids.shape, ids.device)[:, c:b]
        heads = output_head(self.model)
        net = heads[0] if heads is not None else self.model
        with torch.no_grad(), inference_autocast(self.device):
            out = net(input_ids=ids[:, c:b], attention_mask=_bias(allowed, dtype), position_ids=pos, use_cache=True,
                      past_key_values=DynamicCache(self.kv) if self.kv else DynamicCache())
            self.kv = [(layer.keys[:, :, :a], layer.values[:, :, :a]) for layer in out.past_key_values.layers]
            self.cached = a
            states = out.last_hidden_state if heads is not None else out.logits
            states = states[:, a - c :]  # the current window: predicts tokens [s, e)
            logits = heads[1](states) if heads is not None else states
        self.forwards += 1
        self.positions += b - c
        return logits.float().log_softmax(-1)
