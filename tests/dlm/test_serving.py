"""Serving a 4-bit member on CPU: dequantized once at load, the same log-probs as the 4-bit kernels."""

from __future__ import annotations

import pytest
import torch

from dlm_factory.dlm import runtime
from dlm_factory.dlm.checkpoint.ensemble import serving
from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser

pytest.importorskip("bitsandbytes")


def linear4bit_count(model) -> int:
    from bitsandbytes.nn import Linear4bit

    return sum(isinstance(m, Linear4bit) for m in model.modules())


def test_a_4bit_member_is_served_dequantized_on_cpu_with_the_same_log_probs(tiny_dlm):
    from dlm_factory.dlm.train.qlora import QLoraConfig, bnb_config

    assert runtime.current().device.type == "cpu" and runtime.current().serve_4bit_dequantized
    quantized = load_model(tiny_dlm, quantization=bnb_config(QLoraConfig()))
    assert linear4bit_count(quantized.model) > 0
    ids = torch.randint(5, len(quantized.tokenizer) - 5, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 10:] = quantized.spec.mask_token_id
    am = torch.ones_like(ids)
    with torch.no_grad():
        want = ModelDenoiser(quantized)(ids, am)
        served = serving(quantized)
        assert linear4bit_count(served.model) == 0 and next(served.model.parameters()).dtype == torch.float32
        got = ModelDenoiser(served)(ids, am)
    assert torch.allclose(got, want, atol=2e-3), (got - want).abs().max()
    plain = load_model(tiny_dlm)
    assert serving(plain) is plain  # full-precision members are served as loaded
    with torch.no_grad():  # and 4-bit is not a no-op: the fp32 original differs
        assert not torch.allclose(ModelDenoiser(plain)(ids, am), want, atol=2e-3)
