"""Per-user specialists: QLoRA diffusion fine-tuning of a small DLM on one user's data.

SSD-2 (Han et al., "David helps Goliath"): a large general DLM collaborates at inference
time with a ~100x smaller specialist trained on the user's own data. Here the
specialist starts from a small converted DLM that shares the general model's tokenizer
(refused otherwise: ensemble members combine distributions over one vocabulary), loads
its linear layers 4-bit NF4 with double quantization, and trains LoRA adapters on
every attention and MLP projection with the masked-diffusion objective
(``dlm.train.qlora``) on the user's train split.

Output (one dir, written atomically):

    <output>/                 the merged specialist, 4-bit: loads with one ``load_model`` call
      model.safetensors         linear layers NF4 (bitsandbytes Linear4bit), norms bf16
      embeddings.nf4.safetensors  token embeddings (and an untied head) NF4 (dlm.checkpoint.nf4)
      config.json (quantization_config, dlm_4bit_embeddings), tokenizer, diffusion.json, stage.json
      adapter/                the LoRA adapter alone (safetensors) and base.json (its base by digest)

The merged model is W + BA merged in full precision, then quantized once (double
quantization of the linear layers only where it stores fewer bytes). The stage
record keeps, on the user's held-out split and on shared Monte Carlo draws, the ELBO of
the untuned base, the adapter on the 4-bit base (what was trained), the merged model in
bf16 and the merged 4-bit model, with their paired differences, and the bytes of each
(linear layers only and whole checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from dlm_factory.digest import tokenizer_digest
from dlm_factory.dlm import runtime
from dlm_factory.dlm.checkpoint.io import Loaded, load_model, save_model
from dlm_factory.dlm.checkpoint.record import (
    RECORD_FILE,
    StageKey,
    check_output,
    model_digest,
    new_record,
    source_name,
)
from dlm_factory.dlm.checkpoint.spec import SPEC_FILE, DiffusionSpec
from dlm_factory.dlm.data.corpus import Blocks, documents_digest, rolling_windows, tokenize_blocks
from dlm_factory.dlm.data.users import HELDOUT_FRACTION, check_user_id, user_documents
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.diffusion.objective import diffusion_loss
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.evaluation.likelihood import paired_elbo
from dlm_factory.dlm.paths import atomic_dir, materialize
from dlm_factory.dlm.stages.bootstrap import BootstrapConfig
from dlm_factory.dlm.stages.convert import ConvertConfig
from dlm_factory.dlm.train.config import TrainConfig, TrainResult
from dlm_factory.dlm.train.loop import train
from dlm_factory.dlm.train.qlora import (
    ADAPTER_DIR,
    QLoraConfig,
    export_4bit,
    load_qlora,
    merge_adapter,
    save_adapter,
    stored_bytes,
)

log = logging.getLogger(__name__)


# The embedded demo's specialist base: ~15x fewer parameters than the stdlib general model (tied embeddings), trained on the same
# corpus (GENERAL_TRAIN by default: without the demo users' packages) with the general model's tokenizer.
# Widths are multiples of 64: bitsandbytes' CPU 4-bit kernels work on blocks of 64 ("N must be divisible by block_n").
SPECIALIST_BASE = BootstrapConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192,
                                  tie_embeddings=True, max_chars=2_000_000,
                                  train=TrainConfig(steps=300, batch_size=16, lr=3e-3, warmup_steps=20))
SPECIALIST_CONVERT = ConvertConfig(max_chars=1_000_000, anneal_steps=50,
                                   train=TrainConfig(steps=150, batch_size=16, lr=2e-3, warmup_steps=10))


class SpecializeConfig(BaseModel):
    """Settings of one user's specialist (defaults: the embedded demo, under a minute per user on one CPU thread).

    500 steps at lr 5e-3: chosen on the held-out ELBO of two demo users (asyncio, unittest) among
    60-500 steps x lr 2e-3-1e-2 (docs/specialize.md); the other users' figures are untouched by it."""

    seq_len: int = Field(128, ge=8, description="training and evaluation window length")
    heldout_fraction: float = Field(HELDOUT_FRACTION, gt=0, lt=1, description="the user's documents held out, by name hash")
    qlora: QLoraConfig = Field(default_factory=QLoraConfig, description="4-bit base and LoRA adapters")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=500, batch_size=8, lr=5e-3, warmup_steps=20,
                                                                   log_every=100),
                               description="optimisation settings")
    eval_windows: int = Field(16, gt=0, description="held-out windows for the ELBO figures")
    mc_samples: int = Field(16, ge=2, description="Monte Carlo samples of t for the ELBO figures")


@dataclass
class SpecializeResult:
    user: str
    output: str
    data_digest: str
    train: TrainResult
    report: dict


def specialize_key(model: str | os.PathLike, data_root: str, user: str, cfg: SpecializeConfig) -> StageKey:
    """Done when the base's and the user's data's content and the config are unchanged."""
    data = documents_digest(user_documents(data_root, user, "all"))
    return StageKey(stage="specialize", config=cfg.model_dump(),
                    inputs={"base": model_digest(materialize(model)), "data": data})


def check_same_tokenizer(model: str | os.PathLike, general: str | os.PathLike) -> str:
    """The tokenizer digest the specialist shares with the general model; one FactoryError line otherwise."""
    digests = {}
    for role, src in (("specialist base", model), ("general model", general)):
        path = materialize(src)
        if (path / SPEC_FILE).is_file():
            digests[role] = DiffusionSpec.read(path).tokenizer_digest
        else:
            from transformers import AutoTokenizer

            digests[role] = tokenizer_digest(AutoTokenizer.from_pretrained(path, trust_remote_code=False))
    if len(set(digests.values())) != 1:
        raise FactoryError(f"{model}: its tokenizer differs from the general model's ({general}); a specialist "
                           "must share the general model's tokenizer to combine with it")
    return digests["general model"]


def specialize(model: str | os.PathLike, data_root: str, user: str, output: str | os.PathLike,
               cfg: SpecializeConfig, *, general: str | os.PathLike | None = None,
               checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
               overwrite: bool = False) -> SpecializeResult:
    """Train ``user``'s specialist from the small DLM ``model`` on ``<data_root>/users/<user>/data``."""
    check_user_id(user)
    check_output(output, overwrite=overwrite)
    if general is not None:
        check_same_tokenizer(model, general)
    key = specialize_key(model, data_root, user, cfg)
    train_docs = user_documents(data_root, user, "train", heldout_fraction=cfg.heldout_fraction)
    held_docs = user_documents(data_root, user, "heldout", heldout_fraction=cfg.heldout_fraction)
    loaded = load_qlora(model, cfg.qlora)
    tok, spec = loaded.tokenizer, loaded.spec
    blocks = Blocks(tokenize_blocks(tok, train_docs, cfg.seq_len, max_positions=loaded.max_positions))
    mb = cfg.train.micro_batch()

    def objective(m, batch, step, generator):
        return diffusion_loss(m, spec, batch["input_ids"], generator=generator)

    result = train(loaded.model, lambda step, m: blocks.batch(step * cfg.train.slots() + m, mb, cfg.train.seed),
                   objective, cfg.train, checkpoint_dir=checkpoint_dir, progress=progress)
    loaded.model.eval()
    windows = rolling_windows(tok, held_docs, cfg.seq_len, max_windows=cfg.eval_windows,
                              max_positions=loaded.max_positions)
    with tempfile.TemporaryDirectory(prefix="specialize-") as tmp:
        tmp = Path(tmp)
        adapter = save_adapter(loaded.model, tmp / ADAPTER_DIR)
        merged = merge_adapter(model, adapter)  # W + BA in full precision
        merged.model.to(torch.bfloat16)
        save_model(merged, tmp / "bf16", overwrite=True)  # the reference: the merge stored in bf16
        export = export_4bit(tmp / "bf16", tmp / "4bit", cfg.qlora)  # linear layers, embeddings, untied head: NF4
        variants = {"untuned": load_model(model), "adapter_4bit": loaded, "merged_bf16": load_model(tmp / "bf16"),
                    "merged_4bit": load_model(tmp / "4bit")}  # what users load, as they load it
        report = _figures(variants, windows, cfg, {"merged_bf16": tmp / "bf16", "merged_4bit": tmp / "4bit"})
        report["export"] = export
        record = new_record(key, sources={"base": source_name(model), "data": f"user {user}", "user": user},
                            ar_root=spec.source, runtime=runtime.current().describe(),
                            result={"user": user, "train_documents": len(train_docs),
                                    "heldout_documents": len(held_docs), **report, **result.summary()})
        spec.stages.append(record)
        _save_with_adapter(tmp / "4bit", spec, record, output, adapter, model, key.inputs["base"], overwrite=overwrite)
    log.info("specialist %s: held-out ELBO %.3f -> %.3f bits/token (merged 4-bit %.3f), %d -> %d bytes", user,
             report["elbo"]["untuned"]["bits_per_token"], report["elbo"]["adapter_4bit"]["bits_per_token"],
             report["elbo"]["merged_4bit"]["bits_per_token"], report["bytes"]["merged_bf16"]["checkpoint"],
             report["bytes"]["merged_4bit"]["checkpoint"])
    return SpecializeResult(user=user, output=os.fspath(output), data_digest=key.inputs["data"], train=result,
                            report=report)


def _figures(variants: dict[str, Loaded], windows, cfg: SpecializeConfig, dirs: dict[str, Path]) -> dict:
    """Held-out ELBO of every variant on shared draws (paired differences vs untuned), and their bytes as
    stored: the quantizable linear layers (weights and quantization state) and the whole checkpoint."""
    est = paired_elbo({name: ModelDenoiser(v) for name, v in variants.items()}, windows.ids,
                      attention_mask=windows.attention_mask, keep=windows.keep, n=cfg.mc_samples, seed=0)
    elbo = {k: {"bits_per_token": round(e.bits_per_token, 4), "stderr": round(e.stderr, 4)} for k, e in est.items()}
    sizes = {name: stored_bytes(path, variants["merged_bf16"].model) for name, path in dirs.items()}
    ratio = {k: round(sizes["merged_4bit"][k] / sizes["merged_bf16"][k], 4) for k in ("linear", "checkpoint")}
    trained = est["adapter_4bit"].bits_per_token
    return {"elbo": elbo, "tokens": est["untuned"].tokens, "bytes": sizes, "bytes_ratio_4bit_vs_bf16": ratio,
            "merge_change_relative": round((est["merged_4bit"].bits_per_token - trained) / trained, 4)}


def _save_with_adapter(model_dir: Path, spec: DiffusionSpec, record, output, adapter: Path,
                       base: str | os.PathLike, base_digest: str, *, overwrite: bool) -> None:
    """The merged 4-bit model with ``adapter/`` (and the base it needs, by digest) beside it, in one atomic dir."""
    import shutil

    if not runtime.current().master:
        return
    with atomic_dir(output, overwrite=overwrite) as tmp:
        for f in model_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        spec.write(tmp)
        (tmp / RECORD_FILE).write_text(record.model_dump_json(indent=2) + "\n")
        shutil.copytree(adapter, tmp / ADAPTER_DIR)
        (tmp / ADAPTER_DIR / "base.json").write_text(json.dumps(
            {"base_model": source_name(base), "base_digest": base_digest,
             "note": "load the base with dlm.train.qlora (4-bit NF4) and apply this adapter with peft"},
            indent=2) + "\n")
