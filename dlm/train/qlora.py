"""QLoRA for diffusion LMs: a 4-bit NF4 base (bitsandbytes) with LoRA adapters (peft).

Dettmers et al. 2023 (QLoRA): the base's linear layers are stored as 4-bit NormalFloat
with double quantization (the quantization constants quantized too), computation runs
in a higher precision (bf16 on CUDA, fp32 on CPU, where bf16 matmuls are slow), and
only low-rank adapters on every linear projection (attention and MLP) train. The
objective is the core's masked-diffusion loss: the adapters plug into the one
training loop like any other trainable parameters.

bitsandbytes quantizes ``nn.Linear`` layers only: token embeddings (and the output
head, which transformers keeps in full precision) stay in the base's dtype while
training; the exported model stores them NF4 too (``dlm.checkpoint.nf4``).
``stored_bytes`` reports linear-layer and whole-checkpoint bytes separately.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from dlm_factory.dlm import runtime
from dlm_factory.dlm.checkpoint.io import (
    LOAD_LOCK,
    Loaded,
    load_model,
    save_model,
    set_bidirectional,
)
from dlm_factory.dlm.checkpoint.nf4 import embedding_keys, store_embeddings_4bit
from dlm_factory.dlm.errors import FactoryError

log = logging.getLogger(__name__)

# Imported eagerly, as transformers is in dlm.checkpoint.io: two specialists starting in threads of
# one flow would otherwise resolve these lazy imports at once.
try:
    import bitsandbytes  # noqa: F401
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
except ImportError as e:  # reported by load_qlora as one line
    _IMPORT_ERROR: ImportError | None = e
else:
    _IMPORT_ERROR = None

ADAPTER_DIR = "adapter"


class QLoraConfig(BaseModel):
    """Quantization of the base and shape of the adapters."""

    rank: int = Field(16, gt=0, le=256, description="LoRA rank r")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: str | list[str] = Field("all-linear", description="peft target modules: every linear projection (attention and MLP) but the output head")
    quant_type: str = Field("nf4", pattern="^(nf4|fp4)$", description="4-bit data type (NF4: QLoRA's NormalFloat)")
    double_quant: bool = Field(True, description="quantize the quantization constants too (QLoRA), while training")
    export_double_quant: bool | None = Field(
        None, description="double quantization of the exported 4-bit model; None: whichever stores fewer bytes "
                          "(measured: it saves 3 bytes per block of 64 but stores a 1 KiB code per tensor)")


def bnb_config(cfg: QLoraConfig, *, double_quant: bool | None = None):
    """The transformers ``BitsAndBytesConfig`` of ``cfg`` on the runtime's device (``double_quant``
    overrides ``cfg.double_quant``)."""
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as e:  # pragma: no cover - transformers always has it
        raise FactoryError(f"transformers has no BitsAndBytesConfig: {e}") from e
    rt = runtime.current()
    compute = torch.bfloat16 if rt.precision("auto") == "bf16" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant if double_quant is None else double_quant, bnb_4bit_compute_dtype=compute)


def load_qlora(model: str | os.PathLike, cfg: QLoraConfig) -> Loaded:
    """The DLM ``model`` with its linear layers in 4 bits and fresh LoRA adapters (the only trainable weights)."""
    if _IMPORT_ERROR is not None:
        raise FactoryError(f"QLoRA needs bitsandbytes and peft: {_IMPORT_ERROR}") from _IMPORT_ERROR
    loaded = load_model(model, quantization=bnb_config(cfg))
    if loaded.spec is None:
        raise FactoryError(f"{model}: an autoregressive checkpoint; specialists start from a diffusion LM")
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                      bias="none")
    with LOAD_LOCK:
        base = prepare_model_for_kbit_training(loaded.model, use_gradient_checkpointing=False)
        peft_model = get_peft_model(base, lora)
    set_bidirectional(peft_model)
    keep_trainable_layout(peft_model)
    return Loaded(peft_model, loaded.tokenizer, loaded.spec, loaded.path)


def keep_trainable_layout(model) -> int:
    """Keep every 4-bit layer of ``model`` on bitsandbytes' differentiable path; returns the layers seen.

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit``'s weights into an
    inference-only layout the first time the layer runs in eval mode without grad (any
    evaluation, or our output-head check), and from then on every forward, in training too,
    goes through ``gemv_4bit``, which has no backward: the gradient into the layer's input is
    silently dropped ("an autograd kernel was not registered"), so the adapters of every
    earlier layer get wrong gradients. Measured: 50-100% relative error on all but the last
    layer's adapters of a 2-layer model (tests/dlm/test_specialize.py). Turning the repacking
    off keeps training on ``MatMul4Bit`` (dequantize, matmul, exact backward); the served
    specialist, loaded by ``load_model``, keeps the fast inference layout.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    from bitsandbytes.nn import Linear4bit

    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            w = module.weight
            if getattr(w.quant_state, "packing_format_for_cpu", False):
                w.data, w.quant_state = _unpack_for_cpu(w.data, w.quant_state, _convert_weight_packed_for_cpu_inverse)
            n += 1
    return n


def _unpack_for_cpu(packed, state, inverse):
    """bitsandbytes' inverse of its CPU repacking, with the block constants of single quantization restored.

    The repacking stores the constants transposed, ``[K / blocksize, N]`` in bf16; bitsandbytes 0.50's
    inverse restores them only for double quantization and leaves a single-quantized layer's transposed:
    every layer with more than one block per row (in_features > 64) then dequantizes with permuted
    constants (measured: a 64 x 192 ``down_proj`` off by up to 0.27 in weights of at most 0.3). Here
    they go back to the original order, as fp32 (their values keep the repacking's bf16 rounding).
    """
    nested = state.original_nested
    qweight, state = inverse(packed, state)
    if not nested and state.absmax.dim() == 2:
        state.absmax = state.absmax.T.reshape(-1).float().contiguous()
    return qweight, state


def save_adapter(peft_model, dest: Path) -> Path:
    """The adapter alone, safetensors only (``adapter_model.safetensors`` + ``adapter_config.json``)."""
    peft_model.save_pretrained(dest, safe_serialization=True)
    if not (dest / "adapter_model.safetensors").is_file():
        raise FactoryError(f"{dest}: peft wrote no adapter_model.safetensors")
    return dest


def merge_adapter(base_model: str | os.PathLike, adapter: str | os.PathLike) -> Loaded:
    """The base in full precision with the adapter merged in (W + BA): dequantize, merge.

    Merging into the 4-bit weights directly (peft's ``merge_and_unload`` on a quantized
    base) rounds W + BA to the 4-bit grid of W's blocks and is known to lose accuracy;
    merging in full precision and quantizing once afterwards (``quantize``) does not
    stack two roundings. Both are measured by the specialize stage.
    """
    loaded = load_model(base_model)
    with LOAD_LOCK:  # peft loads the adapter through transformers' meta-device machinery too
        merged = PeftModel.from_pretrained(loaded.model, os.fspath(adapter)).merge_and_unload()
    set_bidirectional(merged)
    return Loaded(merged.eval(), loaded.tokenizer, loaded.spec, loaded.path)


def export_4bit(bf16_dir: str | os.PathLike, dest: str | os.PathLike, cfg: QLoraConfig) -> dict:
    """The bf16 checkpoint ``bf16_dir`` stored 4-bit in ``dest`` (a new dir): the linear layers as
    bitsandbytes ``Linear4bit`` (transformers' format), the embeddings and an untied head NF4
    beside them (``dlm.checkpoint.nf4``); ``load_model(dest)`` loads it.

    With ``cfg.export_double_quant`` None both forms of the linear layers are written and the one
    with fewer bytes kept (the embeddings take the smaller form per tensor). Returns
    ``{"double_quant": chosen, "checkpoint_bytes": {"double_quant": n, "single_quant": n}}``.
    """
    import shutil

    dest = Path(dest)
    choices = [True, False] if cfg.export_double_quant is None else [cfg.export_double_quant]
    outs = {dq: dest.with_name(f"{dest.name}.{'dq' if dq else 'sq'}") for dq in choices}
    sizes: dict[bool, int] = {}
    for dq, out in outs.items():
        q = load_model(bf16_dir, quantization=bnb_config(cfg, double_quant=dq), dtype=torch.bfloat16)
        save_model(q, out, overwrite=True)
        store_embeddings_4bit(out, embedding_keys(q.model), double_quant=cfg.export_double_quant)
        sizes[dq] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    best = min(choices, key=lambda dq: (sizes[dq], dq))  # a tie keeps single quantization (exact block constants)
    for dq, out in outs.items():
        if dq == best:
            out.rename(dest)
        else:
            shutil.rmtree(out)
    names = {True: "double_quant", False: "single_quant"}
    return {"double_quant": best, "checkpoint_bytes": {names[dq]: n for dq, n in sizes.items()}}


def stored_bytes(model_dir: str | os.PathLike, model) -> dict[str, int]:
    """Bytes of a saved checkpoint: ``linear``, the tensors stored for the quantizable linear layers of
    ``model`` (weights and quantization state, file headers left out; the output head is not one of
    them), and ``checkpoint``, the size of every ``*.safetensors`` file (headers included).

    Read from the files' safetensors headers (JSON only), so it counts exactly what is stored.
    """
    head = model.get_output_embeddings()
    names = tuple(n + "." for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head)
    linear = total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        total += f.stat().st_size
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for key, entry in header.items():
            if key != "__metadata__" and key.startswith(names):
                start, end = entry["data_offsets"]
                linear += end - start
    return {"linear": linear, "checkpoint": total}
