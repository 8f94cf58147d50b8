"""The bootstrap base model: a normal HF checkpoint, reproducible from its seed."""

from __future__ import annotations

import json

from dlm_factory.digest import sha256_file
from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.checkpoint.record import is_done, read_record
from dlm_factory.dlm.stages.bootstrap import BootstrapConfig, bootstrap, bootstrap_key
from dlm_factory.dlm.train.config import TrainConfig


def small() -> BootstrapConfig:
    return BootstrapConfig(max_chars=60_000, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2,
                           intermediate_size=64, seq_len=32, train=TrainConfig(steps=3, batch_size=4, warmup_steps=1))


def test_bootstrap_is_a_reproducible_hf_checkpoint(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    bootstrap(small(), a, progress=False)
    bootstrap(small(), b, progress=False)
    assert sha256_file(a / "model.safetensors") == sha256_file(b / "model.safetensors")
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    config = json.loads((a / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    loaded = load_model(a)
    assert loaded.spec is None and loaded.tokenizer.eos_token == "<|endoftext|>"
    assert is_done(a, bootstrap_key(small()))
    assert not is_done(a, bootstrap_key(small().model_copy(update={"seq_len": 64})))
    record = read_record(a)
    assert record.stage == "bootstrap" and record.result["steps"] == 3 and record.code_version
    assert not any(p.suffix in {".bin", ".pt"} for p in a.iterdir())
