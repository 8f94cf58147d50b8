"""Likelihood evaluation: the diffusion ELBO (bits/token) or, for an AR checkpoint, the exact NLL."""

from __future__ import annotations

import os

import torch
from pydantic import BaseModel, Field

from dlm_factory.dlm.checkpoint.io import Loaded, load_model
from dlm_factory.dlm.data.corpus import read_documents, tokenize_blocks
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.evaluation.likelihood import ar_nll, elbo


class EvalConfig(BaseModel):
    """Settings of ``factory eval``."""

    data: str = Field("stdlib:heldout", description="evaluation corpus (held-out stdlib split by default)")
    seq_len: int = Field(128, ge=8, description="block length in tokens")
    max_blocks: int = Field(32, gt=0, description="number of blocks evaluated")
    mc_samples: int = Field(128, gt=0, description="Monte Carlo samples of t for the ELBO (LLaDA/SMDM use 128)")
    seed: int = Field(0, description="seed of the Monte Carlo estimate")
    batch_size: int = Field(32, gt=0, description="sequences per forward pass")


def eval_blocks(loaded: Loaded, cfg: EvalConfig) -> torch.Tensor:
    docs = read_documents(cfg.data)
    return tokenize_blocks(loaded.tokenizer, docs, cfg.seq_len, max_positions=loaded.max_positions,
                           max_blocks=cfg.max_blocks)


def evaluate_loaded(loaded: Loaded, cfg: EvalConfig, ids: torch.Tensor | None = None) -> dict:
    """ELBO for a diffusion model, exact NLL for an AR model, on the same token blocks."""
    ids = eval_blocks(loaded, cfg) if ids is None else ids
    if loaded.is_diffusion:
        est = elbo(ModelDenoiser(loaded), ids, n=cfg.mc_samples, seed=cfg.seed, batch_size=cfg.batch_size)
    else:
        est = ar_nll(loaded.model, ids, batch_size=cfg.batch_size)
    return {"data": cfg.data, "blocks": int(ids.shape[0]), "seq_len": cfg.seq_len, **est.to_dict()}


def evaluate(model: str | os.PathLike, cfg: EvalConfig) -> dict:
    loaded = load_model(model)
    return {"model": os.fspath(model), **evaluate_loaded(loaded, cfg)}
