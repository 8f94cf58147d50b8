"""Text corpora and token blocks.

A data source is either ``stdlib[:train|heldout|all]`` (the running interpreter's
standard-library source: the embedded default corpus, split deterministically by
file) or a local path / fsspec URL to a text file, a ``.jsonl`` file with a
``"text"`` field per line, or a directory of ``*.py``, ``*.txt``, ``*.md`` files.

Batches are a pure function of (seed, step), so a resumed run sees exactly the
batches it would have seen: no loader state to checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from dlm_factory.digest import dir_digest
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


def stdlib_documents(split: str = "train", *, heldout_fraction: float = 0.05,
                     packages: list[str] | None = None, max_chars: int | None = None) -> list[Document]:
    """The interpreter's stdlib ``*.py`` files (tests, vendored and generated code skipped).

    ``packages`` restricts to top-level modules/packages (e.g. ``["email", "json"]``).
    ``max_chars`` caps the corpus with a deterministic, evenly spread subset.
    """
    if split not in {"train", "heldout", "all"}:
        raise FactoryError(f"unknown stdlib split '{split}' (train, heldout or all)")
    root = stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _STDLIB_SKIP or part.startswith("config-") for part in rel.parts):
            continue
        if packages is not None and rel.parts[0].removesuffix(".py") not in packages:
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
    """Load a corpus from ``stdlib[:split]``, a path or a URL. Raises FactoryError on empty or non-UTF-8 data."""
    if is_stdlib(src):
        split = src.partition(":")[2] or "train"
        docs = stdlib_documents(split, heldout_fraction=heldout_fraction, max_chars=max_chars)
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
    """Whether ``src`` names the embedded corpus (``stdlib`` or ``stdlib:<split>``)."""
    return src == "stdlib" or src.startswith("stdlib:")


def documents_digest(docs: list[Document]) -> str:
    """``sha256:`` over (name, sha256 of text) of each document, in order."""
    h = hashlib.sha256()
    for d in docs:
        h.update(f"{d.name}\0{hashlib.sha256(d.text.encode()).hexdigest()}\n".encode())
    return "sha256:" + h.hexdigest()


def source_digest(src: str) -> str:
    """A data source's content as a stage input: the whole stdlib corpus of this interpreter, or the
    bytes of the text/JSONL files under a path or URL. Splits and caps are part of the stage's config."""
    if is_stdlib(src):
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


def tokenize_blocks(tokenizer, docs: list[Document], seq_len: int, *, max_positions: int | None = None,
                    max_blocks: int | None = None) -> torch.Tensor:
    """Concatenate documents (EOS-separated) and cut into full blocks. Returns [N, seq_len] int64."""
    if seq_len < 2:
        raise FactoryError(f"sequence length {seq_len} is too short (need at least 2)")
    if max_positions is not None and seq_len > max_positions:
        raise FactoryError(f"sequence length {seq_len} exceeds the model's {max_positions} positions")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    enc = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    for ids in enc:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
        if max_blocks is not None and len(stream) >= max_blocks * seq_len:
            break
    n = len(stream) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise FactoryError(f"data too short: {len(stream)} tokens, need at least one block of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


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
