"""A token n-gram language model with interpolated Kneser-Ney smoothing: the router's scorer.

SmallTalk LM (Filippova et al. 2024) routes with small per-expert *router* LMs, separate
from the experts. Here each user's router is an n-gram LM over the general model's token
ids, counted on the user's train split: a few hundred kilobytes, fitted in about a second,
and it scores a 32-token prefix in microseconds. On the demo users it routes held-out
requests far better than the 0.24 M-parameter specialists' own prefix ELBO (docs/ensemble.md).

Smoothing is interpolated Kneser-Ney (Chen & Goodman 1998) with one absolute discount D:

    P_n(w | h) = max(c_n(h, w) - D, 0) / c_n(h) + D * T_n(h) / c_n(h) * P_{n-1}(w | h')

where h' drops the oldest token of h, c_N are raw counts at the highest order N and c_n
(n < N) are continuation counts (the number of distinct tokens seen before the n-gram),
T_n(h) is the number of distinct w after h, and the recursion ends in the uniform
distribution over the vocabulary, so every token has a probability > 0 and P(. | h) sums
to 1. A context never seen at order n falls through to order n - 1.

Every sequence starts with the start token (``encode_documents``); it is repeated N - 2
times in front, so every scored token has a full history of N - 1 tokens. All lower-order
statistics then follow from the highest-order counts, which are all the file stores:
``router.safetensors`` holds ``grams`` [G, N] (token ids) and ``counts`` [G], with the
order, discount and vocabulary size as JSON in its metadata. Safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path

import torch

from dlm_factory.dlm.errors import FactoryError

ROUTER_FILE = "router.safetensors"
FORMAT = "ngram-kn"
META_KEY = "ngram_router"
MAX_ORDER = 6


def _padded(ids: list[int], order: int) -> list[int]:
    return [ids[0]] * (order - 2) + list(ids) if order > 2 and ids else list(ids)


class NgramLM:
    """Interpolated Kneser-Ney n-gram LM over token ids; build with ``fit`` or ``load``."""

    def __init__(self, counts: dict[tuple[int, ...], int], order: int, discount: float, vocab_size: int):
        if not 1 <= order <= MAX_ORDER:
            raise FactoryError(f"n-gram order {order} is out of range: expected 1 <= order <= {MAX_ORDER}")
        if not 0 < discount < 1:
            raise FactoryError(f"n-gram discount {discount} is out of range: expected 0 < discount < 1")
        if vocab_size < 1:
            raise FactoryError(f"vocabulary size {vocab_size}: expected at least 1")
        self.order, self.discount, self.vocab_size = order, float(discount), int(vocab_size)
        # tables[n - 1]: n-gram -> count (raw at the top order, continuation below)
        tables: list[Counter] = [Counter() for _ in range(order - 1)] + [Counter(counts)]
        self.counts = tables[-1]  # the top-order counts: all that is stored
        for n in range(order - 1, 0, -1):
            for gram in tables[n]:
                tables[n - 1][gram[1:]] += 1
        self._tables = tables
        # per order: context -> (total count, distinct continuations)
        self._contexts: list[dict[tuple[int, ...], list[int]]] = []
        for table in tables:
            ctx: dict[tuple[int, ...], list[int]] = defaultdict(lambda: [0, 0])
            for gram, c in table.items():
                entry = ctx[gram[:-1]]
                entry[0] += c
                entry[1] += 1
            self._contexts.append(dict(ctx))

    @classmethod
    def fit(cls, sequences: list[list[int]], *, order: int = 3, discount: float = 0.75, vocab_size: int) -> NgramLM:
        """Count the ``order``-grams of token-id sequences (each starting with the start token)."""
        if not 1 <= order <= MAX_ORDER:
            raise FactoryError(f"n-gram order {order} is out of range: expected 1 <= order <= {MAX_ORDER}")
        counts: Counter = Counter()
        for ids in sequences:
            seq = _padded(ids, order)
            for i in range(len(seq) - (len(ids) - 1), len(seq)):  # every token after the start token
                counts[tuple(seq[i - order + 1: i + 1])] += 1
        if not counts:
            raise FactoryError(f"no {order}-grams to count: the router needs sequences of at least 2 tokens")
        bad = [t for gram in counts for t in gram if not 0 <= t < vocab_size]
        if bad:
            raise FactoryError(f"token id {bad[0]} is outside the vocabulary of {vocab_size}")
        return cls(counts, order, discount, vocab_size)

    def prob(self, history: tuple[int, ...], token: int) -> float:
        """P(token | the last order - 1 tokens of history)."""
        p = 1.0 / self.vocab_size
        d = self.discount
        for n in range(1, self.order + 1):
            h = tuple(history[len(history) - (n - 1):]) if n > 1 else ()
            if len(h) < n - 1:
                break
            stats = self._contexts[n - 1].get(h)
            if stats is None:
                continue  # an unseen context: the lower order's estimate stands
            total, distinct = stats
            c = self._tables[n - 1].get((*h, token), 0)
            p = max(c - d, 0.0) / total + d * distinct / total * p
        return p

    def nll(self, ids: list[int]) -> float:
        """Negative log-likelihood (nats) of ids[1:] given ids[0] (the start token) and their history."""
        seq = _padded(ids, self.order)
        start = len(seq) - (len(ids) - 1)
        k = self.order - 1
        return -sum(math.log(self.prob(tuple(seq[max(0, i - k): i]), seq[i])) for i in range(start, len(seq)))

    def to_bytes(self, metadata: dict[str, str] | None = None) -> bytes:
        """The safetensors file: grams [G, N] (int16 when the vocabulary fits), counts [G], settings in the metadata."""
        from safetensors.torch import save

        grams = sorted(self.counts)
        dtype = torch.int16 if self.vocab_size <= 2**15 else torch.int32
        tensors = {"grams": torch.tensor(grams, dtype=dtype).reshape(len(grams), self.order),
                   "counts": torch.tensor([self.counts[g] for g in grams], dtype=torch.int32)}
        settings = {**(metadata or {}), "format": FORMAT, "order": self.order, "discount": self.discount,
                    "vocab_size": self.vocab_size}
        # one metadata key holding sorted JSON: safetensors orders several keys differently from run to run
        return save(tensors, metadata={META_KEY: json.dumps(settings, sort_keys=True)})

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
        """Write ``to_bytes`` to ``path``."""
        path = Path(path)
        path.write_bytes(self.to_bytes(metadata))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> NgramLM:
        """Read what ``save`` wrote (safetensors: no code runs on load)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                grams, counts = f.get_tensor("grams"), f.get_tensor("counts")
        except FileNotFoundError:
            raise FactoryError(f"{path}: no router model there") from None
        except Exception as e:  # a truncated or foreign file
            raise FactoryError(f"{path}: not a router model ({type(e).__name__}: {e})") from None
        try:
            settings = json.loads(meta[META_KEY])
            if settings.get("format") != FORMAT:
                raise FactoryError(f"{path}: not an n-gram router (format {settings.get('format')!r})")
            order, discount, vocab = int(settings["order"]), float(settings["discount"]), int(settings["vocab_size"])
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise FactoryError(f"{path}: router metadata missing or incomplete ({type(e).__name__}: {e})") from None
        if grams.ndim != 2 or grams.shape[1] != order or counts.shape != (grams.shape[0],) or (counts < 1).any():
            raise FactoryError(f"{path}: router tensors do not match order {order}")
        table = dict(zip(map(tuple, grams.long().tolist()), counts.tolist(), strict=True))
        return cls(table, order, discount, vocab)
