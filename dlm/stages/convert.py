"""AR -> masked-diffusion conversion (DiffuGPT / DiffuLLaMA, Gong et al. 2024; AR2Diff, 2024).

Recipe: pick a mask token (reuse the tokenizer's mask or an unused reserved special
token, else add ``[MASK]`` and resize the embeddings, new row = mean embedding);
train with the masked-diffusion loss while annealing the attention mask from causal
to bidirectional over ``anneal_steps`` (allowed = causal OR Bernoulli(r), r =
min(1, (step+1)/anneal_steps)); keep the *shift* (logits at i predict token i+1) so
the AR head keeps its meaning. The output is an HF dir with ``config.is_causal =
False`` and ``diffusion.json``.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, Field, model_validator

from dlm_factory.digest import dir_digest, tokenizer_digest
from dlm_factory.dlm import runtime
from dlm_factory.dlm.checkpoint.io import Loaded, load_model, save_model, set_bidirectional
from dlm_factory.dlm.checkpoint.record import (
    StageKey,
    check_output,
    model_digest,
    new_record,
    source_name,
)
from dlm_factory.dlm.checkpoint.spec import DiffusionSpec
from dlm_factory.dlm.checkpoint.vocab import grow_embeddings, unused_special_tokens
from dlm_factory.dlm.data.corpus import Blocks, read_documents, source_digest, tokenize_blocks
from dlm_factory.dlm.data.users import GENERAL_TRAIN
from dlm_factory.dlm.diffusion.objective import diffusion_loss
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.paths import materialize
from dlm_factory.dlm.train.config import TrainConfig, TrainResult
from dlm_factory.dlm.train.loop import train


class ConvertConfig(BaseModel):
    """Settings of the AR -> diffusion conversion (defaults: the embedded demo)."""

    data: str = Field(GENERAL_TRAIN, description="adaptation corpus (stdlib[:split][:exclude=...], path or URL; default: the stdlib train split without the demo users' packages)")
    max_chars: int = Field(2_000_000, gt=0, description="corpus cap in characters")
    seq_len: int = Field(128, ge=8, description="training sequence length")
    shift: bool = Field(True, description="DiffuLLaMA shift: logits at i predict token i+1")
    anneal_steps: int = Field(100, ge=0, description="steps of causal -> bidirectional attention annealing (0: none)")
    mask_token: str = Field("[MASK]", description="text of the mask token when one must be added")
    eps: float = Field(1e-3, gt=0, lt=1, description="minimum masking rate")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=200, batch_size=16, lr=1e-3, warmup_steps=20),
                               description="optimisation settings")

    @model_validator(mode="after")
    def _annealing_ends(self):
        """A converted model must train fully bidirectionally for a while before it is saved as such."""
        if self.anneal_steps and self.anneal_steps >= self.train.steps:
            raise ValueError(f"anneal_steps {self.anneal_steps} must be below the training steps "
                             f"({self.train.steps}): the model would be saved bidirectional without ever "
                             "training fully bidirectional")
        return self

    def bidirectional_steps(self) -> int:
        """Steps trained with the full bidirectional mask (``anneal_rate`` is None from step anneal_steps - 1)."""
        return self.train.steps - max(self.anneal_steps - 1, 0)


def ensure_mask_token(loaded: Loaded, preferred: str = "[MASK]") -> tuple[int, str, str]:
    """Choose or create the mask token. Returns (id, text, how) with how in existing|reused|added."""
    tok = loaded.tokenizer
    if tok.mask_token is not None and tok.mask_token_id is not None:
        return tok.mask_token_id, tok.mask_token, "existing"
    spare = unused_special_tokens(tok)
    if spare:
        token_id, text = spare[0]
        tok.mask_token = text
        return token_id, text, "reused"
    rows = loaded.model.get_input_embeddings().weight.shape[0]
    if preferred in tok.get_vocab():
        raise FactoryError(f"mask token {preferred!r} already exists as an ordinary token; choose another --mask-token")
    tok.add_special_tokens({"mask_token": preferred})
    mask_id = tok.mask_token_id
    grow_embeddings(loaded, [mask_id], rows)
    return mask_id, preferred, "added"


def anneal_rate(step: int, anneal_steps: int) -> float | None:
    """Share of extra (non-causal) attention entries at ``step``; None once fully bidirectional."""
    if anneal_steps <= 0 or step + 1 >= anneal_steps:
        return None
    return (step + 1) / anneal_steps


def convert_key(base_model: str | os.PathLike, cfg: ConvertConfig) -> StageKey:
    """What decides whether a conversion output is done: the base's and the corpus's content, the config."""
    return StageKey(stage="convert", config=cfg.model_dump(),
                    inputs={"base": model_digest(materialize(base_model)), "data": source_digest(cfg.data)})


def convert(base_model: str | os.PathLike, output: str | os.PathLike, cfg: ConvertConfig, *,
            checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
            overwrite: bool = False) -> TrainResult:
    """Convert the AR checkpoint ``base_model`` into a diffusion LM saved at ``output``.

    Atomic: written to a temp dir and renamed; ``overwrite`` swaps out a model already there.
    """
    check_output(output, overwrite=overwrite)
    key = convert_key(base_model, cfg)
    loaded = load_model(base_model)
    if loaded.is_diffusion:
        raise FactoryError(f"{base_model}: already a diffusion model (has diffusion.json)")
    if cfg.seq_len > (loaded.max_positions or cfg.seq_len):
        raise FactoryError(f"--seq-len {cfg.seq_len} exceeds the model's {loaded.max_positions} positions")
    docs = read_documents(cfg.data, max_chars=cfg.max_chars)
    blocks = Blocks(tokenize_blocks(loaded.tokenizer, docs, cfg.seq_len, max_positions=loaded.max_positions))
    mask_id, mask_text, how = ensure_mask_token(loaded, cfg.mask_token)
    spec = DiffusionSpec(mask_token_id=mask_id, mask_token=mask_text, shift=cfg.shift, eps=cfg.eps,
                         tokenizer_digest=tokenizer_digest(loaded.tokenizer), source=source_name(base_model),
                         source_digest=dir_digest(loaded.path))
    model = loaded.model

    def objective(model, batch, step, generator):
        return diffusion_loss(model, spec, batch["input_ids"], anneal_r=anneal_rate(step, cfg.anneal_steps),
                              generator=generator)

    mb = cfg.train.micro_batch()
    result = train(model, lambda step, m: blocks.batch(step * cfg.train.slots() + m, mb, cfg.train.seed),
                   objective, cfg.train, checkpoint_dir=checkpoint_dir, progress=progress)
    set_bidirectional(model)
    record = new_record(key, sources={"base": spec.source, "data": cfg.data}, ar_root=spec.source,
                        runtime=runtime.current().describe(), result={"mask_token": how, "final_anneal_r": 1.0,
                                "bidirectional_steps": cfg.bidirectional_steps(), **result.summary()})
    spec.stages.append(record)
    save_model(Loaded(model, loaded.tokenizer, spec), output, overwrite=overwrite, record=record)
    return result
