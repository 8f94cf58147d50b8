"""AR -> diffusion conversion across architectures, mask-token handling and its outputs."""

from __future__ import annotations

import json

import pytest
import torch

from dlm_factory.digest import tokenizer_digest
from dlm_factory.dlm.checkpoint.io import Loaded, load_model
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.evaluation.likelihood import elbo
from dlm_factory.dlm.stages.convert import anneal_rate, convert, ensure_mask_token
from dlm_factory.dlm.train.config import TrainConfig
from tests.conftest import tiny_convert_config
from tests.dlm.helpers import plain_tokenizer, save_random_checkpoint


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "gemma2", "granite", "cohere"])
def test_convert_any_decoder_only_architecture(arch, tiny_ar, tmp_path):
    tok = load_model(tiny_ar).tokenizer
    base = save_random_checkpoint(arch, tok, tmp_path / f"{arch}-ar")
    out = tmp_path / f"{arch}-dlm"
    cfg = tiny_convert_config(anneal_steps=2, max_chars=50_000, seq_len=32,
                              train=TrainConfig(steps=3, batch_size=4, warmup_steps=1))
    result = convert(str(base), out, cfg, progress=False)
    assert result.steps == 3
    loaded = load_model(out)
    assert loaded.spec is not None and loaded.spec.shift
    assert loaded.model.config.is_causal is False
    assert json.loads((out / "config.json").read_text())["is_causal"] is False
    assert loaded.spec.mask_token == "<|reserved_0|>"  # an unused reserved token is reused
    assert loaded.spec.stages[0].stage == "convert" and loaded.spec.source == str(base)
    assert loaded.spec.source_digest.startswith("sha256:")
    ids = torch.randint(10, 300, (2, 32))
    est = elbo(ModelDenoiser(loaded), ids, n=4)
    assert est.bits_per_token > 0 and est.tokens == 2 * 31
    assert not list(out.glob("*.bin"))


def test_mask_token_is_added_with_mean_embedding_when_no_room():
    tok = plain_tokenizer(["def f(x):\n    return x + 1\n"] * 20)
    from transformers import AutoModelForCausalLM

    from tests.dlm.helpers import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok)))
    before = model.get_input_embeddings().weight.detach().clone()
    mask_id, text, how = ensure_mask_token(Loaded(model, tok, None))
    assert how == "added" and text == "[MASK]" and mask_id == before.shape[0]
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == before.shape[0] + 1
    assert torch.allclose(emb[mask_id], before.mean(0), atol=1e-6)
    assert tok.convert_tokens_to_ids("[MASK]") == mask_id


def test_mask_token_uses_spare_embedding_rows_without_resizing():
    tok = plain_tokenizer(["x = 1\n"] * 20)
    from transformers import AutoModelForCausalLM

    from tests.dlm.helpers import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tok) + 8))
    rows = model.get_input_embeddings().weight.shape[0]
    mask_id, _, how = ensure_mask_token(Loaded(model, tok, None))
    assert how == "added" and mask_id < rows
    assert model.get_input_embeddings().weight.shape[0] == rows


def test_special_tokens_refuse_a_name_already_in_the_vocabulary():
    from transformers import AutoModelForCausalLM

    from dlm_factory.dlm.checkpoint.vocab import add_special_tokens
    from dlm_factory.dlm.errors import FactoryError
    from tests.dlm.helpers import tiny_config

    tok = plain_tokenizer(["x = 1\n"] * 20)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok)))
    taken = tok.convert_ids_to_tokens(5)
    with pytest.raises(FactoryError, match="already exist in the tokenizer"):
        add_special_tokens(Loaded(model, tok, None), ["<|new|>", taken])
    with pytest.raises(FactoryError, match="already exists as an ordinary token; choose another --mask-token"):
        ensure_mask_token(Loaded(model, tok, None), preferred=taken)
    assert len(tok) == model.get_input_embeddings().weight.shape[0]  # nothing was added by the refusals


def test_anneal_rate_schedule():
    assert anneal_rate(0, 10) == pytest.approx(0.1)
    assert anneal_rate(4, 10) == pytest.approx(0.5)
    assert anneal_rate(9, 10) is None and anneal_rate(50, 10) is None
    assert anneal_rate(0, 0) is None


def test_tokenizer_digest_guards_the_spec(tiny_dlm, tmp_path):
    import shutil

    from dlm_factory.dlm.errors import FactoryError

    copy = tmp_path / "dlm"
    shutil.copytree(tiny_dlm, copy)
    spec = json.loads((copy / "diffusion.json").read_text())
    assert spec["tokenizer_digest"] == tokenizer_digest(load_model(tiny_dlm).tokenizer)
    spec["tokenizer_digest"] = "sha256:0"
    (copy / "diffusion.json").write_text(json.dumps(spec))
    with pytest.raises(FactoryError, match="tokenizer does not match"):
        load_model(copy)


@pytest.mark.parametrize("arch,exact", [("llama", True), ("qwen2", True), ("gemma2", False), ("granite", False),
                                        ("cohere", False)])
def test_head_shortcut_only_where_it_equals_the_full_forward(arch, exact, tiny_ar, tmp_path):
    """Families that rescale logits outside lm_head take the full forward; the loss is the same either way."""
    from dlm_factory.dlm.diffusion.forward import output_head
    from dlm_factory.dlm.diffusion.objective import ar_loss

    tok = load_model(tiny_ar).tokenizer
    loaded = load_model(save_random_checkpoint(arch, tok, tmp_path / arch))
    assert (output_head(loaded.model) is not None) is exact
    ids = torch.randint(10, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits[:, :-1]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        got, n = ar_loss(loaded.model, ids)
    assert n == 2 * 15 and float(got) == pytest.approx(float(expected), abs=1e-5)


def test_gemma2_converts_with_eager_attention_and_the_float_mask_holds(tiny_ar, tmp_path):
    tok = load_model(tiny_ar).tokenizer
    out = tmp_path / "gemma2-dlm"
    convert(str(save_random_checkpoint("gemma2", tok, tmp_path / "gemma2")), out,
            tiny_convert_config(anneal_steps=1, max_chars=50_000, seq_len=16,
                                train=TrainConfig(steps=2, batch_size=2, warmup_steps=1)), progress=False)
    loaded = load_model(out)
    assert loaded.model.config._attn_implementation == "eager"
    den = ModelDenoiser(loaded)
    ids = torch.randint(10, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 300
    # bidirectional: a later token changes the prediction at an earlier position
    assert not torch.allclose(den(ids)[0, 3], den(changed)[0, 3])


def test_annealing_that_never_ends_is_refused(tiny_ar, tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="anneal_steps 20 must be below"):
        tiny_convert_config(anneal_steps=20)  # train.steps is 20 in the tiny config
