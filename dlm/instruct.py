"""Instruction tuning (SFT) of diffusion LMs, with an AR SFT baseline on the same rows.

Method (LLaDA, Nie et al. 2025, "Large Language Diffusion Models", SFT section):
each row is prompt + response + EOS + padding to a fixed response length L. Prompt
tokens are never masked; the response, its EOS and the padding (real, attended
tokens, so the model learns where a response ends) are masked at rate t ~ U(eps, 1);
the loss (1/t) * sum of -log p over masked tokens is divided by the row's response
length L (``diffusion_loss(..., keep=prompt, per_sequence=True)``). The padding is by
default *rainbow padding* (Kim et al. 2025): one EOS, then a cycle of K distinct pad
tokens instead of repeated EOS. Repeated EOS makes "EOS" the most confident
prediction at every late position; a confidence-ordered sampler commits those first
and the EOS spreads backwards into near-empty answers. With K pads each late
position's mass is split K ways, so content is decoded first. ``padding="eos"`` keeps
LLaDA's original. The pads are recorded in ``DiffusionSpec.pad_token_ids``; the
sampler treats them like EOS. The AR baseline trains the same base's AR checkpoint
with next-token cross-entropy on prompt + response + one EOS, prompt tokens excluded
from the loss.

Prompts are formatted with the tokenizer's chat template when it has one, else with
the documented default ``DEFAULT_FORMAT`` (installed as the output's chat template, so
``apply_chat_template`` reproduces it at inference). Which one was used is recorded
in ``diffusion.json`` (``stages[-1]``) and in ``instruct.json``.

Batching: rows are bucketed by total length (shuffle, sort windows of
``bucket_window`` batches by length, cut into batches, shuffle the batches), so
padding stays low; ``response_bucket`` < L additionally rounds each row's padding
to a multiple of ``response_bucket`` instead of L. Batches are a pure function of the
step, so a resumed run sees exactly the batches an uninterrupted one would.

Evaluation (``evaluate_instruct``) on held-out instructions: the conditional
likelihood of the reference response (diffusion: ELBO with the prompt kept; AR: exact
NLL), both in bits per reference token (response + one EOS); and on generated
responses: parse rate, judge NLL under an AR checkpoint (use an instruction-tuned
one: an untuned judge rewards degenerate repetition), exact match of the first line,
repetition.

Shapes: B batch, T row length, P prompt length, L response length.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from dlm.diffusion import ModelDenoiser, ar_loss, ar_nll, diffusion_loss, elbo
from dlm.errors import FactoryError
from dlm.instruct_data import Example, first_line, load_examples
from dlm.modeling import SPEC_FILE, DiffusionSpec, Loaded, load_model, save_model, tokenizer_digest
from dlm.sampling import SamplerConfig, sample
from dlm.train import TrainConfig, TrainResult, train
from dlm.vocab import add_special_tokens, unused_special_tokens

log = logging.getLogger("dlm.instruct")

REPORT_FILE = "instruct.json"

# The documented default prompt format, used when the tokenizer has no chat template.
DEFAULT_FORMAT = "### Instruction:\n{prompt}\n### Response:\n"
# The same format as a Jinja chat template (system text first, then user/assistant turns).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '### Response:\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------- configs


class InstructConfig(BaseModel):
    """Settings of instruction tuning (defaults: the embedded demo, a few minutes on CPU)."""

    data: str = Field("stdlib:train", description="instructions: stdlib[:split] or a JSONL file/dir (path, file:// or s3://)")
    objective: Literal["diffusion", "ar"] = Field("diffusion", description="diffusion: LLaDA SFT of a DLM; ar: next-token SFT of an AR checkpoint (the baseline)")
    response_len: int = Field(64, ge=2, description="response length L in tokens, EOS padding included; longer responses are dropped")
    response_bucket: int | None = Field(None, gt=0, description="pad each response to a multiple of this instead of L (None: always L, as LLaDA)")
    padding: Literal["rainbow", "eos"] = Field("rainbow", description="diffusion: what fills the response after its one EOS: rainbow (a cycle of distinct pad tokens, Kim et al. 2025) or eos (repeated EOS, LLaDA)")
    pad_tokens: int = Field(7, ge=1, le=64, description="rainbow padding: number of distinct pad tokens in the cycle (reserved tokens reused, else added)")
    max_prompt_len: int | None = Field(None, gt=0, description="longest prompt in tokens (None: the model's positions minus L); JSONL prompts beyond it are refused, stdlib ones dropped")
    heldout_fraction: float = Field(0.05, ge=0, lt=1, description="stdlib: share of module files held out (0.05: the files the base corpus holds out)")
    max_doc_chars: int = Field(300, gt=0, description="stdlib: skip functions whose docstring summary is longer")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="JSONL: refuse the data when more lines than this share are malformed")
    bucket_window: int = Field(16, gt=0, description="batches per length-sorting window (1: no bucketing)")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=100, batch_size=16, lr=1e-3, warmup_steps=10),
                               description="optimisation settings")


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


# ----------------------------------------------------------------------------- prompt format


def ensure_chat_template(tokenizer) -> str:
    """"tokenizer" if the tokenizer has its own chat template; else install the default, return "default"."""
    current = getattr(tokenizer, "chat_template", None)
    if current:
        return "default" if current == DEFAULT_CHAT_TEMPLATE else "tokenizer"
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return "default"


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text the model sees: chat template with the generation prompt appended."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_chat(tokenizer, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
    """Prompt token ids exactly as SFT builds them (training and inference share this)."""
    if not conversations:
        return []
    own_template = getattr(tokenizer, "chat_template", None) not in (None, DEFAULT_CHAT_TEMPLATE)
    texts = [render_prompt(tokenizer, messages) for messages in conversations]
    # A tokenizer's own template writes its BOS itself; the default lets the tokenizer add its usual specials.
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=not own_template)["input_ids"]]


# ----------------------------------------------------------------------------- rows


@dataclass
class Row:
    prompt: list[int]  # formatted prompt tokens (kept, never masked)
    response: list[int]  # response tokens, without EOS
    source: str
    first_line: str  # first non-blank line of the reference response


@dataclass
class LengthReport:
    """What the tokenizer-dependent filters dropped."""

    too_long_responses: int = 0  # response + EOS longer than L
    long_prompts: int = 0  # dropped (stdlib) prompts longer than max_prompt_len
    special_token_rows: int = 0  # dropped: the text contains the DLM's mask or pad tokens
    rows: int = 0
    max_prompt_len: int = 0
    mean_prompt_tokens: float = 0.0
    mean_response_tokens: float = 0.0


def encode(tokenizer, examples: list[Example], *, response_len: int, max_prompt_len: int,
           refuse_long_prompts: bool) -> tuple[list[Row], LengthReport]:
    """Tokenize examples (template applied) into rows; drop responses longer than L - 1 tokens.

    A prompt longer than ``max_prompt_len`` raises FactoryError naming its source
    line when ``refuse_long_prompts``, else the example is dropped and counted.
    """
    prompts = encode_chat(tokenizer, [ex.messages for ex in examples])
    responses = tokenizer([ex.response for ex in examples], add_special_tokens=False)["input_ids"] if examples else []
    report = LengthReport(max_prompt_len=max_prompt_len)
    rows = []
    for ex, p, r in zip(examples, prompts, responses, strict=True):
        if len(p) > max_prompt_len:
            if refuse_long_prompts:
                raise FactoryError(f"{ex.source}: prompt is {len(p)} tokens, longer than the context allows "
                                   f"({max_prompt_len} = positions left after the {response_len}-token response; "
                                   "shorten it or lower --response-len)")
            report.long_prompts += 1
            continue
        if len(r) + 1 > response_len:
            report.too_long_responses += 1
            continue
        rows.append(Row(list(p), list(r), ex.source, ex.first_line))
    report.rows = len(rows)
    if rows:
        report.mean_prompt_tokens = sum(len(r.prompt) for r in rows) / len(rows)
        report.mean_response_tokens = sum(len(r.response) for r in rows) / len(rows)
    return rows, report


def diffusion_row(row: Row, fill_to: int, eos: int, pads: list[int] | tuple[int, ...] = ()) -> tuple[list[int], int]:
    """(prompt + response + EOS + padding to ``fill_to`` response tokens, prompt length).

    Padding: EOS repeated (LLaDA) when ``pads`` is empty, else the rainbow cycle
    pads[0], pads[1], ..., pads[K-1], pads[0], ... after the single EOS.
    """
    n = fill_to - len(row.response) - 1
    fill = [eos] * n if not pads else [pads[i % len(pads)] for i in range(n)]
    return row.prompt + row.response + [eos] + fill, len(row.prompt)


def ar_row(row: Row, eos: int) -> tuple[list[int], int]:
    """(prompt + response + one EOS, prompt length)."""
    return row.prompt + row.response + [eos], len(row.prompt)


def collate(seqs: list[tuple[list[int], int]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask and prompt_mask (True on prompt tokens), each [B, T]."""
    T = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    am = torch.zeros_like(ids)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for b, (s, n_prompt) in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        am[b, : len(s)] = 1
        keep[b, :n_prompt] = True
    return {"input_ids": ids, "attention_mask": am, "prompt_mask": keep}


class SFTBatches:
    """Length-bucketed micro-batches of SFT rows; ``batch(i)`` is a pure function of i.

    Each epoch: a seeded permutation of the rows, cut into windows of
    ``window * batch_size`` rows, each window sorted by row length and cut into
    batches, then the batch order shuffled. ``window=1`` gives plain random batches.
    """

    def __init__(self, rows: list[Row], *, objective: str, response_len: int, response_bucket: int | None,
                 batch_size: int, seed: int, eos: int, pad: int, window: int = 16,
                 pads: list[int] | tuple[int, ...] = ()):
        if len(rows) < batch_size:
            raise FactoryError(f"only {len(rows)} usable examples, fewer than the batch size {batch_size}")
        self.rows, self.objective, self.batch_size, self.seed = rows, objective, batch_size, seed
        self.eos, self.pad, self.window = eos, pad, window
        step = response_bucket or response_len
        self.seqs = []
        for r in rows:
            if objective == "ar":
                self.seqs.append(ar_row(r, eos))
            else:
                fill = min(response_len, math.ceil((len(r.response) + 1) / step) * step)
                self.seqs.append(diffusion_row(r, fill, eos, pads))
        self.per_epoch = len(rows) // batch_size

    @functools.lru_cache(maxsize=2)  # noqa: B019 (two epochs of index lists; the object lives as long as training)
    def _epoch(self, epoch: int, window: int) -> list[list[int]]:
        g = random.Random(self.seed * 100_003 + epoch)
        order = list(range(len(self.seqs)))
        g.shuffle(order)
        batches = []
        span = window * self.batch_size
        for lo in range(0, len(order), span):
            chunk = sorted(order[lo : lo + span], key=lambda i: len(self.seqs[i][0]))
            batches.extend(chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size))
        batches = [b for b in batches if len(b) == self.batch_size]
        g.shuffle(batches)
        return batches

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(index, self.per_epoch)
        return collate([self.seqs[i] for i in self._epoch(epoch, self.window)[j]], self.pad)

    def padding(self, window: int | None = None) -> dict:
        """Token accounting over one epoch: pad (unattended) and EOS-fill shares of all row slots."""
        slots = real = fill = 0
        for b in self._epoch(0, self.window if window is None else window):
            lengths = [len(self.seqs[i][0]) for i in b]
            slots += max(lengths) * len(b)
            real += sum(lengths)
            fill += sum(len(self.seqs[i][0]) - len(self.rows[i].prompt) - len(self.rows[i].response) - 1 for i in b)
        return {"pad_fraction": round(1 - real / slots, 4), "eos_fill_fraction": round(fill / slots, 4),
                "tokens_per_epoch": slots}


# ----------------------------------------------------------------------------- the stage


@dataclass
class InstructResult:
    train: TrainResult
    data: dict  # DataReport + LengthReport + padding
    template: str  # "tokenizer" or "default"
    output: str = ""

    @property
    def final_loss(self) -> float:
        return self.train.final_loss

    @property
    def tokens_per_s(self) -> float:
        return self.train.tokens_per_s


def _context(loaded: Loaded, response_len: int, max_prompt_len: int | None) -> int:
    """Longest prompt allowed: ``max_prompt_len`` or what the positions leave after L."""
    positions = loaded.max_positions
    if positions is not None and response_len + 1 > positions:
        raise FactoryError(f"response length {response_len} does not fit the model's {positions} positions")
    room = positions - response_len if positions is not None else None
    if max_prompt_len is None:
        if room is None:
            raise FactoryError("the model config has no position limit; set max_prompt_len")
        return room
    if room is not None and max_prompt_len > room:
        raise FactoryError(f"max_prompt_len {max_prompt_len} + response length {response_len} exceeds "
                           f"the model's {positions} positions")
    return max_prompt_len


def check_objective(loaded: Loaded, objective: str, where: str) -> None:
    if objective == "diffusion" and not loaded.is_diffusion:
        raise FactoryError(f"{where}: autoregressive checkpoint (no diffusion.json); convert it first "
                           "(factory convert), or pass --objective ar for the AR SFT baseline")
    if objective == "ar" and loaded.is_diffusion:
        raise FactoryError(f"{where}: diffusion checkpoint; --objective ar needs an autoregressive one")


def prepare_rows(loaded: Loaded, src: str, *, response_len: int, max_prompt_len: int | None,
                 heldout_fraction: float, max_doc_chars: int, max_bad_fraction: float) -> tuple[list[Row], dict]:
    """Load ``src`` and tokenize it for ``loaded`` (its chat template, its context)."""
    examples, report = load_examples(src, heldout_fraction=heldout_fraction, max_bad_fraction=max_bad_fraction,
                                     max_doc_chars=max_doc_chars)
    limit = _context(loaded, response_len, max_prompt_len)
    rows, lengths = encode(loaded.tokenizer, examples, response_len=response_len, max_prompt_len=limit,
                           refuse_long_prompts=not src.startswith("stdlib"))
    if loaded.spec is not None:  # text that tokenizes to the mask or a pad token would corrupt the targets
        special = {loaded.spec.mask_token_id, *loaded.spec.pad_token_ids}
        clean = [r for r in rows if not special.intersection(r.prompt) and not special.intersection(r.response)]
        lengths.special_token_rows, rows = len(rows) - len(clean), clean
        if lengths.special_token_rows:
            log.warning("%s: dropped %d examples containing the mask token %r or a pad token", src,
                        lengths.special_token_rows, loaded.spec.mask_token)
    if lengths.too_long_responses:
        log.info("%s: dropped %d responses longer than %d tokens", src, lengths.too_long_responses, response_len - 1)
    if not rows:
        raise FactoryError(f"{src}: no example fits (response length {response_len}, prompt <= {limit} tokens)")
    return rows, {**report.to_dict(), **asdict(lengths)}


def instruct(model: str | os.PathLike, output: str | os.PathLike, cfg: InstructConfig, *,
             checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
             on_log=None, overwrite: bool = False) -> InstructResult:
    """Instruction-tune ``model`` on ``cfg.data`` and save the result at ``output`` (atomic).

    ``cfg.objective`` "diffusion" needs a DLM (LLaDA SFT); "ar" needs an AR checkpoint
    (the baseline). With ``checkpoint_dir`` an interrupted run resumes where it stopped.
    """
    where = os.fspath(model)
    if not overwrite and "://" not in os.fspath(output) and Path(output).exists():  # fail before training
        raise FactoryError(f"{Path(output).resolve()}: output already exists (choose another --output or remove it)")
    loaded = load_model(model)
    check_objective(loaded, cfg.objective, where)
    tok = loaded.tokenizer
    if tok.eos_token_id is None:
        raise FactoryError(f"{where}: the tokenizer has no EOS token (needed to end responses)")
    template = ensure_chat_template(tok)
    pads = ensure_pad_tokens(loaded, cfg.pad_tokens, seed=cfg.train.seed) \
        if cfg.objective == "diffusion" and cfg.padding == "rainbow" else []
    rows, data = prepare_rows(loaded, cfg.data, response_len=cfg.response_len, max_prompt_len=cfg.max_prompt_len,
                              heldout_fraction=cfg.heldout_fraction, max_doc_chars=cfg.max_doc_chars,
                              max_bad_fraction=cfg.max_bad_fraction)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    mb = cfg.train.micro_batch()
    batches = SFTBatches(rows, objective=cfg.objective, response_len=cfg.response_len,
                         response_bucket=cfg.response_bucket, batch_size=mb, seed=cfg.train.seed,
                         eos=eos, pad=pad, window=cfg.bucket_window, pads=pads)
    data["padding"] = batches.padding()
    data["padding_unbucketed"] = batches.padding(window=1)
    log.info("instruct: %d rows; padding %.1f%% (unbucketed %.1f%%), response fill %.1f%%", len(rows),
             100 * data["padding"]["pad_fraction"], 100 * data["padding_unbucketed"]["pad_fraction"],
             100 * data["padding"]["eos_fill_fraction"])
    spec = loaded.spec

    def objective(model, batch, step, generator):
        if cfg.objective == "ar":
            return ar_loss(model, batch["input_ids"], attention_mask=batch["attention_mask"], keep=batch["prompt_mask"])
        return diffusion_loss(model, spec, batch["input_ids"], attention_mask=batch["attention_mask"],
                              keep=batch["prompt_mask"], per_sequence=True, generator=generator)

    result = train(loaded.model, lambda step, m: batches.batch(step * cfg.train.grad_accum + m), objective,
                   cfg.train, checkpoint_dir=checkpoint_dir, progress=progress, on_log=on_log)
    stage = {"stage": "instruct", "objective": cfg.objective, "template": template,
             "chat_template": tok.chat_template, "prompt_format": DEFAULT_FORMAT if template == "default" else None,
             "padding": {"kind": "rainbow" if pads else "eos", "token_ids": pads,
                         "tokens": tok.convert_ids_to_tokens(pads)} if cfg.objective == "diffusion" else None,
             "base_model": where, "ar_base": lineage_root(loaded.path or Path(where), where), "config": cfg.model_dump(), "data": data,
             "final_loss": result.final_loss, "tokens_per_s": result.tokens_per_s}
    if spec is not None:
        spec.stages.append(stage)
    save_model(Loaded(loaded.model, tok, spec), output, overwrite=overwrite, extra={REPORT_FILE: stage})
    return InstructResult(train=result, data=data, template=template, output=os.fspath(output))


def ensure_pad_tokens(loaded: Loaded, k: int, *, seed: int = 0) -> list[int]:
    """The K rainbow pad token ids of a DLM, recorded in its spec (``pad_token_ids``).

    A model that already has K pads (tuned before) keeps them. Otherwise unused
    reserved special tokens are taken first, then ``<|pad_i|>`` tokens are added
    (rows at the mean embedding plus seeded noise, so the K pads start distinct).
    """
    spec, tok = loaded.spec, loaded.tokenizer
    if len(spec.pad_token_ids) == k:
        return list(spec.pad_token_ids)
    if spec.pad_token_ids:
        raise FactoryError(f"the model was tuned with {len(spec.pad_token_ids)} rainbow pad tokens, not {k}; "
                           f"pass --pad-tokens {len(spec.pad_token_ids)}")
    pads = [i for i, _ in unused_special_tokens(tok, exclude={spec.mask_token_id})][:k]
    vocab = tok.get_vocab()
    names = (f"<|pad_{i}|>" for i in itertools.count())
    new = list(itertools.islice((n for n in names if n not in vocab), k - len(pads)))
    if new:
        pads += add_special_tokens(loaded, new, seed=seed, noise=0.1)
    spec.pad_token_ids = pads
    spec.tokenizer_digest = tokenizer_digest(tok)
    return pads


def lineage_root(model_dir: str | os.PathLike, where: str) -> str:
    """The AR checkpoint at the root of a model's lineage, read from the JSON beside its weights.

    A DLM's ``source`` (diffusion.json), an AR SFT model's recorded base (instruct.json),
    else ``where`` itself. The default judge, and what the instruct flow tunes its judge from.
    """
    model_dir = Path(model_dir)
    if (model_dir / SPEC_FILE).is_file():
        return DiffusionSpec.read(model_dir).source
    return (instruct_report(model_dir) or {}).get("ar_base") or where


def instruct_report(model_dir: str | os.PathLike) -> dict | None:
    """The ``instruct.json`` of a tuned checkpoint dir, or None."""
    path = Path(model_dir) / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------- evaluation


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

    Diffusion: the ELBO of prompt + response + EOS padding to L with the prompt kept
    (LLaDA/SMDM conditional bound), i.e. an upper bound on -log p(response) under the
    fixed-length model, divided by the same token count as the AR figure. AR: exact NLL.
    Rows are evaluated in length-sorted chunks (little padding); chunk i of the ELBO
    uses seed + i, so chunks are independent and their variances add.
    """
    tok = loaded.tokenizer
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    ref_tokens = sum(len(r.response) + 1 for r in rows)
    ordered = sorted(rows, key=lambda r: len(r.prompt) + len(r.response))
    chunks = [ordered[i : i + cfg.batch_size] for i in range(0, len(ordered), cfg.batch_size)]
    bits = var = padded = 0.0
    if loaded.is_diffusion:
        denoiser = ModelDenoiser(loaded)
        for i, chunk in enumerate(chunks):
            b = collate([diffusion_row(r, cfg.response_len, eos, loaded.spec.pad_token_ids) for r in chunk], pad)
            est = elbo(denoiser, b["input_ids"], attention_mask=b["attention_mask"], keep=b["prompt_mask"],
                       n=cfg.mc_samples, seed=cfg.seed + i, batch_size=cfg.batch_size)
            bits += est.bits_per_token * est.tokens  # total bound over the padded response tokens
            var += (est.stderr * est.tokens) ** 2
            padded += est.tokens
        return {"kind": "elbo", "bits_per_token": bits / ref_tokens, "stderr": math.sqrt(var) / ref_tokens,
                "tokens": ref_tokens, "padded_bits_per_token": bits / padded, "mc_samples": cfg.mc_samples}
    for chunk in chunks:
        b = collate([ar_row(r, eos) for r in chunk], pad)
        est = ar_nll(loaded.model, b["input_ids"], attention_mask=b["attention_mask"], keep=b["prompt_mask"],
                     batch_size=cfg.batch_size)
        bits += est.bits_per_token * est.tokens
    return {"kind": "nll", "bits_per_token": bits / ref_tokens, "stderr": 0.0, "tokens": ref_tokens}


@torch.no_grad()
def ar_generate(loaded: Loaded, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16) -> list[list[int]]:
    """Greedy decoding with HF ``generate`` (KV cache), left-padded batches; cut at the first EOS."""
    tok, model = loaded.tokenizer, loaded.model
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    out: list[list[int]] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        P = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), P), pad, dtype=torch.long)
        am = torch.zeros_like(ids)
        for b, p in enumerate(chunk):
            ids[b, P - len(p) :] = torch.tensor(p)
            am[b, P - len(p) :] = 1
        gen = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad, use_cache=True)
        for row in gen[:, P:].tolist():
            cut = next((i for i, t in enumerate(row) if t in (eos, pad)), len(row))
            out.append(row[:cut])
    return out


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
    from dlm.metrics import judge_nll, parse_rate, repetition

    tok = loaded.tokenizer
    texts = [tok.decode(o, skip_special_tokens=True) for o in outputs]
    nonempty = [t for t in texts if has_code(t)]
    parsed = parse_rate(nonempty) * len(nonempty) / len(texts) if nonempty else 0.0
    firsts = [first_line(t) for t in texts]
    exact = sum(f == r.first_line for f, r in zip(firsts, rows, strict=True)) / len(rows)
    similar = sum(line_similarity(f, r.first_line) for f, r in zip(firsts, rows, strict=True)) / len(rows)

    own_digest = tokenizer_digest(tok)

    def judged(j: Loaded | None) -> float | None:
        if j is None:
            return None
        if tokenizer_digest(j.tokenizer) == own_digest:
            prompts, conts = [r.prompt for r in rows], outputs
        else:  # re-tokenize text for a judge with another tokenizer
            prompts = [j.tokenizer(tok.decode(r.prompt))["input_ids"] for r in rows]
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
    tuned = judge is not None and judge.path is not None and instruct_report(judge.path) is not None
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

