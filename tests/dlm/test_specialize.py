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
    # 4 bits a weight plus NF4 block constants; the embedding and the untied head are NF4 too (measured on
    # this 64-wide model with a 512-token vocabulary: 0.29x linear, 0.31x whole checkpoint; 0.72x before)
    assert rep["bytes"]["merged_4bit"]["linear"] < 0.3 * rep["bytes"]["merged_bf16"]["linear"]
    assert rep["bytes"]["merged_4bit"]["checkpoint"] < 0.33 * rep["bytes"]["merged_bf16"]["checkpoint"]
    assert (out / "embeddings.nf4.safetensors").is_file() and rep["export"]["double_quant"] is False


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


def _lora_grads(tiny_dlm, *, eval_first: bool, reference: bool):
    """LoRA gradients of one diffusion loss, through the 4-bit base or through its dequantized fp32 weights.

    The adapters get the same non-zero weights in both (B = 0 at init would hide errors in the
    gradients of A); the loss sees the same tokens and the same masking.
    """
    import bitsandbytes.functional as bnbf
    import torch
    from peft import LoraConfig, get_peft_model

    from dlm_factory.dlm.checkpoint.io import set_bidirectional
    from dlm_factory.dlm.diffusion.objective import diffusion_loss
    from dlm_factory.dlm.train.qlora import QLoraConfig, load_qlora

    q = load_qlora(tiny_dlm, QLoraConfig(rank=4, alpha=8))
    if eval_first:  # what the specialize stage does after training (the held-out ELBO), here before a step
        q.model.eval()
        with torch.no_grad():
            q.model(torch.randint(10, 100, (2, 16)))
    model = q.model
    if reference:
        plain = load_model(tiny_dlm, dtype=torch.float32).model
        for name, module in q.model.named_modules():
            if type(module).__name__ == "Linear4bit":
                w = module.weight
                if getattr(w.quant_state, "packing_format_for_cpu", False):
                    pytest.skip("weights already in the CPU inference layout")
                target = plain.get_submodule(name.removeprefix("base_model.model.").removesuffix(".base_layer"))
                target.weight.data = bnbf.dequantize_4bit(w.data, w.quant_state).float()
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", bias="none")
        model = get_peft_model(plain, lora)
        set_bidirectional(model)
    gen = torch.Generator().manual_seed(0)
    for name, p in sorted(model.named_parameters()):
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.1
    model.train()
    ids = torch.randint(10, 100, (4, 24), generator=torch.Generator().manual_seed(1))
    loss, _ = diffusion_loss(model, q.spec, ids, generator=torch.Generator().manual_seed(2))
    loss.backward()
    return loss.item(), {n.replace(".default", ""): p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def test_lora_gradients_through_the_4bit_base_match_the_dequantized_weights(tiny_dlm):
    """bitsandbytes' CPU backward runs through the dequantized weights: the adapters' gradients equal
    those of an fp32 model holding exactly the dequantized weights. A missing input gradient through a
    frozen 4-bit layer (an op without an autograd kernel) would change every earlier adapter's gradient.

    Also after an evaluation in between: on AVX512-BF16 CPUs bitsandbytes repacks the weights of a
    module that runs in eval mode without grad into an inference-only layout whose kernel
    (``gemv_4bit``) has no backward; ``load_qlora`` turns that repacking off for trainable models."""
    import torch

    loss_ref, ref = _lora_grads(tiny_dlm, eval_first=False, reference=True)
    for eval_first in (False, True):
        loss, got = _lora_grads(tiny_dlm, eval_first=eval_first, reference=False)
        assert got.keys() == ref.keys() and len(ref) >= 14  # 7 projections x 2 layers, A and B
        assert loss == pytest.approx(loss_ref, rel=1e-3)
        for name, g in ref.items():
            assert torch.allclose(got[name], g, rtol=1e-3, atol=1e-6), name
        first = [n for n in ref if "layers.0." in n and "lora_A" in n]
        assert first and all(ref[n].abs().sum() > 0 for n in first)  # the earliest gradients are not trivially 0
