"""Likelihood estimates in bits per token: the diffusion ELBO and the exact AR NLL."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from dlm_factory.dlm.diffusion.denoiser import Denoiser, denoiser_device
from dlm_factory.dlm.diffusion.objective import ar_loss, corrupt, maskable
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.runtime import inference_autocast, model_device


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


def _draws(denoisers, ids, attention_mask, keep, n: int, seed: int, batch_size: int):
    """Dataset totals of sum_i (1/t) * NLL(masked tokens) for each denoiser, stratum and draw.

    ``m = ceil(n / 2)`` strata of t, two independent draws in each (t = (j + u)/m with
    u ~ U(0, 1) drawn per sequence, stratum and draw; masks drawn independently too).
    Every denoiser sees the same noisy inputs, so their differences are paired.
    Returns (totals [len(denoisers), m, 2] float64, scored token count).
    """
    spec = denoisers[0].spec
    keep = torch.zeros_like(ids, dtype=torch.bool) if keep is None else keep.bool().clone()
    keep[:, 0] = True
    device = denoiser_device(denoisers[0])
    ids = ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    keep = keep.to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    m = (n + 1) // 2
    totals = torch.zeros(len(denoisers), m, 2, dtype=torch.float64)
    count = 0
    for lo in range(0, ids.shape[0], batch_size):
        x = ids[lo : lo + batch_size]
        am = None if attention_mask is None else attention_mask[lo : lo + batch_size]
        kp = keep[lo : lo + batch_size]
        count += int(maskable(x, spec, kp, am).sum())
        for j in range(m):
            for d in range(2):
                u = torch.rand(x.shape[0], generator=g, device=device)
                t = ((j + u) / m).clamp(min=spec.eps)
                noisy, masked = corrupt(x, t, spec, kp, am, g)
                for i, den in enumerate(denoisers):
                    logp = den(noisy, am)  # [b, T, V]
                    nll = -logp.gather(-1, x[..., None])[..., 0] * masked  # [b, T]
                    totals[i, j, d] += float((nll.sum(-1) / t).sum())
    if count == 0:
        raise FactoryError("nothing to evaluate: no tokens left after the prompt/first token")
    return totals, count


def _stratified(totals: torch.Tensor, count: int) -> tuple[float, float]:
    """(mean, stderr) in bits/token of a [m, 2] table of stratum totals with two draws per stratum.

    The estimate is the mean over strata of the two draws' mean; its variance is
    sum_j Var(stratum j's mean) / m^2, each estimated without bias from its two
    independent draws as (a - b)^2 / 4. Unlike the spread across strata (which also
    counts how the loss changes with t), this is the error of the stratified mean itself.
    """
    m = totals.shape[0]
    values = totals / count / math.log(2)
    mean = float(values.mean())
    var = float(((values[:, 0] - values[:, 1]) ** 2 / 4).sum()) / m**2
    return mean, math.sqrt(var)


@torch.no_grad()
def elbo(denoiser: Denoiser, ids, *, attention_mask=None, keep=None, n: int = 128, seed: int = 0,
         batch_size: int = 32) -> Estimate:
    """Monte Carlo upper bound on the NLL (bits/token), stratified in t, with a valid standard error.

    ``n`` samples of t per sequence (rounded up to even: ceil(n/2) strata, two
    independent draws each; see ``_stratified``). The first token is always kept
    (conditioned on), so the bound covers the same tokens as ``ar_nll``; ``keep`` [B, T]
    marks further context (a prompt, a rolling window's carried context).
    """
    if n < 2:
        raise FactoryError(f"mc samples {n}: the ELBO needs at least 2 (two draws per stratum give its error bar)")
    totals, count = _draws([denoiser], ids, attention_mask, keep, n, seed, batch_size)
    mean, stderr = _stratified(totals[0], count)
    return Estimate(mean, stderr, count, 2 * totals.shape[1], "elbo")


@torch.no_grad()
def paired_elbo(denoisers: dict[str, Denoiser], ids, *, attention_mask=None, keep=None, n: int = 128,
                seed: int = 0, batch_size: int = 32) -> dict[str, Estimate]:
    """ELBOs of several denoisers on shared draws, plus ``"<a>-<b>"`` differences against the first.

    Comparing variants by the paired difference cancels the noise of the draws they
    share: its standard error is usually far below either estimate's own. The noisy
    inputs depend on the mask token and eps only: the first token is always kept here,
    so the shift (handled inside each denoiser) changes no draw, and a shift/no-shift
    pair is a valid comparison.
    """
    if n < 2:
        raise FactoryError(f"mc samples {n}: the ELBO needs at least 2")
    names = list(denoisers)
    specs = {(d.spec.mask_token_id, d.spec.eps) for d in denoisers.values()}
    if len(specs) != 1:
        raise FactoryError("paired ELBO needs denoisers with one mask token and eps (the same noisy inputs)")
    totals, count = _draws([denoisers[k] for k in names], ids, attention_mask, keep, n, seed, batch_size)
    out = {}
    for i, name in enumerate(names):
        out[name] = Estimate(*_stratified(totals[i], count), count, 2 * totals.shape[1], "elbo")
    for i, name in enumerate(names[1:], 1):
        out[f"{name}-{names[0]}"] = Estimate(*_stratified(totals[i] - totals[0], count), count,
                                             2 * totals.shape[1], "elbo_difference")
    return out


@torch.no_grad()
def ar_nll(model, ids, *, attention_mask=None, keep=None, batch_size: int = 32) -> Estimate:
    """Exact NLL (bits/token) of an AR model on tokens 1..T-1 (not padding, not kept)."""
    device = model_device(model)
    total_nll, total = 0.0, 0
    for lo in range(0, ids.shape[0], batch_size):
        am = None if attention_mask is None else attention_mask[lo : lo + batch_size].to(device)
        kp = None if keep is None else keep[lo : lo + batch_size].to(device)
        with inference_autocast(device):
            loss, n = ar_loss(model, ids[lo : lo + batch_size].to(device), attention_mask=am, keep=kp)
        total_nll += float(loss) * n
        total += n
    return Estimate(total_nll / max(total, 1) / math.log(2), 0.0, total, 1, "nll")


def _sequence_nll(logp: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum of -log p(target) over the scored positions: [b] float64 on the CPU."""
    return (-logp.gather(-1, targets)[..., 0] * scored).sum(-1).double().cpu()


def _ratio_stderr(sums: torch.Tensor, counts: torch.Tensor) -> float:
    """Standard error across sequences of sum(sums) / sum(counts) (the ratio estimator, delta method)."""
    n = sums.numel()
    if n < 2:
        return float("nan")
    r = sums.sum() / counts.sum()
    resid = sums - r * counts
    return float(torch.sqrt((resid**2).sum() * n / (n - 1)) / counts.sum())


@torch.no_grad()
def ar_combined_nll(models: dict[str, object], candidates: dict[str, dict[str, float]], ids, *,
                    attention_mask=None, keep=None, batch_size: int = 32) -> dict[str, Estimate]:
    """Exact NLL (bits/token) of AR models and of token-by-token log-space combinations of them.

    The AR counterpart of ``dlm.diffusion.ensemble`` (SSD-2's "AR collaboration"): candidate
    ``c`` predicts ``log_softmax(sum_m w_cm log_softmax(logits_m))`` at every position, e.g.
    ``{"poe@0.5": {"general": 1.0, "spec": 0.5}}``. Every model runs once per batch; each
    model alone is reported under its own name, and ``"<c>-<first model>"`` is the paired
    difference. Tokens scored as in ``ar_nll``. The NLL is exact, so ``stderr`` is the
    spread across sequences (standard error of the ratio over windows), not Monte Carlo.
    """
    names = list(models)
    unknown = {m for w in candidates.values() for m in w} - set(names)
    if unknown:
        raise FactoryError(f"combination weights for unknown models: {sorted(unknown)}")
    device = model_device(models[names[0]])
    rows = {k: [] for k in [*names, *candidates]}
    counts = []
    for lo in range(0, ids.shape[0], batch_size):
        x = ids[lo : lo + batch_size].to(device)
        am = None if attention_mask is None else attention_mask[lo : lo + batch_size].to(device)
        target = torch.ones_like(x[:, 1:], dtype=torch.bool)
        if am is not None:
            target &= am[:, 1:].bool()
        if keep is not None:
            target &= ~keep[lo : lo + batch_size, 1:].to(device).bool()
        logp = {}
        for name in names:
            m = models[name]
            with inference_autocast(device):
                logits = m(input_ids=x.to(model_device(m)), attention_mask=None if am is None else am.to(model_device(m)),
                           use_cache=False).logits[:, :-1]
            logp[name] = logits.float().to(device).log_softmax(-1)
        V = min(lp.shape[-1] for lp in logp.values())
        y = x[:, 1:, None]
        for name in names:
            rows[name].append(_sequence_nll(logp[name][..., :V], y, target))
        for cand, weights in candidates.items():
            total = sum(w * logp[m][..., :V] for m, w in weights.items() if w != 0.0)
            rows[cand].append(_sequence_nll(total.log_softmax(-1), y, target))
        counts.append(target.sum(-1).double().cpu())
    n_tok = torch.cat(counts)
    if float(n_tok.sum()) == 0:
        raise FactoryError("nothing to evaluate: no tokens left after the prompt/first token")
    sums = {k: torch.cat(v) for k, v in rows.items()}
    ln2 = math.log(2)
    out = {k: Estimate(float(s.sum() / n_tok.sum()) / ln2, _ratio_stderr(s, n_tok) / ln2, int(n_tok.sum()), 1, "nll")
           for k, s in sums.items()}
    first = names[0]
    for k in [*names[1:], *candidates]:
        d = sums[k] - sums[first]
        out[f"{k}-{first}"] = Estimate(float(d.sum() / n_tok.sum()) / ln2, _ratio_stderr(d, n_tok) / ln2,
                                       int(n_tok.sum()), 1, "nll_difference")
    return out


@torch.no_grad()
def ar_nll_across_windows(model, ids, *, attention_mask=None, keep=None) -> Estimate:
    """``ar_nll`` with a standard error from the spread across windows (the NLL itself is exact).

    The figure is a ratio of sums over windows, sum(nll_i) / sum(n_i); its error is the
    ratio estimator's, sqrt(sum((nll_i - R n_i)^2) / (k (k-1))) / mean(n_i): how much the
    figure would move on another sample of windows like these (windows of one document are
    not independent, so it is a lower bound where documents are long).
    """
    device = model_device(model)
    sums, counts = [], []
    for i in range(ids.shape[0]):
        am = None if attention_mask is None else attention_mask[i : i + 1].to(device)
        kp = None if keep is None else keep[i : i + 1].to(device)
        with inference_autocast(device):
            loss, n = ar_loss(model, ids[i : i + 1].to(device), attention_mask=am, keep=kp)
        if n:
            sums.append(float(loss) * n / math.log(2))
            counts.append(n)
    k = len(counts)
    if k == 0:
        raise FactoryError("nothing to evaluate: no tokens left after the prompt/first token")
    total, n_total = sum(sums), sum(counts)
    r = total / n_total
    var = sum((s - r * n) ** 2 for s, n in zip(sums, counts, strict=True)) / (k * (k - 1)) if k > 1 else 0.0
    return Estimate(r, math.sqrt(var) / (n_total / k), n_total, 1, "nll")
