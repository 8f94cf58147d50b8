"""SFT rows and batches: tokenized instructions, padding to a response length, length bucketing.

Each diffusion row is prompt + response + EOS + padding to a fixed response length L
(LLaDA), the padding by default a cycle of distinct pad tokens (rainbow padding);
an AR row is prompt + response + one EOS. Batches are bucketed by total length
(shuffle, sort windows of ``bucket_window`` batches by length, cut into batches,
shuffle the batches), so padding stays low, and are a pure function of the step.

Shapes: B batch, T row length.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import re
from dataclasses import asdict, dataclass, field

import torch

from dlm_factory.dlm.checkpoint.io import Loaded
from dlm_factory.dlm.data.batching import collate
from dlm_factory.dlm.data.chat import encode_chat, ensure_chat_template
from dlm_factory.dlm.data.instructions import Example, load_examples
from dlm_factory.dlm.errors import FactoryError

log = logging.getLogger(__name__)


@dataclass
class Row:
    prompt: list[int]  # formatted prompt tokens (kept, never masked)
    response: list[int]  # response tokens, without EOS
    source: str
    first_line: str  # first non-blank line of the reference response
    messages: list[dict[str, str]] = field(default_factory=list)  # the conversation, for judges with own formats


@dataclass
class LengthReport:
    """What the tokenizer-dependent filters dropped."""

    too_long_responses: int = 0  # response + EOS longer than L
    long_prompts: int = 0  # dropped (stdlib) prompts longer than max_prompt_len
    special_token_rows: int = 0  # dropped: the text contains a special token (the same rows for every contender)
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
        rows.append(Row(list(p), list(r), ex.source, ex.first_line, ex.messages))
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


# Tokens the factory itself adds (rainbow pads, an added mask): every tokenizer of one lineage
# refuses text containing them, so that contenders with and without them see the same rows.
FACTORY_TOKENS = re.compile(r"<\|pad_\d+\|>|\[MASK\]")


def has_special_text(tokenizer, text: str) -> bool:
    """Whether ``text`` spells a special token of the tokenizer's lineage (it would tokenize to it)."""
    return FACTORY_TOKENS.search(text) is not None or any(
        s and s in text for s in tokenizer.all_special_tokens + [str(t) for t in tokenizer.added_tokens_decoder.values()])


def prepare_rows(loaded: Loaded, src: str, *, response_len: int, max_prompt_len: int | None,
                 heldout_fraction: float, max_doc_chars: int, max_bad_fraction: float) -> tuple[list[Row], dict]:
    """Load ``src`` and tokenize it for ``loaded`` (its chat template, installed if missing; its context)."""
    ensure_chat_template(loaded.tokenizer)
    examples, report = load_examples(src, heldout_fraction=heldout_fraction, max_bad_fraction=max_bad_fraction,
                                     max_doc_chars=max_doc_chars)
    limit = _context(loaded, response_len, max_prompt_len)
    # Text that tokenizes to a special token (the mask, a pad, EOS) would corrupt the targets. Filtered on
    # the text, before tokenizing, by one rule for the whole lineage: every contender sees the same rows.
    clean = [ex for ex in examples if not any(has_special_text(loaded.tokenizer, m["content"])
                                             for m in [*ex.messages, {"content": ex.response}])]
    dropped = len(examples) - len(clean)
    if dropped:
        log.warning("%s: dropped %d examples whose text contains a special token", src, dropped)
    rows, lengths = encode(loaded.tokenizer, clean, response_len=response_len, max_prompt_len=limit,
                           refuse_long_prompts=not src.startswith("stdlib"))
    lengths.special_token_rows = dropped
    if lengths.too_long_responses:
        log.info("%s: dropped %d responses longer than %d tokens", src, lengths.too_long_responses, response_len - 1)
    if not rows:
        raise FactoryError(f"{src}: no example fits (response length {response_len}, prompt <= {limit} tokens)")
    return rows, {**report.to_dict(), **asdict(lengths)}
