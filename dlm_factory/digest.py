"""Content digests shared by the core and the catalog: stdlib only (the catalog installs light)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: str | Path, on_bytes: Callable[[int], None] | None = None) -> tuple[int, str]:
    """(size in bytes, hex sha256) of a file, read in 1 MiB chunks; ``on_bytes`` sees each chunk's size."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            h.update(data)
            size += len(data)
            if on_bytes:
                on_bytes(len(data))
    return size, h.hexdigest()


def dir_digest(path: str | Path, patterns: tuple[str, ...] = ("*.safetensors",)) -> str:
    """``sha256:`` over (relative name, file sha256) of the files under ``path`` matching ``patterns``.

    A single file counts as a directory holding just that file (its name, its bytes).
    """
    path = Path(path)
    if path.is_file():
        path, files = path.parent, [path]
    else:
        files = sorted({p for pat in patterns for p in path.rglob(pat) if p.is_file()})
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(path).as_posix()}\0{sha256_file(p)[1]}\n".encode())
    return "sha256:" + h.hexdigest()


def json_digest(obj) -> str:
    """``sha256:`` of the canonical JSON of ``obj`` (sorted keys): a config's identity."""
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """Digest of everything that maps text to ids (fast tokenizers: the full JSON)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()
