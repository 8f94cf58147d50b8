"""The stage record: one typed ``stage.json`` beside every output, and the one ``is_done()``.

Each stage (bootstrap, convert, instruct, and those to come) writes a ``StageRecord``
into its output dir: which stage made it, its inputs *by digest* (the base model's
safetensors, the data's documents), its config, the code version and where it ran,
and its result. A diffusion checkpoint also keeps the history of records in
``diffusion.json`` (``DiffusionSpec.stages``, oldest first).

"Already done?" has one answer everywhere (tasks, flows, benches): ``is_done(output,
key)`` is true when the output's record has the same ``StageKey`` (stage, input
digests, config). Paths do not enter the key, so ``./m`` and ``/abs/m`` are the same
input, and a moved or re-uploaded model with the same bytes is still the same. The
code version is recorded for provenance but is not part of the key: a change in code
that changes results must show in the config (a new field or default) to retrain.
"""

from __future__ import annotations

import functools
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from dlm_factory.digest import dir_digest, json_digest
from dlm_factory.dlm.errors import FactoryError

RECORD_FILE = "stage.json"
# What identifies a checkpoint as an input (its records, which carry timestamps, are left out).
MODEL_FILES = ("*.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class StageKey(BaseModel):
    """What decides whether an output is already done: the stage, its inputs by digest, its config."""

    stage: str = Field(description="stage name: bootstrap, convert, instruct, ...")
    inputs: dict[str, str] = Field(default_factory=dict, description="role -> content digest (base model, data)")
    config: dict[str, Any] = Field(default_factory=dict, description="the stage's full config (model_dump)")

    def digest(self) -> str:
        return json_digest(self.model_dump())


class StageRecord(StageKey):
    """A ``StageKey`` plus what a reader wants to know about how the output was made."""

    schema_version: int = Field(1, description="format version of this record")
    sources: dict[str, str] = Field(default_factory=dict, description="role -> where the input came from (path, URL)")
    ar_root: str | None = Field(None, description="the AR checkpoint at the root of the lineage (judge, verifier); None: this model")
    code_version: str = Field("", description="dlm-factory version and git commit that ran the stage")
    runtime: dict[str, Any] = Field(default_factory=dict, description="device, world size, torch version")
    result: dict[str, Any] = Field(default_factory=dict, description="final loss, throughput, data report, ...")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def key(self) -> StageKey:
        return StageKey(stage=self.stage, inputs=self.inputs, config=self.config)

    @classmethod
    def legacy(cls, old: dict[str, Any]) -> StageRecord:
        """A record from the untyped stage dicts of earlier diffusion.json files (they never match a key)."""
        known = {"stage", "config"}
        return cls(stage=str(old.get("stage", "?")), config=old.get("config") or {},
                   result={k: v for k, v in old.items() if k not in known}, inputs={"legacy": "unknown"})


def new_record(key: StageKey, *, sources: dict[str, str] | None = None, ar_root: str | None = None,
               runtime: dict[str, Any] | None = None, result: dict[str, Any] | None = None) -> StageRecord:
    """The record a stage writes for ``key``, stamped with the code version."""
    return StageRecord(**key.model_dump(), sources=sources or {}, ar_root=ar_root, code_version=code_version(),
                       runtime=runtime or {}, result=result or {})


def model_digest(model_dir: str | os.PathLike) -> str:
    """A checkpoint's identity as an input: its weights, config and tokenizer files (not its records)."""
    return dir_digest(model_dir, MODEL_FILES)


def read_record(model_dir: str | os.PathLike) -> StageRecord | None:
    """The record beside a checkpoint's weights, or None when there is none (or it is unreadable)."""
    path = Path(model_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        return StageRecord.model_validate_json(path.read_text())
    except (ValidationError, ValueError, OSError):
        return None


def is_done(output: str | os.PathLike, key: StageKey) -> bool:
    """True when ``output`` holds a model made by exactly this stage, inputs and config."""
    if "://" in os.fspath(output):
        return False  # remote outputs are published through the catalog, which has its own digests
    record = read_record(output)
    return record is not None and record.key().digest() == key.digest()


def check_output(output: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Refuse an existing output before any work starts (``overwrite`` swaps it at the end instead)."""
    if overwrite or "://" in os.fspath(output):
        return
    path = Path(output)
    if path.exists() or path.is_symlink():
        raise FactoryError(f"{path.resolve()}: output already exists (choose another --output or remove it)")


def source_name(src: str | os.PathLike) -> str:
    """How a record names an input: URLs and hub ids as given, local paths absolute."""
    s = os.fspath(src)
    return s if "://" in s or not Path(s).exists() else str(Path(s).resolve())


def lineage_root(model_dir: str | os.PathLike, where: str) -> str:
    """The AR checkpoint at the root of a model's lineage (the default judge, the speculative verifier).

    A DLM's ``source`` (diffusion.json); a tuned AR model's recorded ``ar_root``; else ``where``.
    """
    from dlm_factory.dlm.checkpoint.spec import SPEC_FILE, DiffusionSpec

    model_dir = Path(model_dir)
    if (model_dir / SPEC_FILE).is_file():
        return DiffusionSpec.read(model_dir).source
    record = read_record(model_dir)
    return (record.ar_root if record is not None else None) or where


@functools.cache
def code_version() -> str:
    """``<package version>+g<commit>`` (the commit from ``$FACTORY_GIT_SHA`` in images, else git)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("dlm-factory")
    except PackageNotFoundError:
        v = "0+unknown"
    sha = os.environ.get("FACTORY_GIT_SHA", "")
    if not sha:
        try:
            sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                                 capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            sha = ""
    return f"{v}+g{sha}" if sha else v
