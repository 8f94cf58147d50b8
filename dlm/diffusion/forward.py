"""Forward passes under a diffusion (bidirectional, optionally annealed) or causal attention mask.

The contract every caller shares: an additive float mask [B, 1, T, T], positions
counted over real tokens (left padding starts at 0), and the output head applied
separately when that is exact (``output_head``).

Shapes: B batch, T sequence length, V vocabulary, H hidden size.
"""

from __future__ import annotations

import torch


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
    """The dtype activations have inside ``model``: autocast's on its device, else the weights'."""
    param = next(model.parameters())
    kind = param.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return param.dtype


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


def output_head(model):
    """(base model returning final hidden states, output projection), or None where that is not exact.

    Computing the head only at masked positions saves most of the vocabulary projection
    during diffusion training. Families that rescale logits outside ``lm_head`` (Granite
    ``logits_scaling``, Cohere ``logit_scale``, Gemma2 soft-capping, MiniCPM3, FalconH1,
    ...) each do it differently, so no config key decides: the first call checks once, on
    a tiny input, that head(hidden) equals ``model(...).logits``, and remembers the answer
    on the model. Where it does not, every caller takes the full forward.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: LoRA is injected in place
    head = inner.get_output_embeddings()
    base = getattr(inner, "base_model", None)
    if head is None or base is None or base is inner:
        return None
    exact = getattr(model, "_dlm_head_is_exact", None)
    if exact is None:
        exact = _head_matches_logits(model, base, head)
        model._dlm_head_is_exact = exact
    return (base, head) if exact else None


def _head_matches_logits(model, base, head) -> bool:
    param = next(model.parameters())
    vocab = getattr(head.weight, "ds_shape", head.weight.shape)[0]  # ZeRO-3 keeps only a partition in .shape
    ids = torch.arange(1, 9, device=param.device).remainder(vocab).view(1, -1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(param.device.type, enabled=False):
            full = model(input_ids=ids, use_cache=False).logits.float()
            short = head(base(input_ids=ids, use_cache=False).last_hidden_state).float()
    finally:
        model.train(was_training)
    return full.shape == short.shape and torch.allclose(full, short, rtol=1e-4, atol=1e-4)
