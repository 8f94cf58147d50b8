"""Shared helpers for catalog tests: fake model dirs, byte flips (imported by tests and fixtures)."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def make_model(path: Path, seed: int = 0, *, weights: int = 300_000, shards: int = 1,
               extra: dict[str, bytes] | None = None) -> Path:
    """A small fake factory model dir (random 'weights'; the catalog never parses them)."""
    import random

    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "seed": seed}))
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "vocab": list(range(50))}))
    (path / "tokenizer_config.json").write_text("{}")
    (path / "diffusion.json").write_text(json.dumps({"mask_token_id": 3, "shift": True}))
    for i in range(shards):
        name = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        (path / name).write_bytes(rng.randbytes(weights))
    for rel, data in (extra or {}).items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def flip_byte(cat, key: str, index: int | None = None) -> None:
    """Flip one bit of one byte of a stored object (in place, through the store)."""
    data = bytearray(cat.store.read(key))
    i = len(data) // 2 if index is None else index
    data[i] ^= 0x01
    if cat.store.local:
        p = Path(cat.store.path(key))
        os.chmod(p, 0o644)
        p.write_bytes(bytes(data))
    else:
        cat.store.fs.pipe_file(cat.store.path(key), bytes(data))
