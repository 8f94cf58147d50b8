"""Speculative decoding with the diffusion LM as the drafter and its source AR model as the verifier.

Leviathan et al. 2023 / Chen et al. 2023 (speculative sampling); DFlash and TiDAR use a
diffusion drafter the same way. Each round:

1. the DLM drafts the next k tokens after the committed text, all k in one denoising
   forward (or ``draft_steps`` LLaDA steps in greedy mode);
2. the AR verifier reads the pending token and the k drafts in ONE forward over its
   exact KV cache, giving its next-token distribution after every prefix;
3. greedy: drafts are accepted while they equal the verifier's argmax, then the
   verifier's own token follows, so the output is token for token the AR model's greedy
   decoding. Sampling: draft i is accepted with probability min(1, p_i(d)/q_i(d)); on
   the first rejection a token is drawn from norm(max(0, p_i - q_i)); when all are
   accepted a bonus token is drawn from p_{k+1}. The output then follows the AR model's
   distribution exactly, whatever the drafter proposes;
4. the verifier's cache is cropped back to the accepted tokens, and k adapts to the
   running acceptance rate (``best_k``: the most expected tokens per unit of cost).

The drafter's prefix cache (``refresh`` = r > 0, Fast-dLLM's approximate prefix cache
applied across rounds): every r rounds one full forward over the committed text and the
k masks; in between, a forward over a window only: the tokens the last verification
committed, and the k new masks, attending to the stored keys/values of everything before.
Every forward appends the keys/values of the committed positions it computed to the store,
so each token's entries are computed once (and again at the next refresh). The DLM is
bidirectional, so stored entries are approximate: they attended to the masks that stood
after them when they were computed, not to the tokens committed since. Only the drafts
change; the verifier still decides every token, so greedy output stays the AR model's
greedy decoding.

Sampling mode drafts all k tokens from one forward with independent draws: q_i is then
the drafter's marginal at position i given the committed text, which is what the
acceptance rule needs (a multi-step draft would make early positions depend on later
ones). Batch size 1: prompts are decoded one after the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, Field

from dlm_factory.dlm.checkpoint.io import Loaded
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.runtime import inference_autocast, model_device


class SpeculativeConfig(BaseModel):
    """Settings of speculative decoding (defaults: greedy, k adapted between 2 and 16)."""

    length: int = Field(64, gt=0, description="tokens to generate after each prompt (fewer when EOS comes first)")
    k: int = Field(4, gt=0, le=64, description="drafted tokens in the first round")
    k_min: int = Field(1, gt=0, description="smallest draft")
    k_max: int = Field(16, gt=0, le=64, description="largest draft")
    adaptive: bool = Field(True, description="adapt k to the running acceptance rate (best_k); False: always k")
    draft_cost: float = Field(0.1, gt=0, description="adaptive k: cost of one more drafted and verified position, as a share of a round's fixed cost (two forwards)")
    draft_steps: int = Field(1, gt=0, description="greedy only: LLaDA denoising steps per draft (1: every draft token from one forward)")
    refresh: int = Field(64, ge=0, description="drafter prefix KV cache: a full drafter forward every r rounds, in between only the tokens committed since and the k masks over the cached (approximate) prefix; 0: a full forward every round")
    temperature: float = Field(0.0, ge=0.0, description="0: greedy (the AR model's greedy output); > 0: speculative sampling at this temperature")
    seed: int = Field(0, description="seed of the sampling mode")
    stop_at_eos: bool = Field(True, description="stop at the verifier's EOS (it is not returned)")


@dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    ks: list[int] = field(default_factory=list)
    draft_positions: int = 0  # positions the drafter's forwards processed (full and window)
    full_rounds: int = 0  # rounds whose every draft was accepted

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / max(self.rounds, 1)

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)


def check_pair(drafter: Loaded, verifier: Loaded, roles: tuple[str, str] = ("drafter", "verifier")) -> None:
    """The verifier is causal and reads the drafter's token ids as the same text (one clear error otherwise).

    ``roles`` names the two in the messages (distillation: student and teacher)."""
    d, v = roles
    if drafter.spec is None:
        raise FactoryError(f"the {d} must be a diffusion checkpoint (with diffusion.json)")
    if verifier.spec is not None:
        raise FactoryError(f"the {v} must be an autoregressive (causal) checkpoint, not a diffusion one")
    dv, vv = drafter.tokenizer.get_vocab(), verifier.tokenizer.get_vocab()
    shared = {t: i for t, i in vv.items() if t in dv}
    if len(shared) != len(vv) or any(dv[t] != i for t, i in shared.items()):
        raise FactoryError(f"the {v}'s tokenizer differs from the {d}'s: every {v} token must keep "
                           f"its id in the {d} (the DLM may only add tokens, e.g. its mask)")


class Speculator:
    """Decodes with a DLM drafter and an AR verifier (see the module docstring)."""

    def __init__(self, drafter: Loaded, verifier: Loaded, cfg: SpeculativeConfig):
        check_pair(drafter, verifier)
        if cfg.k_min > cfg.k_max:
            raise FactoryError(f"k_min {cfg.k_min} > k_max {cfg.k_max}")
        self.denoiser = ModelDenoiser(drafter)
        self.verifier, self.cfg = verifier.model, cfg
        self.vocab = len(verifier.tokenizer)  # ids the verifier knows: drafts stay below
        self.eos = verifier.tokenizer.eos_token_id
        self.device = model_device(self.verifier)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self._prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # the drafter's stored keys/values
        self._since = 0  # rounds since it was stored

    # ------------------------------------------------------------------ drafter

    def _draft(self, context: list[int], k: int, stats: SpeculativeStats) -> tuple[list[int], torch.Tensor | None]:
        """k draft tokens after ``context`` and, when sampling, their proposal distributions q [k, V]."""
        mask = self.denoiser.spec.mask_token_id
        if self.cfg.temperature == 0 and self.cfg.draft_steps > 1:
            from dlm_factory.dlm.sampling.sampler import SamplerConfig, sample

            steps = min(self.cfg.draft_steps, k)
            stats.draft_positions += steps * (len(context) + k)
            out = sample(self.denoiser, [context], SamplerConfig(sampler="llada", length=k, block_size=k,
                                                                 steps=steps, stop_at_eos=False))[0]
            return [t if t < self.vocab else 0 for t in out], None
        x = torch.tensor([context + [mask] * k], device=self.device)
        lp = self._draft_log_probs(x, len(context), stats).float()  # [k, V']
        lp[:, mask] = float("-inf")  # never draft the mask itself
        lp = lp[:, : self.vocab]  # the verifier cannot accept a token it does not have (mask, pads)
        if self.cfg.temperature == 0:
            return lp.argmax(-1).tolist(), None
        q = torch.softmax(lp / self.cfg.temperature, -1)
        return torch.multinomial(q, 1, generator=self.gen)[:, 0].tolist(), q

    def _draft_log_probs(self, x: torch.Tensor, s: int, stats: SpeculativeStats) -> torch.Tensor:
        """The drafter's log-probs [k, V'] of the masked positions [s, T) of ``x`` [1, T] (s: committed length).

        refresh = 0: a full forward every round. refresh = r: a full forward every r rounds; in
        between, a forward over the window [a, T) only (the tokens committed since the last forward
        and the k masks), attending to the stored keys/values of [0, a). After every forward the
        keys/values of the committed positions it computed are appended to the store, so the next
        window holds only the tokens the next verification adds, plus the new masks.
        """
        T = x.shape[1]
        full = not self.cfg.refresh or self._prefix is None or self._since >= self.cfg.refresh
        # stored positions [0, a); the window must hold the state that predicts the first mask (s - 1 under the shift)
        a = 0 if full else min(self._prefix[0][0].shape[2], s - int(self.denoiser.spec.shift))
        if not full:
            self._prefix = [(k[:, :, :a], v[:, :, :a]) for k, v in self._prefix]
        stats.draft_positions += T - a
        lp, kv = self._window_forward(x, a, s)
        # committed positions [0, s) are kept; the masks' entries are dropped (they change every round)
        self._prefix = [(k[:, :, :s], v[:, :, :s]) for k, v in kv] if self.cfg.refresh else None
        self._since = 1 if full else self._since + 1
        return lp

    @torch.no_grad()
    def _window_forward(self, x: torch.Tensor, a: int, s: int):
        """Bidirectional forward of ``x``'s positions [a, T) over the stored prefix [0, a):
        (log-probs [T - s, V'] of the positions [s, T), every layer's keys/values of [0, T))."""
        from transformers import DynamicCache

        from dlm_factory.dlm.diffusion.forward import _compute_dtype, output_head

        model = self.denoiser.model
        T = x.shape[1]
        shift = int(self.denoiser.spec.shift)
        cache = DynamicCache(self._prefix) if a else DynamicCache()
        with inference_autocast(self.device):
            bias = torch.zeros(1, 1, T - a, T, dtype=_compute_dtype(model), device=self.device)  # all keys visible
            pos = torch.arange(a, T, device=self.device)[None]
            heads = output_head(model)
            kw = dict(attention_mask=bias, position_ids=pos, use_cache=True, past_key_values=cache)
            if heads is not None:
                out = heads[0](input_ids=x[:, a:], **kw)
                logits = heads[1](out.last_hidden_state[0, s - shift - a : T - shift - a])
            else:
                out = model(input_ids=x[:, a:], **kw)
                logits = out.logits[0, s - shift - a : T - shift - a]
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return logits.float().log_softmax(-1), kv

    # ------------------------------------------------------------------ verifier

    @torch.no_grad()
    def _forward(self, ids: list[int], cache) -> torch.Tensor:
        with inference_autocast(self.device):
            out = self.verifier(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache,
                                use_cache=True)
        return out.logits[0, :, : self.vocab].float()

    @torch.no_grad()
    def generate(self, prompt: list[int], stats: SpeculativeStats | None = None) -> list[int]:
        """The continuation of ``prompt`` (token ids, start token included), up to ``length`` tokens."""
        from transformers import DynamicCache

        if not prompt:
            raise FactoryError("empty prompt: speculative decoding needs at least the start token")
        cfg = self.cfg
        stats = stats if stats is not None else SpeculativeStats()
        cache = DynamicCache()
        self._prefix, self._since = None, 0  # the drafter's prefix cache is per prompt
        if len(prompt) > 1:
            self._forward(prompt[:-1], cache)
        n, pending, out, k = len(prompt) - 1, prompt[-1], [], cfg.k
        while len(out) < cfg.length:
            k = max(1, min(k, cfg.length - len(out)))  # no draft beyond the requested length
            drafts, q = self._draft(prompt + out, k, stats)  # the committed text ends with the pending token
            logits = self._forward([pending] + drafts, cache)  # [k+1, V]: after pending, after each draft
            accepted, token = self._accept(drafts, q, logits)
            new = drafts[:accepted] + [token]
            if accepted < len(drafts):  # drop the rejected drafts: the cache ends with the last accepted one
                cache.crop(accepted - len(drafts))  # transformers 5: a negative count removes that many tokens
            n += 1 + accepted
            pending = token
            stats.rounds += 1
            stats.drafted += len(drafts)
            stats.accepted += accepted
            stats.full_rounds += accepted == len(drafts)
            stats.ks.append(k)
            if cfg.stop_at_eos and self.eos is not None and self.eos in new:
                out += new[: new.index(self.eos)]
                break
            out += new
            if cfg.adaptive:
                k = best_k(stats.accepted, stats.rounds - stats.full_rounds, cfg)
        out = out[: cfg.length]
        stats.tokens += len(out)
        return out

    def _accept(self, drafts: list[int], q: torch.Tensor | None, logits: torch.Tensor) -> tuple[int, int]:
        return accept(drafts, q, logits, self.cfg.temperature, self.gen)


def best_k(accepted: int, rejections: int, cfg: SpeculativeConfig) -> int:
    """The draft length with the most expected tokens per unit of cost, at the running acceptance rate.

    Each draft is taken as accepted with probability a = accepted / (accepted + rejections) (the
    maximum-likelihood rate of a geometric run, with one pseudo-count of each), so a round of k drafts
    commits (1 - a^(k+1)) / (1 - a) tokens on average and costs 1 + draft_cost * k.
    """
    a = (accepted + 1) / (accepted + rejections + 2)
    def rate(k: int) -> float:
        return (1 - a ** (k + 1)) / (1 - a) / (1 + cfg.draft_cost * k)

    return max(range(cfg.k_min, cfg.k_max + 1), key=rate)


def accept(drafts: list[int], q: torch.Tensor | None, logits: torch.Tensor, temperature: float,
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """The verification rule: (drafts accepted, the verifier's token after them).

    ``logits`` [k+1, V] are the verifier's after the pending token and after each draft;
    ``q`` [k, V] the drafter's proposal distributions (sampling only). Greedy: accept while
    the draft is the argmax. Sampling: accept draft i with probability min(1, p_i/q_i);
    on rejection draw from norm(max(0, p_i - q_i)); after k acceptances draw from p_{k+1}.
    """
    if temperature == 0:
        best = logits.argmax(-1).tolist()
        a = 0
        while a < len(drafts) and drafts[a] == best[a]:
            a += 1
        return a, best[a]
    p = torch.softmax(logits / temperature, -1)  # [k+1, V]
    for i, d in enumerate(drafts):
        ratio = (p[i, d] / q[i, d].clamp(min=1e-20)).clamp(max=1.0)
        if torch.rand((), generator=generator, device=p.device) < ratio:
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        total = residual.sum()
        dist = residual / total if total > 0 else p[i]
        return i, int(torch.multinomial(dist, 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


def speculative_generate(drafter: Loaded, verifier: Loaded, prompts: list[list[int]], cfg: SpeculativeConfig,
                         ) -> tuple[list[list[int]], SpeculativeStats]:
    """Continuations of each prompt (ids) and the decoding statistics over all of them."""
    spec = Speculator(drafter, verifier, cfg)
    stats = SpeculativeStats()
    return [spec.generate(list(p), stats) for p in prompts], stats
