"""Lineage helpers (replaced by the stage record)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dlm_factory.dlm.checkpoint.spec import SPEC_FILE, DiffusionSpec

REPORT_FILE = "instruct.json"


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
