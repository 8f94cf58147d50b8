"""Prefix routing: send a request that names no user to the user whose model explains its start best.

SmallTalk LM (Filippova et al. 2024) routes each request to one expert by the likelihood
of a short prefix under small per-expert *router* LMs (256 tokens in the paper; still
better than a dense model at 32). Two rules, both scored in bits/token on the first M
prompt tokens (default 32) after the start token; the lowest score wins:

- ``prefix_ngram`` (default): each user's router is an interpolated Kneser-Ney n-gram LM
  over the shared tokenizer's ids, counted on the user's train split
  (``dlm.evaluation.ngram``; stored as ``router.safetensors`` in the ensemble dir, its
  sha256 in ENSEMBLE.json). Exact likelihoods, no model forward.
- ``prefix_elbo``: the specialists are the routers: their diffusion ELBO on the prefix,
  a Monte Carlo estimate. Every prompt is replicated ``mc_samples`` times with masking
  rates stratified over (0, 1], and every specialist sees the *same* noisy rows, so the
  comparison between specialists is paired (their shared noise cancels in the argmin).

On the demo users the n-gram routers route held-out requests better than the specialists'
ELBO at every M measured (docs/ensemble.md, ``bench/ensemble.py``).

Shapes: P prompts, R draws per prompt, M prefix tokens, K users, V vocabulary.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from pydantic import BaseModel, Field

from dlm_factory.dlm.data.corpus import Document, encode_documents
from dlm_factory.dlm.diffusion.denoiser import denoiser_device
from dlm_factory.dlm.diffusion.ensemble import check_shared_tokenizer
from dlm_factory.dlm.diffusion.objective import corrupt
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.evaluation.ngram import NgramLM


class RouterConfig(BaseModel):
    """Prefix routing settings (stored in ENSEMBLE.json under ``router``)."""

    rule: Literal["prefix_ngram", "prefix_elbo"] = Field(
        "prefix_ngram", description="prefix_ngram: the users' n-gram router LMs; prefix_elbo: the specialists' ELBO")
    prefix_tokens: int = Field(32, ge=1, description="M: prompt tokens scored (after the start token); SmallTalk LM still beats dense at 32")
    order: int = Field(3, ge=1, le=6, description="prefix_ngram: n-gram order")
    discount: float = Field(0.75, gt=0, lt=1, description="prefix_ngram: Kneser-Ney absolute discount")
    mc_samples: int = Field(32, ge=2, description="prefix_elbo: Monte Carlo draws per prompt (masking rates stratified over (0, 1])")
    seed: int = Field(0, description="prefix_elbo: seed of the draws: the same request is always routed the same way")
    batch_size: int = Field(128, gt=0, description="prefix_elbo: rows (prompt x draw) per forward pass")


def _prefixes(prompts: list[list[int]], cfg: RouterConfig) -> list[list[int]]:
    """Each prompt's start token + first M tokens; a prompt with nothing after the start token is refused."""
    cut = [list(p[: 1 + cfg.prefix_tokens]) for p in prompts]
    short = [i for i, p in enumerate(cut) if len(p) < 2]
    if short:
        raise FactoryError(f"prompt {short[0]} has no token to route on (it needs at least one token after the start token)")
    return cut


def _prefix_rows(prompts: list[list[int]], cfg: RouterConfig):
    """Right-padded prefixes [P, 1 + M] (start token + M tokens) with their attention mask."""
    cut = _prefixes(prompts, cfg)
    T = max(len(p) for p in cut)
    ids = torch.zeros(len(cut), T, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(cut):
        ids[i, : len(p)] = torch.tensor(p)
        am[i, : len(p)] = 1
    return ids, am


@torch.no_grad()
def prefix_elbo(specialists: dict[str, object], prompts: list[list[int]], cfg: RouterConfig | None = None) -> torch.Tensor:
    """ELBO in bits/token of each prompt's first M tokens under each specialist: [P, K].

    The first token (the start token) is context, as in ``elbo``; the K specialists see the
    same noisy rows (paired draws).
    """
    cfg = cfg or RouterConfig()
    if not specialists:
        raise FactoryError("routing needs at least one specialist")
    if not prompts:
        return torch.zeros(0, len(specialists))
    check_shared_tokenizer(specialists)
    dens = list(specialists.values())
    spec = dens[0].spec
    device = denoiser_device(dens[0])
    ids, am = _prefix_rows(prompts, cfg)
    P, R = ids.shape[0], cfg.mc_samples
    ids, am = ids.to(device), am.to(device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    rows_ids = ids.repeat_interleave(R, 0)  # [P*R, T]: prompt p's draws are rows p*R .. p*R+R-1
    rows_am = am.repeat_interleave(R, 0)
    u = torch.rand(P * R, generator=g, device=device)
    strata = torch.arange(R, device=device).repeat(P)
    t = ((strata + u) / R).clamp(min=spec.eps)  # [P*R] stratified masking rates
    keep = torch.zeros_like(rows_ids, dtype=torch.bool)
    keep[:, 0] = True
    noisy, masked = corrupt(rows_ids, t, spec, keep, rows_am, g)
    totals = torch.zeros(len(dens), P * R, dtype=torch.float64)
    for lo in range(0, P * R, cfg.batch_size):
        sl = slice(lo, lo + cfg.batch_size)
        for k, den in enumerate(dens):
            dev = denoiser_device(den)
            logp = den(noisy[sl].to(dev), rows_am[sl].to(dev))
            nll = -logp.gather(-1, rows_ids[sl].to(dev)[..., None])[..., 0] * masked[sl].to(dev)
            totals[k, sl] = (nll.sum(-1) / t[sl].to(dev)).double().cpu()
    scored = (am.sum(-1) - 1).double().cpu()  # [P] tokens scored per prompt
    per_prompt = totals.view(len(dens), P, R).mean(-1) / scored / math.log(2)  # [K, P]
    return per_prompt.T.float()


def fit_router(sequences: list[list[int]], vocab_size: int, cfg: RouterConfig | None = None) -> NgramLM:
    """A user's n-gram router: ``cfg.order``-grams of their token ids (documents encoded with the start token)."""
    cfg = cfg or RouterConfig()
    return NgramLM.fit(sequences, order=cfg.order, discount=cfg.discount, vocab_size=vocab_size)


def prefix_ngram(routers: dict[str, NgramLM], prompts: list[list[int]], cfg: RouterConfig | None = None) -> torch.Tensor:
    """Cross-entropy in bits/token of each prompt's first M tokens under each user's n-gram router: [P, K]."""
    cfg = cfg or RouterConfig()
    if not routers:
        raise FactoryError("routing needs at least one router")
    sizes = {lm.vocab_size for lm in routers.values()}
    if len(sizes) > 1:
        raise FactoryError(f"the routers were counted over different vocabularies ({sorted(sizes)}): "
                           f"they must share the general model's tokenizer")
    return torch.tensor([[lm.nll(row) / (len(row) - 1) / math.log(2) for lm in routers.values()]
                         for row in _prefixes(prompts, cfg)]).reshape(len(prompts), len(routers))


def prefix_scores(scorers: dict[str, object], prompts: list[list[int]], cfg: RouterConfig | None = None) -> torch.Tensor:
    """[P, K] bits/token by ``cfg.rule``: ``scorers`` are the users' ``NgramLM`` routers (prefix_ngram)
    or their specialist denoisers (prefix_elbo)."""
    cfg = cfg or RouterConfig()
    ngram = cfg.rule == "prefix_ngram"
    wrong = [u for u, s in scorers.items() if isinstance(s, NgramLM) != ngram]
    if wrong:
        need = "an n-gram router (NgramLM)" if ngram else "a specialist denoiser"
        raise FactoryError(f"router rule {cfg.rule} needs {need} per user; user {wrong[0]} has another kind")
    return (prefix_ngram if ngram else prefix_elbo)(scorers, prompts, cfg)


def route(scorers: dict[str, object], prompts: list[list[int]], cfg: RouterConfig | None = None) -> list[str]:
    """The user (key of ``scorers``) each prompt is routed to: the lowest prefix score (``prefix_scores``)."""
    names = list(scorers)
    scores = prefix_scores(scorers, prompts, cfg)
    return [names[i] for i in scores.argmin(-1).tolist()]


def prefix_requests(tokenizer, docs: list[Document], n: int, prefix_tokens: int) -> list[list[int]]:
    """Up to ``n`` requests from ``docs``: the text from each ``def``/``class`` line on, as a document
    start (start token + ids), cut to 1 + ``prefix_tokens`` tokens; documents taken round-robin.

    Requests shorter than the prefix are skipped, so every request routes on exactly M tokens.
    """
    per_doc = []
    for doc in docs:
        lines = doc.text.splitlines(keepends=True)
        starts = [i for i, line in enumerate(lines)
                  if line.lstrip().startswith(("def ", "async def ", "class "))]
        texts = ["".join(lines[i:])[: 16 * (prefix_tokens + 8)] for i in starts]  # enough characters for M tokens
        enc = encode_documents(tokenizer, [Document(f"{doc.name}:{i}", t) for i, t in zip(starts, texts, strict=True)])
        per_doc.append([ids[: 1 + prefix_tokens] for ids in enc if len(ids) >= 1 + prefix_tokens])
    out, k = [], 0
    while len(out) < n and any(k < len(d) for d in per_doc):
        out += [d[k] for d in per_doc if k < len(d)]
        k += 1
    return out[:n]


def routing_accuracy(scorers: dict[str, object], requests: dict[str, list[list[int]]],
                     cfg: RouterConfig | None = None) -> dict:
    """Route held-out requests whose user is known; accuracy overall and per user, confusion, cost.

    ``scorers`` as in ``prefix_scores``; ``requests`` maps each user (a key of ``scorers``)
    to its requests. The cost is the wall time of scoring, per request, and for prefix_elbo
    the positions the specialists processed (K specialists x R draws x (1 + M) per request).
    """
    cfg = cfg or RouterConfig()
    unknown = sorted(set(requests) - set(scorers))
    if unknown:
        raise FactoryError(f"requests for users without a router: {', '.join(unknown)}")
    names = list(scorers)
    prompts, truth = [], []
    for user, reqs in requests.items():
        prompts += reqs
        truth += [user] * len(reqs)
    if not prompts:
        raise FactoryError("no routing requests")
    start = time.perf_counter()
    scores = prefix_scores(scorers, prompts, cfg)
    seconds = time.perf_counter() - start
    picked = [names[i] for i in scores.argmin(-1).tolist()]
    confusion = {u: {v: 0 for v in names} for u in requests}
    for t, p in zip(truth, picked, strict=True):
        confusion[t][p] += 1
    correct = sum(t == p for t, p in zip(truth, picked, strict=True))
    n = len(prompts)
    acc = correct / n
    return {
        "accuracy": acc,
        "stderr": math.sqrt(acc * (1 - acc) / n),  # binomial, across requests
        "requests": n,
        "per_user": {u: confusion[u][u] / max(1, sum(confusion[u].values())) for u in requests},
        "confusion": confusion,
        "rule": cfg.rule,
        "prefix_tokens": cfg.prefix_tokens,
        **({"order": cfg.order} if cfg.rule == "prefix_ngram" else
           {"mc_samples": cfg.mc_samples, "positions_per_request": len(names) * cfg.mc_samples * (1 + cfg.prefix_tokens)}),
        "seconds": seconds,
        "seconds_per_request": seconds / n,
    }
