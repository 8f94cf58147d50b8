"""Training checkpoints, complete only with a commit marker written last.

Layout of one checkpoint::

    <dir>/step-000050/
        model.safetensors, optimizer.pt   plain torch: weights, optimizer and scheduler (rank 0)
        ds/...                            DeepSpeed: every rank's shard (model/optimizer partitions,
                                          scheduler), written by ``engine.save_checkpoint``
        rng-rank00000.pt, ...             each rank's RNG state (CPU and CUDA)
        state.json                        step, world size, the training config
        COMMITTED                         written last, by rank 0, after every rank's files are down

Order of a save: rank 0 makes ``.tmp-step-*``; barrier; every rank writes its shard and RNG;
barrier (all shards are down); rank 0 writes ``state.json`` and then the marker, then renames
the dir to ``step-*``. A checkpoint without the marker, whatever its name (a crash between the
shards and the marker, a copy or upload cut short), is never resumed from. The directory must
be shared by the ranks (one machine, or a volume every node mounts).

Resume restores model, optimizer, scheduler, each rank's RNG and the step; the data
position is the step itself (batches are a pure function of it). The ranks first agree on the
checkpoint; one written by another number of ranks, or with another config, is refused.
Plain-torch optimizer state is loaded with ``torch.load(weights_only=True)``, which refuses
arbitrary pickles.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.runtime import Runtime
from dlm_factory.dlm.train.config import TrainConfig

log = logging.getLogger(__name__)

COMMIT_MARKER = "COMMITTED"


def _config_key(cfg: TrainConfig) -> dict:
    # Fields that may change across a resume without invalidating it.
    return cfg.model_dump(exclude={"log_every", "checkpoint_every", "keep_checkpoints"})


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, cfg: TrainConfig, engine, rt: Runtime) -> None:
    """Write checkpoint ``step`` (a collective under DeepSpeed: every rank calls it)."""
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if rt.master:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    rt.barrier()
    if engine is not None:
        engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)  # collective: every rank writes its shard
    rng = {"cpu_rng": torch.get_rng_state()}
    if rt.device.type == "cuda":
        rng["cuda_rng"] = torch.cuda.get_rng_state(rt.device)
    torch.save(rng, tmp / _rng_file(rt.rank))
    rt.barrier()  # every rank's shard and RNG are down
    if rt.master:
        if engine is None:
            state = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
            save_file(_untie(state), tmp / "model.safetensors")
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": rt.world_size,
                                                    "deepspeed": engine is not None,
                                                    "config": _config_key(cfg)}, indent=2))
        write_marker(tmp, {"step": step, "world_size": rt.world_size})
        if final.exists():  # an uncommitted leftover of a crashed run (never resumed from): replaced
            shutil.rmtree(final)
        tmp.rename(final)
        for old in committed(root)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s", final)
    rt.barrier()  # nobody starts the next step's save (or reads this one) before the rename


def write_marker(directory: Path, content: dict) -> None:
    """The commit marker of ``directory``: written last and flushed to disk, after everything it vouches for."""
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    path = directory / COMMIT_MARKER
    with open(path, "w") as f:
        f.write(json.dumps({**content, "files": len(files)}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def is_committed(path: Path) -> bool:
    """Whether a checkpoint dir is complete (its commit marker is there)."""
    return (path / COMMIT_MARKER).is_file()


def committed(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (dirs without the marker are ignored)."""
    if not root.is_dir():
        return []
    return [p for p in sorted(root.glob("step-*")) if p.is_dir() and is_committed(p)]


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
    """The newest complete (committed) checkpoint under ``root``, or None."""
    done = committed(root)
    return done[-1] if done else None


def resume(root: Path, model, optimizer, scheduler, cfg: TrainConfig, engine, rt: Runtime) -> int:
    """Restore the newest committed checkpoint under ``root`` into the live objects; returns its step (0: none)."""
    path = latest_checkpoint(root)
    step = int(path.name.removeprefix("step-")) if path is not None else 0
    if not rt.all_agree(step):
        raise FactoryError(f"{root}: the ranks see different checkpoints; the checkpoint dir must be shared by all ranks")
    if path is None:
        return 0
    state = json.loads((path / "state.json").read_text())
    if state["config"] != _config_key(cfg):
        raise FactoryError(f"{root}: checkpoints were written with a different training config; "
                           "use the same config or a new checkpoint dir")
    written_by = int(state.get("world_size", 1))
    if engine is not None and written_by != rt.world_size:
        raise FactoryError(f"{path}: written by {written_by} process(es), resumed with {rt.world_size}; "
                           "use the same number of processes or a new checkpoint dir")
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
    rng_path = path / _rng_file(rt.rank)
    if rng_path.is_file():
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu_rng"])
        if "cuda_rng" in rng and rt.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda_rng"], rt.device)
    log.info("resumed from %s", path)
    return step


def _tied_names(model) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if not isinstance(keys, dict) else set(keys.keys())
