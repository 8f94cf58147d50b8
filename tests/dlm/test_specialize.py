"""Per-user QLoRA specialists: 4-bit base + LoRA on the diffusion objective, export, isolation, bad input."""

from __future__ import annotations

import json

import pytest

from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.checkpoint.record import is_done, read_record
from dlm_factory.dlm.data.users import write_demo_users
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.stages.specialize import SpecializeConfig, specialize, specialize_key
from dlm_factory.dlm.train.config import TrainConfig


def small_cfg(**kw) -> SpecializeConfig:
    return SpecializeConfig(seq_len=32, train=TrainConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=1),
                            eval_windows=4, mc_samples=4, **kw)


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_demo_users(root, {"mail": "email", "aio": "asyncio"})
    return str(root)


@pytest.fixture(scope="module")
def specialist(tiny_dlm, users, tmp_path_factory):
    out = tmp_path_factory.mktemp("spec") / "mail"
    result = specialize(tiny_dlm, users, "mail", out, small_cfg(), general=tiny_dlm, progress=False)
    return out, result


def test_specialist_is_a_4bit_dlm_with_its_adapter(specialist, tiny_dlm):
    out, result = specialist
    loaded = load_model(out)  # one call: the merged 4-bit model
    assert type(loaded.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert loaded.spec.stage_names()[-1] == "specialize" and loaded.spec.mask_token_id is not None
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    base = json.loads((out / "adapter" / "base.json").read_text())
    assert base["base_digest"] == read_record(out).inputs["base"]
    assert not list(out.rglob("*.bin"))
    rep = result.report
    assert set(rep["elbo"]) >= {"untuned", "adapter_4bit", "merged_bf16", "merged_4bit", "adapter_4bit-untuned"}
    # 4 bits a weight plus NF4 block constants (double-quantized): well under half of bf16 even this small
    assert rep["bytes"]["merged_4bit"]["linear"] < 0.4 * rep["bytes"]["merged_bf16"]["linear"]
    assert rep["bytes"]["merged_4bit"]["checkpoint"] < rep["bytes"]["merged_bf16"]["checkpoint"]


def test_unchanged_data_is_done_and_changed_data_is_not(specialist, tiny_dlm, users):
    out, _ = specialist
    assert is_done(out, specialize_key(tiny_dlm, users, "mail", small_cfg()))
    assert not is_done(out, specialize_key(tiny_dlm, users, "aio", small_cfg()))


def test_bad_input_is_one_error(tiny_dlm, tiny_ar, users, tmp_path):
    with pytest.raises(FactoryError, match="invalid user id"):
        specialize(tiny_dlm, users, "../mail", tmp_path / "x", small_cfg(), progress=False)
    with pytest.raises(FactoryError, match="user ghost"):
        specialize(tiny_dlm, users, "ghost", tmp_path / "x", small_cfg(), progress=False)
    with pytest.raises(FactoryError, match="autoregressive checkpoint"):
        specialize(tiny_ar, users, "mail", tmp_path / "x", small_cfg(), progress=False)
    assert not (tmp_path / "x").exists()
