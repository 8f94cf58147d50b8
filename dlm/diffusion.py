"""Masked (absorbing-state) diffusion: corruption, attention masks, losses, denoisers, ELBO.

References:
- MDLM (Sahoo et al., 2024) and LLaDA (Nie et al., 2025): t ~ U(eps, 1), mask each
  token with probability t, loss = (1/t) * sum_masked -log p(x_i | x_t) / #tokens.
- DiffuGPT / DiffuLLaMA (Gong et al., 2024): adapt an AR model by attention-mask
  annealing (causal -> bidirectional) and the *shift*: logits at position i predict
  token i+1, so the AR head keeps its meaning; the first token is never masked.
- LLaDA SFT: prompt tokens are never masked; loss divided by the response length.

Shapes: B batch, T sequence length, V vocabulary, H hidden size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from dlm.modeling import DiffusionSpec, Loaded, output_head

# ----------------------------------------------------------------------------- masks


def attention_bias(
    attention_mask: torch.Tensor | None,
    shape: tuple[int, int],
    *,
    dtype: torch.dtype,
    device: torch.device,
    anneal_r: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Additive float attention mask [B, 1, T, T]: 0 where allowed, dtype-min elsewhere.

    ``anneal_r`` (DiffuLLaMA attention annealing): allowed = causal OR Bernoulli(r)
    extra entries; None or >= 1 means fully bidirectional. Padding keys (attention
    mask 0) are never attended. An additive float mask is used on purpose: a bool
    4D mask can be silently ignored by eager attention (measured with transformers 5).
    """
    B, T = shape
    allowed = torch.ones(B, 1, T, T, dtype=torch.bool, device=device)
    if anneal_r is not None and anneal_r < 1.0:
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        extra = torch.rand(B, 1, T, T, generator=generator, device=device) < anneal_r
        allowed = causal | extra
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)  # pad queries: no empty rows
    bias = torch.zeros(B, 1, T, T, dtype=dtype, device=device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


def position_ids(attention_mask: torch.Tensor | None, shape: tuple[int, int], device) -> torch.Tensor:
    """Positions counted over real tokens, so left-padded rows start at 0. [B, T]"""
    if attention_mask is None:
        return torch.arange(shape[1], device=device).expand(shape)
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def _compute_dtype(model) -> torch.dtype:
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return next(model.parameters()).dtype


def hidden_states(model, ids, attention_mask=None, *, anneal_r=None, generator=None, causal=False):
    """Final hidden states [B, T, H] of the base model under a diffusion (or causal) mask."""
    base, _ = output_head(model)
    pos = position_ids(attention_mask, ids.shape, ids.device)
    if causal:  # AR: let the model build its own causal mask (fast SDPA path)
        mask = attention_mask
    else:
        mask = attention_bias(attention_mask, ids.shape, dtype=_compute_dtype(model), device=ids.device,
                              anneal_r=anneal_r, generator=generator)
    return base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state


def full_logits(model, ids, attention_mask=None, *, anneal_r=None, generator=None) -> torch.Tensor:
    """Logits [B, T, V] of the whole model under a diffusion mask (works for any head)."""
    mask = attention_bias(attention_mask, ids.shape, dtype=_compute_dtype(model), device=ids.device,
                          anneal_r=anneal_r, generator=generator)
    pos = position_ids(attention_mask, ids.shape, ids.device)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


# ----------------------------------------------------------------------------- corruption


def maskable(ids: torch.Tensor, spec: DiffusionSpec, keep=None, attention_mask=None) -> torch.Tensor:
    """Positions the forward process may mask [B, T] (bool): not padding, not kept, not token 0 under shift."""
    ok = torch.ones_like(ids, dtype=torch.bool)
    if attention_mask is not None:
        ok &= attention_mask.bool()
    if keep is not None:
        ok &= ~keep.bool()
    if spec.shift:
        ok[:, 0] = False
    return ok


def sample_t(batch: int, eps: float, generator=None, device=None) -> torch.Tensor:
    """Masking rate per sequence, t ~ U(eps, 1). [B]"""
    return eps + (1 - eps) * torch.rand(batch, generator=generator, device=device)


def corrupt(ids, t, spec: DiffusionSpec, keep=None, attention_mask=None, generator=None):
    """Forward process: mask each maskable token independently with probability t[b].

    Returns (noisy_ids [B, T], masked [B, T] bool).
    """
    ok = maskable(ids, spec, keep, attention_mask)
    masked = (torch.rand(ids.shape, generator=generator, device=ids.device) < t[:, None]) & ok
    return torch.where(masked, torch.full_like(ids, spec.mask_token_id), ids), masked


# ----------------------------------------------------------------------------- losses


def _masked_nll(model, spec: DiffusionSpec, noisy, masked, ids, attention_mask, anneal_r, generator):
    """-log p(x_i | x_t) at every masked position, and the batch index of each. ([N], [N])"""
    heads = output_head(model)
    if spec.shift:  # hidden state at i-1 predicts token i
        sel = masked[:, 1:]
        targets = ids[:, 1:][sel]
        rows = sel.nonzero()[:, 0]
    else:
        sel = masked
        targets = ids[sel]
        rows = sel.nonzero()[:, 0]
    if heads is None:
        logits = full_logits(model, noisy, attention_mask, anneal_r=anneal_r, generator=generator)
        logits = logits[:, :-1][sel] if spec.shift else logits[sel]
    else:
        h = hidden_states(model, noisy, attention_mask, anneal_r=anneal_r, generator=generator)
        h = h[:, :-1][sel] if spec.shift else h[sel]  # [N, H]: only masked positions reach the head
        logits = heads[1](h)
    return F.cross_entropy(logits.float(), targets, reduction="none"), rows


def diffusion_loss(model, spec: DiffusionSpec, ids, *, attention_mask=None, keep=None, anneal_r=None,
                   generator=None, per_sequence=False):
    """Masked-diffusion training loss (a scalar) and the number of tokens it covers.

    per_sequence=False: sum over the batch of (1/t) * NLL, divided by the number of
    maskable tokens (pretraining / conversion). per_sequence=True: each sequence's sum
    divided by its own maskable length, then averaged (LLaDA SFT: response length).
    """
    B = ids.shape[0]
    t = sample_t(B, spec.eps, generator, ids.device)
    noisy, masked = corrupt(ids, t, spec, keep, attention_mask, generator)
    n_tok = maskable(ids, spec, keep, attention_mask).sum(-1)  # [B]
    nll, rows = _masked_nll(model, spec, noisy, masked, ids, attention_mask, anneal_r, generator)
    per_seq = torch.zeros(B, device=ids.device).index_add_(0, rows, nll) / t  # [B]
    if per_sequence:
        loss = (per_seq / n_tok.clamp(min=1)).mean()
    else:
        loss = per_seq.sum() / n_tok.sum().clamp(min=1)
    return loss, int(n_tok.sum())


def ar_loss(model, ids, *, attention_mask=None, keep=None):
    """Next-token cross-entropy over positions 1..T-1 (skipping padding and kept/prompt tokens).

    The output head runs only where a target counts (SFT: the response), as in
    ``diffusion_loss``; models with post-processed logits take the full forward.
    """
    target_ok = torch.ones_like(ids[:, 1:], dtype=torch.bool)
    if attention_mask is not None:
        target_ok &= attention_mask[:, 1:].bool()
    if keep is not None:
        target_ok &= ~keep[:, 1:].bool()
    heads = output_head(model)
    if heads is None:
        logits = model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][target_ok]
    else:
        logits = heads[1](hidden_states(model, ids, attention_mask, causal=True)[:, :-1][target_ok])
    nll = F.cross_entropy(logits.float(), ids[:, 1:][target_ok], reduction="sum")
    n = int(target_ok.sum())
    return nll / max(n, 1), n


# ----------------------------------------------------------------------------- denoisers


class Denoiser(Protocol):
    """Maps a partially masked batch to log-probs of the clean token at each position.

    ``__call__(ids [B, T], attention_mask [B, T] | None) -> log_probs [B, T, V]``.
    The shift is handled inside, so samplers and ensembles never see it.
    """

    spec: DiffusionSpec

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor: ...


class ModelDenoiser:
    """A diffusion checkpoint as a Denoiser."""

    def __init__(self, loaded: Loaded):
        if loaded.spec is None:
            from dlm.errors import FactoryError

            raise FactoryError("this is an autoregressive checkpoint (no diffusion.json); convert it first")
        self.model, self.spec, self.tokenizer = loaded.model, loaded.spec, loaded.tokenizer

    @torch.no_grad()
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

    @torch.no_grad()
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

    @torch.no_grad()
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


# ----------------------------------------------------------------------------- likelihood


@dataclass
class Estimate:
    """A likelihood figure in bits per token, with the standard error of its Monte Carlo estimate."""

    bits_per_token: float
    stderr: float
    tokens: int
    samples: int
    kind: str  # "elbo" (diffusion upper bound) or "nll" (exact AR)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def elbo(denoiser: Denoiser, ids, *, attention_mask=None, keep=None, n: int = 128, seed: int = 0,
         batch_size: int = 32) -> Estimate:
    """Monte Carlo upper bound on the NLL (bits/token) with stratified t_k = (k + u)/n.

    The first token is always kept (conditioned on), so the bound covers the same
    tokens as ``ar_nll``. ``keep`` [B, T] marks a prompt for the conditional variant.
    Stderr: the spread of the n per-t dataset estimates / sqrt(n) (conservative for
    stratified t).
    """
    spec = denoiser.spec
    keep = torch.zeros_like(ids, dtype=torch.bool) if keep is None else keep.bool().clone()
    keep[:, 0] = True
    g = torch.Generator().manual_seed(seed)
    per_k = torch.zeros(n, dtype=torch.float64)
    total = 0
    for lo in range(0, ids.shape[0], batch_size):
        x = ids[lo : lo + batch_size]
        am = None if attention_mask is None else attention_mask[lo : lo + batch_size]
        kp = keep[lo : lo + batch_size]
        total += int(maskable(x, spec, kp, am).sum())
        u = torch.rand(x.shape[0], generator=g)
        for k in range(n):
            t = ((k + u) / n).clamp(min=spec.eps)
            noisy, masked = corrupt(x, t, spec, kp, am, g)
            logp = denoiser(noisy, am)  # [b, T, V]
            nll = -logp.gather(-1, x[..., None])[..., 0] * masked  # [b, T]
            per_k[k] += float((nll.sum(-1) / t).sum())
    if total == 0:
        from dlm.errors import FactoryError

        raise FactoryError("nothing to evaluate: no tokens left after the prompt/first token")
    values = per_k / total / math.log(2)
    stderr = float(values.std() / math.sqrt(n)) if n > 1 else float("nan")
    return Estimate(float(values.mean()), stderr, total, n, "elbo")


@torch.no_grad()
def ar_nll(model, ids, *, attention_mask=None, keep=None, batch_size: int = 32) -> Estimate:
    """Exact NLL (bits/token) of an AR model on tokens 1..T-1 (not padding, not kept)."""
    total_nll, total = 0.0, 0
    for lo in range(0, ids.shape[0], batch_size):
        am = None if attention_mask is None else attention_mask[lo : lo + batch_size]
        kp = None if keep is None else keep[lo : lo + batch_size]
        loss, n = ar_loss(model, ids[lo : lo + batch_size], attention_mask=am, keep=kp)
        total_nll += float(loss) * n
        total += n
    return Estimate(total_nll / max(total, 1) / math.log(2), 0.0, total, 1, "nll")
