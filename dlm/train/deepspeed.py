"""DeepSpeed engine for the shared training loop (ZeRO stages from a JSON config)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.runtime import Runtime
from dlm_factory.dlm.train.config import TrainConfig


def deepspeed_engine(model, optimizer, scheduler, cfg: TrainConfig, rt: Runtime):
    """Wrap the model in a DeepSpeed engine (one process unless launched by torchrun/deepspeed).

    The accelerator follows the runtime: ``DS_ACCELERATOR=cpu`` (gloo) on CPU. A plain
    process gets the single-rank rendezvous variables DeepSpeed insists on.
    """
    if rt.device.type == "cpu":
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
    if rt.precision(cfg.precision) == "bf16":
        ds_config.setdefault("bf16", {"enabled": True})
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine
