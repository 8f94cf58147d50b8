"""4-bit export of a whole checkpoint: Linear4bit layers plus NF4 embeddings and head (dlm.checkpoint.nf4)."""

from __future__ import annotations

import json

import pytest
import torch

from dlm_factory.dlm.checkpoint.io import Loaded, load_model, save_model
from dlm_factory.dlm.checkpoint.nf4 import CONFIG_KEY, EMBEDDINGS_FILE
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.train.qlora import QLoraConfig, bnb_config, export_4bit, stored_bytes


def _stored(model_dir, key):
    """What the file holds for ``key``, dequantized by bitsandbytes itself."""
    import bitsandbytes.functional as bnbf
    from safetensors import safe_open

    with safe_open(model_dir / EMBEDDINGS_FILE, framework="pt") as f:
        state = {k[len(key) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(key + ".")}  # noqa: SIM118
        return bnbf.dequantize_4bit(f.get_tensor(key), bnbf.QuantState.from_dict(state, device=torch.device("cpu")))


@pytest.fixture(scope="module")
def tiny_bf16(tiny_dlm, tmp_path_factory):
    """The tiny DLM (untied head, vocabulary 512) stored bf16, as the specialize stage stores its merge."""
    loaded = load_model(tiny_dlm)
    loaded.model.to(torch.bfloat16)
    return save_model(loaded, tmp_path_factory.mktemp("nf4") / "bf16")


@pytest.fixture(scope="module")
def tiny_4bit(tiny_bf16):
    dest = tiny_bf16.parent / "4bit"
    return dest, export_4bit(tiny_bf16, dest, QLoraConfig())


@pytest.fixture(scope="module")
def demo_geometry(tiny_ar, tmp_path_factory):
    """A model of the demo specialist base's geometry (Llama 64 x 2, MLP 192, vocabulary 2048, tied
    embeddings), random weights (std 0.02), stored bf16."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=192, max_position_embeddings=512,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(tiny_ar)
    return save_model(Loaded(model, tok, None), tmp_path_factory.mktemp("nf4-demo") / "bf16")


def test_whole_checkpoint_of_the_demo_geometry_is_under_0_3x_of_bf16(demo_geometry):
    dest = demo_geometry.parent / "4bit"
    export = export_4bit(demo_geometry, dest, QLoraConfig())
    model = load_model(demo_geometry).model
    bf16, nf4 = stored_bytes(demo_geometry, model), stored_bytes(dest, model)
    assert nf4["checkpoint"] <= 0.3 * bf16["checkpoint"], (nf4, bf16)
    assert nf4["linear"] <= 0.3 * bf16["linear"], (nf4, bf16)
    # the linear layers are 64 wide: a 1 KiB nested code per layer costs more than double quantization saves
    sizes = export["checkpoint_bytes"]
    assert export["double_quant"] is False and sizes["double_quant"] > sizes["single_quant"] == nf4["checkpoint"]
    config = json.loads((dest / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is False
    # the tied embedding is stored once, NF4; its 2048 blocks make double quantization pay off there
    assert config[CONFIG_KEY]["tensors"] == {"model.embed_tokens.weight": {"double_quant": True}}
    loaded = load_model(dest)
    assert loaded.model.lm_head.weight is loaded.model.get_input_embeddings().weight
    assert torch.equal(loaded.model.get_input_embeddings().weight, _stored(dest, "model.embed_tokens.weight").float())


def test_round_trip_loads_what_was_stored_and_stays_close_to_bf16(tiny_bf16, tiny_4bit):
    from safetensors import safe_open

    dest, export = tiny_4bit
    assert (dest / EMBEDDINGS_FILE).is_file()
    with safe_open(dest / "model.safetensors", framework="pt") as f:
        assert not {"model.embed_tokens.weight", "lm_head.weight"} & set(f.keys())  # noqa: SIM118 - moved out
    record = json.loads((dest / "config.json").read_text())[CONFIG_KEY]
    assert set(record["tensors"]) == {"model.embed_tokens.weight", "lm_head.weight"}  # untied: the head too

    q, ref = load_model(dest), load_model(tiny_bf16)
    assert type(q.model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert q.model.lm_head.weight is not q.model.get_input_embeddings().weight
    for key in record["tensors"]:
        loaded = q.model.get_parameter(key)
        assert torch.equal(loaded, _stored(dest, key).float())  # exactly bitsandbytes' dequantization
        assert not torch.equal(loaded, ref.model.get_parameter(key))  # and it was quantized
    assert not hasattr(q.model.config, CONFIG_KEY)  # held dense in memory now

    ids = torch.randint(10, 500, (4, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref.model(ids).logits, q.model(ids).logits
    # every weight matrix NF4-rounded: measured 0.017 relative error of the logits (tolerance 0.05)
    assert (a - b).norm() / a.norm() < 0.05


def test_old_format_with_bf16_embeddings_still_loads(tiny_bf16, tmp_path):
    """Specialists exported before the NF4 embeddings: Linear4bit layers, embeddings in model.safetensors."""
    old = load_model(tiny_bf16, quantization=bnb_config(QLoraConfig()), dtype=torch.bfloat16)
    save_model(old, tmp_path / "old")
    assert not (tmp_path / "old" / EMBEDDINGS_FILE).exists()
    loaded, ref = load_model(tmp_path / "old"), load_model(tiny_bf16)
    assert type(loaded.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert torch.equal(loaded.model.get_input_embeddings().weight, ref.model.get_input_embeddings().weight)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(file="../elsewhere.safetensors"), "must name"),
    (lambda r: r["tensors"].update({"model.norm.weight": {}}), "not an embedding"),
])
def test_a_hostile_record_is_one_error(tiny_4bit, tmp_path, change, message):
    import shutil

    dest, _ = tiny_4bit
    bad = shutil.copytree(dest, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    change(config[CONFIG_KEY])
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(FactoryError, match=message):
        load_model(bad)


def test_a_missing_embeddings_file_is_one_error(tiny_4bit, tmp_path):
    import shutil

    bad = shutil.copytree(tiny_4bit[0], tmp_path / "bad")
    (bad / EMBEDDINGS_FILE).unlink()
    with pytest.raises(FactoryError, match="not a regular file"):
        load_model(bad)


def test_catalog_publish_pull_load_keeps_the_nf4_embeddings(tiny_4bit, tmp_path):
    """The extra weights file is listed with its sha256 like any other; the pulled copy loads the same."""
    from dlm_factory.catalog import Catalog

    dest, _ = tiny_4bit
    cat = Catalog(f"file://{tmp_path / 'bucket'}", cache_dir=tmp_path / "cache")
    res = cat.publish(dest, "spec-mail", kind="specialist", user="mail")
    assert EMBEDDINGS_FILE in {f.path for f in res.manifest.files}
    cat.pull("spec-mail", tmp_path / "pulled")
    pulled, local = load_model(tmp_path / "pulled"), load_model(dest)
    assert torch.equal(pulled.model.lm_head.weight, local.model.lm_head.weight)
    assert torch.equal(pulled.model.get_input_embeddings().weight, local.model.get_input_embeddings().weight)


def test_undoing_the_cpu_inference_layout_keeps_single_quantized_weights(tiny_4bit):
    """On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit layer at its first eval forward; undoing it
    (``keep_trainable_layout``, before training or dequantized serving) must give back the weights.
    bitsandbytes 0.50's inverse leaves single-quantized block constants transposed: the 128-wide
    ``down_proj`` (two blocks a row) came back permuted."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.nn import Linear4bit

    from dlm_factory.dlm.train.qlora import keep_trainable_layout

    dest, export = tiny_4bit
    assert export["double_quant"] is False
    q = load_model(dest).model
    layers = {n: m for n, m in q.named_modules() if isinstance(m, Linear4bit)}
    before = {n: bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).float() for n, m in layers.items()}
    with torch.no_grad():
        q(torch.randint(10, 500, (1, 16)))
    if not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers.values()):
        pytest.skip("bitsandbytes did not repack on this CPU (no AVX512-BF16)")
    keep_trainable_layout(q)
    for n, m in layers.items():
        after = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        # the repacking rounds the block constants to bf16: 2^-8 relative at most
        assert torch.allclose(after, before[n], rtol=2 ** -8, atol=1e-6), (n, (after - before[n]).abs().max())
