"""Text corpora and token blocks.

A data source is either ``stdlib[:train|heldout|all][:exclude=pkg,...]`` (the running
interpreter's standard-library source: the embedded default corpus, split
deterministically by file, optionally without some top-level packages: the general
model's defaults leave out the demo users' packages, see ``dlm.data.users``) or a local
path / fsspec URL to a text file, a ``.jsonl`` file with a
``"text"`` field per line, or a directory of ``*.py``, ``*.txt``, ``*.md`` files.

Batches are a pure function of (seed, step), so a resumed run sees exactly the
batches it would have seen: no loader state to checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from dlm_factory.digest import dir_digest
from dlm_factory.dlm.data.batching import collate
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.paths import materialize

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst"}
DATA_PATTERNS = tuple(sorted(f"*{s}" for s in TEXT_SUFFIXES | {".jsonl"}))  # what a data source may hold
# Parts of the stdlib that are not representative library code (or not ours to train on).
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "lib2to3", "ensurepip",
                "__pycache__", "idlelib", "turtledemo", "pydoc_data", "encodings"}


@dataclass(frozen=True)
class Document:
    name: str  # relative path, used for the deterministic split
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def heldout(name: str, fraction: float) -> bool:
    """Deterministic split by name: stable across machines and Python runs."""
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    return bucket < fraction


@dataclass(frozen=True)
class StdlibSource:
    """A parsed ``stdlib[:split][:exclude=pkg,...]`` source."""

    split: str = "train"
    exclude: tuple[str, ...] = ()

    def __str__(self) -> str:
        """The canonical spelling (packages sorted): equal sources, equal strings, equal stage keys."""
        return f"stdlib:{self.split}" + (f":exclude={','.join(self.exclude)}" if self.exclude else "")


_PACKAGE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def stdlib_source(split: str = "train", exclude=()) -> str:
    """The source string of the stdlib ``split`` without the top-level packages ``exclude``."""
    return str(parse_stdlib(f"stdlib:{split}" + (f":exclude={','.join(exclude)}" if exclude else "")))


def parse_stdlib(src: str) -> StdlibSource:
    """``stdlib``, ``stdlib:heldout``, ``stdlib:train:exclude=asyncio,json``: one FactoryError line otherwise."""
    if not is_stdlib(src):
        raise FactoryError(f"{src!r} is not a stdlib source")
    parts = src.split(":")[1:]
    split = "train"
    if parts and not parts[0].startswith("exclude="):
        split = parts.pop(0)
    if split not in {"train", "heldout", "all"}:
        raise FactoryError(f"unknown stdlib split '{split}' (train, heldout or all)")
    exclude: set[str] = set()
    for part in parts:
        names = part.removeprefix("exclude=").split(",") if part.startswith("exclude=") else None
        if names is None or not all(_PACKAGE.fullmatch(n) for n in names):
            raise FactoryError(f"{src!r}: expected stdlib[:train|heldout|all][:exclude=package,...] "
                               "(top-level package names, comma-separated)")
        exclude.update(names)
    return StdlibSource(split, tuple(sorted(exclude)))


def top_package(name: str) -> str:
    """The top-level module or package of a stdlib document name (``asyncio/tasks.py`` -> ``asyncio``)."""
    return name.split("/", 1)[0].removesuffix(".py")


def stdlib_documents(split: str = "train", *, heldout_fraction: float = 0.05,
                     packages: list[str] | None = None, exclude=(), max_chars: int | None = None) -> list[Document]:
    """The interpreter's stdlib ``*.py`` files (tests, vendored and generated code skipped).

    ``packages`` restricts to top-level modules/packages (e.g. ``["email", "json"]``);
    ``exclude`` leaves some out. ``max_chars`` caps the corpus with a deterministic,
    evenly spread subset (taken after the exclusion).
    """
    if split not in {"train", "heldout", "all"}:
        raise FactoryError(f"unknown stdlib split '{split}' (train, heldout or all)")
    root = stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _STDLIB_SKIP or part.startswith("config-") for part in rel.parts):
            continue
        package = top_package(rel.as_posix())
        if (packages is not None and package not in packages) or package in exclude:
            continue
        name = rel.as_posix()
        if split != "all" and heldout(name, heldout_fraction) != (split == "heldout"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a handful of stdlib files are deliberately not UTF-8
        if text.strip():
            docs.append(Document(name, text))
    if max_chars is not None:
        docs.sort(key=lambda d: hashlib.sha256(d.name.encode()).digest())
        kept, size = [], 0
        for d in docs:
            if size >= max_chars:
                break
            kept.append(d)
            size += len(d.text)
        docs = sorted(kept, key=lambda d: d.name)
    return docs


def read_documents(src: str, *, heldout_fraction: float = 0.05, max_chars: int | None = None) -> list[Document]:
    """Load a corpus from ``stdlib[:split][:exclude=...]``, a path or a URL. Raises FactoryError on empty or non-UTF-8 data."""
    if is_stdlib(src):
        s = parse_stdlib(src)
        docs = stdlib_documents(s.split, heldout_fraction=heldout_fraction, exclude=s.exclude, max_chars=max_chars)
    else:
        root = materialize(src, patterns=DATA_PATTERNS)
        files = [root] if root.is_file() else sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | {".jsonl"})
        docs = []
        for f in files:
            name = f.name if root.is_file() else f.relative_to(root).as_posix()
            docs.extend(_read_file(f, name))
    if not docs or not any(d.text.strip() for d in docs):
        raise FactoryError(f"{src}: no text found (empty data)")
    return docs


def is_stdlib(src: str) -> bool:
    """Whether ``src`` names the embedded corpus (``stdlib`` or ``stdlib:<split>[:exclude=...]``)."""
    return src == "stdlib" or src.startswith("stdlib:")


def documents_digest(docs: list[Document]) -> str:
    """``sha256:`` over (name, sha256 of text) of each document, in order."""
    h = hashlib.sha256()
    for d in docs:
        h.update(f"{d.name}\0{hashlib.sha256(d.text.encode()).hexdigest()}\n".encode())
    return "sha256:" + h.hexdigest()


def source_digest(src: str) -> str:
    """A data source's content as a stage input: the whole stdlib corpus of this interpreter, or the
    bytes of the text/JSONL files under a path or URL. Splits, exclusions and caps are part of the stage's
    config (the source string itself), so the digest is checked even for packages left out."""
    if is_stdlib(src):
        parse_stdlib(src)
        return documents_digest(stdlib_documents("all"))
    return dir_digest(materialize(src, patterns=DATA_PATTERNS), DATA_PATTERNS)


def _read_file(path: Path, name: str) -> list[Document]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FactoryError(f"{path}: not UTF-8 text (byte {e.start})") from e
    if path.suffix != ".jsonl":
        return [Document(name, text)] if text.strip() else []
    docs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            docs.append(Document(f"{name}:{i}", str(json.loads(line)["text"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FactoryError(f"{path}:{i}: expected a JSON object with a \"text\" field") from e
    return docs


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text by itself (Llama-style checkpoints rely on it)."""
    bos = tokenizer.bos_token_id
    return bos is not None and list(tokenizer("a")["input_ids"][:1]) == [bos]


def start_token(tokenizer) -> int | None:
    """The token each document starts with, as the checkpoint saw documents in training.

    BOS where the tokenizer adds it (Llama family: an attention sink at position 0;
    without it a real small Llama scores ~10.8 instead of 4.2 bits/token); else EOS, the
    separator packing puts before every document (GPT-2 convention, our bootstrap
    tokenizer); else None, and the first token of a document is context only.
    """
    if adds_bos(tokenizer):
        return tokenizer.bos_token_id
    return tokenizer.eos_token_id


def encode_documents(tokenizer, docs: list[Document]) -> list[list[int]]:
    """Token ids of each document, preceded by ``start_token`` (when there is one)."""
    start = start_token(tokenizer)
    enc = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"] if docs else []
    return [([start] if start is not None else []) + list(ids) for ids in enc]


def tokenize_blocks(tokenizer, docs: list[Document], seq_len: int, *, max_positions: int | None = None,
                    max_blocks: int | None = None) -> torch.Tensor:
    """Training blocks [N, seq_len] int64: documents packed into one stream and cut into full blocks.

    The stream follows the checkpoint's convention: without BOS (GPT-2 style) documents
    are joined by EOS; where the tokenizer adds BOS, each document is ``BOS doc EOS`` and
    every block starts with BOS (a block cut inside a document gets BOS prepended), so the
    model never sees a position 0 it was not trained with.
    """
    _check_window(seq_len, max_positions)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id if adds_bos(tokenizer) else None
    body = seq_len - (bos is not None)  # tokens of the stream per block
    stream: list[int] = []
    enc = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    for ids in enc:
        stream.extend(([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else []))
        if max_blocks is not None and len(stream) >= max_blocks * seq_len:
            break
    if bos is None:
        blocks = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    else:
        blocks, i = [], 0
        while True:
            if i < len(stream) and stream[i] == bos:
                i += 1  # the block's own BOS stands for the document's
            if i + body > len(stream):
                break
            blocks.append([bos] + stream[i : i + body])
            i += body
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    if not blocks:
        raise FactoryError(f"data too short: {len(stream)} tokens, need at least one block of {seq_len}")
    return torch.tensor(blocks, dtype=torch.long)


def _check_window(seq_len: int, max_positions: int | None) -> None:
    if seq_len < 2:
        raise FactoryError(f"sequence length {seq_len} is too short (need at least 2: a start token and one more)")
    if max_positions is not None and seq_len > max_positions:
        raise FactoryError(f"sequence length {seq_len} exceeds the model's {max_positions} positions")


@dataclass
class Windows:
    """Evaluation windows over whole documents (right-padded to one length).

    ids, attention_mask, keep: [N, T] (T: the longest window). ``keep`` marks context: tokens a window conditions
    on but does not score (each document's start token, and the carried context of a
    rolling window). Every other attended token is scored exactly once, by the ELBO and
    by the exact AR NLL alike.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    keep: torch.Tensor
    documents: int  # documents (partly) covered
    skipped: int  # documents too short to score (fewer than two tokens with the start token)

    @property
    def scored(self) -> int:
        return int((self.attention_mask.bool() & ~self.keep).sum())


def rolling_windows(tokenizer, docs: list[Document], seq_len: int, *, stride: int | None = None,
                    max_windows: int | None = None, max_positions: int | None = None) -> Windows:
    """Score documents with rolling windows that carry context (lm-eval-harness ``loglikelihood_rolling``).

    Each document is ``start_token + text``. Its first window covers positions [0, T) and
    scores 1..T-1; each next window ends ``stride`` tokens later and scores only those
    ``stride`` tokens, with the ``T - stride`` tokens before them as context. So every
    token is scored once, with at least ``T - stride`` tokens of context after the first
    window (``stride`` default T // 2: half a window of context).
    """
    _check_window(seq_len, max_positions)
    stride = stride or max(1, seq_len // 2)
    if not 1 <= stride <= seq_len - 1:
        raise FactoryError(f"stride {stride} must be between 1 and the window length - 1 ({seq_len - 1})")
    rows: list[tuple[list[int], int]] = []  # (window tokens, context length)
    covered = skipped = 0
    for seq in encode_documents(tokenizer, docs):
        if len(seq) < 2:
            skipped += 1
            continue
        covered += 1
        rows.append((seq[:seq_len], 1))
        end = seq_len
        while end < len(seq) and (max_windows is None or len(rows) < max_windows):
            new_end = min(end + stride, len(seq))
            window = seq[max(0, new_end - seq_len) : new_end]
            rows.append((window, len(window) - (new_end - end)))
            end = new_end
        if max_windows is not None and len(rows) >= max_windows:
            rows = rows[:max_windows]
            break
    if not rows:
        raise FactoryError(f"no document has two tokens to score ({skipped} too short)")
    batch = collate(rows, pad=0)  # right-padded: padding is never attended, so any id works
    return Windows(ids=batch["input_ids"], attention_mask=batch["attention_mask"], keep=batch["prompt_mask"],
                   documents=covered, skipped=skipped)


@dataclass
class Blocks:
    """Fixed-length token blocks with deterministic, resumable batching."""

    ids: torch.Tensor  # [N, T]

    def batch(self, step: int, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Batch number ``step``: epochs are seeded permutations, so resume needs only the step."""
        n = self.ids.shape[0]
        start = step * batch_size
        rows = []
        while len(rows) < batch_size:
            epoch, offset = divmod(start + len(rows), n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            rows.extend(perm[offset : offset + batch_size - len(rows)].tolist())
        return {"input_ids": self.ids[rows]}


def code_prompts(docs: list[Document], n: int, *, lines: int = 3, per_document: int | None = None) -> list[str]:
    """Up to ``n`` prompts: the first ``lines`` lines of each ``def``/``class`` in ``docs``, dedented.

    Documents are taken round-robin (one definition from each in turn), so a few long
    files do not crowd out the others; ``per_document`` caps what one file gives.
    Deterministic: the same documents give the same prompts.
    """
    import textwrap

    per_file = []
    for doc in docs:
        src = doc.text.splitlines()
        found = []
        for i, line in enumerate(src[: max(len(src) - lines, 0)]):
            head = line.lstrip()
            if head.startswith(("def ", "async def ", "class ")) and line.rstrip().endswith(":"):
                found.append(textwrap.dedent("\n".join(src[i : i + lines])) + "\n")
        per_file.append(found[:per_document] if per_document is not None else found)
    prompts, k = [], 0
    while len(prompts) < n and any(k < len(f) for f in per_file):
        prompts += [f[k] for f in per_file if k < len(f)]
        k += 1
    return prompts[:n]
