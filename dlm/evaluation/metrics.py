"""Quality metrics shared by every stage that generates text.

- ``judge_nll``: per-token NLL (nats) of generated continuations under an AR
  "judge" checkpoint (exact likelihood by teacher forcing). Lower is better; a
  judge that is the source AR model measures how plausible the samples are to it.
- ``parse_rate``: fraction of generated Python snippets that ``ast.parse`` accepts
  (the demo corpus is Python source).
- ``repetition``: distinct-2 and the longest repeated n-gram (degenerate loops).
"""

from __future__ import annotations

import ast
import math
import textwrap
import warnings


def judge_nll(judge, prompts: list[list[int]], continuations: list[list[int]], batch_size: int = 16) -> float:
    """Mean per-token NLL in nats of ``continuations[i]`` given ``prompts[i]`` under ``judge``, tokens pooled
    over all continuations (a long sample weighs more); NaN when every continuation is empty.
    See ``judge_nlls`` for the rules."""
    return pooled_mean(judge_nlls(judge, prompts, continuations, batch_size))[0]


def judge_nlls(judge, prompts: list[list[int]], continuations: list[list[int]],
               batch_size: int = 16) -> list[tuple[float, int]]:
    """(summed NLL in nats, tokens) of each ``continuations[i]`` given ``prompts[i]`` under ``judge``.

    ``judge`` is a ``dlm.checkpoint.io.Loaded`` AR checkpoint (``spec`` None). Tokens are
    pooled over all continuations (a long sample weighs more). Sequences are
    right-padded with an attention mask; a prompt too long for the judge's positions
    loses its oldest tokens. An empty prompt is conditioned on BOS/EOS. An empty
    continuation scores (0.0, 0).
    """
    import torch
    import torch.nn.functional as F

    from dlm_factory.dlm.data.batching import collate, pad_id
    from dlm_factory.dlm.errors import FactoryError
    from dlm_factory.dlm.runtime import inference_autocast, model_device

    if getattr(judge, "spec", None) is not None:
        raise FactoryError("judge_nll needs an autoregressive checkpoint (this one has diffusion.json)")
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    tok = judge.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    limit = judge.max_positions or 1 << 30
    pairs, kept = [], []
    for i, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
        if not c:
            continue
        p = list(p) if p else ([start] if start is not None else [])
        if not p:
            raise FactoryError("judge_nll: empty prompt and the judge's tokenizer has no BOS/EOS to condition on")
        if len(c) + 1 > limit:
            raise FactoryError(f"judge_nll: continuation of {len(c)} tokens exceeds the judge's {limit} positions")
        p = p[-(limit - len(c)):]
        pairs.append((p, list(c)))
        kept.append(i)
    out = [(0.0, 0)] * len(continuations)
    if not pairs:
        return out
    model = judge.model
    device = model_device(model)
    sums = []
    with torch.no_grad(), inference_autocast(device):
        for lo in range(0, len(pairs), batch_size):
            batch = collate([(p + c, len(p)) for p, c in pairs[lo : lo + batch_size]], pad_id(tok))
            ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            target = (am.bool() & ~batch["prompt_mask"].to(device))[:, 1:]  # continuation tokens: their NLL counts
            logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits[:, :-1]  # [B, T-1, V]
            nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
            sums += [(float((row * m).sum()), int(m.sum())) for row, m in zip(nll, target.float(), strict=True)]
    for i, pair in zip(kept, sums, strict=True):
        out[i] = pair
    return out


def pooled_mean(scores: list[tuple[float, int]]) -> tuple[float, float]:
    """(mean per token, its standard error across samples) of per-sample (total, tokens): a ratio estimator.

    mean = sum(total) / sum(tokens); its variance (delta method, samples independent) is
    sum_i (total_i - mean * tokens_i)^2 / (k (k - 1)) / (mean tokens)^2. NaN when nothing was scored.
    """
    k = len(scores)
    tokens = sum(n for _, n in scores)
    if tokens == 0:
        return float("nan"), float("nan")
    mean = sum(y for y, _ in scores) / tokens
    if k < 2:
        return mean, float("nan")
    resid = sum((y - mean * n) ** 2 for y, n in scores)
    return mean, math.sqrt(resid / (k * (k - 1))) / (tokens / k)


def paired_difference(a: list[tuple[float, int]], b: list[tuple[float, int]]) -> tuple[float, float]:
    """(mean_a - mean_b, standard error) of two ratio estimators over the same samples (paired by index).

    Each sample's linearised contribution is d_i = (y_a - m_a n_a) / nbar_a - (y_b - m_b n_b) / nbar_b;
    the difference's variance is sum_i d_i^2 / (k (k - 1)): noise shared by the pair (a hard prompt)
    cancels.
    """
    if len(a) != len(b):
        raise ValueError(f"paired over the same samples: {len(a)} vs {len(b)}")
    (ma, _), (mb, _) = pooled_mean(a), pooled_mean(b)
    k = len(a)
    if math.isnan(ma) or math.isnan(mb) or k < 2:
        return ma - mb, float("nan")
    na, nb = sum(n for _, n in a) / k, sum(n for _, n in b) / k
    d = [(ya - ma * xa) / na - (yb - mb * xb) / nb for (ya, xa), (yb, xb) in zip(a, b, strict=True)]
    return ma - mb, math.sqrt(sum(x * x for x in d) / (k * (k - 1)))


def parses(text: str) -> bool:
    """True when ``ast.parse`` accepts the text as is, or after ``textwrap.dedent``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in generated code
        for candidate in (text, textwrap.dedent(text)):
            try:
                ast.parse(candidate)
                return True
            except (SyntaxError, ValueError, MemoryError, RecursionError):
                continue
    return False


def parse_rate(texts: list[str]) -> float:
    """Fraction of ``texts`` that parse as Python (see ``parses``); ``[]`` -> NaN."""
    if not texts:
        return float("nan")
    return sum(parses(t) for t in texts) / len(texts)


def longest_repeat(seq: list[int]) -> int:
    """Length of the longest n-gram occurring at least twice in ``seq`` (overlaps allowed); 0 if none."""

    def repeats(n: int) -> bool:
        seen = set()
        for i in range(len(seq) - n + 1):
            gram = tuple(seq[i : i + n])
            if gram in seen:
                return True
            seen.add(gram)
        return False

    lo, hi = 0, max(len(seq) - 1, 0)  # a repeat of length n exists => one of length n-1 exists
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if repeats(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def repetition(sequences: list[list[int]]) -> dict:
    """``{"distinct_2": unique bigrams / total bigrams (pooled), "longest_repeat": mean longest repeated n-gram}``.

    distinct_2 is NaN when there are no bigrams; longest_repeat is NaN for ``[]``.
    """
    bigrams = [tuple(s[i : i + 2]) for s in sequences for i in range(len(s) - 1)]
    distinct = len(set(bigrams)) / len(bigrams) if bigrams else float("nan")
    longest = sum(longest_repeat(list(s)) for s in sequences) / len(sequences) if sequences else float("nan")
    return {"distinct_2": distinct, "longest_repeat": longest}


def mean(values) -> float:
    """Mean ignoring NaN (NaN if nothing is left)."""
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")
