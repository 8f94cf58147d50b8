"""Distillation for parallel decoding: the DLM learns its AR teacher's own greedy continuations.

Method (dParallel, Chen et al. 2025, "certainty-forcing distillation"; D2F, Wang et al. 2025,
distillation of a diffusion student from an AR teacher): prompts are windows of the corpus;
the AR teacher continues each greedily for ``length`` tokens (HF ``generate`` with its KV
cache); the DLM is trained with the masked-diffusion loss on prompt + teacher continuation,
the prompt never masked. The targets are what the teacher would say, not what the corpus
says, so the student's predictions become sharper and agree with the teacher, which is what
both parallel decoders need: more positions clear a confidence threshold per step, and more
speculative drafts are accepted by the teacher as verifier.

Two masking patterns (each row draws one):
- random (``1 - suffix_fraction`` of rows): every continuation token masked with probability
  t ~ U(eps, 1), loss weighted by 1/t (MDLM / LLaDA);
- suffix (``suffix_fraction``): the continuation from a random cut onwards is all masked,
  the pattern a semi-autoregressive block and a speculative draft present (clean prefix,
  masks after it); weighted by 1/(masked share).

Optional certainty term (dParallel): ``certainty`` x the entropy of the student's prediction
at the masked positions it already predicts correctly (argmax = teacher token), which pushes
those predictions towards certainty without rewarding confident mistakes.

The output is a DLM with the same spec (mask, shift, lineage: the verifier default stays the
original AR source) and one more stage record. Shapes: B batch, T = prompt_len + length.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from dlm_factory.dlm import runtime
from dlm_factory.dlm.checkpoint.io import Loaded, load_model, save_model
from dlm_factory.dlm.checkpoint.record import (
    StageKey,
    check_output,
    model_digest,
    new_record,
    source_name,
)
from dlm_factory.dlm.data.corpus import Blocks, read_documents, source_digest, tokenize_blocks
from dlm_factory.dlm.data.users import GENERAL_TRAIN
from dlm_factory.dlm.diffusion.objective import maskable, masked_logits, sample_t
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.paths import materialize
from dlm_factory.dlm.train.config import TrainConfig, TrainResult
from dlm_factory.dlm.train.loop import train


class DistillConfig(BaseModel):
    """Settings of the distillation (defaults: the embedded demo, a few minutes on CPU)."""

    data: str = Field(GENERAL_TRAIN, description="where the prompts come from: stdlib[:split][:exclude=...], a path or URL (default: the general model's corpus, without the demo users' packages)")
    max_chars: int = Field(2_000_000, gt=0, description="corpus cap in characters")
    prompts: int = Field(512, gt=0, description="teacher trajectories (prompts, evenly spread over the corpus)")
    prompt_len: int = Field(32, ge=2, description="prompt window in tokens (start token included)")
    length: int = Field(96, gt=0, description="tokens the teacher continues each prompt with (greedy)")
    teacher_batch: int = Field(32, gt=0, description="prompts per teacher generate() call")
    teacher_temperature: float = Field(0.0, ge=0, description="0: the teacher's greedy continuations; > 0: its samples at this temperature (keeps the student's sampling diverse)")
    suffix_fraction: float = Field(0.5, ge=0, le=1, description="share of rows masked as a suffix (clean prefix, masks after a random cut) instead of at random")
    certainty: float = Field(0.0, ge=0, description="weight of the dParallel certainty term: entropy at correctly predicted masked positions (0: off)")
    block_causal: int = Field(0, ge=0, description="0: bidirectional attention; N (experimental): block-causal adaptation with blocks of N tokens (BD3-LM objective, per-block noise; decode with cache='block', docs/sampling.md; suffix_fraction unused)")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=150, batch_size=16, lr=1e-3, warmup_steps=10),
                               description="optimisation settings")


@dataclass
class DistillResult:
    train: TrainResult
    trajectories: int
    teacher_eos_fraction: float  # share of trajectories where the teacher ended before ``length``
    output: str


def distill_key(model: str | os.PathLike, teacher: str | os.PathLike, cfg: DistillConfig) -> StageKey:
    """What decides whether a distillation output is done: student, teacher and corpus by content, the config."""
    # block_causal joins the key only when set, so bidirectional outputs made before it existed stay done
    config = cfg.model_dump(exclude=set() if cfg.block_causal else {"block_causal"})
    return StageKey(stage="distill", config=config,
                    inputs={"model": model_digest(materialize(model)), "teacher": model_digest(materialize(teacher)),
                            "data": source_digest(cfg.data)})


def teacher_trajectories(teacher: Loaded, prompts: torch.Tensor, length: int, batch_size: int,
                         temperature: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, float]:
    """prompt + the teacher's continuation [N, P + length] (greedy, or sampled at ``temperature``); one
    that ends early is filled with EOS (LLaDA's padding: the student learns where text ends). Also the
    share that ended."""
    from dlm_factory.dlm.sampling.generate import ar_generate

    eos = teacher.tokenizer.eos_token_id
    outs = ar_generate(teacher, prompts.tolist(), length, batch_size=batch_size, temperature=temperature, seed=seed)
    ended = sum(len(o) < length for o in outs)
    rows = [p + o + [eos] * (length - len(o)) for p, o in zip(prompts.tolist(), outs, strict=True)]
    return torch.tensor(rows, dtype=torch.long), ended / max(len(outs), 1)


def distill_mask(ids: torch.Tensor, spec, prompt_len: int, suffix_fraction: float, generator=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions of ``ids`` [B, T] are masked [B, T] (bool), and each row's masked share [B].

    The prompt [0, prompt_len) is never masked. A suffix row masks the continuation from a
    cut onwards (share ~ t); the others mask each continuation token with probability t.
    """
    B, T = ids.shape
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, :prompt_len] = True
    ok = maskable(ids, spec, keep)  # the continuation
    t = sample_t(B, spec.eps, generator, ids.device)
    u = torch.rand(ids.shape, generator=generator, device=ids.device)
    suffix = torch.rand(B, generator=generator, device=ids.device) < suffix_fraction
    cut = prompt_len + ((1 - t) * (T - prompt_len)).long()  # suffix rows: [cut, T) masked
    pos = torch.arange(T, device=ids.device)[None]
    masked = torch.where(suffix[:, None], pos >= cut[:, None], u < t[:, None]) & ok
    share = torch.where(suffix, masked.sum(-1) / ok.sum(-1).clamp(min=1), t).clamp(min=spec.eps)
    return masked, share


def distill_loss(model, spec, ids: torch.Tensor, prompt_len: int, cfg: DistillConfig, generator=None):
    """The distillation loss (a scalar) on teacher trajectories ``ids`` [B, T] and the tokens it covers:
    sum over masked positions of -log p(teacher token) (+ the certainty term), each row divided by its
    masked share, over the number of continuation tokens (the MDLM weighting)."""
    B = ids.shape[0]
    masked, share = distill_mask(ids, spec, prompt_len, cfg.suffix_fraction, generator)
    n_tok = (ids.shape[1] - prompt_len) * B
    noisy = ids.masked_fill(masked, spec.mask_token_id)
    logits, targets, rows = masked_logits(model, spec, noisy, masked, ids)
    per_token = F.cross_entropy(logits, targets, reduction="none")  # [N]
    if cfg.certainty > 0:  # dParallel: sharpen the positions already right
        logp = logits.log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        right = (logits.argmax(-1) == targets).float()
        per_token = per_token + cfg.certainty * right * entropy
    per_seq = torch.zeros(B, device=ids.device).index_add_(0, rows, per_token) / share
    return per_seq.sum() / max(n_tok, 1), n_tok


def distill(model: str | os.PathLike, teacher: str | os.PathLike, output: str | os.PathLike, cfg: DistillConfig, *,
            checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
            overwrite: bool = False) -> DistillResult:
    """Train the DLM ``model`` on ``teacher``'s greedy continuations of corpus prompts; save it at ``output``.

    The teacher must be causal and share the DLM's token ids (the check speculative decoding makes).
    Atomic like every stage: written to a temp dir and renamed.
    """
    from dlm_factory.dlm.sampling.speculative import check_pair

    check_output(output, overwrite=overwrite)
    if cfg.block_causal and cfg.certainty > 0:
        raise FactoryError("block-causal distillation has no certainty term (set certainty 0)")
    key = distill_key(model, teacher, cfg)
    student, ar = load_model(model), load_model(teacher)
    check_pair(student, ar, roles=("student", "teacher"))
    limit = min(p for p in (student.max_positions, ar.max_positions, 1 << 30) if p)
    if cfg.prompt_len + cfg.length > limit:
        raise FactoryError(f"prompt_len {cfg.prompt_len} + length {cfg.length} exceeds the models' {limit} positions")
    docs = read_documents(cfg.data, max_chars=cfg.max_chars)
    windows = tokenize_blocks(ar.tokenizer, docs, cfg.prompt_len)
    if len(windows) < cfg.prompts:
        raise FactoryError(f"{cfg.data}: {len(windows)} prompt windows of {cfg.prompt_len} tokens, "
                           f"fewer than the {cfg.prompts} prompts asked for (raise max_chars or lower prompts)")
    pick = torch.linspace(0, len(windows) - 1, cfg.prompts).long()  # evenly over the corpus, deterministic
    rt = runtime.current()
    ar.model.eval()
    ids, ended = teacher_trajectories(ar, windows[pick], cfg.length, cfg.teacher_batch, cfg.teacher_temperature,
                                      cfg.train.seed)
    del ar  # the teacher's weights are not needed while the student trains
    data = Blocks(ids.cpu())
    spec = student.spec

    def objective(m, batch, step, generator):
        if cfg.block_causal:  # the prompt length varies by step, so blocks are not tied to absolute positions
            from dlm_factory.dlm.diffusion.block_causal import block_diffusion_loss

            cut = int(torch.randint(cfg.prompt_len // 2, cfg.prompt_len + 1, (1,), generator=generator,
                                    device=generator.device))
            return block_diffusion_loss(m, spec, batch["input_ids"], max(cut, 1), cfg.block_causal, generator)
        return distill_loss(m, spec, batch["input_ids"], cfg.prompt_len, cfg, generator)

    mb = cfg.train.micro_batch()
    result = train(student.model, lambda step, m: data.batch(step * cfg.train.slots() + m, mb, cfg.train.seed),
                   objective, cfg.train, checkpoint_dir=checkpoint_dir, progress=progress)
    record = new_record(key, sources={"model": source_name(model), "teacher": source_name(teacher), "data": cfg.data},
                        ar_root=spec.source, runtime=rt.describe(),
                        result={"trajectories": len(ids), "teacher_eos_fraction": ended, **result.summary()})
    spec.stages.append(record)
    save_model(Loaded(student.model, student.tokenizer, spec), output, overwrite=overwrite, record=record)
    return DistillResult(train=result, trajectories=len(ids), teacher_eos_fraction=ended,
                         output=os.fspath(Path(output)))
