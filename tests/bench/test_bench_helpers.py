"""The arithmetic the benches report: compute accounting (bench/convert.py) and the judge NLL's
ratio estimator with its error bar and paired differences (bench/sampling.py)."""

from __future__ import annotations

import math
import statistics

import pytest

from bench.convert import compute, equal_compute_steps, matmul_params, stage_tokens
from bench.sampling import paired_difference, pooled_mean
from dlm_factory.dlm.checkpoint.record import StageKey, new_record
from dlm_factory.dlm.stages.bootstrap import BootstrapConfig


def test_stage_tokens_and_equal_compute_count_the_base_pretraining():
    record = new_record(StageKey(stage="bootstrap", config=BootstrapConfig().model_dump()))
    assert stage_tokens(record) == 400 * 16 * 128
    assert equal_compute_steps(stage_tokens(record), 150, 16, 128) == 550  # 400 AR steps + 150
    assert equal_compute_steps(stage_tokens(record), 150, 8, 128) == 950  # half the batch: twice the steps
    assert equal_compute_steps(1000, 10, 16, 128) == 11  # a partial step rounds up
    assert compute(5, 7) == {"tokens": 7, "flops": 6 * 5 * 7}


@pytest.mark.parametrize("tied", [False, True])
def test_matmul_params_leave_out_the_embedding_lookup_only(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied))
    body = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("model.embed_tokens", "lm_head")))
    assert matmul_params(model) == body + 50 * 16  # the output head multiplies, tied or not


def test_pooled_mean_is_the_token_ratio_with_the_spread_across_samples():
    scores = [(2.0, 4), (6.0, 4), (3.0, 4), (9.0, 4)]  # equal lengths: the mean of per-sample means
    mean, se = pooled_mean(scores)
    per_sample = [y / n for y, n in scores]
    assert mean == pytest.approx(statistics.fmean(per_sample))
    assert se == pytest.approx(statistics.stdev(per_sample) / math.sqrt(4))
    mean, _ = pooled_mean([(10.0, 10), (1.0, 1), (0.0, 0)])  # pooled by tokens; an empty sample adds nothing
    assert mean == pytest.approx(1.0)
    assert all(math.isnan(x) for x in pooled_mean([(0.0, 0), (0.0, 0)]))
    assert math.isnan(pooled_mean([(1.0, 2)])[1])  # one sample: no spread to estimate


def test_paired_difference_cancels_what_the_samples_share():
    a = [(2.0, 4), (12.0, 3), (3.0, 5), (9.0, 2)]
    assert paired_difference(a, a) == (0.0, 0.0)
    b = [(y + 0.5 * n, n) for y, n in a]  # b costs 0.5 nats more on every token of every sample
    diff, se = paired_difference(b, a)
    assert diff == pytest.approx(0.5) and se == pytest.approx(0.0, abs=1e-12)
    assert se < pooled_mean(a)[1]  # the unpaired error bars are far larger
    with pytest.raises(ValueError):
        paired_difference(a, a[:2])


def test_independent_chunks_combine_by_tokens_and_add_variances():
    from bench.instruct import combine
    from dlm_factory.dlm.evaluation.likelihood import Estimate

    est = combine([Estimate(2.0, 0.3, 10, 8, "elbo"), Estimate(5.0, 0.4, 30, 8, "elbo")])
    assert est.bits_per_token == pytest.approx((2.0 * 10 + 5.0 * 30) / 40)
    assert est.stderr == pytest.approx(math.hypot(0.3 * 10, 0.4 * 30) / 40)
    assert (est.tokens, est.samples, est.kind) == (40, 8, "elbo")
