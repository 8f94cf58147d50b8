"""The checkpoint's token conventions: BOS where the tokenizer adds it, in packing, in evaluation
(rolling windows over whole documents), and an eval that equals a plain-transformers NLL."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dlm_factory.dlm.data.corpus import (
    Document,
    adds_bos,
    encode_documents,
    rolling_windows,
    start_token,
    stdlib_documents,
    tokenize_blocks,
)
from dlm_factory.dlm.errors import FactoryError
from tests.dlm.helpers import bos_tokenizer, plain_tokenizer, save_random_checkpoint


@pytest.fixture(scope="module")
def texts():
    return [d.text for d in stdlib_documents("train", max_chars=60_000)]


def test_conventions_detected(texts):
    bos, plain = bos_tokenizer(texts), plain_tokenizer(texts)
    assert adds_bos(bos) and start_token(bos) == bos.bos_token_id
    assert not adds_bos(plain) and start_token(plain) == plain.eos_token_id  # GPT-2: EOS separates documents
    docs = [Document("a", "x = 1"), Document("b", "y")]
    assert [ids[0] for ids in encode_documents(bos, docs)] == [bos.bos_token_id] * 2
    assert encode_documents(bos, docs)[0] == bos("x = 1")["input_ids"]  # what the tokenizer itself does


def test_packing_starts_every_block_with_bos_once(texts):
    tok = bos_tokenizer(texts)
    docs = [Document(str(i), t) for i, t in enumerate(texts[:20])]
    blocks = tokenize_blocks(tok, docs, 32)
    bos = tok.bos_token_id
    assert bool((blocks[:, 0] == bos).all()) and not bool((blocks[:, 1] == bos).any())
    # between the BOS tokens: every document's text and EOS, in order, nothing dropped or repeated
    stream = [t for row in blocks.tolist() for t in row if t != bos]
    expected = [t for ids in tok([d.text for d in docs], add_special_tokens=False)["input_ids"]
                for t in (*ids, tok.eos_token_id)]
    assert len(stream) > 10 * 32 and stream == expected[: len(stream)]


def test_rolling_windows_score_every_token_once_with_context(texts):
    tok = plain_tokenizer(texts)
    docs = [Document("long", texts[0]), Document("short", "z = 2"), Document("empty-ish", "")]
    w = rolling_windows(tok, docs, 32, stride=8)
    scored = [int(t) for r in range(len(w.ids)) for t, a, k in zip(w.ids[r], w.attention_mask[r], w.keep[r],
                                                                   strict=True) if a and not k]
    seqs = encode_documents(tok, docs)
    assert scored == [t for s in seqs if len(s) >= 2 for t in s[1:]]  # each token once, in order
    assert w.skipped == 1 and w.documents == 2 and w.scored == len(scored)
    full = [r for r in range(1, len(w.ids)) if int(w.attention_mask[r].sum()) == 32]
    # carried context: T - stride tokens, more in a document's last window (it ends at the document's end)
    assert len(full) > 3 and all(int(w.keep[r].sum()) == 32 - 8 for r in full[:-1])
    assert int(w.keep[full[-1]].sum()) >= 32 - 8


def test_bad_windows_and_documents_are_refused(texts):
    tok = plain_tokenizer(texts)
    with pytest.raises(FactoryError, match="too short"):
        rolling_windows(tok, [Document("a", "x")], 1)
    with pytest.raises(FactoryError, match="stride 32 must be between 1 and"):
        rolling_windows(tok, [Document("a", texts[0])], 32, stride=32)
    tok.eos_token = None  # no BOS, no EOS: the first token of a document is context only
    assert start_token(tok) is None
    with pytest.raises(FactoryError, match="no document has two tokens"):
        rolling_windows(tok, [Document("a", "x")], 8)


def test_eval_equals_plain_transformers_nll_with_bos(texts, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from dlm_factory.cli import main

    tok = bos_tokenizer(texts)
    model_dir = save_random_checkpoint("llama", tok, tmp_path / "llama-bos", positions=128)
    corpus = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n", "class A:\n    pass\n"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    assert main(["eval", "--model", str(model_dir), "--data", str(tmp_path / "docs.jsonl"), "--seq-len", "128",
                 "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in corpus:
            ids = torch.tensor([tok(text)["input_ids"]])  # the tokenizer adds BOS itself
            logits = model(ids).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert got["tokens"] == count
    assert got["bits_per_token"] == pytest.approx(nll / count / math.log(2), abs=1e-4)
