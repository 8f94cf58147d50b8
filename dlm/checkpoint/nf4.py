"""4-bit storage of what bitsandbytes' ``Linear4bit`` leaves in full precision: token embeddings and an untied head.

transformers' bitsandbytes integration quantizes ``nn.Linear`` layers only and keeps the
output head in full precision; in a small specialist the embedding is most of the weights,
so a checkpoint whose linear layers are 4-bit is still mostly bf16 (measured on the demo's
specialist base: 0.72x of bf16 for the whole checkpoint). Here those tensors are quantized
with bitsandbytes' own NF4 (``quantize_4bit``, blocks of 64) and stored, with their
quantization state in bitsandbytes' own packed form (``QuantState.as_dict(packed=True)``,
the form transformers stores for a ``Linear4bit``), in :data:`EMBEDDINGS_FILE` beside
``model.safetensors``, which no longer holds them. ``config.json`` records which tensors
moved (:data:`CONFIG_KEY`); ``load_model`` dequantizes them into the model at load (they are
held dequantized in memory: an embedding lookup and the tied head need the dense matrix).

Double quantization (the block constants quantized too) saves 3 bytes per block of 64 but
stores a 256-entry fp32 code (1 KiB) per tensor: it pays off above ~400 blocks only, so
``double_quant=None`` keeps whichever stores fewer bytes, per tensor.

Checkpoints without :data:`CONFIG_KEY` (embeddings in ``model.safetensors``, the format
before this one) load as before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dlm_factory.dlm.errors import FactoryError

EMBEDDINGS_FILE = "embeddings.nf4.safetensors"
CONFIG_KEY = "dlm_4bit_embeddings"
BLOCKSIZE = 64


def embedding_keys(model) -> list[str]:
    """State-dict keys of the input embedding and of an untied output head that is not 4-bit already."""
    names = {id(m): n for n, m in model.named_modules()}
    keys = [names[id(model.get_input_embeddings())] + ".weight"]
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    if head is not None and not tied and type(head) is torch.nn.Linear:
        keys.append(names[id(head)] + ".weight")
    return keys


def _quantize(weight: torch.Tensor, double_quant: bool | None) -> dict[str, torch.Tensor]:
    """``{"": codes, "absmax": ..., ...}``: bitsandbytes' NF4 codes and packed quantization state;
    with ``double_quant=None`` the smaller of the two forms (ties: single)."""
    import bitsandbytes.functional as bnbf

    forms = []
    for dq in ([False, True] if double_quant is None else [double_quant]):
        codes, state = bnbf.quantize_4bit(weight.detach().cpu().contiguous(), blocksize=BLOCKSIZE,
                                          compress_statistics=dq, quant_type="nf4")
        form = {"": codes, **state.as_dict(packed=True)}
        forms.append((sum(t.numel() * t.element_size() for t in form.values()), dq, form))
    return min(forms, key=lambda f: f[0])[2]


def store_embeddings_4bit(model_dir: str | os.PathLike, keys: list[str], *, double_quant: bool | None = None) -> dict:
    """Move ``keys`` of ``model_dir/model.safetensors`` into :data:`EMBEDDINGS_FILE`, NF4; record it in config.json.

    Returns the record written to ``config.json[CONFIG_KEY]``.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    weights = model_dir / "model.safetensors"
    with safe_open(weights, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise FactoryError(f"{model_dir}: {', '.join(missing)} not in model.safetensors (nothing to quantize)")
    stored: dict[str, torch.Tensor] = {}
    record = {"file": EMBEDDINGS_FILE, "quant_type": "nf4", "blocksize": BLOCKSIZE, "tensors": {}}
    for key in keys:
        form = _quantize(tensors.pop(key), double_quant)
        stored.update({key if not part else f"{key}.{part}": t for part, t in form.items()})
        record["tensors"][key] = {"double_quant": "nested_absmax" in form}
    save_file(stored, model_dir / EMBEDDINGS_FILE, metadata={"format": "pt"})
    save_file(tensors, weights, metadata=metadata)
    config = json.loads((model_dir / "config.json").read_text())
    config[CONFIG_KEY] = record
    (model_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return record


def load_embeddings_4bit(model, model_dir: Path, record, where: str) -> list[str]:
    """Dequantize the tensors ``record`` (``config.json[CONFIG_KEY]``) names into ``model``; returns their keys.

    The record leaves the in-memory config: the model holds them dense now. (transformers 5.24
    cannot save a model loaded from a 4-bit checkpoint again: ``Bnb4bitDeserialize`` has no
    reverse; a 4-bit checkpoint is made from full-precision weights, ``dlm.train.qlora.export_4bit``.)
    """
    import bitsandbytes.functional as bnbf
    from safetensors import safe_open

    if not isinstance(record, dict) or record.get("file") != EMBEDDINGS_FILE or not isinstance(record.get("tensors"), dict):
        raise FactoryError(f"{where}: config.json {CONFIG_KEY} must name {EMBEDDINGS_FILE} and its tensors")
    allowed = set(embedding_keys(model))
    params = dict(model.named_parameters(remove_duplicate=False))
    with safe_open(model_dir / EMBEDDINGS_FILE, framework="pt") as f:
        keys = set(f.keys())
        for key in record["tensors"]:
            if key not in allowed or key not in params or key not in keys:
                raise FactoryError(f"{where}: {EMBEDDINGS_FILE}: {key!r} is not an embedding of this model "
                                   f"stored in the file")
            state = bnbf.QuantState.from_dict({k[len(key) + 1:]: f.get_tensor(k) for k in keys
                                               if k.startswith(key + ".")}, device=torch.device("cpu"))
            dense = bnbf.dequantize_4bit(f.get_tensor(key), state)
            param = params[key]
            if dense.shape != param.shape:
                raise FactoryError(f"{where}: {EMBEDDINGS_FILE}: {key} has shape {tuple(dense.shape)}, the model "
                                   f"{tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(dense.to(param.dtype))
    if hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    return list(record["tensors"])
