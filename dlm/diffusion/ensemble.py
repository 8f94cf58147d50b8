"""Ensembles of denoisers: a large general DLM and a small user specialist, combined in log space.

SSD-2 ("David helps Goliath", Han et al. 2023): at every denoising step each member
predicts per-position distributions over the same vocabulary for the same partially
masked sequence, and the predictions are combined in log space, then renormalised:

- product of experts: ``log p_g + lambda * log p_s``;
- emulated fine-tuning (EFT, Mitchell et al. 2023): ``log p_g + lambda * (log p_s_tuned -
  log p_s_base)``: the large model plus the *change* that tuning made to the small one;
- logarithmic pool: ``(log p_g + lambda * log p_s) / (1 + lambda)``, the product of experts
  at temperature ``1 + lambda``: a weighted geometric mean that runs from the general
  model (lambda = 0) to the specialist (lambda -> inf). Where the specialist alone beats
  the general model (a small general model, or a user far from its data), the unnormalised
  product and EFT stay overconfident and can lose to the specialist; the pool cannot lose
  to both members at its best lambda by more than the grid's resolution.

All are one weighted sum ``sum_i w_i log p_i`` followed by ``log_softmax``, so an
ensemble is a list of (member denoiser, weight). It is one more ``Denoiser``: every
sampler and the ELBO estimator work unchanged (an ensemble's ELBO uses the combined
distribution). Each member's shift is handled by its own denoiser, so the log-probs are
aligned per position before they are combined. A member may see a private *context*
(token ids put before every sequence, e.g. user documents the general model never
sees); its log-probs are read back at the positions of the shared sequence. The block
KV cache delegates to the members when all of them have one (a tuple of their caches).

Members must share the tokenizer (its digest in ``diffusion.json``) and the mask token:
anything else is refused with one FactoryError line.

Shapes: B batch, T sequence length, C a member's context length, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dlm_factory.dlm.diffusion.denoiser import denoiser_device
from dlm_factory.dlm.errors import FactoryError

PRODUCT_OF_EXPERTS = "product_of_experts"
EMULATED_FINETUNING = "emulated_finetuning"
LOGARITHMIC_POOL = "logarithmic_pool"
FORMS = (PRODUCT_OF_EXPERTS, EMULATED_FINETUNING, LOGARITHMIC_POOL)
FORM_ALIASES = {"poe": PRODUCT_OF_EXPERTS, "eft": EMULATED_FINETUNING, "pool": LOGARITHMIC_POOL}
FORM_SHORT = {v: k for k, v in FORM_ALIASES.items()}
# lambda beyond this makes the small model dominate a model ~10-100x larger; SSD-2 and EFT
# tune it in [0, 2]. Values outside [0, LAMBDA_MAX] are refused as bad input.
LAMBDA_MAX = 8.0
_FLOOR = -1e4  # member log-probs are clamped here so a negative EFT weight never meets -inf


def check_form(form: str) -> str:
    """The canonical form name (``poe``/``eft`` accepted), else one FactoryError line."""
    canonical = FORM_ALIASES.get(form, form)
    if canonical not in FORMS:
        raise FactoryError(f"unknown ensemble form {form!r}: expected {', '.join(FORMS)} (or poe, eft, pool)")
    return canonical


def check_lambda(lam) -> float:
    """``lam`` as a float in [0, LAMBDA_MAX], else one FactoryError line."""
    try:
        value = float(lam)
    except (TypeError, ValueError):
        raise FactoryError(f"lambda {lam!r} is not a number") from None
    if not math.isfinite(value) or not 0.0 <= value <= LAMBDA_MAX:
        raise FactoryError(f"lambda {lam!r} is out of range: expected 0 <= lambda <= {LAMBDA_MAX:g}")
    return value


def form_weights(form: str, lam: float) -> tuple[float, float, float]:
    """Weights of (general, specialist, specialist's base) in the log-space sum."""
    form, lam = check_form(form), check_lambda(lam)
    if form == LOGARITHMIC_POOL:
        return (1.0 / (1.0 + lam), lam / (1.0 + lam), 0.0)
    return (1.0, lam, -lam) if form == EMULATED_FINETUNING else (1.0, lam, 0.0)


def check_shared_tokenizer(denoisers: dict[str, object]) -> None:
    """Members must map text to the same ids: equal tokenizer digests and mask tokens, else one error."""
    items = list(denoisers.items())
    name0, first = items[0]
    for name, den in items[1:]:
        a, b = first.spec.tokenizer_digest, den.spec.tokenizer_digest
        if a != b:
            raise FactoryError(f"ensemble members must share a tokenizer: {name0} has {a[:19]}..., "
                               f"{name} has {b[:19]}... (build the specialist on the general model's tokenizer)")
        if first.spec.mask_token_id != den.spec.mask_token_id:
            raise FactoryError(f"ensemble members must share the mask token: {name0} uses id "
                               f"{first.spec.mask_token_id}, {name} uses id {den.spec.mask_token_id}")


def positions(denoiser) -> int | None:
    """A denoiser's context length: its ``max_positions``, else its model's config, else None."""
    value = getattr(denoiser, "max_positions", None)
    if value is None and getattr(denoiser, "model", None) is not None:
        from dlm_factory.dlm.checkpoint.io import max_positions

        value = max_positions(denoiser.model.config)
    return value


@dataclass
class Member:
    """One term of the log-space sum: ``weight * log p_denoiser(. | context + sequence)``.

    context: token ids this member sees before every sequence (user-private context); the
    general model usually has none. name: for messages and reports.
    """

    denoiser: object
    weight: float
    context: list[int] | None = None
    name: str = ""
    _context: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not math.isfinite(self.weight):
            raise FactoryError(f"member {self.name or '?'}: weight {self.weight} is not finite")
        if self.context:
            mask_id = self.denoiser.spec.mask_token_id
            if mask_id in self.context:
                raise FactoryError(f"member {self.name or '?'}: its context contains the mask token (id {mask_id})")
            self._context = torch.tensor(list(self.context), dtype=torch.long)

    @property
    def offset(self) -> int:
        return 0 if self._context is None else self._context.numel()

    def inputs(self, ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """(ids [B, C+T], attention mask [B, C+T] or None) as this member sees them."""
        if self._context is None:
            return ids, attention_mask
        B = ids.shape[0]
        ctx = self._context.to(ids.device).expand(B, -1)
        am = torch.ones_like(ids) if attention_mask is None else attention_mask
        return torch.cat([ctx, ids], 1), torch.cat([torch.ones_like(ctx), am.to(ids.dtype)], 1)


class EnsembleDenoiser:
    """``log_softmax(sum_i w_i log p_i)`` over members sharing a tokenizer: one more Denoiser.

    The first member is the general model: the ensemble takes its ``spec`` (mask token,
    shift, eps), tokenizer and device. Members with weight 0 are not evaluated at all; when
    only the general member is left with weight 1, its log-probs are returned unchanged
    (lambda = 0 is exactly the general model).
    """

    def __init__(self, members: Sequence[Member]):
        if not members:
            raise FactoryError("an ensemble needs at least one member")
        names = [m.name or f"member{i}" for i, m in enumerate(members)]
        check_shared_tokenizer({n: m.denoiser for n, m in zip(names, members, strict=True)})
        self.members = list(members)
        general = self.members[0].denoiser
        self.spec = general.spec
        self.tokenizer = getattr(general, "tokenizer", None)
        self.device = denoiser_device(general)
        self.active = [m for m in self.members if m.weight != 0.0]
        self._passthrough = len(self.active) == 1 and self.active[0].weight == 1.0 and self.active[0].offset == 0
        self._cached = all(callable(getattr(m.denoiser, "block_cache", None))
                           and callable(getattr(m.denoiser, "block_log_probs", None)) for m in self.active)
        vocab = len(self.tokenizer) if self.tokenizer is not None else None
        self._vocab = vocab

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def combine(cls, form: str, lam: float, general, specialist, base=None, *,
                context: list[int] | None = None) -> EnsembleDenoiser:
        """The ensemble of ``form`` (product_of_experts | emulated_finetuning) at ``lam``.

        ``context`` is seen by the specialist side only (the tuned specialist and its base).
        """
        form = check_form(form)
        wg, ws, wb = form_weights(form, lam)
        members = [Member(general, wg, name="general"), Member(specialist, ws, context, name="specialist")]
        if form == EMULATED_FINETUNING:
            if base is None:
                raise FactoryError("the emulated fine-tuning form needs the specialist's base model")
            members.append(Member(base, wb, context, name="base"))
        return cls(members)

    # -- the Denoiser interface ----------------------------------------------------------------

    @property
    def max_positions(self) -> int | None:
        """Positions of the shared sequence every member can take (its own limit minus its context)."""
        limits = [lim - m.offset for m in self.members if (lim := positions(m.denoiser)) is not None]
        return min(limits) if limits else None

    def _combine(self, parts: list[tuple[Member, torch.Tensor]]) -> torch.Tensor:
        if self._passthrough:
            return parts[0][1]
        V = min(lp.shape[-1] for _, lp in parts)
        if self._vocab is not None and V < self._vocab:
            raise FactoryError(f"ensemble member predicts {V} tokens, fewer than the shared tokenizer's {self._vocab}")
        # Clamping is only needed where a negative weight (EFT's base) could meet -inf; with
        # non-negative weights the sum is accumulated in one fused op per member (the sampler
        # pays this at every step, so no extra passes over [B, n, V]).
        clamp = any(m.weight < 0 for m, _ in parts)
        total = None
        for m, lp in parts:
            lp = lp[..., :V].to(self.device, torch.float32)
            if clamp:
                lp = lp.clamp(min=_FLOOR)
            if total is None:
                total = lp * m.weight
            else:
                total.add_(lp, alpha=m.weight)
        return total.log_softmax(-1)

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Combined log-probs [B, T, V] of the clean token at every position of ``ids`` [B, T]."""
        parts = []
        for m in self.active:
            dev = denoiser_device(m.denoiser)
            x, am = m.inputs(ids.to(dev), None if attention_mask is None else attention_mask.to(dev))
            parts.append((m, m.denoiser(x, am)[:, m.offset:]))
        return self._combine(parts)

    # -- the block KV cache (Fast-dLLM), delegated to the members ------------------------------

    @property
    def block_cache(self):
        """The members' block caches combined, when every active member has one (else None: uncached)."""
        return self._block_cache if self._cached else None

    @property
    def block_log_probs(self):
        return self._block_log_probs if self._cached else None

    def _block_cache(self, ids, attention_mask, block: tuple[int, int], *, dual: bool = True):
        s, e = block
        parts, caches = [], []
        for m in self.active:
            dev = denoiser_device(m.denoiser)
            x, am = m.inputs(ids.to(dev), None if attention_mask is None else attention_mask.to(dev))
            lp, cache = m.denoiser.block_cache(x, am, (s + m.offset, e + m.offset), dual=dual)
            parts.append((m, lp))
            caches.append(cache)
        return self._combine(parts), tuple(caches)

    def _block_log_probs(self, cache, ids, attention_mask):
        parts = []
        for m, c in zip(self.active, cache, strict=True):
            dev = denoiser_device(m.denoiser)
            x, am = m.inputs(ids.to(dev), None if attention_mask is None else attention_mask.to(dev))
            parts.append((m, m.denoiser.block_log_probs(c, x, am)))
        return self._combine(parts)


class LastCall:
    """A denoiser that remembers its last call: several ensembles over the same members, evaluated
    on the same noisy batch (``paired_elbo``), then run each member once per batch.

    Exact: the cached output is returned only for inputs equal to the last ones.
    """

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.spec = denoiser.spec
        self.tokenizer = getattr(denoiser, "tokenizer", None)
        self.device = denoiser_device(denoiser)
        self._last: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None

    @property
    def max_positions(self):
        return positions(self.denoiser)

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self._last is not None:
            ids0, am0, out = self._last
            same_mask = (am0 is None and attention_mask is None) or (
                am0 is not None and attention_mask is not None and am0.shape == attention_mask.shape
                and torch.equal(am0, attention_mask))
            if ids0.shape == ids.shape and same_mask and torch.equal(ids0, ids):
                return out
        out = self.denoiser(ids, attention_mask)
        self._last = (ids.clone(), None if attention_mask is None else attention_mask.clone(), out)
        return out
