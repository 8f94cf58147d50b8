"""Padding token ids into batches: one left-pad helper and one pad-id fallback."""

from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt batch (ids [B, P], attention mask [B, P])."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    am = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        if p:
            ids[b, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            am[b, P - len(p) :] = 1
    return ids, am
