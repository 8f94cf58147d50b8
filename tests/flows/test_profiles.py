"""The factory's profiles are consistent before anything trains: a default-profile mistake costs a
user minutes of training before it surfaces (a ladder width that is no whole number of heads
once stopped `make demo` at the scale stage, eight minutes in)."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from dlm_factory.dlm.stages.grow import Shape, grown_config
from dlm_factory.dlm.stages.scale import is_shape, parse_ladder
from dlm_factory.flows.demo import PROFILES


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_ladder_rung_fits_the_profiles_own_base_model(profile):
    cfg = PROFILES[profile]
    b = cfg.bootstrap
    base = LlamaConfig(vocab_size=512, hidden_size=b.hidden_size, intermediate_size=b.intermediate_size,
                       num_hidden_layers=b.num_layers, num_attention_heads=b.num_heads,
                       num_key_value_heads=b.num_heads)
    rungs = [e for e in parse_ladder(cfg.scale.ladder) if is_shape(e)]
    assert rungs, "the demo ladder is given as shapes"
    for entry in rungs:
        grown = grown_config(base, Shape.parse(entry), allow_shrink=True)  # FactoryError if heads do not divide
        assert grown.hidden_size == Shape.parse(entry).hidden


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_model_windows_fit_their_position_capacity(profile):
    cfg = PROFILES[profile]
    cap = cfg.bootstrap.max_positions
    assert cfg.convert.seq_len <= cap and cfg.eval.seq_len <= cap and cfg.scale.seq_len <= cap
    assert cfg.distill.prompt_len + cfg.distill.length <= cap
