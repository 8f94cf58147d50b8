"""The one training loop of the factory (bootstrap, conversion, SFT, scaling, specialists).

A stage supplies a model, a ``batch_fn(step, micro) -> dict`` (a pure function of
the step, see dlm.data.Blocks) and an ``objective(model, batch, step, generator)
-> (loss, n_tokens)``. The loop adds gradient accumulation, fp32/bf16 autocast, a
cosine schedule with warmup, gradient clipping, loss and tokens/s logging, an
optional DeepSpeed engine, and checkpoint/resume (model, optimizer, scheduler,
RNG, step) so an evicted pod loses at most one checkpoint interval.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from dlm.errors import FactoryError

log = logging.getLogger("dlm.train")

Objective = Callable[..., tuple[torch.Tensor, int]]
BatchFn = Callable[[int, int], dict[str, torch.Tensor]]


class TrainConfig(BaseModel):
    """Optimisation settings shared by every stage."""

    steps: int = Field(200, gt=0, description="optimizer steps")
    batch_size: int = Field(16, gt=0, description="sequences per optimizer step")
    grad_accum: int = Field(1, gt=0, description="micro-batches per step (batch_size must divide evenly)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(20, ge=0, description="linear warmup steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of the peak (cosine)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 uses autocast; weights stay fp32")
    seed: int = Field(0, description="seeds init, batches and masking")
    log_every: int = Field(10, gt=0, description="steps between log lines")
    checkpoint_every: int = Field(50, gt=0, description="steps between checkpoints (when a checkpoint dir is set)")
    keep_checkpoints: int = Field(2, gt=0, description="checkpoints kept on disk")
    deepspeed: str | None = Field(None, description="path to a DeepSpeed JSON config; None trains with plain torch")

    def micro_batch(self) -> int:
        if self.batch_size % self.grad_accum:
            raise FactoryError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        return self.batch_size // self.grad_accum


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    tokens_per_s: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr: linear warmup, then cosine to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + micro)


def train(model, batch_fn: BatchFn, objective: Objective, cfg: TrainConfig, *,
          checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
          on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps (resuming from ``checkpoint_dir`` if it has one)."""
    cfg.micro_batch()  # validates batch_size % grad_accum early
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg))
    engine = _deepspeed_engine(model, optimizer, scheduler, cfg) if cfg.deepspeed else None
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    start = _resume(ckpt, model, optimizer, scheduler, cfg, engine) if ckpt else 0

    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.precision == "bf16" and engine is None else nullcontext()
    losses: list[tuple[int, float]] = []
    tokens, t0, last = 0, time.perf_counter(), float("nan")
    bar = _progress(progress, start, cfg.steps)
    for step in range(start, cfg.steps):
        step_loss = 0.0
        for m in range(cfg.grad_accum):
            batch = batch_fn(step, m)
            with autocast:
                loss, n = objective(model, batch, step, _step_generator(cfg.seed, step, m))
            if not torch.isfinite(loss):
                raise FactoryError(f"loss became {loss.item()} at step {step}; lower the learning rate")
            if engine is not None:
                engine.backward(loss)
                engine.step()
            else:
                (loss / cfg.grad_accum).backward()
            step_loss += float(loss.detach()) / cfg.grad_accum
            tokens += n
        if engine is None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        last = step_loss
        losses.append((step + 1, step_loss))
        elapsed = time.perf_counter() - t0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            record = {"step": step + 1, "loss": round(step_loss, 4), "lr": scheduler.get_last_lr()[0],
                      "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1)}
            log.info("step %(step)d loss %(loss).4f lr %(lr).2e tok/s %(tokens_per_s).0f", record)
            if on_log:
                on_log(record)
        if ckpt and ((step + 1) % cfg.checkpoint_every == 0) and step + 1 < cfg.steps:
            _save_checkpoint(ckpt, step + 1, model, optimizer, scheduler, cfg, engine)
    if bar is not None:
        bar.close()
    model.eval()
    elapsed = time.perf_counter() - t0
    return TrainResult(steps=cfg.steps, final_loss=last, tokens_per_s=tokens / max(elapsed, 1e-9),
                       losses=losses, resumed_from=start, seconds=elapsed)


def _progress(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False)


# ----------------------------------------------------------------------------- checkpoints
#
# <dir>/step-000050/{model.safetensors, optimizer.pt, state.json}; a checkpoint is
# complete once state.json exists (written last, then the dir is renamed in place).


def _config_key(cfg: TrainConfig) -> dict:
    # Fields that may change across a resume without invalidating it.
    return cfg.model_dump(exclude={"log_every", "checkpoint_every", "keep_checkpoints"})


def _save_checkpoint(root: Path, step: int, model, optimizer, scheduler, cfg: TrainConfig, engine) -> None:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if engine is not None:
        engine.save_checkpoint(str(tmp), tag="ds")
    else:
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(_untie(state), tmp / "model.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    torch.save({"cpu_rng": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": _config_key(cfg)}, indent=2))
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s", final)


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings): store independent copies."""
    seen: dict[int, str] = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            state[k] = v.clone()
        seen[ptr] = k
    return state


def latest_checkpoint(root: Path) -> Path | None:
    done = [p for p in sorted(root.glob("step-*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def _resume(root: Path, model, optimizer, scheduler, cfg: TrainConfig, engine) -> int:
    path = latest_checkpoint(root) if root.exists() else None
    if path is None:
        return 0
    state = json.loads((path / "state.json").read_text())
    if state["config"] != _config_key(cfg):
        raise FactoryError(f"{root}: checkpoints were written with a different training config; "
                           "use the same config or a new checkpoint dir")
    if engine is not None:
        engine.load_checkpoint(str(path), tag="ds")
    else:
        weights = load_file(path / "model.safetensors")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if k not in _tied_names(model)]:
            raise FactoryError(f"{path}: checkpoint does not match the model")
        opt = torch.load(path / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["cpu_rng"])
    log.info("resumed from %s", path)
    return int(state["step"])


def _tied_names(model) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if not isinstance(keys, dict) else set(keys.keys())


# ----------------------------------------------------------------------------- deepspeed


def _deepspeed_engine(model, optimizer, scheduler, cfg: TrainConfig):
    """Wrap the model in a DeepSpeed engine (single process unless launched by torchrun/deepspeed)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}.items():
        os.environ.setdefault(key, value)
    try:
        import deepspeed
    except ImportError as e:
        raise FactoryError(f"deepspeed is not importable: {e}") from e
    try:
        ds_config = json.loads(Path(cfg.deepspeed).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FactoryError(f"{cfg.deepspeed}: unreadable DeepSpeed config ({e})") from e
    ds_config.setdefault("train_micro_batch_size_per_gpu", cfg.micro_batch())
    ds_config.setdefault("gradient_accumulation_steps", cfg.grad_accum)
    ds_config.setdefault("gradient_clipping", cfg.max_grad_norm)
    if cfg.precision == "bf16":
        ds_config.setdefault("bf16", {"enabled": True})
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine
