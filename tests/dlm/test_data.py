"""Corpora, the deterministic stdlib split, token blocks and resumable batching."""

from __future__ import annotations

import json

import pytest
import torch

from dlm_factory.dlm.data.corpus import (
    Blocks,
    parse_stdlib,
    read_documents,
    source_digest,
    stdlib_documents,
    stdlib_source,
    tokenize_blocks,
)
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.stages.bootstrap import train_tokenizer


def test_stdlib_split_is_deterministic_disjoint_and_skips_tests():
    train = {d.name for d in stdlib_documents("train")}
    held = {d.name for d in stdlib_documents("heldout")}
    assert train and held and not train & held
    assert 0.02 < len(held) / (len(train) + len(held)) < 0.10
    assert not any(n.startswith(("test/", "site-packages/")) for n in train | held)
    assert held == {d.name for d in stdlib_documents("heldout")}


def test_stdlib_exclusion_leaves_out_whole_packages_and_keeps_the_rest():
    full = {d.name for d in read_documents("stdlib:train")}
    kept = {d.name for d in read_documents("stdlib:train:exclude=json,asyncio")}
    gone = full - kept
    assert {n.split("/")[0] for n in gone} == {"json", "asyncio"}  # only those packages, every file of them
    assert any(n.startswith("asyncio/") for n in gone) and any(n.startswith("json/") for n in gone)
    assert not any(n.startswith(("json/", "asyncio/")) for n in kept)
    # the same split: the held-out side of the exclusion is the held-out split minus the packages
    held = {d.name for d in read_documents("stdlib:heldout:exclude=json,asyncio")}
    assert held == {d.name for d in read_documents("stdlib:heldout")
                    if d.name.split("/")[0].removesuffix(".py") not in {"json", "asyncio"}}
    assert not held & kept
    # the cap is taken after the exclusion: still ~max_chars of text, none of it from the packages
    capped = read_documents("stdlib:train:exclude=json,asyncio", max_chars=300_000)
    assert sum(len(d.text) for d in capped) >= 300_000 and not {d.name for d in capped} - kept


def test_stdlib_source_spellings():
    assert parse_stdlib("stdlib").split == "train" and parse_stdlib("stdlib").exclude == ()
    assert parse_stdlib("stdlib:exclude=json").split == "train"
    # canonical: sorted and deduplicated, so equal sources make equal stage keys
    assert stdlib_source("heldout", ["unittest", "email", "email"]) == "stdlib:heldout:exclude=email,unittest"
    assert str(parse_stdlib("stdlib:all:exclude=b:exclude=a")) == "stdlib:all:exclude=a,b"
    for bad, msg in [("stdlib:dev", "unknown stdlib split"), ("stdlib:train:json", "expected stdlib"),
                     ("stdlib:train:exclude=", "expected stdlib"), ("stdlib:train:exclude=../x", "expected stdlib")]:
        with pytest.raises(FactoryError, match=msg):
            read_documents(bad)
    with pytest.raises(FactoryError, match="expected stdlib"):
        source_digest("stdlib:train:exclude=a/b")


def test_general_defaults_leave_out_the_demo_users_packages():
    from dlm_factory.dlm.data.users import DEMO_USERS, GENERAL_HELDOUT, GENERAL_TRAIN
    from dlm_factory.dlm.evaluation.corpus import EvalConfig
    from dlm_factory.dlm.stages.bootstrap import BootstrapConfig
    from dlm_factory.dlm.stages.convert import ConvertConfig
    from dlm_factory.flows.specialize import SPECIALIST_BASE, SPECIALIST_CONVERT

    assert GENERAL_TRAIN == "stdlib:train:exclude=asyncio,email,json,unittest"
    for cfg in (BootstrapConfig(), ConvertConfig(), SPECIALIST_BASE, SPECIALIST_CONVERT):
        assert cfg.data == GENERAL_TRAIN
    assert EvalConfig().data == GENERAL_HELDOUT
    names = {d.name.split("/")[0].removesuffix(".py") for d in read_documents(GENERAL_TRAIN, max_chars=2_000_000)}
    assert not names & set(DEMO_USERS.values())


def test_max_chars_gives_a_stable_subset():
    a = stdlib_documents("train", max_chars=200_000)
    b = stdlib_documents("train", max_chars=200_000)
    assert [d.name for d in a] == [d.name for d in b]
    size = sum(len(d.text) for d in a)
    assert 200_000 <= size < 200_000 + max(len(d.text) for d in a)


def test_jsonl_and_directory_sources(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.py").write_text("x = 1\n")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    assert [d.text for d in read_documents(str(tmp_path / "d"))] == ["x = 1\n"]
    assert [d.name for d in read_documents(f"file://{tmp_path / 't.jsonl'}")] == ["t.jsonl:1", "t.jsonl:3"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(FactoryError, match=r"bad.jsonl:2: expected a JSON object"):
        read_documents(str(tmp_path / "bad.jsonl"))


def test_blocks_and_batches():
    docs = stdlib_documents("heldout", max_chars=50_000)
    tok = train_tokenizer([d.text for d in docs], 400)
    full = tokenize_blocks(tok, docs, 16)
    assert int((full == tok.eos_token_id).sum()) in (len(docs) - 1, len(docs))  # EOS after each doc (last may be cut)
    ids = tokenize_blocks(tok, docs, 16, max_blocks=10)
    assert ids.shape == (10, 16) and ids.dtype == torch.long and torch.equal(ids, full[:10])
    blocks = Blocks(ids)
    assert torch.equal(blocks.batch(3, 4)["input_ids"], blocks.batch(3, 4)["input_ids"])
    seen = torch.cat([blocks.batch(s, 5)["input_ids"] for s in range(2)])  # one epoch = one permutation
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, ids.tolist()))
    assert not torch.equal(blocks.batch(0, 4, seed=1)["input_ids"], blocks.batch(0, 4, seed=2)["input_ids"])
    with pytest.raises(FactoryError, match="data too short"):
        tokenize_blocks(tok, docs[:1], 10_000_000)


def test_tokenizer_training_is_reproducible():
    texts = [d.text for d in stdlib_documents("heldout", max_chars=30_000)]
    from dlm_factory.digest import tokenizer_digest

    assert tokenizer_digest(train_tokenizer(texts, 300)) == tokenizer_digest(train_tokenizer(texts, 300))
