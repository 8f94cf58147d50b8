"""Held-out instruction evaluation (``factory instruct-eval``).

The conditional likelihood of the reference response (diffusion: ELBO with the
prompt kept; AR: exact NLL), both in bits per reference token (response + one EOS);
and on generated responses: parse rate, judge NLL under an AR checkpoint (use an
instruction-tuned one: an untuned judge rewards degenerate repetition), exact and
graded first-line match, repetition.
"""

from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from dlm_factory.dlm.checkpoint.io import Loaded, load_model
from dlm_factory.dlm.checkpoint.record import lineage_root, read_record
from dlm_factory.dlm.data.batching import collate, pad_id
from dlm_factory.dlm.data.chat import encode_chat, ensure_chat_template
from dlm_factory.dlm.data.instructions import first_line
from dlm_factory.dlm.data.sft import Row, ar_row, diffusion_row, prepare_rows
from dlm_factory.dlm.diffusion.denoiser import ModelDenoiser
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.evaluation.likelihood import ar_nll, elbo
from dlm_factory.dlm.sampling.generate import ar_generate
from dlm_factory.dlm.sampling.sampler import SamplerConfig, sample

log = logging.getLogger(__name__)


class InstructEvalConfig(BaseModel):
    """Settings of the held-out instruction evaluation (``factory instruct-eval``)."""

    data: str = Field("stdlib:heldout", description="held-out instructions: stdlib[:split] or JSONL path/URL")
    response_len: int = Field(64, ge=2, description="response length L (generation length; longer references are dropped)")
    max_prompt_len: int | None = Field(None, gt=0, description="longest prompt in tokens (None: the model's positions minus L)")
    max_examples: int = Field(32, gt=0, description="held-out examples for the likelihood (a seeded sample)")
    gen_examples: int = Field(16, ge=0, description="of those, how many are generated (parse rate, judge NLL, exact match)")
    mc_samples: int = Field(16, gt=0, description="Monte Carlo samples of t for the conditional ELBO (LLaDA: 128; the bench uses more)")
    seed: int = Field(0, description="seed of the example sample, the ELBO and the sampler")
    batch_size: int = Field(16, gt=0, description="rows per forward pass")
    heldout_fraction: float = Field(0.05, ge=0, lt=1, description="stdlib: share of module files held out")
    max_doc_chars: int = Field(300, gt=0, description="stdlib: skip functions whose docstring summary is longer")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="JSONL: refuse the data beyond this share of bad lines")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="diffusion decoding (its length is set to response_len)")
    judge: str | None = Field(None, description="AR checkpoint scoring generations; should be instruction-tuned on the same format (an AR SFT model: an untuned judge rewards degenerate repetition). None: the lineage's root AR model")


def heldout_rows(loaded: Loaded, cfg: InstructEvalConfig) -> tuple[list[Row], dict]:
    """A seeded sample of ``cfg.max_examples`` held-out rows, formatted for ``loaded``."""
    rows, data = prepare_rows(loaded, cfg.data, response_len=cfg.response_len, max_prompt_len=cfg.max_prompt_len,
                              heldout_fraction=cfg.heldout_fraction, max_doc_chars=cfg.max_doc_chars,
                              max_bad_fraction=cfg.max_bad_fraction)
    rows = list(rows)
    random.Random(cfg.seed).shuffle(rows)
    return rows[: cfg.max_examples], data


@torch.no_grad()
def conditional_likelihood(loaded: Loaded, rows: list[Row], cfg: InstructEvalConfig) -> dict:
    """Bits per reference token (response + one EOS) of the reference responses given the prompts.

    Diffusion, two bounds: ``bits_per_token`` is the ELBO of prompt + response + EOS with the
    prompt kept (LLaDA/SMDM conditional bound on -log p(response, EOS | prompt)), over the
    same tokens as the AR figure; ``padded_bits_per_token`` is the ELBO of the row padded to
    L as SFT trains it (rainbow or EOS fill scored too), per padded token: only a tuned model
    has learned the padding, so compare untuned and tuned models on the first. AR: exact NLL.
    Rows are evaluated in length-sorted chunks (little padding); chunk i of each ELBO uses
    seed + i, so chunks are independent and their variances add.
    """
    tok = loaded.tokenizer
    eos = tok.eos_token_id
    pad = pad_id(tok)
    ref_tokens = sum(len(r.response) + 1 for r in rows)
    ordered = sorted(rows, key=lambda r: len(r.prompt) + len(r.response))
    chunks = [ordered[i : i + cfg.batch_size] for i in range(0, len(ordered), cfg.batch_size)]
    if loaded.is_diffusion:
        denoiser = ModelDenoiser(loaded)

        def bound(make_row) -> tuple[float, float, int]:  # (bits/token, stderr, tokens) over all chunks
            bits = var = count = 0.0
            for i, chunk in enumerate(chunks):
                b = collate([make_row(r) for r in chunk], pad)
                est = elbo(denoiser, b["input_ids"], attention_mask=b["attention_mask"], keep=b["prompt_mask"],
                           n=cfg.mc_samples, seed=cfg.seed + i, batch_size=cfg.batch_size)
                bits += est.bits_per_token * est.tokens
                var += (est.stderr * est.tokens) ** 2
                count += est.tokens
            return bits / count, math.sqrt(var) / count, int(count)

        resp, resp_err, n = bound(lambda r: ar_row(r, eos))  # prompt + response + EOS: the AR figure's tokens
        padded, padded_err, _ = bound(lambda r: diffusion_row(r, cfg.response_len, eos, loaded.spec.pad_token_ids))
        assert n == ref_tokens
        return {"kind": "elbo", "bits_per_token": resp, "stderr": resp_err, "tokens": ref_tokens,
                "padded_bits_per_token": padded, "padded_stderr": padded_err, "mc_samples": cfg.mc_samples}
    bits = 0.0
    for chunk in chunks:
        b = collate([ar_row(r, eos) for r in chunk], pad)
        est = ar_nll(loaded.model, b["input_ids"], attention_mask=b["attention_mask"], keep=b["prompt_mask"],
                     batch_size=cfg.batch_size)
        bits += est.bits_per_token * est.tokens
    return {"kind": "nll", "bits_per_token": bits / ref_tokens, "stderr": 0.0, "tokens": ref_tokens}


def generations(loaded: Loaded, rows: list[Row], cfg: InstructEvalConfig) -> list[list[int]]:
    """Responses to the rows' prompts: diffusion sampler for a DLM, greedy ``generate`` for an AR model."""
    prompts = [r.prompt for r in rows]
    if loaded.is_diffusion:
        scfg = cfg.sampler.model_copy(update={"length": cfg.response_len})
        out = []
        for lo in range(0, len(prompts), cfg.batch_size):
            out.extend(sample(ModelDenoiser(loaded), prompts[lo : lo + cfg.batch_size], scfg))
        return out
    return ar_generate(loaded, prompts, cfg.response_len, cfg.batch_size)


def generation_metrics(loaded: Loaded, rows: list[Row], outputs: list[list[int]], judge: Loaded | None,
                       extra_judges: dict[str, Loaded] | None = None) -> dict:
    """Parse rate, judge NLL (nats/token), first-line exact match, repetition of generated responses.

    The parse rate counts a response without a code line (empty, or comments only:
    both parse trivially) as a failure. ``extra_judges`` add ``judge_nll_<name>``
    figures for the same outputs (the bench compares judges without re-generating).
    """
    from dlm_factory.dlm.evaluation.metrics import judge_nll, parse_rate, repetition

    tok = loaded.tokenizer
    texts = [tok.decode(o, skip_special_tokens=True) for o in outputs]
    nonempty = [t for t in texts if has_code(t)]
    parsed = parse_rate(nonempty) * len(nonempty) / len(texts) if nonempty else 0.0
    firsts = [first_line(t) for t in texts]
    exact = sum(f == r.first_line for f, r in zip(firsts, rows, strict=True)) / len(rows)
    similar = sum(line_similarity(f, r.first_line) for f, r in zip(firsts, rows, strict=True)) / len(rows)

    def judged(j: Loaded | None) -> float | None:
        """Every contender is scored the same way: the judge formats the conversation itself and
        reads the response as text (ids of another tokenizer, or a second BOS, never reach it)."""
        if j is None:
            return None
        ensure_chat_template(j.tokenizer)
        prompts = encode_chat(j.tokenizer, [r.messages for r in rows])
        conts = [j.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        nll = judge_nll(j, prompts, conts)
        return None if math.isnan(nll) else nll

    extra = {f"judge_nll_{name}": judged(j) for name, j in (extra_judges or {}).items()}
    return {"parse_rate": parsed, "judge_nll": judged(judge), **extra, "exact_first_line": exact,
            "first_line_similarity": similar,
            "no_code_rate": 1 - len(nonempty) / len(texts), "mean_tokens": sum(map(len, outputs)) / len(outputs),
            **repetition(outputs), "samples": [{"source": r.source, "text": t} for r, t in zip(rows[:3], texts[:3], strict=True)]}


def line_similarity(a: str, b: str) -> float:
    """Graded first-line match in [0, 1]: difflib's ratio 2M/T of the two lines (1: identical)."""
    import difflib

    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def has_code(text: str) -> bool:
    """True when some line is neither blank nor a comment."""
    return any(line.strip() and not line.strip().startswith("#") for line in text.splitlines())


def evaluate_loaded_instruct(loaded: Loaded, cfg: InstructEvalConfig, judge: Loaded | None = None,
                             rows: list[Row] | None = None, extra_judges: dict[str, Loaded] | None = None) -> dict:
    """All held-out instruction metrics of a loaded model (rows: reuse across models of one tokenizer)."""
    template = ensure_chat_template(loaded.tokenizer)
    data = {}
    if rows is None:
        rows, data = heldout_rows(loaded, cfg)
    result = {"kind": "diffusion" if loaded.is_diffusion else "ar", "template": template, "examples": len(rows),
              "likelihood": conditional_likelihood(loaded, rows, cfg)}
    gen_rows = rows[: cfg.gen_examples]
    if gen_rows:
        result["generation"] = {"examples": len(gen_rows),
                                **generation_metrics(loaded, gen_rows, generations(loaded, gen_rows, cfg), judge,
                                                     extra_judges)}
    if data:
        result["data"] = data
    return result


def evaluate_instruct(model: str | os.PathLike, cfg: InstructEvalConfig,
                      extra_judges: dict[str, Loaded] | None = None) -> dict:
    """Held-out instruction metrics of a checkpoint (see ``evaluate_loaded_instruct``).

    ``judge_tuned`` in the result says whether the judge was instruction-tuned: an
    untuned judge finds degenerate output (blank lines, repeated ``import``) likely
    and ranks it above real code (docs/instruct.md, "Figures").
    """
    where = os.fspath(model)
    loaded = load_model(model)
    judge_src = cfg.judge or lineage_root(loaded.path or Path(where), where)
    judge = None
    try:
        judge = load_model(judge_src)
        if judge.is_diffusion:
            raise FactoryError(f"{judge_src}: the judge must be an autoregressive checkpoint")
    except FactoryError as e:
        if cfg.judge:  # an explicit judge must work
            raise
        log.warning("no judge for %s (%s): judge NLL skipped", where, e)
        judge = None
    record = read_record(judge.path) if judge is not None and judge.path is not None else None
    tuned = record is not None and record.stage == "instruct"
    if judge is not None and not tuned:
        log.warning("judge %s is not instruction-tuned: its NLL rewards degenerate repetition; "
                    "pass an AR SFT model as the judge (factory instruct --objective ar)", judge_src)
    return {"model": where, "judge": judge_src if judge is not None else None, "judge_tuned": tuned,
            **evaluate_loaded_instruct(loaded, cfg, judge, extra_judges=extra_judges)}


def summary(result: dict) -> dict:
    """One flat table row of ``evaluate_instruct``'s result."""
    gen = result.get("generation", {})
    lik = result["likelihood"]

    def r(x, n=4):
        return None if x is None or math.isnan(x) else round(x, n)

    return {"cond_bits_per_token": r(lik["bits_per_token"]), "stderr": r(lik["stderr"]), "kind": lik["kind"],
            "parse_rate": r(gen.get("parse_rate"), 3), "judge_nll": r(gen.get("judge_nll"), 3),
            "exact_first_line": r(gen.get("exact_first_line"), 3),
            "first_line_similarity": r(gen.get("first_line_similarity"), 3), "no_code_rate": r(gen.get("no_code_rate"), 3),
            "distinct_2": r(gen.get("distinct_2"), 3), "mean_tokens": r(gen.get("mean_tokens"), 1)}
