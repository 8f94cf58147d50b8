"""Prefix routing: the n-gram routers (Kneser-Ney golden values, normalisation, round trip, a user's own
text routed to them) and the specialists' prefix ELBO (only the prefix counts, paired draws, deterministic)."""

from __future__ import annotations

import math

import pytest
import torch

from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.data.corpus import encode_documents
from dlm_factory.dlm.data.users import user_documents
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.evaluation.ngram import NgramLM
from dlm_factory.dlm.evaluation.router import (
    RouterConfig,
    fit_router,
    prefix_elbo,
    prefix_ngram,
    prefix_requests,
    prefix_scores,
    route,
    routing_accuracy,
)

ELBO = {"rule": "prefix_elbo"}


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
    cfg = RouterConfig(prefix_tokens=12, mc_samples=4, **ELBO)
    changed = [r[:13] + [7] * (len(r) - 13) for r in reqs]
    a = prefix_elbo({"g": general}, reqs, cfg)
    assert torch.equal(a, prefix_elbo({"g": general}, changed, cfg))
    assert a.shape == (len(reqs), 1)


def test_the_uniform_denoiser_scores_about_log2_v_and_loses(general, demo_root):
    reqs = prefix_requests(general.tokenizer, user_documents(demo_root, "json", "heldout"), 6, 32)
    uni = Uniform(general)
    cfg = RouterConfig(mc_samples=16, **ELBO)
    scores = prefix_elbo({"uniform": uni, "model": general}, reqs, cfg)
    assert scores[:, 0].mean().item() == pytest.approx(math.log2(uni.V), rel=0.15)
    assert route({"uniform": uni, "model": general}, reqs, cfg) == ["model"] * len(reqs)
    report = routing_accuracy({"uniform": uni, "model": general}, {"model": reqs}, cfg)
    assert report["accuracy"] == 1.0 and report["confusion"]["model"] == {"uniform": 0, "model": len(reqs)}
    assert report["positions_per_request"] == 2 * 16 * 33 and report["seconds_per_request"] > 0


def test_routing_is_deterministic_and_paired(general, tiny_specialist, demo_root):
    spec = ModelDenoiser(load_model(tiny_specialist))
    reqs = prefix_requests(general.tokenizer, user_documents(demo_root, "email", "heldout"), 4, 32)
    cfg = RouterConfig(mc_samples=8, **ELBO)
    a = prefix_elbo({"g": general, "s": spec, "g2": general}, reqs, cfg)
    assert torch.equal(a, prefix_elbo({"g": general, "s": spec, "g2": general}, reqs, cfg))
    assert torch.equal(a[:, 0], a[:, 2])  # the same model under two names sees the same draws


def test_router_refuses_what_it_cannot_route(general, foreign_dlm):
    with pytest.raises(FactoryError, match="no token to route"):
        prefix_elbo({"g": general}, [[general.tokenizer.eos_token_id]])
    with pytest.raises(FactoryError, match="share a tokenizer"):
        prefix_elbo({"g": general, "f": ModelDenoiser(load_model(foreign_dlm))}, [[1, 2, 3]])
    with pytest.raises(FactoryError, match="without a router"):
        routing_accuracy({"g": general}, {"h": [[1, 2, 3]]}, RouterConfig(**ELBO))
    with pytest.raises(FactoryError, match="needs an n-gram router"):
        prefix_scores({"g": general}, [[1, 2, 3]])  # the default rule is prefix_ngram


# The n-gram routers


def test_kneser_ney_golden_values():
    """Bigrams of 0 1 2 1 2 (0 the start token), D = 0.5, V = 4, worked by hand:
    continuation counts N(1) = 2, N(2) = 1 over 3 distinct bigrams, so the unigram level is
    P(1) = 1.5/3 + 0.5*2/3/4 = 7/12, P(2) = 0.5/3 + 1/12 = 1/4, P(0) = P(3) = 1/12;
    after token 1 (seen twice, always before 2): P(2|1) = 1.5/2 + 0.5*1/2 * 1/4 = 13/16, P(3|1) = 1/4 * 1/12."""
    lm = NgramLM.fit([[0, 1, 2, 1, 2]], order=2, discount=0.5, vocab_size=4)
    assert lm.prob((), 1) == pytest.approx(7 / 12) and lm.prob((), 2) == pytest.approx(1 / 4)
    assert lm.prob((1,), 2) == pytest.approx(13 / 16) and lm.prob((1,), 3) == pytest.approx(1 / 48)
    assert lm.prob((3,), 1) == pytest.approx(7 / 12)  # an unseen context falls through to the lower order
    assert lm.nll([0, 1, 2]) == pytest.approx(-math.log(lm.prob((0,), 1)) - math.log(13 / 16))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_history_gives_a_distribution(order):
    g = torch.Generator().manual_seed(order)
    seqs = [[0, *torch.randint(1, 12, (40,), generator=g).tolist()] for _ in range(5)]
    lm = NgramLM.fit(seqs, order=order, discount=0.75, vocab_size=16)
    for hist in [(), (0,), (0, 0, 0), tuple(seqs[0][3:8]), (15, 14, 13)]:
        total = sum(lm.prob(hist, w) for w in range(16))
        assert total == pytest.approx(1.0, abs=1e-9)
        assert min(lm.prob(hist, w) for w in range(16)) > 0


def test_router_file_round_trip_and_refusals(tmp_path):
    lm = NgramLM.fit([[0, 5, 6, 7, 5, 6], [0, 7, 7, 5]], order=3, discount=0.6, vocab_size=9)
    assert lm.to_bytes() == lm.to_bytes()  # deterministic bytes: the sha256 in ENSEMBLE.json is stable
    back = NgramLM.load(lm.save(tmp_path / "r.safetensors"))
    assert (back.order, back.discount, back.vocab_size, back.counts) == (3, 0.6, 9, lm.counts)
    assert back.nll([0, 5, 6, 8]) == lm.nll([0, 5, 6, 8])
    (tmp_path / "bad.safetensors").write_bytes(lm.to_bytes()[:-7])
    with pytest.raises(FactoryError, match="not a router model"):
        NgramLM.load(tmp_path / "bad.safetensors")
    with pytest.raises(FactoryError, match="no router model"):
        NgramLM.load(tmp_path / "missing.safetensors")
    with pytest.raises(FactoryError, match="outside the vocabulary"):
        NgramLM.fit([[0, 9]], vocab_size=9)
    with pytest.raises(FactoryError, match="order 7 is out of range"):
        NgramLM.fit([[0, 1]], order=7, vocab_size=9)
    with pytest.raises(FactoryError, match="at least 2 tokens"):
        NgramLM.fit([[0]], vocab_size=9)


def test_each_users_held_out_requests_route_to_their_own_router(general, demo_root):
    """Routers counted on each user's train split; their held-out requests (unseen) route home."""
    tok = general.tokenizer
    users = ["email", "json"]
    routers = {u: fit_router(encode_documents(tok, user_documents(demo_root, u, "train")), len(tok)) for u in users}
    requests = {u: prefix_requests(tok, user_documents(demo_root, u, "heldout"), 8, 32) for u in users}
    report = routing_accuracy(routers, requests)
    assert report["rule"] == "prefix_ngram" and report["requests"] == sum(map(len, requests.values()))
    # deterministic (exact likelihoods): 11 of 16 on the test tokenizer; routing all to one user gets 8
    assert report["accuracy"] >= 0.65 and report["per_user"]["email"] == 1.0, report["confusion"]
    scores = prefix_ngram(routers, requests["json"])
    assert scores.shape == (len(requests["json"]), 2) and (scores > 0).all()
    cut = [r[:17] + [7] * (len(r) - 17) for r in requests["json"]]  # only the first M tokens count
    cfg = RouterConfig(prefix_tokens=16)
    assert torch.equal(prefix_ngram(routers, requests["json"], cfg), prefix_ngram(routers, cut, cfg))
    assert route(routers, requests["json"], cfg) == route(routers, cut, cfg)
