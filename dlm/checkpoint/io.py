"""Loading and saving checkpoints: the one loader and the one saver of the factory.

A checkpoint is a normal Hugging Face dir (config.json, *.safetensors, tokenizer
files). A diffusion LM additionally carries ``diffusion.json`` (a DiffusionSpec)
and ``config.is_causal = False``. Safetensors only; ``trust_remote_code`` is off.
Models are placed on the device of ``dlm.runtime`` when loaded.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Imported eagerly: transformers resolves these lazily, and two threads resolving them
# at once (concurrent Prefect tasks) can fail with "cannot import name 'AutoConfig'".
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dlm_factory.digest import tokenizer_digest
from dlm_factory.dlm import runtime
from dlm_factory.dlm.checkpoint import nf4
from dlm_factory.dlm.checkpoint.record import RECORD_FILE, StageRecord
from dlm_factory.dlm.checkpoint.spec import SPEC_FILE, DiffusionSpec
from dlm_factory.dlm.checkpoint.weights import weight_files
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.paths import atomic_dir, materialize


@dataclass
class Loaded:
    """A model with its tokenizer; ``spec`` is None for an autoregressive checkpoint."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    spec: DiffusionSpec | None
    path: Path | None = None

    @property
    def is_diffusion(self) -> bool:
        return self.spec is not None

    @property
    def max_positions(self) -> int | None:
        return max_positions(self.model.config)


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_causal_lm(config, where: str) -> None:
    """Refuse anything that is not a decoder-only causal LM, with a clear message."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise FactoryError(f"{where}: {model_type} is an encoder-decoder model; only decoder-only causal LMs can be converted")
    # BERT-style encoders (token-type embeddings) sit in the causal-LM mapping as
    # `*LMHeadModel` but are only causal when explicitly configured `is_decoder`.
    encoder = getattr(config, "type_vocab_size", None) is not None and not getattr(config, "is_decoder", False)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder:
        raise FactoryError(f"{where}: model_type '{model_type}' is not a decoder-only causal LM (encoder-only or unsupported)")


def load_model(src: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None, quantization=None) -> Loaded:
    """Load a checkpoint from a dir, ``file://``/``s3://`` URL or hub id, onto ``device``
    (default: the runtime's). Weights stay ``dtype`` (fp32): the precision policy is autocast.

    ``quantization``: a transformers ``BitsAndBytesConfig`` to load the linear layers
    quantized (QLoRA); a checkpoint saved quantized loads quantized by itself, and
    embeddings stored NF4 beside it (``dlm.checkpoint.nf4``) are dequantized into it.

    Diffusion checkpoints (with ``diffusion.json``) get their attention modules
    marked non-causal; callers still pass explicit masks (see dlm.diffusion.forward).
    """
    path = materialize(src)
    where = os.fspath(src)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FactoryError(f"{where}: not a checkpoint directory (no config.json)")
    weight_files(path, where)  # safetensors only: the files transformers will read, each checked
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise FactoryError(f"{where}: unreadable config.json ({e})") from e
    check_causal_lm(config, where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (ValueError, OSError) as e:
        raise FactoryError(f"{where}: no usable tokenizer ({e})") from e
    device = torch.device(device) if device is not None else runtime.current().device
    quantized = quantization is not None or getattr(config, "quantization_config", None) is not None
    nf4_record = getattr(config, nf4.CONFIG_KEY, None)
    model = _from_pretrained(path, dtype, where, getattr(config, "model_type", "?"),
                             quantization=quantization, device=device if quantized else None,
                             quiet=nf4_record is not None)
    if not quantized:  # quantized weights are placed by the loader (they refuse .to())
        model.to(device)
    if nf4_record is not None:  # embeddings (and an untied head) stored NF4 beside model.safetensors
        nf4.load_embeddings_4bit(model, path, nf4_record, where)
    model.eval()
    spec = DiffusionSpec.read(path) if (path / SPEC_FILE).is_file() else None
    if spec is not None:
        if spec.tokenizer_digest != tokenizer_digest(tokenizer):
            raise FactoryError(f"{where}: tokenizer does not match the digest in {SPEC_FILE}")
        set_bidirectional(model)
    return Loaded(model=model, tokenizer=tokenizer, spec=spec, path=path)


# transformers builds models on the meta device and patches module construction process-wide while it
# loads: two threads loading at once (a flow's parallel users) fail with "Cannot copy out of meta tensor".
# Loads are serialized; training and inference still run in parallel.
LOAD_LOCK = threading.RLock()


def _from_pretrained(path: Path, dtype: torch.dtype, where: str, model_type: str, *, quantization=None,
                     device: torch.device | None = None, quiet: bool = False):
    """The model with SDPA attention where the architecture has it, else eager (Gemma2 and others).

    Both honour the additive float mask the diffusion forward passes. Any other failure
    of an architecture this transformers cannot build is one FactoryError line. ``quiet``:
    transformers' warnings are silenced (its load report would call the NF4 embeddings, which
    ``load_model`` fills in afterwards, missing and the checkpoint corrupted).
    """
    from transformers.utils import logging as hf_logging

    last: Exception | None = None
    for attn in ("sdpa", "eager"):
        try:
            with LOAD_LOCK, warnings.catch_warnings(), _verbosity(hf_logging, hf_logging.ERROR if quiet else None):
                warnings.simplefilter("ignore")
                extra = {} if device is None else {"device_map": {"": str(device)}}
                if quantization is not None:
                    extra["quantization_config"] = quantization
                return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                            trust_remote_code=False, attn_implementation=attn,
                                                            **extra)
        except ValueError as e:
            if "attention implementation" not in str(e) and "attn_implementation" not in str(e):
                last = e
                break
            last = e
        except (KeyError, OSError, NotImplementedError, ImportError, RuntimeError) as e:
            last = e
            break
    first = str(last).strip().splitlines()[0] if last and str(last).strip() else type(last).__name__
    raise FactoryError(f"{where}: cannot load this {model_type} checkpoint ({first})") from last


@contextlib.contextmanager
def _verbosity(hf_logging, level: int | None):
    """transformers' log level set to ``level`` (None: unchanged) inside the block (callers hold LOAD_LOCK)."""
    before = hf_logging.get_verbosity()
    if level is not None:
        hf_logging.set_verbosity(level)
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def set_bidirectional(model) -> None:
    """Mark the model non-causal: config (persisted) and every attention module."""
    model.config.is_causal = False
    for module in model.modules():
        if hasattr(module, "is_causal") and isinstance(module.is_causal, bool):
            module.is_causal = False


def save_model(loaded: Loaded, dest: str | os.PathLike, *, overwrite: bool = False,
               record: StageRecord | None = None) -> Path:
    """Write model + tokenizer (+ diffusion.json, + the stage record) as safetensors, via temp dir then rename.

    Only rank 0 writes; every rank returns once the output is complete (a barrier).
    """
    rt = runtime.current()
    if rt.master:
        with atomic_dir(dest, overwrite=overwrite) as tmp:
            loaded.model.save_pretrained(tmp, safe_serialization=True)
            loaded.tokenizer.save_pretrained(tmp)
            if loaded.spec is not None:
                loaded.spec.write(tmp)
            if record is not None:
                (tmp / RECORD_FILE).write_text(record.model_dump_json(indent=2) + "\n")
    rt.barrier()
    return Path(dest).resolve()
