"""Instruction tuning (SFT) of diffusion LMs, with an AR SFT baseline on the same rows.

Method (LLaDA, Nie et al. 2025, "Large Language Diffusion Models", SFT section):
each row is prompt + response + EOS + padding to a fixed response length L. Prompt
tokens are never masked; the response, its EOS and the padding (real, attended
tokens, so the model learns where a response ends) are masked at rate t ~ U(eps, 1);
the loss (1/t) * sum of -log p over masked tokens is divided by the row's response
length L (``diffusion_loss(..., keep=prompt, per_sequence=True)``). The padding is by
default *rainbow padding* (Kim et al. 2025): one EOS, then a cycle of K distinct pad
tokens instead of repeated EOS. Repeated EOS makes "EOS" the most confident
prediction at every late position; a confidence-ordered sampler commits those first
and the EOS spreads backwards into near-empty answers. With K pads each late
position's mass is split K ways, so content is decoded first. ``padding="eos"`` keeps
LLaDA's original. The pads are recorded in ``DiffusionSpec.pad_token_ids``; the
sampler treats them like EOS. The AR baseline trains the same base's AR checkpoint
with next-token cross-entropy on prompt + response + one EOS, prompt tokens excluded
from the loss.

Prompts are formatted with the tokenizer's chat template when it has one, else with
the documented default (``dlm.data.chat``). Rows and length-bucketed batches come
from ``dlm.data.sft``; the held-out evaluation is ``dlm.evaluation.instruct``. The
template, padding and data report are kept in the stage record (``stage.json``, and
``diffusion.json`` ``stages[-1]`` for a DLM).

Shapes: B batch, T row length, P prompt length, L response length.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from dlm_factory.digest import tokenizer_digest
from dlm_factory.dlm import runtime
from dlm_factory.dlm.checkpoint.io import Loaded, load_model, save_model
from dlm_factory.dlm.checkpoint.record import (
    StageKey,
    check_output,
    lineage_root,
    model_digest,
    new_record,
    source_name,
)
from dlm_factory.dlm.checkpoint.vocab import add_special_tokens, unused_special_tokens
from dlm_factory.dlm.data.batching import pad_id
from dlm_factory.dlm.data.chat import DEFAULT_FORMAT, ensure_chat_template
from dlm_factory.dlm.data.corpus import source_digest
from dlm_factory.dlm.data.sft import SFTBatches, prepare_rows
from dlm_factory.dlm.data.users import GENERAL_TRAIN
from dlm_factory.dlm.diffusion.objective import ar_loss, diffusion_loss
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.paths import materialize
from dlm_factory.dlm.train.config import TrainConfig, TrainResult
from dlm_factory.dlm.train.loop import train

log = logging.getLogger(__name__)


class InstructConfig(BaseModel):
    """Settings of instruction tuning (defaults: the embedded demo, a few minutes on CPU)."""

    data: str = Field(GENERAL_TRAIN, description="instructions: stdlib[:split][:exclude=...] or a JSONL file/dir (path, file:// or s3://); default: from the general model's corpus, without the demo users' packages")
    objective: Literal["diffusion", "ar"] = Field("diffusion", description="diffusion: LLaDA SFT of a DLM; ar: next-token SFT of an AR checkpoint (the baseline)")
    response_len: int = Field(64, ge=2, description="response length L in tokens, EOS padding included; longer responses are dropped")
    response_bucket: int | None = Field(None, gt=0, description="pad each response to a multiple of this instead of L (None: always L, as LLaDA)")
    padding: Literal["rainbow", "eos"] = Field("rainbow", description="diffusion: what fills the response after its one EOS: rainbow (a cycle of distinct pad tokens, Kim et al. 2025) or eos (repeated EOS, LLaDA)")
    pad_tokens: int = Field(7, ge=1, le=64, description="rainbow padding: number of distinct pad tokens in the cycle (reserved tokens reused, else added)")
    max_prompt_len: int | None = Field(None, gt=0, description="longest prompt in tokens (None: the model's positions minus L); JSONL prompts beyond it are refused, stdlib ones dropped")
    heldout_fraction: float = Field(0.05, ge=0, lt=1, description="stdlib: share of module files held out (0.05: the files the base corpus holds out)")
    max_doc_chars: int = Field(300, gt=0, description="stdlib: skip functions whose docstring summary is longer")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="JSONL: refuse the data when more lines than this share are malformed")
    bucket_window: int = Field(16, gt=0, description="batches per length-sorting window (1: no bucketing)")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=100, batch_size=16, lr=1e-3, warmup_steps=10),
                               description="optimisation settings")


@dataclass
class InstructResult:
    train: TrainResult
    data: dict  # DataReport + LengthReport + padding
    template: str  # "tokenizer" or "default"
    output: str = ""

    @property
    def final_loss(self) -> float:
        return self.train.final_loss

    @property
    def tokens_per_s(self) -> float:
        return self.train.tokens_per_s


def check_objective(loaded: Loaded, objective: str, where: str) -> None:
    if objective == "diffusion" and not loaded.is_diffusion:
        raise FactoryError(f"{where}: autoregressive checkpoint (no diffusion.json); convert it first "
                           "(factory convert), or pass --objective ar for the AR SFT baseline")
    if objective == "ar" and loaded.is_diffusion:
        raise FactoryError(f"{where}: diffusion checkpoint; --objective ar needs an autoregressive one")


def instruct_key(model: str | os.PathLike, cfg: InstructConfig) -> StageKey:
    """What decides whether an instruction-tuning output is done: the base's and the data's content, the config."""
    return StageKey(stage="instruct", config=cfg.model_dump(),
                    inputs={"base": model_digest(materialize(model)), "data": source_digest(cfg.data)})


def instruct(model: str | os.PathLike, output: str | os.PathLike, cfg: InstructConfig, *,
             checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
             on_log=None, overwrite: bool = False) -> InstructResult:
    """Instruction-tune ``model`` on ``cfg.data`` and save the result at ``output`` (atomic).

    ``cfg.objective`` "diffusion" needs a DLM (LLaDA SFT); "ar" needs an AR checkpoint
    (the baseline). With ``checkpoint_dir`` an interrupted run resumes where it stopped.
    """
    where = os.fspath(model)
    check_output(output, overwrite=overwrite)
    key = instruct_key(model, cfg)
    loaded = load_model(model)
    check_objective(loaded, cfg.objective, where)
    tok = loaded.tokenizer
    if tok.eos_token_id is None:
        raise FactoryError(f"{where}: the tokenizer has no EOS token (needed to end responses)")
    template = ensure_chat_template(tok)
    pads = ensure_pad_tokens(loaded, cfg.pad_tokens, seed=cfg.train.seed) \
        if cfg.objective == "diffusion" and cfg.padding == "rainbow" else []
    rows, data = prepare_rows(loaded, cfg.data, response_len=cfg.response_len, max_prompt_len=cfg.max_prompt_len,
                              heldout_fraction=cfg.heldout_fraction, max_doc_chars=cfg.max_doc_chars,
                              max_bad_fraction=cfg.max_bad_fraction)
    eos = tok.eos_token_id
    pad = pad_id(tok)
    mb = cfg.train.micro_batch()
    batches = SFTBatches(rows, objective=cfg.objective, response_len=cfg.response_len,
                         response_bucket=cfg.response_bucket, batch_size=mb, seed=cfg.train.seed,
                         eos=eos, pad=pad, window=cfg.bucket_window, pads=pads)
    data["padding"] = batches.padding()
    data["padding_unbucketed"] = batches.padding(window=1)
    log.info("instruct: %d rows; padding %.1f%% (unbucketed %.1f%%), response fill %.1f%%", len(rows),
             100 * data["padding"]["pad_fraction"], 100 * data["padding_unbucketed"]["pad_fraction"],
             100 * data["padding"]["eos_fill_fraction"])
    spec = loaded.spec

    def objective(model, batch, step, generator):
        if cfg.objective == "ar":
            return ar_loss(model, batch["input_ids"], attention_mask=batch["attention_mask"], keep=batch["prompt_mask"])
        return diffusion_loss(model, spec, batch["input_ids"], attention_mask=batch["attention_mask"],
                              keep=batch["prompt_mask"], per_sequence=True, generator=generator)

    result = train(loaded.model, lambda step, m: batches.batch(step * cfg.train.slots() + m), objective,
                   cfg.train, checkpoint_dir=checkpoint_dir, progress=progress, on_log=on_log)
    base = source_name(model)
    outcome = {"objective": cfg.objective, "template": template, "chat_template": tok.chat_template,
               "prompt_format": DEFAULT_FORMAT if template == "default" else None,
               "padding": {"kind": "rainbow" if pads else "eos", "token_ids": pads,
                           "tokens": tok.convert_ids_to_tokens(pads)} if cfg.objective == "diffusion" else None,
               "data": data, **result.summary()}
    record = new_record(key, sources={"base": base, "data": cfg.data}, runtime=runtime.current().describe(),
                        ar_root=lineage_root(loaded.path or Path(where), base), result=outcome)
    if spec is not None:
        spec.stages.append(record)
    save_model(Loaded(loaded.model, tok, spec), output, overwrite=overwrite, record=record)
    return InstructResult(train=result, data=data, template=template, output=os.fspath(output))


def ensure_pad_tokens(loaded: Loaded, k: int, *, seed: int = 0) -> list[int]:
    """The K rainbow pad token ids of a DLM, recorded in its spec (``pad_token_ids``).

    A model that already has K pads (tuned before) keeps them. Otherwise unused
    reserved special tokens are taken first, then ``<|pad_i|>`` tokens are added
    (rows at the mean embedding plus seeded noise, so the K pads start distinct).
    """
    spec, tok = loaded.spec, loaded.tokenizer
    if len(spec.pad_token_ids) == k:
        return list(spec.pad_token_ids)
    if spec.pad_token_ids:
        raise FactoryError(f"the model was tuned with {len(spec.pad_token_ids)} rainbow pad tokens, not {k}; "
                           f"pass --pad-tokens {len(spec.pad_token_ids)}")
    pads = [i for i, _ in unused_special_tokens(tok, exclude={spec.mask_token_id})][:k]
    vocab = tok.get_vocab()
    names = (f"<|pad_{i}|>" for i in itertools.count())
    new = list(itertools.islice((n for n in names if n not in vocab), k - len(pads)))
    if new:
        pads += add_special_tokens(loaded, new, seed=seed, noise=0.1)
    spec.pad_token_ids = pads
    spec.tokenizer_digest = tokenizer_digest(tok)
    return pads
