"""Scaling: a size ladder of DLMs (and the same ladder trained autoregressively), and their scaling laws.

SSD-2 (Han et al. 2023) scaled its diffusion LM 0.4B -> 13B; SMDM (Nie et al. 2024) fitted
L(C) = a C^-b + c to masked diffusion and AR models trained alike and found the DLM needs
about 16x the AR compute for the same loss. The factory does it to its own models:

1. **Plan** (``plan_ladder``; everything checked before anything is written). A ladder is
   a comma-separated list of rungs, each ``LAYERSxHIDDEN`` (the given model grown to that
   shape, function-preserving: dlm.stages.grow) or a checkpoint (dir or URL: several AR
   checkpoints of one family; their tokenizers must match the given model's). Parameters
   must strictly increase. Every rung gets the same compute budget C = 6 N D (N: the
   parameters that cost compute per token, D: tokens), so smaller rungs see more tokens;
   the memory a rung needs is estimated (dlm.train.memory) and a rung that cannot fit is
   refused with the numbers.
2. **Train** each rung with each objective (``run_rung``): the diffusion rung is the grown
   AR model converted as in dlm.stages.convert (mask token, attention annealing over
   ``anneal_fraction`` of its steps, shift) or the grown DLM trained on; the AR rung is the
   same grown model trained with the AR loss. Under DeepSpeed (``zero``) a rung runs as a
   ``torchrun`` job of ``nproc`` processes (``python -m dlm_factory.dlm.stages.scale JOB``),
   checkpointing so a killed rung resumes; its output is a consolidated HF dir with its loss
   curve and held-out ELBO/NLL in the stage record.
3. **Fit** (``summarize``): dlm.evaluation.scaling over the rungs' curves: both laws, the
   compute multiplier, the compute-optimal size for a target budget, and a PNG.

``init="scratch"`` re-initialises every rung's architecture at random instead (both
objectives from scratch, the comparison SMDM makes); growth and conversion are then skipped.

Output layout (local dir, or a URL: staged locally and uploaded, the record last)::

    <output>/plan.json                 the validated plan
    <output>/rungs/<rung>/<objective>/ HF dir + stage.json (curve, eval, params, tokens, FLOPs)
    <output>/scaling.json, scaling.png, REPORT.md
    <output>/stage.json                the scale record, written last
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from dlm_factory.dlm.data.users import GENERAL_TRAIN
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.evaluation.corpus import EvalConfig
from dlm_factory.dlm.train.config import TrainConfig

log = logging.getLogger(__name__)

Objective = Literal["diffusion", "ar"]
_NAME = re.compile(r"[^a-z0-9._-]+")


class ScaleConfig(BaseModel):
    """Settings of the scaling stage (defaults: a small ladder the embedded demo can run on CPU)."""

    ladder: str = Field("2x64,2x128,4x128", description="rungs, comma-separated: LAYERSxHIDDEN (grow the model) or checkpoint dirs/URLs (one family); parameters must increase")
    data: str = Field(GENERAL_TRAIN, description="training corpus (stdlib[:split][:exclude=...], path or URL; default: the general model's, without the demo users' packages)")
    max_chars: int = Field(3_000_000, gt=0, description="corpus cap in characters")
    seq_len: int = Field(128, ge=8, description="training sequence length")
    init: Literal["grow", "scratch"] = Field("grow", description="grow: start each rung from the model (grown) or the checkpoint; scratch: random init of each rung's architecture")
    objectives: list[Objective] = Field(default_factory=lambda: ["diffusion", "ar"], min_length=1, description="objectives each rung is trained with")
    budget: float = Field(2e12, gt=0, description="training compute per rung and objective in FLOPs (C = 6 N D): every rung gets the same")
    min_steps: int = Field(20, gt=0, description="a rung the budget gives fewer optimizer steps is refused")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="linear warmup as a share of each rung's steps")
    anneal_fraction: float = Field(0.2, ge=0, lt=1, description="causal -> bidirectional annealing as a share of the steps (DLM rungs converted from AR)")
    shift: bool = Field(True, description="DiffuLLaMA shift for DLM rungs converted from AR")
    zero: int | None = Field(2, description="DeepSpeed ZeRO stage 0-3 (each rung runs under torchrun); None: plain torch, one process, in this process")
    offload: bool = Field(False, description="ZeRO CPU offload of the optimizer (and parameters at stage 3)")
    nproc: int = Field(1, ge=1, description="processes per rung (data parallel); at most the CPU cores or GPUs here")
    memory_limit_gb: float | None = Field(None, gt=0, description="memory a rung may use (per GPU, or the host on CPU); None: what is free now")
    target_compute: float | None = Field(None, gt=0, description="budget for the compute-optimal size (None: 10x the ladder's budget)")
    curve_bins: int = Field(12, ge=4, description="log-spaced compute bins per loss curve for the fits")
    skip_fraction: float = Field(0.1, ge=0, lt=1, description="early share of each curve left out of the fits (warmup transient)")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=1, batch_size=16, lr=2e-3, warmup_steps=0, log_every=50, checkpoint_every=100),
                               description="optimisation settings; steps and warmup are set per rung from the budget")
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig(mc_samples=32, max_windows=32),
                             description="held-out evaluation of every rung (ELBO / exact NLL)")

    @model_validator(mode="after")
    def _check(self):
        from dlm_factory.dlm.train.deepspeed import ZERO_STAGES

        if self.zero is not None and self.zero not in ZERO_STAGES:
            raise ValueError(f"ZeRO stage {self.zero} is not supported (choose one of {', '.join(map(str, ZERO_STAGES))})")
        if self.zero is None and self.nproc > 1:
            raise ValueError("more than one process needs DeepSpeed (set a ZeRO stage)")
        if self.offload and (self.zero is None or self.zero == 0):
            raise ValueError("CPU offload needs ZeRO stage 1, 2 or 3")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError("objectives repeat")
        return self


class Rung(BaseModel):
    """One planned rung."""

    index: int
    name: str
    kind: Literal["grow", "checkpoint", "scratch"]
    source: str = Field(description="where the weights come from (the model to grow, or the checkpoint)")
    shape: str | None = Field(None, description="LAYERSxHIDDEN to grow or build; None: the checkpoint as it is")
    params: int
    compute_params: int = Field(description="N in C = 6 N D: all parameters but the input embedding")
    layers: int
    hidden: int
    heads: int
    vocab: int
    steps: int
    warmup_steps: int
    anneal_steps: int
    tokens: int
    flops: float
    memory: dict


class Plan(BaseModel):
    model: str
    ar_model: str | None = Field(description="the AR checkpoint the AR-objective rungs start from")
    rungs: list[Rung]
    tokens_per_step: int
    digests: dict[str, str]


class RungJob(BaseModel):
    """Everything a rung worker needs (written as JSON for ``python -m dlm_factory.dlm.stages.scale``)."""

    rung: Rung
    objective: Objective
    config: ScaleConfig
    key: dict = Field(description="the rung's StageKey (planned by the parent: workers do not re-plan)")
    source: str
    output: str
    checkpoint_dir: str | None = Field(None, description="None: $FACTORY_HOME/cache/checkpoints/scale-<key digest> where the worker runs")
    error_file: str | None = None
    overwrite: bool = False


# --- planning -------------------------------------------------------------------------------------------


def machine_procs() -> tuple[int, str]:
    """(processes this machine allows for one rung, what limits it): GPUs where CUDA is used, else CPU cores."""
    from dlm_factory.dlm import runtime

    rt = runtime.current()
    if rt.device.type == "cuda":
        import torch

        return torch.cuda.device_count(), "GPUs"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, "CPU cores"


def parse_ladder(spec: str) -> list[str]:
    """The rung entries of a ladder spec (shapes stay text; FactoryError on an empty or repeated entry)."""
    items = [s.strip() for s in spec.split(",")]
    if not spec.strip() or any(not s for s in items):
        raise FactoryError(f"ladder {spec!r}: expected comma-separated rungs (LAYERSxHIDDEN or checkpoint dirs)")
    if len(set(items)) != len(items):
        raise FactoryError(f"ladder {spec!r}: a rung appears twice")
    return items


def is_shape(entry: str) -> bool:
    return re.fullmatch(r"\s*\d+\s*x\s*\d+\s*", entry) is not None


def _rung_name(index: int, label: str) -> str:
    return f"r{index}-" + (_NAME.sub("-", label.lower()).strip("-.")[:40] or "model")


def plan_ladder(model: str | os.PathLike, cfg: ScaleConfig) -> Plan:
    """Check everything and plan every rung; writes nothing. FactoryError (one line) on bad input."""
    from transformers import AutoConfig

    from dlm_factory.digest import tokenizer_digest
    from dlm_factory.dlm import runtime
    from dlm_factory.dlm.checkpoint.io import check_causal_lm
    from dlm_factory.dlm.checkpoint.record import lineage_root, model_digest
    from dlm_factory.dlm.checkpoint.spec import SPEC_FILE
    from dlm_factory.dlm.data.corpus import source_digest
    from dlm_factory.dlm.paths import materialize
    from dlm_factory.dlm.stages.bootstrap import load_tokenizer
    from dlm_factory.dlm.stages.grow import Shape, config_params, grown_config, model_shape
    from dlm_factory.dlm.train.memory import estimate_memory

    rt = runtime.current()
    limit, what = machine_procs()
    if cfg.nproc > limit:
        raise FactoryError(f"--nproc {cfg.nproc}: this machine allows at most {limit} ({limit} {what})")
    entries = parse_ladder(cfg.ladder)
    base_dir = materialize(model)
    if not (base_dir / "config.json").is_file():
        raise FactoryError(f"{model}: not a checkpoint directory (no config.json)")
    base_cfg = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    check_causal_lm(base_cfg, os.fspath(model))
    base_tok = tokenizer_digest(load_tokenizer(os.fspath(base_dir)))
    is_dlm = (base_dir / SPEC_FILE).is_file()
    ar_model = None
    if "ar" in cfg.objectives:
        ar_model = lineage_root(base_dir, os.fspath(model)) if is_dlm else os.fspath(model)
        if is_dlm and (ar_model == os.fspath(model) or "://" not in ar_model and not Path(ar_model).is_dir()):
            raise FactoryError(f"{model}: a diffusion model whose AR source ({ar_model}) is not here; the AR "
                               "ladder starts from it (or run --objectives diffusion)")
    digests = {"model": model_digest(base_dir), "data": source_digest(cfg.data)}
    tokens_per_step = cfg.train.batch_size * cfg.seq_len
    cfg.train.micro_batch(cfg.nproc)  # batch_size must split over the processes
    rungs: list[Rung] = []
    for i, entry in enumerate(entries):
        if is_shape(entry):
            shape = Shape.parse(entry)
            if cfg.init == "scratch":  # any shape of the family, smaller than the model too
                c = grown_config(base_cfg, shape, allow_shrink=True) if shape != model_shape(base_cfg) else base_cfg
            else:
                c = grown_config(base_cfg, shape)  # refuses shrinking and shapes that are not whole heads
            kind, source, label = ("scratch" if cfg.init == "scratch" else "grow"), os.fspath(model), str(shape)
        else:
            path = materialize(entry)
            if not (path / "config.json").is_file():
                raise FactoryError(f"{entry}: ladder rung is neither LAYERSxHIDDEN nor a checkpoint dir")
            c = AutoConfig.from_pretrained(path, trust_remote_code=False)
            check_causal_lm(c, entry)
            tok = tokenizer_digest(load_tokenizer(os.fspath(path)))
            if tok != base_tok:
                raise FactoryError(f"{entry}: its tokenizer differs from {model}'s; a ladder is one family "
                                   "with one tokenizer (compare the tokenizer digests)")
            if (path / SPEC_FILE).is_file():
                raise FactoryError(f"{entry}: a diffusion checkpoint; family rungs are AR checkpoints (they are converted)")
            kind, source, label = ("scratch" if cfg.init == "scratch" else "checkpoint"), entry, path.name
            digests[f"rung{i}"] = model_digest(path)
        total, n = config_params(c)
        steps = math.floor(cfg.budget / (6 * n * tokens_per_step))
        if steps < cfg.min_steps:
            raise FactoryError(f"rung {label} ({n / 1e6:.2f}M compute parameters): the budget {cfg.budget:.3g} FLOPs "
                               f"gives {steps} steps of {tokens_per_step} tokens, fewer than {cfg.min_steps}; "
                               "raise --budget")
        heads = c.num_attention_heads if hasattr(c, "num_attention_heads") else getattr(c, "n_head", 1)
        layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", 1)
        hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", 1)
        micro = cfg.train.micro_batch(cfg.nproc)
        mem = estimate_memory(total, layers=layers, hidden=hidden, heads=heads, vocab=c.vocab_size,
                              seq_len=cfg.seq_len, micro_batch=micro, ranks=cfg.nproc, zero=cfg.zero,
                              offload=cfg.offload, bf16=rt.precision(cfg.train.precision) == "bf16",
                              device=rt.device.type)
        _check_fits(label, total, mem, cfg, rt.device.type)
        anneal = 0 if (cfg.init == "scratch" or is_dlm) else round(cfg.anneal_fraction * steps)
        rungs.append(Rung(index=i, name=_rung_name(i, label), kind=kind, source=source,
                          shape=str(Shape(layers, hidden)) if kind in ("grow", "scratch") else None,
                          params=total, compute_params=n, layers=layers, hidden=hidden, heads=heads,
                          vocab=c.vocab_size, steps=steps, warmup_steps=round(cfg.warmup_fraction * steps),
                          anneal_steps=anneal, tokens=steps * tokens_per_step,
                          flops=6.0 * n * steps * tokens_per_step, memory=mem.to_dict()))
    for a, b in zip(rungs[:-1], rungs[1:], strict=False):
        if b.compute_params <= a.compute_params:
            raise FactoryError(f"ladder is not increasing: {b.name} has {b.compute_params:,} compute parameters, "
                               f"{a.name} {a.compute_params:,}; order the rungs from small to large")
    return Plan(model=os.fspath(model), ar_model=ar_model, rungs=rungs, tokens_per_step=tokens_per_step,
                digests=digests)


def _check_fits(label: str, total: int, mem, cfg: ScaleConfig, device: str) -> None:
    """Refuse a rung whose estimated memory exceeds what this machine (or --memory-limit) allows."""
    from dlm_factory.dlm.train.memory import GIB, available_memory, host_available

    avail, where = available_memory(device)
    if cfg.memory_limit_gb is not None:
        avail, where = cfg.memory_limit_gb * GIB, f"--memory-limit {cfg.memory_limit_gb:g} GiB"
    need = mem.per_rank * (cfg.nproc if device == "cpu" else 1) + (mem.host_offload * cfg.nproc if device == "cpu" else 0)
    ranks = f" x {cfg.nproc} processes on one host" if device == "cpu" and cfg.nproc > 1 else ""
    if need > avail:
        raise FactoryError(f"rung {label} ({total / 1e6:.2f}M parameters) cannot fit: needs an estimated "
                           f"{mem.describe()}{ranks} = {need / GIB:.2f} GiB, {avail / GIB:.2f} GiB available on "
                           f"{where}; use a higher ZeRO stage, --offload, a smaller batch or fewer processes")
    if device == "cuda" and mem.host_offload * cfg.nproc > host_available():
        raise FactoryError(f"rung {label}: offloading needs {mem.host_offload * cfg.nproc / GIB:.2f} GiB of host "
                           f"memory, {host_available() / GIB:.2f} GiB free")


# --- keys -------------------------------------------------------------------------------------------------


def _ladder_identity(plan: Plan) -> list[str]:
    """The ladder without paths: shapes, and family members by digest (paths never enter a key)."""
    return [r.shape if r.kind in ("grow", "scratch") else plan.digests[f"rung{r.index}"] for r in plan.rungs]


def rung_key(plan: Plan, rung: Rung, objective: Objective, cfg: ScaleConfig):
    """What decides whether a rung's output is done: its source and data by content, its settings."""
    from dlm_factory.dlm.checkpoint.record import StageKey

    settings = cfg.model_dump(exclude={"ladder", "memory_limit_gb", "target_compute", "curve_bins",
                                       "skip_fraction", "objectives"})
    source = plan.digests.get(f"rung{rung.index}", plan.digests["model"])
    return StageKey(stage="scale-rung", inputs={"source": source, "data": plan.digests["data"]},
                    config={"objective": objective, "rung": _ladder_identity(plan)[rung.index], "index": rung.index,
                            "steps": rung.steps, "settings": settings})


def scale_key(plan: Plan, cfg: ScaleConfig):
    from dlm_factory.dlm.checkpoint.record import StageKey

    return StageKey(stage="scale", inputs=dict(plan.digests),
                    config={**cfg.model_dump(exclude={"ladder", "memory_limit_gb"}), "ladder": _ladder_identity(plan)})


# --- training one rung ------------------------------------------------------------------------------------


def rung_dir(output: str | os.PathLike, rung: Rung, objective: Objective) -> str:
    o = os.fspath(output)
    return f"{o.rstrip('/')}/rungs/{rung.name}/{objective}" if "://" in o else str(Path(o) / "rungs" / rung.name / objective)


def train_rung(job: RungJob, *, progress: bool = False) -> dict:
    """Build, train, evaluate and save one rung (every rank of a torchrun job runs this). Returns its result."""
    import torch
    from transformers import AutoModelForCausalLM

    from dlm_factory.digest import dir_digest, tokenizer_digest
    from dlm_factory.dlm import runtime
    from dlm_factory.dlm.checkpoint.io import Loaded, load_model, save_model, set_bidirectional
    from dlm_factory.dlm.checkpoint.record import StageKey, new_record, source_name
    from dlm_factory.dlm.checkpoint.spec import DiffusionSpec
    from dlm_factory.dlm.data.corpus import Blocks, read_documents, tokenize_blocks
    from dlm_factory.dlm.diffusion.objective import ar_loss, diffusion_loss
    from dlm_factory.dlm.evaluation.corpus import eval_windows
    from dlm_factory.dlm.evaluation.likelihood import ar_nll_across_windows, elbo
    from dlm_factory.dlm.paths import is_remote, upload_dir
    from dlm_factory.dlm.stages.convert import anneal_rate, ensure_mask_token
    from dlm_factory.dlm.stages.grow import Shape, grow, grown_config
    from dlm_factory.dlm.train.deepspeed import zero_config
    from dlm_factory.dlm.train.loop import train
    from dlm_factory.home import factory_home

    rt = runtime.current()
    cfg, rung, objective = job.config, job.rung, job.objective
    loaded = load_model(job.source)
    seed = cfg.train.seed
    model = loaded.model
    if rung.kind == "grow":
        model = grow(model, Shape.parse(rung.shape), seed=seed + rung.index)
    elif rung.kind == "scratch":
        shape = Shape.parse(rung.shape)
        c = grown_config(model.config, shape, allow_shrink=True) \
            if (model.config.num_hidden_layers, model.config.hidden_size) != (shape.layers, shape.hidden) else model.config
        torch.manual_seed(seed + rung.index)
        model = AutoModelForCausalLM.from_config(c, attn_implementation=model.config._attn_implementation)
        model.to(rt.device)
    loaded = Loaded(model, loaded.tokenizer, loaded.spec, loaded.path)
    spec, how = loaded.spec, "existing"
    if objective == "diffusion" and spec is None:
        mask_id, mask_text, how = ensure_mask_token(loaded, "[MASK]")
        spec = DiffusionSpec(mask_token_id=mask_id, mask_token=mask_text, shift=cfg.shift, eps=1e-3,
                             tokenizer_digest=tokenizer_digest(loaded.tokenizer), source=source_name(job.source),
                             source_digest=dir_digest(loaded.path))
    if objective == "ar" and spec is not None:
        raise FactoryError(f"{job.source}: the AR ladder starts from an AR checkpoint, not a diffusion model")
    model = loaded.model
    docs = read_documents(cfg.data, max_chars=cfg.max_chars)
    blocks = Blocks(tokenize_blocks(loaded.tokenizer, docs, cfg.seq_len, max_positions=loaded.max_positions))
    tcfg = cfg.train.model_copy(update={
        "steps": rung.steps, "warmup_steps": rung.warmup_steps,
        "deepspeed": zero_config(cfg.zero, offload=cfg.offload) if cfg.zero is not None else None})
    mb = tcfg.micro_batch(rt.world_size)

    def batch_fn(step, slot):
        return blocks.batch(step * tcfg.slots(rt.world_size) + slot, mb, tcfg.seed)

    if objective == "diffusion":
        def loss_fn(model, batch, step, generator):
            return diffusion_loss(model, spec, batch["input_ids"], anneal_r=anneal_rate(step, rung.anneal_steps),
                                  generator=generator)
    else:
        def loss_fn(model, batch, step, generator):
            return ar_loss(model, batch["input_ids"])

    ckpt = job.checkpoint_dir or str(factory_home() / "cache" / "checkpoints" / f"scale-{job_tag(job)}")
    result = train(model, batch_fn, loss_fn, tcfg, checkpoint_dir=ckpt, progress=progress)
    if objective == "diffusion":
        set_bidirectional(model)
    evaluation = None
    if rt.master:
        from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser

        final = Loaded(model, loaded.tokenizer, spec, loaded.path)
        w = eval_windows(final, cfg.eval.model_copy(update={"seq_len": min(cfg.eval.seq_len, cfg.seq_len)}))
        if objective == "diffusion":
            est = elbo(ModelDenoiser(final), w.ids, attention_mask=w.attention_mask, keep=w.keep,
                       n=cfg.eval.mc_samples, seed=cfg.eval.seed, batch_size=cfg.eval.batch_size)
        else:
            est = ar_nll_across_windows(model, w.ids, attention_mask=w.attention_mask, keep=w.keep)
        evaluation = {"data": cfg.eval.data, "windows": int(w.ids.shape[0]), **est.to_dict()}
    epochs = rung.tokens / max(1, blocks.ids.numel())
    outcome = {"rung": rung.name, "objective": objective, "kind": rung.kind, "shape": rung.shape,
               "params": rung.params, "compute_params": rung.compute_params, "tokens": rung.tokens,
               "flops": rung.flops, "epochs": round(epochs, 3), "tokens_per_step": cfg.train.batch_size * cfg.seq_len,
               "world_size": rt.world_size, "zero": cfg.zero, "mask_token": how if objective == "diffusion" else None,
               "anneal_steps": rung.anneal_steps if objective == "diffusion" else 0,
               "eval": evaluation, "curve": [[s, round(v, 5)] for s, v in result.losses], **result.summary()}
    record = new_record(StageKey.model_validate(job.key), sources={"source": job.source, "data": cfg.data}, runtime=rt.describe(),
                        ar_root=spec.source if spec is not None else source_name(job.source), result=outcome)
    if spec is not None:  # the lineage keeps the figures; the curve stays in stage.json only
        spec.stages.append(record.model_copy(update={"result": {k: v for k, v in outcome.items() if k != "curve"}}))
    final = Loaded(model, loaded.tokenizer, spec)
    if is_remote(job.output):
        staging = Path(ckpt) / "final"
        if rt.master:
            shutil.rmtree(staging, ignore_errors=True)
        save_model(final, staging, record=record)
        if rt.master:
            upload_dir(staging, job.output, last=("stage.json",))
    else:
        save_model(final, job.output, overwrite=job.overwrite, record=record)
    if rt.master:  # the output is complete: its training checkpoints are spent
        shutil.rmtree(ckpt, ignore_errors=True)
    return outcome


# --- running a ladder -------------------------------------------------------------------------------------


def rung_job(plan: Plan, rung: Rung, objective: Objective, cfg: ScaleConfig, output: str | os.PathLike) -> RungJob:
    """The job of one rung and objective, writing to its dir under ``output`` (a local dir or a URL)."""
    key = rung_key(plan, rung, objective, cfg)
    dest = rung_dir(output, rung, objective)
    source = plan.ar_model if objective == "ar" and rung.kind != "checkpoint" else rung.source
    return RungJob(rung=rung, objective=objective, config=cfg, key=key.model_dump(), source=source, output=dest,
                   overwrite=Path(dest).exists() if "://" not in dest else False)


def job_tag(job: RungJob) -> str:
    """A short name for a job's files and checkpoints: its key's digest."""
    from dlm_factory.digest import json_digest

    return json_digest(job.key)[7:19]


def run_rung(plan: Plan, rung: Rung, objective: Objective, cfg: ScaleConfig, output: str | os.PathLike, *,
             progress: bool = False, threads: int | None = None) -> dict:
    """Train one rung with one objective unless its output is done; returns the rung's record result.

    ``cfg.zero`` None: in this process. Otherwise a ``torchrun`` job of ``cfg.nproc`` processes
    (DeepSpeed) with ``threads`` torch threads each, checkpointing under
    $FACTORY_HOME/cache/checkpoints/ so a rerun resumes.
    """
    from dlm_factory.dlm.checkpoint.record import StageKey, is_done, read_record

    job = rung_job(plan, rung, objective, cfg, output)
    if is_done(job.output, StageKey.model_validate(job.key)):
        log.info("reusing rung %s (%s) at %s", rung.name, objective, job.output)
        return {**read_record(job.output).result, "reused": True}
    log.info("rung %s (%s): %d steps, %.3g FLOPs, %s", rung.name, objective, rung.steps, rung.flops,
             "in process" if cfg.zero is None else f"{cfg.nproc} process(es), ZeRO-{cfg.zero}")
    if cfg.zero is None:
        train_rung(job, progress=progress)
    else:
        launch_rung(job, cfg.nproc, threads=threads)
    record = read_record(job.output)
    if record is None:
        raise FactoryError(f"rung {rung.name} ({objective}) finished without a record at {job.output}")
    return record.result


def worker_env(nproc: int, threads: int | None = None) -> dict[str, str]:
    """The environment of a rung's ranks: the runtime's device, DeepSpeed's accelerator, cores split over ranks."""
    from dlm_factory.dlm import runtime

    rt = runtime.current()
    env = {**os.environ, "FACTORY_DEVICE": rt.device.type, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    if rt.device.type == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        cores, _ = machine_procs()
        env.setdefault("OMP_NUM_THREADS", str(threads or max(1, cores // nproc)))  # ranks share the cores
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # torchrun sets its own rendezvous
    return env


def launch_rung(job: RungJob, nproc: int, *, threads: int | None = None) -> None:
    """Run ``job`` as ``torchrun --standalone --nproc_per_node nproc``; FactoryError with the rung's own error line."""
    import psutil

    from dlm_factory.home import factory_home

    tag = job_tag(job)
    work = factory_home() / "cache" / "scale" / "jobs"
    work.mkdir(parents=True, exist_ok=True)
    job_file, err_file, log_file = (work / f"{tag}.{ext}" for ext in ("json", "error", "log"))
    err_file.unlink(missing_ok=True)
    job = job.model_copy(update={"error_file": str(err_file)})
    job_file.write_text(job.model_dump_json(indent=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "dlm_factory.dlm.stages.scale", str(job_file)]
    with open(log_file, "w") as out:
        proc = subprocess.Popen(cmd, env=worker_env(nproc, threads), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait()
        except BaseException:  # cancelled or interrupted: take the ranks down with us (own session each)
            tree = [proc.pid, *(c.pid for c in _children(proc.pid))]
            for pid in tree:
                with _quiet():
                    psutil.Process(pid).kill()
            proc.wait()
            raise
    if code != 0:
        if err_file.is_file():
            raise FactoryError(f"rung {job.rung.name} ({job.objective}): {err_file.read_text().strip()}")
        tail = " | ".join(log_file.read_text(errors="replace").strip().splitlines()[-3:])
        raise FactoryError(f"rung {job.rung.name} ({job.objective}) failed with exit code {code} "
                           f"(log {log_file}): {tail[-400:]}")


def _children(pid: int):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        import psutil

        return exc[0] is not None and issubclass(exc[0], psutil.Error)


def prepare_output(output: str | os.PathLike, plan: Plan, cfg: ScaleConfig, *, overwrite: bool = False) -> Path:
    """The local dir the ladder is written to (a cache dir for a URL output), with ``plan.json``.

    A dir holding the same plan (an interrupted run) is continued; any other existing output
    is refused unless ``overwrite``. Its ``stage.json`` is removed until the ladder is complete again.
    """
    from dlm_factory.digest import json_digest
    from dlm_factory.dlm.checkpoint.record import RECORD_FILE
    from dlm_factory.home import factory_home

    key = json_digest(scale_key(plan, cfg).model_dump())
    o = os.fspath(output)
    local = factory_home() / "cache" / "scale" / key[7:19] if "://" in o else Path(o)
    plan_file = local / "plan.json"
    if local.exists() and "://" not in o and not overwrite:
        same = plan_file.is_file() and json.loads(plan_file.read_text()).get("key") == key
        if not same:
            raise FactoryError(f"{local.resolve()}: output already exists with another ladder (choose another "
                               "--output or remove it)")
    local.mkdir(parents=True, exist_ok=True)
    (local / RECORD_FILE).unlink(missing_ok=True)
    plan_file.write_text(json.dumps({"key": key, "plan": plan.model_dump(), "config": cfg.model_dump()}, indent=1))
    return local


def summarize(plan: Plan, cfg: ScaleConfig, local: str | os.PathLike) -> dict:
    """Fits, multiplier, compute-optimal size, table and PNG of a finished ladder (written beside the rungs)."""
    from dlm_factory.dlm.checkpoint.record import read_record
    from dlm_factory.dlm.evaluation.scaling import (
        compute_multiplier,
        curve_points,
        fit_objective,
        plot,
    )

    local = Path(local)
    rows, fits = [], {}
    target = cfg.target_compute or 10 * cfg.budget
    for objective in cfg.objectives:
        rungs = {}
        for rung in plan.rungs:
            record = read_record(rung_dir(local, rung, objective))
            if record is None:
                raise FactoryError(f"rung {rung.name} ({objective}) has no output yet")
            res = record.result
            rungs[rung.name] = curve_points([tuple(x) for x in res["curve"]], params=rung.compute_params,
                                            tokens_per_step=plan.tokens_per_step, bins=cfg.curve_bins,
                                            skip_fraction=cfg.skip_fraction, rung=rung.name)
            ev = res.get("eval") or {}
            rows.append({"rung": rung.name, "objective": objective, "params": rung.params,
                         "compute_params": rung.compute_params, "tokens": rung.tokens, "flops": rung.flops,
                         "steps": rung.steps, "heldout_bits_per_token": ev.get("bits_per_token"),
                         "heldout_stderr": ev.get("stderr"), "heldout_kind": ev.get("kind"),
                         "final_train_loss": res.get("final_loss"), "tokens_per_s": res.get("tokens_per_s"),
                         "world_size": res.get("world_size"), "seconds": res.get("seconds")})
        fits[objective] = fit_objective(objective, rungs, target_compute=target, reference=cfg.budget)
    multiplier = None
    if {"diffusion", "ar"} <= fits.keys() and fits["diffusion"].law and fits["ar"].law:
        ar_front = fits["ar"].frontier
        multiplier = compute_multiplier(fits["diffusion"].law, fits["ar"].law, ar_front[-1].compute,
                                        dlm_frontier=fits["diffusion"].frontier, ar_frontier=ar_front)
    png = local / "scaling.png"
    plot(list(fits.values()), png, title=f"{len(plan.rungs)}-rung ladder, {cfg.budget:.3g} FLOPs per rung "
                                          f"({cfg.init})", multiplier=multiplier)
    report = {"rows": rows, "fits": {k: v.to_dict() for k, v in fits.items()},
              "multiplier": multiplier.to_dict() if multiplier else None, "target_compute": target,
              "budget": cfg.budget, "plot": str(png.resolve())}
    (local / "scaling.json").write_text(json.dumps(report, indent=1, default=str))
    (local / "REPORT.md").write_text(markdown_report(report))
    return report


def markdown_report(report: dict) -> str:
    """The ladder's table, fits and multiplier as markdown (REPORT.md, the flow's artifact, the bench)."""
    lines = ["| rung | objective | params | N (compute) | tokens | FLOPs | held-out bits/token | final train loss (nats) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        held = (f"{r['heldout_bits_per_token']:.3f} ± {r['heldout_stderr']:.3f}"
                if r["heldout_bits_per_token"] is not None else "-")
        lines.append(f"| {r['rung']} | {r['objective']} | {r['params']:,} | {r['compute_params']:,} | {r['tokens']:,} | "
                     f"{r['flops']:.3g} | {held} | {r['final_train_loss']:.3f} |")
    lines.append("")
    for name, f in report["fits"].items():
        law = f["law"]
        if law:
            e = law["stderr"]
            lines.append(f"- {name}: L(C) = {law['a']:.4g} (± {e['a']:.2g}) * C^-{law['b']:.4f} (± {e['b']:.4f}) "
                         f"+ {law['c']:.3f} (± {e['c']:.3f}); {law['points']} frontier points, "
                         f"chi2/dof {law['chi2_per_dof']:.2f}")
        opt = f.get("compute_optimal")
        if opt:
            lo, hi = opt["params_interval"]
            verdict = "" if opt.get("trusted") else f" -- not identifiable from this ladder: {opt.get('why_not')}"
            lines.append(f"  compute-optimal at {opt['compute']:.3g} FLOPs: N = {opt['params']:.3g} "
                         f"(68%: {lo:.3g}-{hi:.3g}), D = {opt['tokens']:.3g} tokens, loss {opt['loss']:.3f}{verdict}")
        for err in f.get("errors", []):
            lines.append(f"  ({err})")
    m = report.get("multiplier")
    if m:
        lo, hi = m["interval"]
        obs = f"; observed without fits: {m['observed']:.2f}x at loss {m['observed_loss']:.3f}" if m.get("observed") else ""
        lines.append(f"- compute multiplier DLM/AR at the AR loss {m['ar_loss']:.3f} (AR compute "
                     f"{m['reference_compute']:.3g}): {m['value']:.2f}x (68%: {lo:.2f}-{hi:.2f}x, "
                     f"{100 * m['unreachable_fraction']:.0f}% of draws never reach it){obs}")
    return "\n".join(lines) + "\n"


def finish(plan: Plan, cfg: ScaleConfig, local: str | os.PathLike, output: str | os.PathLike, report: dict) -> str:
    """Write the scale record last (and upload the whole ladder when ``output`` is a URL). Returns ``output``."""
    from dlm_factory.dlm import runtime
    from dlm_factory.dlm.checkpoint.record import RECORD_FILE, new_record
    from dlm_factory.dlm.paths import is_remote, upload_dir

    local = Path(local)
    record = new_record(scale_key(plan, cfg), sources={"model": plan.model, "data": cfg.data},
                        runtime=runtime.current().describe(),
                        result={k: report[k] for k in ("rows", "multiplier", "target_compute", "budget")}
                        | {"laws": {k: v["law"] for k, v in report["fits"].items()},
                           "compute_optimal": {k: v["compute_optimal"] for k, v in report["fits"].items()}})
    tmp = local / f".{RECORD_FILE}.tmp"
    tmp.write_text(record.model_dump_json(indent=2) + "\n")
    tmp.rename(local / RECORD_FILE)
    if is_remote(output):
        upload_dir(local, os.fspath(output), last=(RECORD_FILE,))
    return os.fspath(output)


def scale(model: str | os.PathLike, output: str | os.PathLike, cfg: ScaleConfig, *, progress: bool = False,
          overwrite: bool = False) -> dict:
    """Plan, train every rung with every objective, fit, and write the ladder to ``output`` (see the module doc)."""
    plan = plan_ladder(model, cfg)
    local = prepare_output(output, plan, cfg, overwrite=overwrite)
    for rung in plan.rungs:
        for objective in cfg.objectives:
            run_rung(plan, rung, objective, cfg, local, progress=progress)
    report = summarize(plan, cfg, local)
    finish(plan, cfg, local, output, report)
    return report


def main(argv: list[str] | None = None) -> int:
    """A rung worker: ``python -m dlm_factory.dlm.stages.scale JOB.json`` (every rank of a torchrun job)."""
    from dlm_factory.dlm import runtime

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m dlm_factory.dlm.stages.scale JOB.json|'{...job...}'", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    job = None
    try:
        text = args[0] if args[0].lstrip().startswith("{") else Path(args[0]).read_text()  # inline: a k8s job
        job = RungJob.model_validate_json(text)
        runtime.configure(os.environ.get("FACTORY_DEVICE"))
        train_rung(job)
    except FactoryError as e:
        if job is not None and job.error_file and not Path(job.error_file).exists():
            Path(job.error_file).write_text(str(e).replace("\n", " ") + "\n")
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
