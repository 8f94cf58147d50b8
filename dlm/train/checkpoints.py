"""Training checkpoints: <dir>/step-000050/{model.safetensors, optimizer.pt, rng.pt, state.json}.

A checkpoint is complete once its dir is renamed from ``.tmp-step-*`` to ``step-*``
(``state.json`` is written last inside it), so a run killed mid-write resumes from the
previous one. Rank 0 creates, finishes and prunes checkpoints; under DeepSpeed every
rank writes its own shard in between (barriers on both sides). Resume restores model,
optimizer, scheduler, RNG (CPU and CUDA) and step; optimizer state is loaded with
``torch.load(weights_only=True)``, which refuses arbitrary pickles.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.runtime import Runtime
from dlm_factory.dlm.train.config import TrainConfig

log = logging.getLogger(__name__)


def _config_key(cfg: TrainConfig) -> dict:
    # Fields that may change across a resume without invalidating it.
    return cfg.model_dump(exclude={"log_every", "checkpoint_every", "keep_checkpoints"})


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, cfg: TrainConfig, engine, rt: Runtime) -> None:
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if rt.master:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    rt.barrier()
    if engine is not None:
        engine.save_checkpoint(str(tmp), tag="ds")  # collective: every rank writes its shard
    rt.barrier()
    if not rt.master:
        return
    if engine is None:
        state = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
        save_file(_untie(state), tmp / "model.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    rng = {"cpu_rng": torch.get_rng_state()}
    if rt.device.type == "cuda":
        rng["cuda_rng"] = torch.cuda.get_rng_state(rt.device)
    torch.save(rng, tmp / "rng.pt")
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
    """The newest complete checkpoint under ``root``, or None."""
    done = [p for p in sorted(root.glob("step-*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def resume(root: Path, model, optimizer, scheduler, cfg: TrainConfig, engine) -> int:
    """Restore the newest checkpoint under ``root`` into the live objects; returns its step (0: none)."""
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
        device = next(model.parameters()).device
        weights = load_file(path / "model.safetensors", device=str(device))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if k not in _tied_names(model)]:
            raise FactoryError(f"{path}: checkpoint does not match the model")
        opt = torch.load(path / "optimizer.pt", weights_only=True, map_location=device)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu_rng"])
    if "cuda_rng" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda_rng"])
    log.info("resumed from %s", path)
    return int(state["step"])


def _tied_names(model) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if not isinstance(keys, dict) else set(keys.keys())
