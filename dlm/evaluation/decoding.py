"""Speculative decoding as an evaluation: how many tokens a drafter earns per verification.

The figure that decides whether a drafter is worth its forward passes is the mean number
of tokens committed per verification round (accepted drafts plus the verifier's own next
token). Greedy speculative decoding must reproduce the verifier's greedy output exactly;
the count of prompts where it does is reported beside the rate (anything but all of them
is a bug). Timing is left to ``bench/decoding.py``, which measures it side by side.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.data.corpus import code_prompts, stdlib_documents
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.sampling.generate import ar_generate, encode_prompts
from dlm_factory.dlm.sampling.speculative import SpeculativeConfig, speculative_generate


class DraftEvalConfig(BaseModel):
    """Prompts and lengths of the drafter evaluation (greedy)."""

    prompts: int = Field(6, gt=0, description="held-out stdlib code prompts (first lines of a def/class)")
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig,
                                           description="speculative decoding settings (greedy: temperature 0)")


def draft_prompts(n: int) -> list[str]:
    """``n`` deterministic prompts from the held-out stdlib split (never trained on)."""
    return code_prompts(stdlib_documents("heldout"), n, per_document=1)


def drafter_agreement(drafter: str | os.PathLike, verifier: str | os.PathLike,
                      cfg: DraftEvalConfig | None = None) -> dict:
    """Greedy speculative decoding of held-out prompts: tokens per verification, acceptance, and how
    many outputs are identical to the verifier's own greedy decoding (all of them, or it is a bug)."""
    cfg = cfg or DraftEvalConfig()
    if cfg.speculative.temperature != 0:
        raise FactoryError("the drafter evaluation compares with greedy decoding: speculative.temperature must be 0")
    ar = load_model(verifier)
    prompts = encode_prompts(ar.tokenizer, draft_prompts(cfg.prompts))
    reference = ar_generate(ar, prompts, cfg.speculative.length)
    outs, stats = speculative_generate(load_model(drafter), ar, prompts, cfg.speculative)
    return {"tokens_per_verification": round(stats.tokens_per_round, 3), "acceptance": round(stats.acceptance, 3),
            "identical": sum(o == r for o, r in zip(outs, reference, strict=True)), "prompts": len(prompts)}
