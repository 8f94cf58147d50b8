"""The drafter evaluation: greedy speculative decoding scored against the verifier's own greedy output."""

from __future__ import annotations

import pytest

from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.evaluation.decoding import DraftEvalConfig, draft_prompts, drafter_agreement
from dlm_factory.dlm.sampling.speculative import SpeculativeConfig


def test_prompts_are_held_out_and_deterministic():
    first = draft_prompts(3)
    assert first == draft_prompts(3) and len(first) == 3
    assert all(p.lstrip().startswith(("def ", "async def ", "class ")) for p in first)


def test_every_output_is_the_verifiers_greedy_output(tiny_dlm, tiny_ar):
    dlm, ar = tiny_dlm, tiny_ar
    row = drafter_agreement(dlm, ar, DraftEvalConfig(prompts=2, speculative=SpeculativeConfig(length=12)))
    assert row["identical"] == row["prompts"] == 2
    assert 1.0 <= row["tokens_per_verification"] <= 1 + SpeculativeConfig().k_max
    assert 0.0 <= row["acceptance"] <= 1.0


def test_sampling_mode_is_refused(tiny_dlm, tiny_ar):
    dlm, ar = tiny_dlm, tiny_ar
    with pytest.raises(FactoryError, match="greedy"):
        drafter_agreement(dlm, ar, DraftEvalConfig(speculative=SpeculativeConfig(temperature=1.0)))
