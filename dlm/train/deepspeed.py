"""DeepSpeed for the shared training loop: ZeRO configs, the engine, and consolidation of the weights.

One process or many (``torchrun --nproc_per_node N``, or an Indexed Job per node, see
tasks/kubernetes.py); on CPU with the gloo backend (``DS_ACCELERATOR=cpu``), on GPUs
with NCCL. ZeRO (Rajbhandari et al. 2020) partitions across the data-parallel ranks:
stage 1 the optimizer states, stage 2 also the gradients, stage 3 also the parameters;
``offload`` keeps the optimizer states (and, at stage 3, the parameters) in host memory.

After training, ``consolidate`` gathers the full fp32 weights from the ranks' partitions
(DeepSpeed's ``safe_get_full_fp32_param``: the optimizer's fp32 master copy, so a bf16
run saves its master weights, not their bf16 rounding) and leaves an ordinary torch
module behind on every rank: the equivalent of ``zero_to_fp32`` in memory, which also
works when the ranks' checkpoint shards live on different machines.
``shards_state_dict`` is the on-disk route (``zero_to_fp32``) for a checkpoint's shards.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.runtime import Runtime
from dlm_factory.dlm.train.config import TrainConfig

log = logging.getLogger(__name__)

ZERO_STAGES = (0, 1, 2, 3)  # 0: plain data parallelism through DeepSpeed (no partitioning)


def zero_config(stage: int, *, offload: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of ZeRO ``stage`` (optionally with CPU offload); micro-batch sizes come from TrainConfig."""
    if stage not in ZERO_STAGES:
        raise FactoryError(f"ZeRO stage {stage} is not supported (choose one of {', '.join(map(str, ZERO_STAGES))})")
    zero: dict[str, Any] = {"stage": stage}
    if offload:
        if stage == 0:
            raise FactoryError("CPU offload needs ZeRO stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config: dict[str, Any] = {"zero_optimization": zero, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if offload:
        # The loop's AdamW stays the optimizer (its math is the reference the tests compare with);
        # DeepSpeed otherwise insists on its CPU Adam under offload.
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def load_config(spec: str | dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config given inline or as a JSON file path (a copy: the engine's defaults are added to it)."""
    if isinstance(spec, dict):
        return json.loads(json.dumps(spec))
    try:
        return json.loads(Path(spec).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FactoryError(f"{spec}: unreadable DeepSpeed config ({e})") from e


def import_deepspeed(rt: Runtime):
    """``deepspeed`` with the accelerator of the runtime (``DS_ACCELERATOR=cpu`` on CPU: gloo)."""
    if rt.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise FactoryError(f"deepspeed is not importable: {e}") from e
    return deepspeed


def deepspeed_engine(model, optimizer, scheduler, cfg: TrainConfig, rt: Runtime):
    """Wrap the model in a DeepSpeed engine (one process unless launched by torchrun/deepspeed).

    A plain process gets the single-rank rendezvous variables DeepSpeed insists on.
    """
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}.items():
        os.environ.setdefault(key, value)
    deepspeed = import_deepspeed(rt)
    ds_config = load_config(cfg.deepspeed)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in ZERO_STAGES:
        raise FactoryError(f"ZeRO stage {stage} is not supported (choose one of {', '.join(map(str, ZERO_STAGES))})")
    ds_config.setdefault("train_micro_batch_size_per_gpu", cfg.micro_batch(rt.world_size))
    ds_config.setdefault("gradient_accumulation_steps", cfg.grad_accum)
    ds_config.setdefault("gradient_clipping", cfg.max_grad_norm)
    if rt.precision(cfg.precision) == "bf16":
        ds_config.setdefault("bf16", {"enabled": True})
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def zero_stage(engine) -> int:
    """The ZeRO stage an engine runs (0 without partitioning)."""
    return int(engine.zero_optimization_stage()) if engine.zero_optimization() else 0


@torch.no_grad()
def consolidate(engine, model) -> None:
    """Gather the full fp32 weights into ``model`` on every rank and release the engine (a collective).

    Afterwards ``model`` is an ordinary module again (ZeRO-3 hooks removed, full tensors in
    place of partitions), ready for evaluation and ``save_model``.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    full = {}
    for name, p in model.named_parameters():  # shared (tied) parameters appear once
        value = safe_get_full_fp32_param(p)  # collective at ZeRO 1-3; None where the module holds fp32 itself
        if value is None:
            if hasattr(p, "ds_id"):
                raise FactoryError(f"cannot gather ZeRO-3 parameter {name}")
            value = p.data
        full[name] = value.detach().to(torch.float32).clone()
    engine.destroy()  # removes the ZeRO-3 module hooks
    for name, p in model.named_parameters():
        p.data = full[name].to(p.device)
        for attr in ("ds_tensor", "ds_numel", "ds_shape", "ds_status", "ds_id"):
            if hasattr(p, attr):
                delattr(p, attr)  # an ordinary parameter again (and the partition's memory is freed)
    for buf_name, buf in model.named_buffers():  # bf16 runs cast the buffers; the weights policy is fp32
        if buf.is_floating_point() and buf.dtype != torch.float32:
            log.warning("buffer %s was cast to %s by DeepSpeed; restored to fp32", buf_name, buf.dtype)
            buf.data = buf.data.float()


def shards_state_dict(checkpoint: str | os.PathLike, tag: str = "ds") -> dict[str, torch.Tensor]:
    """The fp32 weights of a DeepSpeed checkpoint, consolidated from its per-rank shards (``zero_to_fp32``).

    Reads every rank's shard from ``checkpoint/<tag>``: on a cluster without shared storage,
    collect the shards first (``consolidate`` gathers in memory instead).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(os.fspath(checkpoint), tag=tag)
    except (FileNotFoundError, ValueError) as e:
        raise FactoryError(f"{checkpoint}: cannot consolidate the DeepSpeed shards ({e})") from e
