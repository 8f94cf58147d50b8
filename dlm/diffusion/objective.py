"""Masked (absorbing-state) diffusion: the forward process and the training losses.

References:
- MDLM (Sahoo et al., 2024) and LLaDA (Nie et al., 2025): t ~ U(eps, 1), mask each
  token with probability t, loss = (1/t) * sum_masked -log p(x_i | x_t) / #tokens.
- DiffuGPT / DiffuLLaMA (Gong et al., 2024): adapt an AR model by attention-mask
  annealing (causal -> bidirectional) and the *shift*: logits at position i predict
  token i+1, so the AR head keeps its meaning; the first token is never masked.
- LLaDA SFT: prompt tokens are never masked; loss divided by the response length.

Shapes: B batch, T sequence length, V vocabulary, N masked positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlm_factory.dlm.checkpoint.spec import DiffusionSpec
from dlm_factory.dlm.diffusion.forward import full_logits, hidden_states, output_head


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


def masked_logits(model, spec: DiffusionSpec, noisy, masked, ids, attention_mask=None, anneal_r=None, generator=None):
    """Logits at every masked position [N, V] (the head runs there only), their targets [N], batch rows [N]."""
    heads = output_head(model)
    if spec.shift:  # hidden state at i-1 predicts token i
        sel = masked[:, 1:]
        targets = ids[:, 1:][sel]
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
    return logits.float(), targets, rows


def _masked_nll(model, spec: DiffusionSpec, noisy, masked, ids, attention_mask, anneal_r, generator):
    """-log p(x_i | x_t) at every masked position, and the batch index of each. ([N], [N])"""
    logits, targets, rows = masked_logits(model, spec, noisy, masked, ids, attention_mask, anneal_r, generator)
    return F.cross_entropy(logits, targets, reduction="none"), rows


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
