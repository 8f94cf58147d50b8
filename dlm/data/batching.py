"""Padding token ids into batches: left padding (prompts to sample), right padding with a prompt
mask (rows to train or score), and the one pad-id fallback."""

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


def pad_id(tokenizer) -> int:
    """The id that fills unattended positions: PAD, else EOS, else 0 (never attended, so any id works)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def collate(seqs: list[tuple[list[int], int]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask and prompt_mask (True on prompt tokens), each [B, T]."""
    T = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    am = torch.zeros_like(ids)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for b, (s, n_prompt) in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        am[b, : len(s)] = 1
        keep[b, :n_prompt] = True
    return {"input_ids": ids, "attention_mask": am, "prompt_mask": keep}
