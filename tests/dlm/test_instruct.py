"""Instruction tuning: prompt format, rows and bucketing, the SFT loss, the stage, resume, eval, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.checkpoint.record import is_done, read_record
from dlm_factory.dlm.checkpoint.spec import DiffusionSpec
from dlm_factory.dlm.data.batching import collate
from dlm_factory.dlm.data.chat import (
    DEFAULT_CHAT_TEMPLATE,
    DEFAULT_FORMAT,
    ensure_chat_template,
    render_prompt,
)
from dlm_factory.dlm.data.instructions import Example
from dlm_factory.dlm.data.sft import Row, SFTBatches, ar_row, diffusion_row, encode
from dlm_factory.dlm.diffusion.objective import ar_loss, corrupt, diffusion_loss, sample_t
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.evaluation.instruct import (
    InstructEvalConfig,
    evaluate_instruct,
    has_code,
    summary,
)
from dlm_factory.dlm.stages.instruct import InstructConfig, instruct, instruct_key
from dlm_factory.dlm.train.config import TrainConfig
from tests.dlm.helpers import leftovers, plain_tokenizer


@pytest.fixture(scope="module")
def tok():
    return plain_tokenizer(["def f(x):\n    return x + 1\n### Instruction: Implement it.\n" * 20], vocab_size=300)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    """32 tiny instructions in both JSONL formats."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = []
    for i in range(32):
        prompt, response = f"Implement `add{i}(x)`: Return x plus {i}.", f"return x + {i}"
        if i % 2:
            lines.append({"prompt": prompt, "response": response})
        else:
            lines.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def small(data: str, **train) -> InstructConfig:
    values = dict(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1, checkpoint_every=2)
    values.update(train)
    return InstructConfig(data=data, response_len=16, train=TrainConfig(**values))


# ----------------------------------------------------------------------------- prompt format


def test_default_template_is_installed_and_documented(tok):
    tok = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>", pad_token="<pad>")
    assert tok.chat_template is None
    assert ensure_chat_template(tok) == "default" and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "Do it."}]
    assert render_prompt(tok, msgs) == DEFAULT_FORMAT.format(prompt="Do it.") == "### Instruction:\nDo it.\n### Response:\n"
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A?"},
             {"role": "assistant", "content": "a"}, {"role": "user", "content": "B?"}]
    assert render_prompt(tok, convo) == ("Be brief.\n\n### Instruction:\nA?\n### Response:\na<eos>\n"
                                         "### Instruction:\nB?\n### Response:\n")


def test_tokenizer_template_wins(tok):
    tok = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = "{{ 'U: ' + messages[-1]['content'] + '\\nA: ' }}"
    assert ensure_chat_template(tok) == "tokenizer"
    assert render_prompt(tok, [{"role": "user", "content": "hi"}]) == "U: hi\nA: "


# ----------------------------------------------------------------------------- rows and batches


def _example(prompt: str, response: str, source: str = "d.jsonl:1") -> Example:
    return Example([{"role": "user", "content": prompt}], response, source)


def test_encode_drops_long_bodies_and_refuses_long_prompts(tok):
    ensure_chat_template(tok)
    examples = [_example("Short.", "return x"), _example("Short.", "return x + 1\n" * 30, "d.jsonl:2")]
    rows, report = encode(tok, examples, response_len=16, max_prompt_len=40, refuse_long_prompts=True)
    assert len(rows) == 1 and report.too_long_responses == 1
    assert tok.decode(rows[0].prompt) == DEFAULT_FORMAT.format(prompt="Short.")
    assert tok.decode(rows[0].response) == "return x" and rows[0].first_line == "return x"
    long = [_example("word " * 50, "return x", "d.jsonl:7")]
    with pytest.raises(FactoryError, match=r"d.jsonl:7: prompt is \d+ tokens, longer than the context allows \(10"):
        encode(tok, long, response_len=16, max_prompt_len=10, refuse_long_prompts=True)
    rows, report = encode(tok, long, response_len=16, max_prompt_len=10, refuse_long_prompts=False)
    assert rows == [] and report.long_prompts == 1


def _rows(n: int) -> list[Row]:
    # prompt lengths 2..9, response lengths 1..5
    return [Row(list(range(10, 12 + i % 8)), list(range(20, 21 + i % 5)), f"r{i}", "") for i in range(n)]


def test_rows_diffusion_and_ar():
    r = Row([5, 6, 7], [8, 9], "x", "")
    assert diffusion_row(r, 5, eos=1) == ([5, 6, 7, 8, 9, 1, 1, 1], 3)
    assert ar_row(r, eos=1) == ([5, 6, 7, 8, 9, 1], 3)
    b = collate([diffusion_row(r, 4, 1), ar_row(Row([5], [8], "y", ""), 1)], pad=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 1], [5, 8, 1, 0, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    assert b["prompt_mask"].tolist() == [[True] * 3 + [False] * 4, [True] + [False] * 6]


def test_rainbow_rows_cycle_distinct_pads_after_one_eos():
    r = Row([5, 6, 7], [8, 9], "x", "")
    assert diffusion_row(r, 8, eos=1, pads=[20, 21, 22]) == ([5, 6, 7, 8, 9, 1, 20, 21, 22, 20, 21], 3)
    assert diffusion_row(r, 3, eos=1, pads=[20, 21, 22]) == ([5, 6, 7, 8, 9, 1], 3)  # no room left for a pad
    batches = SFTBatches([r] * 4, objective="diffusion", response_len=6, response_bucket=None, batch_size=4,
                         seed=0, eos=1, pad=0, pads=[20, 21])
    assert batches.batch(0)["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 1, 20, 21, 20]


def test_pad_tokens_reuse_reserved_then_add_distinct_rows(tiny_dlm):
    from dlm_factory.digest import tokenizer_digest
    from dlm_factory.dlm.checkpoint.vocab import unused_special_tokens
    from dlm_factory.dlm.stages.instruct import ensure_pad_tokens

    loaded = load_model(tiny_dlm)
    tok, spec = loaded.tokenizer, loaded.spec
    spare = [i for i, _ in unused_special_tokens(tok, exclude={spec.mask_token_id})]
    rows = loaded.model.get_input_embeddings().weight.shape[0]
    pads = ensure_pad_tokens(loaded, 7, seed=0)
    assert len(set(pads)) == 7 and pads[: len(spare)] == spare  # reserved tokens first
    named = {tok.eos_token_id, tok.pad_token_id, spec.mask_token_id, tok.bos_token_id}
    assert not named.intersection(pads)
    added = pads[len(spare):]
    assert tok.convert_ids_to_tokens(added) == [f"<|pad_{i}|>" for i in range(len(added))]
    emb = loaded.model.get_input_embeddings().weight
    assert emb.shape[0] == rows + len(added)
    assert len({tuple(emb[i].tolist()) for i in pads}) == 7  # distinct from the start
    assert spec.pad_token_ids == pads and spec.tokenizer_digest == tokenizer_digest(tok)
    assert tok.decode([pads[0], pads[-1]], skip_special_tokens=True) == ""
    assert ensure_pad_tokens(loaded, 7) == pads  # a tuned model keeps its pads
    with pytest.raises(FactoryError, match="tuned with 7 rainbow pad tokens, not 3; pass --pad-tokens 7"):
        ensure_pad_tokens(loaded, 3)


def test_batches_are_deterministic_bucketed_and_fixed_length():
    rows = _rows(64)
    make = lambda **kw: SFTBatches(rows, objective="diffusion", response_len=8, response_bucket=None,  # noqa: E731
                                   batch_size=4, seed=3, eos=1, pad=0, **kw)
    a, b = make(), make()
    for i in (0, 5, 16, 17, 40):  # across epochs (16 batches per epoch)
        assert torch.equal(a.batch(i)["input_ids"], b.batch(i)["input_ids"])
    assert not torch.equal(a.batch(0)["input_ids"], a.batch(16)["input_ids"])  # epochs are reshuffled
    for i in range(16):
        batch = a.batch(i)
        am, keep = batch["attention_mask"].bool(), batch["prompt_mask"]
        assert batch["input_ids"].shape[0] == 4
        assert ((am & ~keep).sum(-1) == 8).all()  # response + EOS fill = L for every row
    seen = sorted(r for i in range(16) for r in a._epoch(0, 16)[i])
    assert seen == list(range(64))  # one epoch covers every row once
    bucketed, plain = a.padding(), a.padding(window=1)
    assert bucketed["pad_fraction"] < plain["pad_fraction"]
    assert bucketed["eos_fill_fraction"] > 0


def test_response_bucket_and_ar_rows():
    rows = _rows(16)
    d = SFTBatches(rows, objective="diffusion", response_len=8, response_bucket=4, batch_size=4, seed=0, eos=1, pad=0)
    for (ids, n_prompt), r in zip(d.seqs, rows, strict=True):
        assert len(ids) - n_prompt == (4 if len(r.response) < 4 else 8)
    ar = SFTBatches(rows, objective="ar", response_len=8, response_bucket=None, batch_size=4, seed=0, eos=1, pad=0)
    assert ar.padding()["eos_fill_fraction"] == 0
    assert [len(s) - n for s, n in ar.seqs] == [len(r.response) + 1 for r in rows]
    with pytest.raises(FactoryError, match="fewer than the batch size"):
        SFTBatches(rows[:3], objective="ar", response_len=8, response_bucket=None, batch_size=4, seed=0, eos=1, pad=0)


# ----------------------------------------------------------------------------- the loss


@pytest.fixture(scope="module")
def uniform_model():
    """A tiny Llama whose head is zero: log p = -log V for every token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


SPEC = DiffusionSpec(mask_token_id=63, mask_token="[MASK]", tokenizer_digest="sha256:test", shift=True)


def _hand_batch():
    rows = [Row([10, 11, 12], [20, 21], "a", ""), Row([13, 14], [22], "b", ""), Row([15, 16, 17, 18], [], "c", "")]
    return collate([diffusion_row(r, 4, eos=1) for r in rows], pad=0)  # rows of 7, 6 and 8 tokens; L = 4


def test_prompt_tokens_are_never_masked():
    b = _hand_batch()
    ids, am, keep = b["input_ids"], b["attention_mask"], b["prompt_mask"]
    _, masked = corrupt(ids, torch.ones(3), SPEC, keep, am)
    assert torch.equal(masked, am.bool() & ~keep)  # t = 1: exactly response + EOS padding
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        _, masked = corrupt(ids, sample_t(3, SPEC.eps, g), SPEC, keep, am, g)
        assert not (masked & keep).any() and not (masked & ~am.bool()).any()


def test_sft_loss_is_normalised_by_response_length(uniform_model):
    b = _hand_batch()
    ids, am, keep = b["input_ids"], b["attention_mask"], b["prompt_mask"]
    with torch.no_grad():
        loss, n = diffusion_loss(uniform_model, SPEC, ids, attention_mask=am, keep=keep, per_sequence=True,
                                 generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # replay the draws: t per row, then the masks
    t = sample_t(3, SPEC.eps, g)
    _, masked = corrupt(ids, t, SPEC, keep, am, g)
    expected = (masked.sum(-1) * math.log(64) / t / 4).mean()  # each row divided by its L = 4, not its length
    assert n == 12
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert masked.sum(-1).tolist() == [2, 4, 0]  # golden draws (seed 0) ...
    assert float(loss) == pytest.approx(3.19934, rel=1e-4)  # ... and the golden loss
    # AR baseline on the same rows: prompt excluded, response + one EOS
    rows = [Row([10, 11, 12], [20, 21], "a", ""), Row([13, 14], [22], "b", "")]
    ab = collate([ar_row(r, eos=1) for r in rows], pad=0)
    with torch.no_grad():
        loss, n = ar_loss(uniform_model, ab["input_ids"], attention_mask=ab["attention_mask"], keep=ab["prompt_mask"])
    assert n == 5 and float(loss) == pytest.approx(math.log(64), rel=1e-5)


# ----------------------------------------------------------------------------- the stage


def test_instruct_writes_a_tuned_dlm(tiny_dlm, jsonl, tmp_path):
    out = tmp_path / "tuned"
    result = instruct(tiny_dlm, out, small(jsonl), progress=False)
    assert result.template == "default" and result.data["rows"] == 32
    assert math.isfinite(result.final_loss) and len(result.train.losses) == 4
    loaded = load_model(out)
    record = loaded.spec.stages[-1]
    assert loaded.spec.stage_names() == ["convert", "instruct"]
    stage = record.result
    assert stage["objective"] == "diffusion" and stage["template"] == "default"
    assert stage["prompt_format"] == DEFAULT_FORMAT and record.config == small(jsonl).model_dump()
    assert loaded.tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE  # generation can format prompts the same way
    assert read_record(out) == record and record.ar_root == loaded.spec.source
    assert is_done(out, instruct_key(tiny_dlm, small(jsonl)))
    assert stage["padding"]["kind"] == "rainbow" and stage["padding"]["token_ids"] == loaded.spec.pad_token_ids
    assert len(set(loaded.spec.pad_token_ids)) == 7
    assert leftovers(tmp_path) == []
    eos = instruct(tiny_dlm, tmp_path / "eos", small(jsonl).model_copy(update={"padding": "eos"}), progress=False)
    plain = load_model(tmp_path / "eos")
    assert plain.spec.pad_token_ids == [] and plain.spec.stages[-1].result["padding"]["kind"] == "eos"
    assert eos.data["rows"] == 32


def test_ar_baseline_and_objective_errors(tiny_ar, tiny_dlm, jsonl, tmp_path):
    with pytest.raises(FactoryError, match="autoregressive checkpoint .*--objective ar"):
        instruct(tiny_ar, tmp_path / "x", small(jsonl), progress=False)
    with pytest.raises(FactoryError, match="diffusion checkpoint; --objective ar needs an autoregressive"):
        instruct(tiny_dlm, tmp_path / "x", small(jsonl).model_copy(update={"objective": "ar"}), progress=False)
    assert not (tmp_path / "x").exists()
    cfg = small(jsonl).model_copy(update={"objective": "ar"})
    result = instruct(tiny_ar, tmp_path / "ar", cfg, progress=False)
    assert math.isfinite(result.final_loss)
    loaded = load_model(tmp_path / "ar")
    assert loaded.spec is None and loaded.tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert read_record(tmp_path / "ar").ar_root == tiny_ar


def test_prompt_longer_than_context_is_refused(tiny_dlm, tmp_path):
    data = tmp_path / "long.jsonl"
    lines = [{"prompt": "Say hi.", "response": "hi"}] * 4 + [{"prompt": "word " * 400, "response": "ok"}]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = small(str(data))
    with pytest.raises(FactoryError, match=r"long.jsonl:5: prompt is \d+ tokens, longer than the context allows \(240"):
        instruct(tiny_dlm, tmp_path / "x", cfg, progress=False)
    with pytest.raises(FactoryError, match="does not fit the model's 256 positions"):
        instruct(tiny_dlm, tmp_path / "x", cfg.model_copy(update={"response_len": 300}), progress=False)


def test_existing_output_and_mask_token_text(tiny_dlm, jsonl, tmp_path):
    from dlm_factory.dlm.data.sft import prepare_rows

    (tmp_path / "taken").mkdir()
    with pytest.raises(FactoryError, match="output already exists"):
        instruct(tiny_dlm, tmp_path / "taken", small(jsonl), progress=False)
    loaded = load_model(tiny_dlm)
    ensure_chat_template(loaded.tokenizer)
    data = tmp_path / "m.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n"
                    + json.dumps({"prompt": "a", "response": f"x = '{loaded.spec.mask_token}'"}) + "\n")
    rows, report = prepare_rows(loaded, str(data), response_len=16, max_prompt_len=None, heldout_fraction=0.05,
                                max_doc_chars=300, max_bad_fraction=0.05)
    assert len(rows) == 1 and report["special_token_rows"] == 1


def test_resume_after_crash_matches_uninterrupted_run(tiny_dlm, jsonl, tmp_path):
    from safetensors.torch import load_file

    cfg = small(jsonl, steps=6)
    full = instruct(tiny_dlm, tmp_path / "full", cfg, progress=False)

    def evicted(record):
        if record["step"] == 5:
            raise RuntimeError("simulated eviction")

    ckpt = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="simulated eviction"):
        instruct(tiny_dlm, tmp_path / "resumed", cfg, checkpoint_dir=ckpt, progress=False, on_log=evicted)
    assert not (tmp_path / "resumed").exists() and leftovers(tmp_path) == []
    resumed = instruct(tiny_dlm, tmp_path / "resumed", cfg, checkpoint_dir=ckpt, progress=False)
    assert resumed.train.resumed_from == 4
    assert resumed.train.losses == full.train.losses[4:]
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- evaluation and CLI


def test_evaluate_dlm_and_ar(tiny_ar, tiny_dlm, jsonl, caplog):
    cfg = InstructEvalConfig(data=jsonl, response_len=16, max_examples=6, gen_examples=3, mc_samples=4)
    with caplog.at_level("WARNING", logger="dlm_factory.dlm.stages.instruct"):
        d = evaluate_instruct(tiny_dlm, cfg)
    assert d["judge"] == tiny_ar and d["kind"] == "diffusion" and d["examples"] == 6
    assert d["judge_tuned"] is False and "is not instruction-tuned" in caplog.text
    lik = d["likelihood"]
    assert lik["kind"] == "elbo" and lik["tokens"] > 6  # response + one EOS per example
    assert lik["bits_per_token"] > lik["padded_bits_per_token"] > 0  # padded to L = 16 > response + 1 tokens
    gen = d["generation"]
    assert gen["examples"] == 3 and len(gen["samples"]) == 3
    texts = [x["text"] for x in gen["samples"]]
    # The barely trained DLM answers blanks: no code line, so each counts as a parse failure (not a trivial parse).
    assert gen["no_code_rate"] == sum(not has_code(t) for t in texts) / 3 == 1.0
    assert gen["parse_rate"] == 0.0 and gen["exact_first_line"] == 0.0
    a = evaluate_instruct(tiny_ar, cfg)
    assert a["kind"] == "ar" and a["likelihood"]["kind"] == "nll" and a["judge"] == tiny_ar
    assert a["likelihood"]["tokens"] == lik["tokens"]  # both figures cover the same reference tokens
    row = summary(a)
    assert set(row) >= {"cond_bits_per_token", "parse_rate", "judge_nll", "exact_first_line", "first_line_similarity"}


def test_generation_metrics_first_line_and_extra_judges(tiny_ar, tiny_dlm):
    from dlm_factory.dlm.evaluation.instruct import generation_metrics, line_similarity

    assert line_similarity("abcd", "abce") == 0.75 and line_similarity("", "x") == 0.0
    assert line_similarity("return x", "return x") == 1.0
    ar = load_model(tiny_ar)
    tok = ar.tokenizer
    rows = [Row(tok("Implement f.")["input_ids"], [], "a", "return x + 1", [{"role": "user", "content": "Implement f."}]),
            Row(tok("Implement g.")["input_ids"], [], "b", "return y", [{"role": "user", "content": "Implement g."}])]
    texts = ("\nreturn x + 1\nfoo()", "return z")
    outs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    g = generation_metrics(ar, rows, outs, ar, {"again": ar})
    assert g["exact_first_line"] == 0.5  # blank lines before the first line do not count
    assert g["first_line_similarity"] == pytest.approx((1 + 7 / 8) / 2)  # "return z" vs "return y": 2*7/16
    assert g["judge_nll_again"] == pytest.approx(g["judge_nll"]) and g["judge_nll"] > 0
    # A contender with another tokenizer (the DLM's, with its mask) is scored the same way for the same text.
    dlm = load_model(tiny_dlm)
    dlm_outs = [dlm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert generation_metrics(dlm, rows, dlm_outs, ar)["judge_nll"] == pytest.approx(g["judge_nll"], abs=1e-6)


def test_cli_instruct_and_eval(tiny_ar, tiny_dlm, jsonl, tmp_path, capsys):
    from dlm_factory.cli import main

    assert main(["instruct", "--model", tiny_ar, "--data", jsonl, "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' loading bar)
    assert err.startswith("error: ") and "--objective ar" in err
    assert main(["instruct", "--model", tiny_dlm, "--data", jsonl, "--output", str(tmp_path / "x"),
                 "--steps", "0"]) == 2
    assert "invalid steps" in capsys.readouterr().err
    out = tmp_path / "tuned"
    assert main(["instruct", "--model", tiny_dlm, "--data", jsonl, "--output", str(out), "--steps", "2",
                 "--batch-size", "4", "--response-len", "16"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["objective"] == "diffusion" and line["rows"] == 32 and line["bad_lines"] == 0
    assert main(["instruct-eval", "--model", str(out), "--data", jsonl, "--examples", "4", "--gen-examples", "2",
                 "--mc-samples", "2", "--response-len", "16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 4 and result["template"] == "default" and result["judge"] == tiny_ar


def test_every_contender_sees_the_same_rows(tiny_ar, tiny_dlm, tmp_path):
    """Rows are filtered on the text by one rule for the lineage, not per model's special ids."""
    from dlm_factory.dlm.data.sft import prepare_rows
    from dlm_factory.dlm.stages.instruct import ensure_pad_tokens

    lines = [{"prompt": f"Implement `f{i}(x)`.", "response": f"return x + {i}"} for i in range(6)]
    lines[1]["response"] = "return '<|pad_3|>'"  # a pad only the tuned DLM has
    lines[2]["prompt"] = "Say <|endoftext|>."  # a special token of the base tokenizer
    lines[3]["response"] = "return '[MASK]'"
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    dlm = load_model(tiny_dlm)
    ensure_pad_tokens(dlm, 7)
    kw = dict(response_len=16, max_prompt_len=None, heldout_fraction=0.05, max_doc_chars=300, max_bad_fraction=0.0)
    sources = {}
    for name, loaded in [("ar", load_model(tiny_ar)), ("dlm", dlm)]:
        rows, report = prepare_rows(loaded, str(data), **kw)
        sources[name] = [r.source for r in rows]
        assert report["special_token_rows"] == 3
    assert sources["ar"] == sources["dlm"] and len(sources["ar"]) == 3
