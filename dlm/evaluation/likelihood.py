"""Likelihood estimates in bits per token: the diffusion ELBO and the exact AR NLL."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from dlm_factory.dlm.diffusion.denoiser import Denoiser, denoiser_device
from dlm_factory.dlm.diffusion.objective import ar_loss, corrupt, maskable
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
    device = denoiser_device(denoiser)
    ids = ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    keep = keep.to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    per_k = torch.zeros(n, dtype=torch.float64)
    total = 0
    for lo in range(0, ids.shape[0], batch_size):
        x = ids[lo : lo + batch_size]
        am = None if attention_mask is None else attention_mask[lo : lo + batch_size]
        kp = keep[lo : lo + batch_size]
        total += int(maskable(x, spec, kp, am).sum())
        u = torch.rand(x.shape[0], generator=g, device=device)
        for k in range(n):
            t = ((k + u) / n).clamp(min=spec.eps)
            noisy, masked = corrupt(x, t, spec, kp, am, g)
            logp = denoiser(noisy, am)  # [b, T, V]
            nll = -logp.gather(-1, x[..., None])[..., 0] * masked  # [b, T]
            per_k[k] += float((nll.sum(-1) / t).sum())
    if total == 0:
        from dlm_factory.dlm.errors import FactoryError

        raise FactoryError("nothing to evaluate: no tokens left after the prompt/first token")
    values = per_k / total / math.log(2)
    stderr = float(values.std() / math.sqrt(n)) if n > 1 else float("nan")
    return Estimate(float(values.mean()), stderr, total, n, "elbo")


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
