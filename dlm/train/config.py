"""Optimisation settings and results shared by every stage's training run."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from dlm_factory.dlm.errors import FactoryError

Objective = Callable[..., tuple[torch.Tensor, int]]  # (model, batch, step, generator) -> (loss, tokens)
# (step, slot) -> batch on the CPU. ``slot`` is the global micro-batch index of the step, in
# [0, grad_accum * world_size): micro-batch m of rank r is slot m * world_size + r (see ``TrainConfig.slots``).
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
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU (dlm.runtime); bf16: autocast, weights stay fp32")
    seed: int = Field(0, description="seeds init, batches and masking")
    log_every: int = Field(10, gt=0, description="steps between log lines")
    checkpoint_every: int = Field(50, gt=0, description="steps between checkpoints (when a checkpoint dir is set)")
    keep_checkpoints: int = Field(2, gt=0, description="checkpoints kept on disk")
    deepspeed: str | dict[str, Any] | None = Field(None, description="DeepSpeed config: a JSON file path or the config itself (dlm.train.deepspeed.zero_config); None trains with plain torch in one process")

    def slots(self, world: int | None = None) -> int:
        """Micro-batches per optimizer step across all ranks (``grad_accum`` per rank).

        The global batch of a step is cut into this many slots of ``micro_batch(world)`` rows;
        rank r runs slots r, r + world, ... A batch function that serves slot k of step s
        from rows ``(s * slots + k) * micro`` onwards gives every world size the same global
        batch, and one process with ``grad_accum = world * a`` the very same slots.
        """
        return self.grad_accum * _world(world)

    def micro_batch(self, world: int | None = None) -> int:
        """Rows per micro-batch of one rank: batch_size / (grad_accum * world size)."""
        slots = self.slots(world)
        if self.batch_size % slots:
            if slots == self.grad_accum:
                raise FactoryError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
            raise FactoryError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum} "
                               f"x {slots // self.grad_accum} processes")
        return self.batch_size // slots


def _world(world: int | None) -> int:
    if world is not None:
        return world
    from dlm_factory.dlm import runtime

    return runtime.current().world_size


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    tokens_per_s: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        """The figures a stage record keeps (the loss curve stays out: it is in the logs)."""
        return {"steps": self.steps, "final_loss": self.final_loss, "tokens_per_s": round(self.tokens_per_s, 1),
                "resumed_from": self.resumed_from, "seconds": round(self.seconds, 1)}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr: linear warmup, then cosine to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
