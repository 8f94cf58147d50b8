"""The validation gate: an ensemble is publishable only if it beats each member on the user's held-out data.

Two kinds of checks, on the user's held-out (test) windows and prompts:

1. Likelihood: the ensemble's ELBO must be lower than each member's alone by at least
   ``margin`` bits/token, with confidence: ``(member - ensemble) - z * stderr >= margin``,
   where the difference and its standard error come from ``paired_elbo`` (every
   contender scored on the same noisy draws, so the error is that of the difference).
   The error bar covers the Monte Carlo noise of the estimate on this split (two
   independent draws per stratum), not the choice of documents.
2. Samples (a guard): with the same prompts, sampler settings and seed, the ensemble's
   samples must not be worse than the general model's, compared prompt by prompt: the
   paired judge-NLL difference may not exceed ``judge_tolerance`` times the general's by
   more than ``z`` standard errors, nor the paired parse-rate drop ``parse_tolerance``;
   and no more blank
   responses than the general model's plus ``blank_tolerance`` (a blank continuation has a
   low judge NLL and "parses" whenever the prompt does: both checks pass it). The judge is an AR
   checkpoint that is not a contender (default: the general model's AR root, which if
   anything favours the general model).

The report is written as ``gate.json`` and ``gate.md`` and travels with the ensemble into
the catalog; a failing gate publishes nothing.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from dlm_factory.dlm.evaluation.likelihood import paired_elbo
from dlm_factory.dlm.evaluation.metrics import judge_nlls, paired_difference, parses, pooled_mean
from dlm_factory.dlm.sampling.sampler import SamplerConfig, random_order, sample

GATE_JSON = "gate.json"
GATE_MD = "gate.md"


def _default_sampler() -> SamplerConfig:
    """Random-order ancestral sampling at temperature 1 (MDLM; LLaDA's ``random`` remasking), one block.

    The unbiased reference for sample quality (docs/sampling.md, the collapse study): the
    confidence-ordered samplers commit the most frequent tokens first, and on the demo's
    small models both contenders' greedy samples collapse into repeated newlines, which the
    blank check then refuses for whichever collapses harder (measured: every demo user's
    pool ensemble, 1.0 blank vs the general model's 0.0). Same seed for both contenders."""
    return random_order(64)


class GateConfig(BaseModel):
    """Thresholds of the validation gate (defaults: the embedded demo)."""

    margin: float = Field(0.0, description="bits/token by which the ensemble's ELBO must beat each member's (beyond z standard errors); negative: tolerate that much worse (plumbing tests only, e.g. the smoke profile)")
    z: float = Field(2.0, ge=0.0, description="standard errors of the paired difference required beyond the margin (2: ~97.7% one-sided)")
    judge_tolerance: float = Field(0.02, ge=0.0, description="tolerated relative increase of the samples' judge NLL over the general model's")
    parse_tolerance: float = Field(0.0, ge=0.0, le=1.0, description="tolerated absolute drop of the samples' parse rate below the general model's")
    blank_tolerance: float = Field(0.0, ge=0.0, le=1.0, description="tolerated absolute rise of the share of blank responses over the general model's")
    prompts: int = Field(16, ge=0, description="held-out prompts sampled by the ensemble and the general model (0: skip the sample checks)")
    prompt_lines: int = Field(3, ge=1, description="lines of each held-out definition used as a prompt")
    sampler: SamplerConfig = Field(default_factory=_default_sampler, description="sampler settings shared by both contenders")


@dataclass
class Check:
    """One gate criterion: passed when ``value`` is on the right side of ``threshold``."""

    name: str
    passed: bool
    value: float
    threshold: float
    detail: str


@dataclass
class GateReport:
    """What the gate decided and why (``gate.json``; ``gate.md`` renders it)."""

    passed: bool
    user: str | None
    combination: dict
    checks: list[Check]
    elbo: dict  # contender -> Estimate dict; "<member>-ensemble" -> paired difference
    quality: dict  # contender -> {judge_nll, parse_rate, samples}
    config: dict
    windows: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def elbo_checks(estimates: dict, members: list[str], cfg: GateConfig) -> list[Check]:
    """``(member - ensemble) - z * stderr >= margin`` for each member (``estimates`` from paired_elbo
    with the ensemble first)."""
    checks = []
    for name in members:
        diff = estimates[f"{name}-ensemble"]
        bound = diff.bits_per_token - cfg.z * diff.stderr
        checks.append(Check(
            name=f"elbo_beats_{name}", passed=bound >= cfg.margin, value=bound, threshold=cfg.margin,
            detail=(f"{name} - ensemble = {diff.bits_per_token:+.4f} +- {diff.stderr:.4f} bits/token; "
                    f"lower bound at z={cfg.z:g}: {bound:+.4f} (needs >= {cfg.margin:g})")))
    return checks


def quality_checks(quality: dict, cfg: GateConfig) -> list[Check]:
    """The ensemble's samples against the general model's, paired prompt by prompt: judge NLL, parse rate, blanks.

    A guard, not the evidence of improvement (the ELBO checks are): the judge NLL and parse
    checks fail when the ensemble is worse beyond the tolerance by more than ``z`` standard
    errors of the paired per-prompt difference; a handful of samples at temperature 1 cannot
    show more. Blank responses are a degenerate mode and are checked on the rates as they are.
    """
    ens, gen = quality["ensemble"], quality["general"]
    d, se = paired_difference(ens["prompt_scores"], gen["prompt_scores"])
    n = len(ens["prompt_scores"])
    allowed = cfg.judge_tolerance * gen["judge_nll"]
    judge_bound = d - cfg.z * se
    judge_ok = math.isfinite(d) and judge_bound <= allowed  # NaN: the ensemble answered nothing
    p, pse = paired_difference([(float(x), 1) for x in gen["prompt_parses"]], [(float(x), 1) for x in ens["prompt_parses"]])
    parse_bound = p - cfg.z * pse
    return [
        Check(name="judge_nll_not_worse", passed=judge_ok, value=judge_bound, threshold=allowed,
              detail=f"ensemble - general = {d:+.4f} +- {se:.4f} nats/token over {n} paired prompts "
                     f"(ensemble {ens['judge_nll']:.4f}, general {gen['judge_nll']:.4f}); lower bound at "
                     f"z={cfg.z:g}: {judge_bound:+.4f} (fails above {allowed:.4f}, {cfg.judge_tolerance:.0%} of the general's)"),
        Check(name="parse_rate_not_worse", passed=parse_bound <= cfg.parse_tolerance + 1e-12, value=parse_bound,
              threshold=cfg.parse_tolerance,
              detail=f"general - ensemble parse rate = {p:+.3f} +- {pse:.3f} (ensemble {ens['parse_rate']:.3f}, "
                     f"general {gen['parse_rate']:.3f}); lower bound at z={cfg.z:g}: {parse_bound:+.3f} "
                     f"(fails above {cfg.parse_tolerance:g})"),
        Check(name="blank_rate_not_worse", passed=ens["blank_rate"] <= gen["blank_rate"] + cfg.blank_tolerance + 1e-12,
              value=ens["blank_rate"], threshold=gen["blank_rate"] + cfg.blank_tolerance,
              detail=f"blank responses: ensemble {ens['blank_rate']:.3f} vs general {gen['blank_rate']:.3f} "
                     f"(tolerance {cfg.blank_tolerance:g})"),
    ]


def sample_quality(denoisers: dict[str, object], prompt_texts: list[str], tokenizer, judge,
                   sampler: SamplerConfig) -> dict:
    """Sample each contender on the same prompts (same seed); judge NLL (nats/token, pooled and per prompt),
    parse rate (and per prompt) of prompt + response, blank rate."""
    from dlm_factory.dlm.sampling.generate import encode_prompts

    prompt_ids = encode_prompts(tokenizer, prompt_texts)
    out = {}
    for name, den in denoisers.items():
        start = time.perf_counter()
        ids = sample(den, prompt_ids, sampler)
        seconds = time.perf_counter() - start
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
        scores = judge_nlls(judge, prompt_ids, ids)
        parsed = [parses(p + t) for p, t in zip(prompt_texts, texts, strict=True)]
        out[name] = {"judge_nll": pooled_mean(scores)[0],
                     "parse_rate": sum(parsed) / len(parsed), "seconds": seconds,
                     "blank_rate": sum(not t.strip() for t in texts) / len(texts),  # blanks score well on both of the above
                     "prompt_scores": scores, "prompt_parses": parsed,
                     "examples": texts[:2]}
    return out


def run_gate(ensemble, members: dict[str, object], windows, *, cfg: GateConfig, mc_samples: int = 64,
             seed: int = 0, batch_size: int = 16, prompts: list[str] | None = None, judge=None,
             user: str | None = None, combination: dict | None = None) -> GateReport:
    """Evaluate the gate on held-out ``windows`` (a ``Windows``) and ``prompts``.

    ``members`` maps member names (the first is the general model) to their denoisers.
    Sample checks run when ``prompts`` and a ``judge`` are given and ``cfg.prompts > 0``.
    """
    start = time.perf_counter()
    contenders = {"ensemble": ensemble, **members}
    est = paired_elbo(contenders, windows.ids, attention_mask=windows.attention_mask, keep=windows.keep,
                      n=mc_samples, seed=seed, batch_size=batch_size)
    checks = elbo_checks(est, list(members), cfg)
    quality: dict = {}
    notes = [f"ELBO error bars: Monte Carlo standard errors ({2 * ((mc_samples + 1) // 2)} draws per window, "
             "two per stratum), paired across contenders; they do not cover the choice of documents"]
    if cfg.prompts and prompts and judge is not None:
        general = next(iter(members))
        quality = sample_quality({"general": members[general], "ensemble": ensemble}, prompts[: cfg.prompts],
                                 ensemble.tokenizer, judge, cfg.sampler)
        checks += quality_checks(quality, cfg)
    else:
        notes.append("sample checks skipped (no prompts or no judge)")
    return GateReport(passed=all(c.passed for c in checks), user=user, combination=combination or {},
                      checks=checks, elbo={k: v.to_dict() for k, v in est.items()}, quality=quality,
                      config=cfg.model_dump(), windows=int(windows.ids.shape[0]),
                      seconds=time.perf_counter() - start, notes=notes)


def markdown(report: GateReport | dict) -> str:
    """``gate.md``: the decision, the checks, the ELBO table and the sample quality."""
    r = report.to_dict() if isinstance(report, GateReport) else report
    verdict = "PASSED: publishable" if r["passed"] else "FAILED: not publishable"
    comb = r.get("combination") or {}
    lines = [f"# Validation gate: {verdict}", ""]
    if r.get("user"):
        lines.append(f"User: `{r['user']}`  ")
    if comb:
        lines.append(f"Combination: {comb.get('rule', '?')}, lambda = {comb.get('lambda', '?')}  ")
    lines += [f"Held-out windows: {r['windows']}", "", "| check | result | value | threshold | detail |",
              "|---|---|---:|---:|---|"]
    for c in r["checks"]:
        lines.append(f"| {c['name']} | {'pass' if c['passed'] else 'FAIL'} | {c['value']:.4f} | "
                     f"{c['threshold']:.4f} | {c['detail']} |")
    lines += ["", "| contender | ELBO (bits/token) | stderr |", "|---|---:|---:|"]
    for name, e in r["elbo"].items():
        lines.append(f"| {name} | {e['bits_per_token']:.4f} | {e['stderr']:.4f} |")
    if r["quality"]:
        lines += ["", "| samples | judge NLL (nats/token) | parse rate | blank responses | seconds |",
                  "|---|---:|---:|---:|---:|"]
        for name, q in r["quality"].items():
            nll = "n/a" if q["judge_nll"] is None else f"{q['judge_nll']:.4f}"
            lines.append(f"| {name} | {nll} | {q['parse_rate']:.3f} | {q.get('blank_rate', 0):.3f} | {q['seconds']:.1f} |")
    if r.get("notes"):
        lines += [""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def write_report(report: GateReport, directory: str | Path) -> tuple[Path, Path]:
    """Write ``gate.json`` and ``gate.md`` into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    data = report.to_dict()
    (d / GATE_JSON).write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    (d / GATE_MD).write_text(markdown(data))
    return d / GATE_JSON, d / GATE_MD


def read_report(directory: str | Path) -> dict | None:
    """The gate report in ``directory`` (None when there is none)."""
    p = Path(directory) / GATE_JSON
    return json.loads(p.read_text()) if p.is_file() else None
