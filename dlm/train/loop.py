"""The one training loop of the factory (bootstrap, conversion, SFT, scaling, specialists).

A stage supplies a model, a ``batch_fn(step, micro) -> dict`` (a pure function of
the step, see dlm.data.corpus.Blocks) and an ``objective(model, batch, step,
generator) -> (loss, n_tokens)``. The loop adds the runtime (model, batches and the
masking generator on ``dlm.runtime``'s device, the precision policy's autocast),
gradient accumulation, a cosine schedule with warmup, gradient clipping, loss and
tokens/s logging, an optional DeepSpeed engine, and checkpoint/resume (model,
optimizer, scheduler, RNG, step) so an evicted pod loses at most one checkpoint
interval. Only rank 0 logs and writes checkpoints.

Data parallelism (DeepSpeed, one process per rank): the global batch of a step is cut
into ``cfg.slots()`` micro-batches; rank r runs slots r, r + world, ... with the masking
generator of its slot (``step_generator(seed, step, slot)``). So 2 ranks with micro-batch b
train on exactly the rows and noise of 1 process with ``grad_accum = 2`` and micro-batch b:
their loss curves differ only by the order of floating-point sums (the tests hold them to
1e-4). The logged loss and token counts are summed over the ranks, so the curve is the
global batch's. At the end the weights are consolidated onto every rank
(``dlm.train.deepspeed.consolidate``): the caller gets an ordinary module back.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from dlm_factory.dlm import runtime
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.train.checkpoints import resume, save_checkpoint
from dlm_factory.dlm.train.config import BatchFn, Objective, TrainConfig, TrainResult, lr_at
from dlm_factory.dlm.train.deepspeed import consolidate, deepspeed_engine

log = logging.getLogger(__name__)


def step_generator(rt: runtime.Runtime, seed: int, step: int, slot: int) -> torch.Generator:
    """The masking generator of one micro-batch: a pure function of (seed, step, slot), so resume is
    exact and the noise of a slot does not depend on which rank runs it."""
    return rt.generator(seed * 1_000_003 + step * 1_009 + slot)


def train(model, batch_fn: BatchFn, objective: Objective, cfg: TrainConfig, *,
          checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
          on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps (resuming from ``checkpoint_dir`` if it has one)."""
    rt = runtime.current()
    cfg.micro_batch(rt.world_size)  # validates batch_size % (grad_accum * world) early
    if rt.world_size > 1 and not cfg.deepspeed:
        raise FactoryError(f"{rt.world_size} processes need DeepSpeed for data parallelism "
                           "(set a DeepSpeed config, e.g. ZeRO stage 0-3)")
    rt.init_distributed()
    torch.manual_seed(cfg.seed)
    model.to(rt.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg))
    engine = deepspeed_engine(model, optimizer, scheduler, cfg, rt) if cfg.deepspeed else None
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    start = resume(ckpt, model, optimizer, scheduler, cfg, engine, rt) if ckpt else 0

    model.train()
    autocast = rt.autocast(cfg.precision) if engine is None else nullcontext()  # DeepSpeed: its bf16 config
    losses: list[tuple[int, float]] = []
    tokens, t0, last = 0, time.perf_counter(), float("nan")
    bar = _progress(progress and rt.master, start, cfg.steps)
    world = rt.world_size
    for step in range(start, cfg.steps):
        step_loss, step_tokens = 0.0, 0
        for m in range(cfg.grad_accum):
            slot = m * world + rt.rank
            batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch_fn(step, slot).items()}
            with autocast:
                loss, n = objective(model, batch, step, step_generator(rt, cfg.seed, step, slot))
            if not torch.isfinite(loss):
                raise FactoryError(f"loss became {loss.item()} at step {step}; lower the learning rate")
            if engine is not None:
                engine.backward(loss)
                engine.step()
            else:
                (loss / cfg.grad_accum).backward()
            step_loss += float(loss.detach()) / cfg.grad_accum
            step_tokens += n
        if engine is None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if world > 1:  # the global batch's loss: the mean over ranks of equal-sized shards
            total_loss, step_tokens = rt.all_sum([step_loss, step_tokens])
            step_loss, step_tokens = total_loss / world, int(step_tokens)
        tokens += step_tokens
        last = step_loss
        losses.append((step + 1, step_loss))
        elapsed = time.perf_counter() - t0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
        if rt.master and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            record = {"step": step + 1, "loss": round(step_loss, 4), "lr": scheduler.get_last_lr()[0],
                      "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1)}
            log.info("step %(step)d loss %(loss).4f lr %(lr).2e tok/s %(tokens_per_s).0f", record)
            if on_log:
                on_log(record)
        if ckpt and ((step + 1) % cfg.checkpoint_every == 0) and step + 1 < cfg.steps:
            save_checkpoint(ckpt, step + 1, model, optimizer, scheduler, cfg, engine, rt)
    if bar is not None:
        bar.close()
    if engine is not None:
        consolidate(engine, model)  # full fp32 weights on every rank, an ordinary module again
    model.eval()
    elapsed = time.perf_counter() - t0
    return TrainResult(steps=cfg.steps, final_loss=last, tokens_per_s=tokens / max(elapsed, 1e-9),
                       losses=losses, resumed_from=start, seconds=elapsed)


def _progress(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False)
