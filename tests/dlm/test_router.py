"""Prefix routing: scores only the prefix, paired draws, deterministic, and a clearly better specialist wins."""

from __future__ import annotations

import math

import pytest
import torch

from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.data.users import user_documents
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.evaluation.router import (
    RouterConfig,
    prefix_elbo,
    prefix_requests,
    route,
    routing_accuracy,
)


class Uniform:
    """A denoiser that knows nothing: every token equally likely."""

    def __init__(self, like):
        self.spec, self.tokenizer, self.device = like.spec, like.tokenizer, like.device
        self.V = len(like.tokenizer)

    def __call__(self, ids, attention_mask=None):
        return torch.full((*ids.shape, self.V), -math.log(self.V))


@pytest.fixture(scope="module")
def general(tiny_dlm):
    return ModelDenoiser(load_model(tiny_dlm))


def test_requests_are_prefixes_of_definitions_with_the_start_token(general, demo_root):
    tok = general.tokenizer
    reqs = prefix_requests(tok, user_documents(demo_root, "json", "heldout"), 5, 16)
    assert 0 < len(reqs) <= 5 and all(len(r) == 17 and r[0] == tok.eos_token_id for r in reqs)
    assert tok.decode(reqs[0][1:]).lstrip().startswith(("def ", "class ", "async def "))


def test_only_the_first_m_tokens_count(general, demo_root):
    reqs = prefix_requests(general.tokenizer, user_documents(demo_root, "json", "heldout"), 3, 24)
    cfg = RouterConfig(prefix_tokens=12, mc_samples=4)
    changed = [r[:13] + [7] * (len(r) - 13) for r in reqs]
    a = prefix_elbo({"g": general}, reqs, cfg)
    assert torch.equal(a, prefix_elbo({"g": general}, changed, cfg))
    assert a.shape == (len(reqs), 1)


def test_the_uniform_denoiser_scores_about_log2_v_and_loses(general, demo_root):
    reqs = prefix_requests(general.tokenizer, user_documents(demo_root, "json", "heldout"), 6, 32)
    uni = Uniform(general)
    cfg = RouterConfig(mc_samples=16)
    scores = prefix_elbo({"uniform": uni, "model": general}, reqs, cfg)
    assert scores[:, 0].mean().item() == pytest.approx(math.log2(uni.V), rel=0.15)
    assert route({"uniform": uni, "model": general}, reqs, cfg) == ["model"] * len(reqs)
    report = routing_accuracy({"uniform": uni, "model": general}, {"model": reqs}, cfg)
    assert report["accuracy"] == 1.0 and report["confusion"]["model"] == {"uniform": 0, "model": len(reqs)}
    assert report["positions_per_request"] == 2 * 16 * 33 and report["seconds_per_request"] > 0


def test_routing_is_deterministic_and_paired(general, tiny_specialist, demo_root):
    spec = ModelDenoiser(load_model(tiny_specialist))
    reqs = prefix_requests(general.tokenizer, user_documents(demo_root, "email", "heldout"), 4, 32)
    cfg = RouterConfig(mc_samples=8)
    a = prefix_elbo({"g": general, "s": spec, "g2": general}, reqs, cfg)
    assert torch.equal(a, prefix_elbo({"g": general, "s": spec, "g2": general}, reqs, cfg))
    assert torch.equal(a[:, 0], a[:, 2])  # the same model under two names sees the same draws


def test_router_refuses_what_it_cannot_route(general, foreign_dlm):
    with pytest.raises(FactoryError, match="no token to route"):
        prefix_elbo({"g": general}, [[general.tokenizer.eos_token_id]])
    with pytest.raises(FactoryError, match="share a tokenizer"):
        prefix_elbo({"g": general, "f": ModelDenoiser(load_model(foreign_dlm))}, [[1, 2, 3]])
    with pytest.raises(FactoryError, match="without a specialist"):
        routing_accuracy({"g": general}, {"h": [[1, 2, 3]]})
