"""Special tokens the factory needs beyond a base tokenizer's own: the mask, rainbow pads.

A token is taken, in this order, from the tokenizer's unused reserved special tokens
(``<|reserved_N|>``, ``<unused_N>``: real tokenizers ship spare rows) or added as a
new special token, growing the embedding (and an untied output head) by one row
initialised at the mean of the existing rows.
"""

from __future__ import annotations

import re

import torch

from dlm_factory.dlm.checkpoint.io import Loaded
from dlm_factory.dlm.errors import FactoryError

_UNUSED = re.compile(r"reserved|unused", re.IGNORECASE)


def in_use(tokenizer) -> set[int]:
    """Ids a new role must not take: named specials (BOS/EOS/PAD/UNK/MASK)."""
    named = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id,
             tokenizer.mask_token_id)
    return {i for i in named if i is not None}


def unused_special_tokens(tokenizer, exclude: set[int] = frozenset()) -> list[tuple[int, str]]:
    """(id, text) of the reserved/unused special tokens not in ``exclude`` nor in a named role, by id."""
    taken = in_use(tokenizer) | set(exclude)
    return [(i, added.content) for i, added in sorted(tokenizer.added_tokens_decoder.items())
            if added.special and i not in taken and _UNUSED.search(added.content)]


def add_special_tokens(loaded: Loaded, texts: list[str], *, seed: int = 0, noise: float = 0.0) -> list[int]:
    """Add ``texts`` as extra special tokens and give each a row (``grow_embeddings``). Returns their ids."""
    tok = loaded.tokenizer
    clash = [t for t in texts if t in tok.get_vocab()]
    if clash:
        raise FactoryError(f"tokens {clash} already exist in the tokenizer")
    rows = loaded.model.get_input_embeddings().weight.shape[0]
    tok.add_special_tokens({"extra_special_tokens": list(texts)}, replace_extra_special_tokens=False)
    ids = tok.convert_tokens_to_ids(list(texts))
    grow_embeddings(loaded, ids, rows, seed=seed, noise=noise)
    return ids


def grow_embeddings(loaded: Loaded, ids: list[int], rows: int, *, seed: int = 0, noise: float = 0.0) -> None:
    """Make room for the new token ``ids`` and set their rows to the mean of the first ``rows``.

    Rows the matrix already has (a spare row beyond the tokenizer) are reused without
    resizing. ``noise`` > 0 adds seeded Gaussian noise of that many per-dimension
    standard deviations so that several new tokens start distinguishable.
    """
    model = loaded.model
    try:
        if max(ids) + 1 > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    except Exception as e:  # e.g. an embedding type that cannot grow
        raise FactoryError(f"no room for {len(ids)} new token(s) and the embeddings cannot be resized ({e})") from e
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        matrices = [emb] + ([head.weight] if head is not None and head.weight.data_ptr() != emb.data_ptr() else [])
        for w in matrices:
            mean, std = w[:rows].mean(0), w[:rows].std(0)
            for i in ids:
                w[i] = mean + noise * std * torch.randn(w.shape[1], generator=g).to(w.device, w.dtype)
