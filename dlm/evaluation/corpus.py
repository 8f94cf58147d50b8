"""Likelihood evaluation (``factory eval``): the diffusion ELBO or, for an AR checkpoint, the exact NLL.

Both are computed on the same rolling windows over whole documents
(``dlm.data.corpus.rolling_windows``): each document starts with the checkpoint's start
token (BOS where the tokenizer adds it), every token after it is scored exactly once
with as much context as the window allows, and the two figures count the same tokens.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

from dlm_factory.dlm.checkpoint.io import Loaded, load_model
from dlm_factory.dlm.data.corpus import Windows, read_documents, rolling_windows
from dlm_factory.dlm.data.users import GENERAL_HELDOUT
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.evaluation.likelihood import ar_nll, elbo


class EvalConfig(BaseModel):
    """Settings of ``factory eval``."""

    data: str = Field(GENERAL_HELDOUT, description="evaluation corpus (default: the held-out stdlib split without the demo users' packages)")
    seq_len: int = Field(128, ge=2, description="window length in tokens (start token included)")
    stride: int | None = Field(None, gt=0, description="tokens scored per window after a document's first (None: half a window; the rest is carried context)")
    max_windows: int = Field(32, gt=0, description="windows evaluated (documents in order, whole until the cap)")
    mc_samples: int = Field(128, ge=2, description="Monte Carlo samples of t for the ELBO (LLaDA/SMDM use 128); drawn two per stratum")
    seed: int = Field(0, description="seed of the Monte Carlo estimate")
    batch_size: int = Field(32, gt=0, description="sequences per forward pass")


def eval_windows(loaded: Loaded, cfg: EvalConfig) -> Windows:
    """The windows ``cfg`` describes, tokenized for ``loaded``."""
    return rolling_windows(loaded.tokenizer, read_documents(cfg.data), cfg.seq_len, stride=cfg.stride,
                           max_windows=cfg.max_windows, max_positions=loaded.max_positions)


def evaluate_loaded(loaded: Loaded, cfg: EvalConfig, windows: Windows | None = None) -> dict:
    """ELBO for a diffusion model, exact NLL for an AR model, on the same windows (pass them to share)."""
    w = eval_windows(loaded, cfg) if windows is None else windows
    if loaded.is_diffusion:
        est = elbo(ModelDenoiser(loaded), w.ids, attention_mask=w.attention_mask, keep=w.keep, n=cfg.mc_samples,
                   seed=cfg.seed, batch_size=cfg.batch_size)
    else:
        est = ar_nll(loaded.model, w.ids, attention_mask=w.attention_mask, keep=w.keep, batch_size=cfg.batch_size)
    return {"data": cfg.data, "windows": int(w.ids.shape[0]), "documents": w.documents, "seq_len": cfg.seq_len,
            **est.to_dict()}


def evaluate(model: str | os.PathLike, cfg: EvalConfig) -> dict:
    loaded = load_model(model)
    return {"model": os.fspath(model), **evaluate_loaded(loaded, cfg)}
