"""Quality metrics: golden values on hand-made inputs, and the judge NLL against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.evaluation.metrics import (
    judge_nll,
    longest_repeat,
    parse_rate,
    parses,
    repetition,
)


def test_parse_rate_golden():
    texts = ["x = 1\n", "def f(:\n", "    y = 2\n    z = 3\n", "if x:\n    pass\nelse\n", ""]
    assert [parses(t) for t in texts] == [True, False, True, False, True]  # 3rd: accepted after dedent
    assert parse_rate(texts) == pytest.approx(3 / 5)
    assert math.isnan(parse_rate([]))


def test_repetition_golden():
    assert longest_repeat([1, 2, 3, 1, 2, 3]) == 3
    assert longest_repeat([1, 1, 1, 1]) == 3  # overlapping occurrences count
    assert longest_repeat([1, 2, 3]) == 0 and longest_repeat([]) == 0
    r = repetition([[1, 2, 3, 1, 2, 3], [4, 5]])
    # bigrams: (1,2) (2,3) (3,1) (1,2) (2,3) (4,5) -> 4 unique of 6
    assert r["distinct_2"] == pytest.approx(4 / 6)
    assert r["longest_repeat"] == pytest.approx((3 + 0) / 2)
    empty = repetition([[7]])
    assert math.isnan(empty["distinct_2"]) and empty["longest_repeat"] == 0
    assert math.isnan(repetition([])["longest_repeat"])


def _direct_nll(model, prompt, cont):
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")[len(prompt) - 1 :]
    return float(nll.sum()), len(cont)


def test_judge_nll_matches_unbatched_teacher_forcing(tiny_ar):
    judge = load_model(tiny_ar)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 500, (n,), generator=g).tolist() for n in (3, 9, 1, 5)]
    conts = [torch.randint(10, 500, (n,), generator=g).tolist() for n in (7, 2, 11, 0)]
    total = count = 0
    for p, c in zip(prompts[:3], conts[:3], strict=True):
        s, n = _direct_nll(judge.model, p, c)
        total, count = total + s, count + n
    expected = total / count
    assert judge_nll(judge, prompts, conts, batch_size=16) == pytest.approx(expected, rel=1e-4)
    assert judge_nll(judge, prompts, conts, batch_size=1) == pytest.approx(expected, rel=1e-4)
    assert 0 < expected < 2 * math.log(len(judge.tokenizer))
    # an empty prompt is conditioned on BOS/EOS
    eos = judge.tokenizer.eos_token_id
    assert judge_nll(judge, [[]], [[11, 12]]) == pytest.approx(_direct_nll(judge.model, [eos], [11, 12])[0] / 2, rel=1e-4)
    assert math.isnan(judge_nll(judge, [[1, 2]], [[]]))


def test_judge_nll_refuses_a_diffusion_checkpoint(tiny_dlm):
    with pytest.raises(FactoryError, match="autoregressive"):
        judge_nll(load_model(tiny_dlm), [[1]], [[2]])
