"""Build a user's ensemble: tune the combination on validation windows, gate it on test windows, write the dir.

SSD-2 ("David helps Goliath", Han et al. 2023) combines a large general DLM with a small
user specialist at every denoising step (``dlm.diffusion.ensemble``). This stage picks
the form (product of experts, or emulated fine-tuning when the specialist's base is
given) and lambda for one user, by ELBO, and runs the validation gate:

- the user's held-out documents (``dlm.data.users``, split by name hash) are cut into
  rolling windows; windows alternate between *validation* (even) and *test* (odd), so
  the sweep and the gate never score the same tokens. The specialist was trained on the
  train split, so neither half is seen in training; the user's held-out data is small
  (a stdlib package holds out 1-6 files), hence windows and not documents.
- the sweep evaluates every (form, lambda) on the validation windows with
  ``paired_elbo`` on shared draws, each member run once per draw (``LastCall``); the
  lowest ELBO wins and the whole sweep is written to ``tuning.json``.
- the gate (``dlm.evaluation.gate``) compares the chosen ensemble with each member on
  the test windows and its samples with the general model's on held-out prompts.

The output dir holds ENSEMBLE.json (members pinned by name, version and digest: catalog
models by their manifest, local dirs by their content digest), tuning.json, gate.json,
gate.md, eval_results.json (the catalog card's numbers), router.safetensors (the user's
n-gram router, ``dlm.evaluation.router``), stage.json, and
``.ensemble-local.json`` (member paths and the user; a dot-file, never published).
After publishing the members, ``dlm.checkpoint.ensemble.repin`` pins them to their
catalog versions. The dir is written even when the gate fails (the report says why):
publishing checks ``gate.json`` and refuses a failed gate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, Field, field_validator

from dlm_factory.digest import json_digest
from dlm_factory.dlm import runtime
from dlm_factory.dlm.checkpoint.ensemble import LOCAL_FILE, ensemble_spec, pin_member, serving
from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.checkpoint.record import (
    RECORD_FILE,
    StageKey,
    check_output,
    lineage_root,
    model_digest,
    new_record,
    source_name,
)
from dlm_factory.dlm.data.corpus import (
    Document,
    Windows,
    code_prompts,
    encode_documents,
    rolling_windows,
)
from dlm_factory.dlm.data.users import check_user_id, user_data_digest, user_documents
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.diffusion.ensemble import (
    EMULATED_FINETUNING,
    FORM_SHORT,
    FORMS,
    EnsembleDenoiser,
    LastCall,
    Member,
    check_form,
    check_lambda,
    check_shared_tokenizer,
)
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.evaluation.gate import GateConfig, read_report, run_gate, write_report
from dlm_factory.dlm.evaluation.likelihood import paired_elbo
from dlm_factory.dlm.evaluation.ngram import ROUTER_FILE
from dlm_factory.dlm.evaluation.router import RouterConfig, fit_router
from dlm_factory.dlm.paths import atomic_dir
from dlm_factory.home import factory_home

log = logging.getLogger(__name__)

TUNING_FILE = "tuning.json"
EVAL_FILE = "eval_results.json"
# SSD-2 and EFT tune lambda in [0, 2]; a coarse log-spaced grid covers it with 7 points.
DEFAULT_LAMBDAS = (0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0)  # the pool needs the upper end


class EnsembleConfig(BaseModel):
    """Settings of one user's ensemble build (defaults: the embedded demo)."""

    user: str = Field(description="user id: the held-out split comes from <data_root>/users/<user>/data/")
    data_root: str | None = Field(None, description="root holding users/<id>/data/ (None: FACTORY_HOME)")
    forms: list[str] = Field(default_factory=lambda: list(FORMS), description="forms swept (emulated_finetuning only when the specialist's base is given)")
    lambdas: list[float] = Field(default_factory=lambda: list(DEFAULT_LAMBDAS), description="lambda grid of the sweep")
    seq_len: int = Field(128, ge=2, description="window length in tokens (start token included)")
    stride: int | None = Field(None, gt=0, description="tokens scored per window after a document's first (None: half a window)")
    max_windows: int = Field(64, ge=2, description="held-out windows in all (half validation, half test)")
    mc_samples: int = Field(32, ge=2, description="Monte Carlo samples of t per window for every ELBO (two per stratum)")
    seed: int = Field(0, description="seed of the Monte Carlo draws")
    batch_size: int = Field(16, gt=0, description="windows per forward pass")
    context: str | None = Field(None, description="private context text the specialist (and its base) see before every sequence")
    judge: str | None = Field(None, description="AR checkpoint judging samples (None: the general model's AR root)")
    router: RouterConfig = Field(default_factory=RouterConfig, description="router settings stored with the ensemble")
    gate: GateConfig = Field(default_factory=GateConfig, description="validation gate thresholds")

    @field_validator("user")
    @classmethod
    def _user(cls, v):
        try:
            return check_user_id(v)
        except FactoryError as e:
            raise ValueError(str(e)) from None

    @field_validator("forms")
    @classmethod
    def _forms(cls, v):
        try:
            out = list(dict.fromkeys(check_form(f) for f in v))
        except FactoryError as e:
            raise ValueError(str(e)) from None
        if not out:
            raise ValueError("sweep at least one form")
        return out

    @field_validator("lambdas")
    @classmethod
    def _lambdas(cls, v):
        try:
            out = sorted({check_lambda(x) for x in v})
        except FactoryError as e:
            raise ValueError(str(e)) from None
        if not out:
            raise ValueError("sweep at least one lambda")
        return out

    def root(self) -> str:
        return self.data_root or str(factory_home())


def split_windows(w: Windows) -> tuple[Windows, Windows]:
    """(validation, test): even and odd windows, so tuning and gating never score the same tokens."""
    n = w.ids.shape[0]
    if n < 2:
        raise FactoryError(f"the held-out split gives {n} window(s); need at least 2 (validation and test)")

    def take(idx):
        return Windows(ids=w.ids[idx], attention_mask=w.attention_mask[idx], keep=w.keep[idx],
                       documents=w.documents, skipped=w.skipped)

    return take(torch.arange(0, n, 2)), take(torch.arange(1, n, 2))


def heldout_windows(tokenizer, cfg: EnsembleConfig, max_positions: int | None) -> tuple[Windows, Windows]:
    """The user's held-out windows, split into (validation, test)."""
    docs = user_documents(cfg.root(), cfg.user, "heldout")
    w = rolling_windows(tokenizer, docs, cfg.seq_len, stride=cfg.stride, max_windows=cfg.max_windows,
                        max_positions=max_positions)
    return split_windows(w)


def candidate_name(form: str, lam: float) -> str:
    return f"{FORM_SHORT[check_form(form)]}@{lam:g}"


def sweep(general, specialist, windows: Windows, *, base=None, forms=FORMS, lambdas=DEFAULT_LAMBDAS,
          context: list[int] | None = None, n: int = 32, seed: int = 0, batch_size: int = 16) -> dict:
    """ELBO of every (form, lambda) ensemble and of each member on ``windows``, on shared draws.

    Members are run once per draw (``LastCall``); each candidate's paired difference with
    the general model carries its own standard error. Returns ``{"candidates": [...],
    "members": {...}, "best": {...}}``; the best is the lowest ELBO among the ensembles.
    """
    g, s = LastCall(general), LastCall(specialist)
    b = LastCall(base) if base is not None else None
    contenders: dict[str, object] = {"general": g, "specialist": s}
    if b is not None:
        contenders["base"] = b
    grid = []
    for form in forms:
        if form == EMULATED_FINETUNING and b is None:
            continue
        for lam in lambdas:
            name = candidate_name(form, lam)
            contenders[name] = EnsembleDenoiser.combine(form, lam, g, s, b, context=context)
            grid.append((name, form, lam))
    if not grid:
        raise FactoryError("nothing to sweep: emulated fine-tuning needs the specialist's base model")
    if context:  # the specialist alone, seeing the context as it does inside the ensemble
        contenders["specialist"] = EnsembleDenoiser([Member(s, 1.0, context, name="specialist")])
    est = paired_elbo(contenders, windows.ids, attention_mask=windows.attention_mask, keep=windows.keep,
                      n=n, seed=seed, batch_size=batch_size)
    candidates = []
    for name, form, lam in grid:
        e, d = est[name], est[f"{name}-general"]
        candidates.append({"name": name, "form": form, "lambda": lam, "bits_per_token": e.bits_per_token,
                           "stderr": e.stderr, "minus_general": d.bits_per_token, "minus_general_stderr": d.stderr})
    members = {k: est[k].to_dict() for k in ("general", "specialist", "base") if k in est}
    best = min(candidates, key=lambda c: c["bits_per_token"])
    return {"candidates": candidates, "members": members, "best": best, "windows": int(windows.ids.shape[0]),
            "tokens": est["general"].tokens, "mc_samples": est["general"].samples}


def user_router(tokenizer, cfg: EnsembleConfig) -> tuple[bytes | None, dict]:
    """(router.safetensors bytes or None, ENSEMBLE.json's ``router``) for ``cfg.user``.

    prefix_ngram: the user's n-gram router counted on their *train* split (the held-out split
    stays unseen, as for the specialist), its sha256 and size recorded beside the settings.
    """
    settings = cfg.router.model_dump()
    if cfg.router.rule != "prefix_ngram":
        return None, settings
    docs = user_documents(cfg.root(), cfg.user, "train")
    lm = fit_router(encode_documents(tokenizer, docs), len(tokenizer), cfg.router)
    data = lm.to_bytes({"user": cfg.user})
    return data, {**settings, "file": ROUTER_FILE, "sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
                  "bytes": len(data), "ngrams": len(lm.counts)}


def ensemble_key(general, specialist, cfg: EnsembleConfig, base=None) -> StageKey:
    """What decides whether an ensemble dir is done: the members' and the user data's content, the config."""
    inputs = {"general": model_digest(general), "specialist": model_digest(specialist),
              "data": user_data_digest(cfg.root(), cfg.user)}
    if base is not None:
        inputs["base"] = model_digest(base)
    config = cfg.model_dump(exclude={"data_root", "judge", "context"})
    config["context"] = context_digest(cfg.context)  # private: only its digest is recorded
    if cfg.judge:
        config["judge"] = model_digest(cfg.judge)
    return StageKey(stage="ensemble", inputs=inputs, config=config)


@dataclass
class EnsembleResult:
    """What a build decided: the combination, the gate's verdict, where the dir is."""

    output: Path
    passed: bool
    form: str
    lam: float
    tuning: dict
    gate: dict

    def summary(self) -> dict:
        return {"passed": self.passed, "form": self.form, "lambda": self.lam, "output": str(self.output)}


def _finite(obj):
    """JSON-safe: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def build_ensemble(general: str | os.PathLike, specialist: str | os.PathLike, output: str | os.PathLike,
                   cfg: EnsembleConfig, *, base: str | os.PathLike | None = None, names: dict[str, str] | None = None,
                   form: str | None = None, lam: float | None = None, gate: bool = True,
                   overwrite: bool = False) -> EnsembleResult:
    """Tune, gate and write ``cfg.user``'s ensemble of ``general`` + ``specialist`` (+ its ``base`` for EFT).

    ``form`` and ``lam`` fix the combination (no sweep; it is still evaluated on the
    validation windows). ``names`` sets catalog names for local members
    (``{"general": ..., "specialist": ..., "base": ...}``; default: the dir names).
    ``gate=False`` skips the gate (the dir is then not publishable).
    """
    check_output(output, overwrite=overwrite)
    if form is not None:
        form = check_form(form)
        if form == EMULATED_FINETUNING and base is None:
            raise FactoryError("the emulated fine-tuning form needs the specialist's base model (--base)")
    if lam is not None:
        lam = check_lambda(lam)
    names = names or {}
    user_documents(cfg.root(), cfg.user, "heldout")  # an unknown user fails before any model is loaded
    key = ensemble_key(general, specialist, cfg, base)
    loaded = {"general": load_model(general), "specialist": load_model(specialist)}
    if base is not None:
        loaded["base"] = load_model(base)
    for role, lo in loaded.items():
        if lo.spec is None:
            raise FactoryError(f"{role} model is an autoregressive checkpoint (no diffusion.json); convert it first")
    dens = {role: ModelDenoiser(serving(lo)) for role, lo in loaded.items()}  # as load_ensemble serves them
    check_shared_tokenizer(dens)  # one error line before any data is read
    probe = EnsembleDenoiser.combine("product_of_experts", 0.0, dens["general"], dens["specialist"])
    context = None
    if cfg.context:
        context = encode_documents(loaded["general"].tokenizer, [Document("context", cfg.context)])[0]
    max_pos = EnsembleDenoiser.combine("product_of_experts", 1.0, dens["general"], dens["specialist"],
                                       context=context).max_positions if context else probe.max_positions
    validation, test = heldout_windows(loaded["general"].tokenizer, cfg, max_pos)

    # Tune: every (form, lambda) on the validation windows (or just the fixed one)
    forms = [form] if form is not None else [f for f in cfg.forms if f != EMULATED_FINETUNING or base is not None]
    lambdas = [lam] if lam is not None else cfg.lambdas
    tuning = sweep(dens["general"], dens["specialist"], validation, base=dens.get("base"), forms=forms,
                   lambdas=lambdas, context=context, n=cfg.mc_samples, seed=cfg.seed, batch_size=cfg.batch_size)
    best = tuning["best"]
    chosen_form, chosen_lam = best["form"], best["lambda"]
    tuning.update({"user": cfg.user, "split": "validation (even held-out windows)", "fixed": form is not None or lam is not None})
    log.info("user %s: %s lambda %g (validation ELBO %.4f)", cfg.user, chosen_form, chosen_lam, best["bits_per_token"])

    # Pin the members
    pins = {"general": pin_member(general, "general", names.get("general")),
            "specialist": pin_member(specialist, "specialist", names.get("specialist"))}
    if base is not None:
        pins["base"] = pin_member(base, "general", names.get("base"))
    if len({p.name for p in pins.values()}) != len(pins):
        raise FactoryError(f"member names must differ: {', '.join(p.name for p in pins.values())} (pass names)")
    router_bytes, router = user_router(loaded["general"].tokenizer, cfg)
    spec = ensemble_spec(pins["general"], pins["specialist"], chosen_form, chosen_lam,
                         base=pins.get("base") if chosen_form == EMULATED_FINETUNING else None, router=router)

    # Gate: the chosen ensemble against each member on the test windows, samples on held-out prompts
    ensemble = EnsembleDenoiser.combine(chosen_form, chosen_lam, dens["general"], dens["specialist"],
                                        dens.get("base"), context=context)
    members = {pins["general"].name: dens["general"], pins["specialist"].name: dens["specialist"]}
    if chosen_form == EMULATED_FINETUNING:
        members[pins["base"].name] = dens["base"]
    report = None
    if gate:
        judge = None
        prompts = []
        if cfg.gate.prompts:
            judge_src = cfg.judge or lineage_root(loaded["general"].path or Path(general), str(general))
            judge = load_model(judge_src)
            if judge.spec is not None:
                raise FactoryError(f"judge {judge_src} is a diffusion model; pass an AR checkpoint as the judge")
            prompts = code_prompts(user_documents(cfg.root(), cfg.user, "heldout"), cfg.gate.prompts,
                                   lines=cfg.gate.prompt_lines)
        report = run_gate(ensemble, members, test, cfg=cfg.gate, mc_samples=cfg.mc_samples, seed=cfg.seed + 1,
                          batch_size=cfg.batch_size, prompts=prompts, judge=judge, user=cfg.user,
                          combination=spec.combination.model_dump())

    # Write the dir
    evals = []
    if report is not None:
        for name in ["ensemble", *members]:
            e = report.elbo[name]
            evals.append({"dataset": f"user-{cfg.user}-heldout", "metric": f"elbo_bits_per_token_{name}",
                              "value": e["bits_per_token"], "split": "test", "lower_is_better": True})
    record = new_record(key, sources={"general": source_name(general), "specialist": source_name(specialist),
                                      **({"base": source_name(base)} if base is not None else {}),
                                      "data": f"users/{cfg.user}"},
                        runtime=runtime.current().describe(),
                        result={"passed": None if report is None else report.passed, "form": chosen_form,
                                "lambda": chosen_lam})
    local = {"user": cfg.user, "members": {pins[r].name: str(Path(p).resolve()) for r, p in
                                           (("general", general), ("specialist", specialist), ("base", base))
                                           if p is not None}}
    with atomic_dir(output, overwrite=overwrite) as tmp:
        spec.write(tmp)
        if router_bytes is not None:
            (tmp / ROUTER_FILE).write_bytes(router_bytes)
        (tmp / TUNING_FILE).write_text(json.dumps(_finite(tuning), indent=2) + "\n")
        if report is not None:
            report.elbo = _finite(report.elbo)
            report.quality = _finite(report.quality)
            write_report(report, tmp)
        (tmp / EVAL_FILE).write_text(json.dumps([e for e in evals if math.isfinite(e["value"])], indent=2) + "\n")
        (tmp / RECORD_FILE).write_text(record.model_dump_json(indent=2) + "\n")
        (tmp / LOCAL_FILE).write_text(json.dumps(local, indent=2) + "\n")
    out = Path(output).resolve()
    return EnsembleResult(output=out, passed=bool(report and report.passed), form=chosen_form, lam=chosen_lam,
                          tuning=tuning, gate={} if report is None else report.to_dict())


def gate_passed(directory: str | os.PathLike) -> bool:
    """Whether the ensemble dir holds a passing gate report (what publishing requires)."""
    report = read_report(directory)
    return bool(report and report.get("passed") is True)


def context_digest(text: str | None) -> str | None:
    return None if text is None else json_digest({"context": text})
