"""What the catalog stores: names, MANIFEST.json, ENSEMBLE.json, digests.

Everything here is pure (no I/O), so names are checked before the store is touched.

Identity of a version (see docs/catalog.md):
- ``digest`` = sha256 over the canonical JSON of the *content*: kind, user, payload files
  (path, size, sha256), parents, base model, tags, license and eval results. Lineage and
  the creation time are not content: publishing the same dir again yields the same digest.
- ``version`` = the first 12 hex digits of the digest. Two publishers of different content
  therefore never write the same version directory; two of the same content write the
  same bytes.
- ``integrity`` = sha256 over the canonical JSON of every other manifest field, and the
  stored MANIFEST.json must be byte-identical to ``manifest_bytes(manifest)``: one
  flipped byte anywhere in MANIFEST.json is detected.

Regenerate the published JSON Schemas with
``python -c 'import dlm_factory.catalog.schema as s; s.write_schemas()'``.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from dlm_factory.catalog.errors import CatalogError

SCHEMA_VERSION = 1
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^[0-9a-f]{12}$"
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
_NAME = re.compile(NAME_PATTERN[1:-1])  # used with fullmatch: no "$ before a trailing newline"
_VERSION = re.compile(VERSION_PATTERN[1:-1])
_DIGEST = re.compile(DIGEST_PATTERN[1:-1])
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PATH_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
MAX_PATH_DEPTH = 8

Kind = Literal["general", "specialist", "ensemble"]
KINDS: tuple[str, ...] = ("general", "specialist", "ensemble")
Relation = Literal["adapter", "merge", "quantized", "finetune"]
# Pickle-based formats execute code when loaded: never published, never pulled.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Written by the catalog itself; a source dir's own copies are not published.
MANIFEST_FILE = "MANIFEST.json"
CARD_FILE = "README.md"
ENSEMBLE_FILE = "ENSEMBLE.json"
SIGNATURE_FILE = "MANIFEST.json.sig"  # beside MANIFEST.json: a model-signing bundle over its bytes
# Pull writes MANIFEST.json (and the signature) into DEST and an ensemble's members under
# members/<name>/: no stored file may take those places (compared case-insensitively, for
# case-insensitive filesystems).
RESERVED_PATHS = (MANIFEST_FILE.lower(), SIGNATURE_FILE.lower())
MEMBERS_DIR = "members"
MAX_JSON_DEPTH = 64  # lineage config, eval results, ENSEMBLE.json router: deeper is refused
MAX_TEXT = 256  # base_model and other one-line card fields
RESERVED_MODEL_NAMES = ("ensembles",)  # refs/ensembles/ holds the per-user ensemble pointers


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_name(value: object, what: str = "name") -> str:
    """Return ``value`` if it is a valid catalog name or user id, else raise CatalogError."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise CatalogError(f"invalid {what} {_short(value)}: must match {NAME_PATTERN}")
    return value


def check_version(value: object) -> str:
    if not isinstance(value, str) or not _VERSION.fullmatch(value):
        raise CatalogError(f"invalid version {_short(value)}: expected 'latest' or 12 hex digits")
    return value


def check_digest(value: object) -> str:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise CatalogError(f"invalid digest {_short(value)}: expected sha256:<64 hex digits>")
    return value


def check_file_path(value: object) -> str:
    """A stored file's path: relative POSIX, ASCII, no '..', no hidden parts, not pickle."""
    if not isinstance(value, str) or not value or len(value) > 512:
        raise CatalogError(f"invalid file path {_short(value)}")
    parts = value.split("/")
    if len(parts) > MAX_PATH_DEPTH or not all(_PATH_PART.fullmatch(p) for p in parts):
        raise CatalogError(f"invalid file path {_short(value)}: parts must match "
                           f"{_PATH_PART.pattern}, at most {MAX_PATH_DEPTH} deep")
    if value.lower().endswith(PICKLE_SUFFIXES):
        raise CatalogError(f"refusing pickle-format file {value}: safetensors only")
    return value


def check_text(value: object, what: str) -> str | None:
    """A one-line printable field (base_model, ...): no control characters, at most MAX_TEXT."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT or not value.isprintable():
        raise CatalogError(f"invalid {what} {_short(value)}: expected 1-{MAX_TEXT} printable characters")
    return value


def check_json_depth(obj: Any, where: str, limit: int = MAX_JSON_DEPTH) -> Any:
    """Refuse JSON nested deeper than ``limit`` (iterative: never a RecursionError)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            if depth > limit:
                raise CatalogError(f"{where}: JSON nested deeper than {limit} levels")
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return obj


def load_json(raw: bytes | str, where: str) -> Any:
    """``json.loads`` for untrusted bytes: one CatalogError line for bad or too deeply nested JSON."""
    try:
        return check_json_depth(json.loads(raw), where)
    except RecursionError:
        raise CatalogError(f"{where}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CatalogError(f"{where}: invalid JSON ({str(e)[:200]})") from None


def check_layout(paths: list[str], kind: str) -> None:
    """Paths that cannot all exist in one directory, or that take a place pull writes itself.

    Refused: MANIFEST.json and its signature (any case), ``members`` and ``members/...`` in an
    ensemble (its members are pulled there), a path nested under another file
    (``config.json`` and ``config.json/x.json``), and paths equal but for case.
    """
    seen: dict[str, str] = {}
    for p in paths:
        if p.lower() in RESERVED_PATHS:
            raise CatalogError(f"file path {p!r} is reserved (the catalog writes it)")
        if kind == "ensemble" and p.split("/")[0].lower() == MEMBERS_DIR:
            raise CatalogError(f"file path {p!r} is reserved in an ensemble (members are pulled into {MEMBERS_DIR}/)")
        if p.lower() in seen:
            raise CatalogError(f"file paths {seen[p.lower()]!r} and {p!r} differ only by case")
        seen[p.lower()] = p
    for p in paths:
        parts = p.lower().split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in seen:
                raise CatalogError(f"file path {p!r} is nested under the file {seen['/'.join(parts[:i])]!r}")


def check_weight_files(paths: list[str], read, where: str) -> None:
    """Safetensors only, by content and not only by extension: what a loader would follow.

    ``read(path) -> bytes`` returns a listed file's (verified) bytes. Refused: a weight index
    (``*.index.json``) whose ``weight_map`` names anything but ``.safetensors`` files listed in
    the same version (a pickle shard, a path outside the dir); a ``config.json`` that redirects
    the weights (``transformers_weights``); an ``adapter_config.json`` without
    ``adapter_model.safetensors`` beside it (PEFT would fall back to a pickle).
    """
    listed = set(paths)
    for p in sorted(listed):
        folder, _, fname = p.rpartition("/")
        prefix = folder + "/" if folder else ""
        if fname.endswith(".index.json"):
            data = load_json(read(p), f"{where}/{p}")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CatalogError(f"{where}/{p}: a weight index needs a non-empty weight_map")
            for target in sorted({str(t) for t in weight_map.values()}):
                rel = prefix + target
                if not target.endswith(".safetensors") or not _is_plain_path(rel) or rel not in listed:
                    raise CatalogError(f"{where}/{p}: weight_map names {_short(target)}, not a "
                                       f".safetensors file of this version (safetensors only)")
        elif fname == "config.json":
            data = load_json(read(p), f"{where}/{p}")
            if isinstance(data, dict) and "transformers_weights" in data:
                raise CatalogError(f"{where}/{p}: transformers_weights redirects the weights; refused "
                                   f"(safetensors only, from the files the catalog lists)")
        elif fname == "adapter_config.json" and prefix + "adapter_model.safetensors" not in listed:
            raise CatalogError(f"{where}/{p}: an adapter needs adapter_model.safetensors beside it")


def _is_plain_path(rel: str) -> bool:
    try:
        check_file_path(rel)
    except CatalogError:
        return False
    return True


def _pyd(check):
    """Adapt a CatalogError checker to a pydantic validator (ValueError)."""

    def validate(value):
        try:
            return check(value)
        except CatalogError as e:
            raise ValueError(str(e)) from None

    return validate


Name = Annotated[str, Field(pattern=NAME_PATTERN), AfterValidator(_pyd(check_name))]
Version = Annotated[str, Field(pattern=VERSION_PATTERN), AfterValidator(_pyd(check_version))]
Digest = Annotated[str, Field(pattern=DIGEST_PATTERN), AfterValidator(_pyd(check_digest))]
FilePath = Annotated[str, AfterValidator(_pyd(check_file_path))]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Model):
    """One stored file of a version."""

    path: FilePath = Field(description="relative POSIX path inside the version dir")
    size: int = Field(ge=0, description="size in bytes")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the bytes")


class Parent(_Model):
    """A model this version was derived from (or, for an ensemble, a member)."""

    digest: Digest = Field(description="content digest of the parent version")
    name: str | None = Field(None, description="catalog name or hub id, for humans")
    version: str | None = Field(None, description="catalog version, when the parent is in the catalog")
    role: str | None = Field(None, description="e.g. base, general, specialist")


class EvalResult(_Model):
    """One metric on one dataset (becomes a model-index entry of the card)."""

    dataset: str = Field(description="dataset name, e.g. 'stdlib-email'")
    metric: str = Field(description="metric name, e.g. 'bits_per_token'")
    value: float = Field(allow_inf_nan=False, description="metric value")
    split: str | None = Field(None, description="dataset split, e.g. 'heldout'")
    task: str = Field("text-generation", description="HF task type")
    lower_is_better: bool | None = Field(None, description="direction of the metric, if known")


class Lineage(_Model):
    """Where a version came from. Not part of the content digest."""

    flow_run_id: str | None = Field(None, description="Prefect flow run id that published it")
    git_sha: str | None = Field(None, description="git commit of the factory code")
    image: str | None = Field(None, description="container image that ran the publisher")
    data_digests: dict[str, str] = Field(default_factory=dict, description="dataset name -> digest")
    config: dict[str, Any] = Field(default_factory=dict, description="stage config (JSON)")


class Content(_Model):
    """The digest input: everything that makes two publishes 'the same content'."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Kind
    user: Name | None = None
    files: tuple[FileEntry, ...]  # payload only: README.md and MANIFEST.json excluded
    parents: tuple[Parent, ...] = ()
    base_model: str | None = None
    base_model_relation: Relation | None = None
    tags: tuple[str, ...] = ()
    license: str = "apache-2.0"
    evals: tuple[EvalResult, ...] = ()

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(canonical_json(self.model_dump(mode="json"))).hexdigest()


class Manifest(_Model):
    """MANIFEST.json: written last, with exclusive create; its presence publishes a version."""

    schema_version: Literal[1] = Field(SCHEMA_VERSION, description="bumped on incompatible changes")
    name: Name = Field(description="model or ensemble name")
    version: Version = Field(description="first 12 hex digits of the digest")
    kind: Kind = Field(description="general | specialist | ensemble")
    user: Name | None = Field(None, description="owner user id (required for ensembles)")
    digest: Digest = Field(description="content digest (see catalog.schema)")
    files: tuple[FileEntry, ...] = Field(description="every stored file except MANIFEST.json")
    parents: tuple[Parent, ...] = Field((), description="models it derives from, by digest")
    base_model: str | None = Field(None, description="card: base model name")
    base_model_relation: Relation | None = Field(None, description="card: relation to base model")
    tags: tuple[str, ...] = Field((), description="card tags")
    license: str = Field("apache-2.0", description="SPDX-like license id")
    evals: tuple[EvalResult, ...] = Field((), description="eval results")
    lineage: Lineage = Field(default_factory=Lineage, description="provenance (not in the digest)")
    created: datetime = Field(description="UTC time the manifest was written")
    integrity: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the other fields")

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Manifest:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("duplicate file paths")
        try:
            check_layout(paths, self.kind)
            check_text(self.base_model, "base_model")
            check_json_depth(self.lineage.config, "lineage.config")
        except CatalogError as e:
            raise ValueError(str(e)) from None
        if CARD_FILE not in paths:
            raise ValueError(f"{CARD_FILE} missing from files")
        if self.kind == "ensemble" and (self.user is None or ENSEMBLE_FILE not in paths):
            raise ValueError(f"an ensemble needs a user and {ENSEMBLE_FILE}")
        if self.content().digest() != self.digest:
            raise ValueError("digest does not match the content")
        if self.digest[7:19] != self.version:
            raise ValueError("version does not match the digest")
        sealing = bool(info.context and info.context.get("sealing"))
        if not sealing and _integrity(self) != self.integrity:
            raise ValueError("integrity hash does not match")
        return self

    def content(self) -> Content:
        fields = self.model_dump(include=set(Content.model_fields) - {"files"})
        return Content(**fields, files=tuple(f for f in self.files if f.path != CARD_FILE))

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry | None:
        return next((f for f in self.files if f.path == path), None)


class EnsembleMember(_Model):
    name: Name = Field(description="catalog model name (models/<name>)")
    version: Version = Field(description="pinned version")
    digest: Digest = Field(description="content digest the member must have")
    role: Literal["general", "specialist"] = Field(description="role in the ensemble")


class Combination(BaseModel):
    """How member predictions are combined; extra keys (e.g. temperature) are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)
    rule: str = Field("product_of_experts", description="product_of_experts | emulated_finetuning | router")
    weights: dict[str, float] = Field(default_factory=dict, description="member name -> weight")


class EnsembleSpec(_Model):
    """ENSEMBLE.json: the members (pinned by digest), their combination and an optional router."""

    schema_version: Literal[1] = SCHEMA_VERSION
    members: tuple[EnsembleMember, ...] = Field(min_length=1)
    combination: Combination = Field(default_factory=Combination)
    router: dict[str, Any] | None = Field(None, description="router config, e.g. prefix ELBO routing")

    @model_validator(mode="after")
    def _consistent(self) -> EnsembleSpec:
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError("member names must be unique")
        unknown = set(self.combination.weights) - set(names)
        if unknown:
            raise ValueError(f"weights for unknown members: {sorted(unknown)}")
        try:
            check_json_depth([self.router, self.combination.model_extra], "router/combination")
        except CatalogError as e:
            raise ValueError(str(e)) from None
        return self

    @classmethod
    def read(cls, path: str | Path) -> EnsembleSpec:
        return parse_ensemble(Path(path).read_bytes(), str(path))

    def write(self, directory: str | Path) -> Path:
        """Write ENSEMBLE.json into ``directory`` (created if missing)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / ENSEMBLE_FILE).write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return out / ENSEMBLE_FILE


# ---------------------------------------------------------------------------------------------
# Canonical bytes


def canonical_json(obj: Any) -> bytes:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode()
    except ValueError as e:  # NaN/inf in a config dict
        raise CatalogError(f"not JSON-serializable: {e}") from None


def _integrity(m: Manifest) -> str:
    return hashlib.sha256(canonical_json(m.model_dump(mode="json", exclude={"integrity"}))).hexdigest()


def build_manifest(name: str, content: Content, card: FileEntry, lineage: Lineage,
                   created: datetime | None = None) -> Manifest:
    """Assemble and seal a manifest (the integrity field is computed here)."""
    digest = content.digest()
    data = {**content.model_dump(mode="json"), "name": name, "version": digest[7:19],
            "digest": digest, "lineage": lineage.model_dump(mode="json"),
            "created": (created or datetime.now(UTC)).astimezone(UTC), "integrity": "0" * 64}
    data["files"].append(card.model_dump(mode="json"))
    draft = Manifest.model_validate(data, context={"sealing": True})
    sealed = draft.model_dump(mode="json")
    sealed["integrity"] = _integrity(draft)
    return Manifest.model_validate_json(json.dumps(sealed))


def manifest_bytes(m: Manifest) -> bytes:
    """The exact bytes of MANIFEST.json (sorted keys, 2-space indent, ASCII, trailing newline)."""
    return json.dumps(m.model_dump(mode="json"), sort_keys=True, indent=2, ensure_ascii=True,
                      allow_nan=False).encode() + b"\n"


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Parse and check MANIFEST.json bytes; any corruption raises CatalogError naming ``where``."""
    try:
        m = Manifest.model_validate_json(raw)
    except ValidationError as e:
        raise CatalogError(f"{where}: corrupt {MANIFEST_FILE} ({_first_error(e)})") from None
    except RecursionError:
        raise CatalogError(f"{where}: corrupt {MANIFEST_FILE} (nested too deeply)") from None
    if manifest_bytes(m) != raw:
        raise CatalogError(f"{where}: corrupt {MANIFEST_FILE} (bytes are not canonical)")
    return m


def parse_ensemble(raw: bytes, where: str) -> EnsembleSpec:
    try:
        return EnsembleSpec.model_validate_json(raw)
    except ValidationError as e:
        raise CatalogError(f"{where}: invalid {ENSEMBLE_FILE} ({_first_error(e)})") from None
    except RecursionError:
        raise CatalogError(f"{where}: invalid {ENSEMBLE_FILE} (nested too deeply)") from None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    msg = err.get("msg", "invalid").replace("\n", " ")
    return f"{loc}: {msg}" if loc else msg


# ---------------------------------------------------------------------------------------------
# Published JSON Schemas (catalog/*.schema.json, shipped as package data)

SCHEMA_FILES = {"manifest.schema.json": Manifest, "ensemble.schema.json": EnsembleSpec}


def json_schemas() -> dict[str, bytes]:
    out = {}
    for filename, model in SCHEMA_FILES.items():
        schema = model.model_json_schema()
        schema["$id"] = f"https://dlm-factory.invalid/catalog/{filename}"
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        out[filename] = json.dumps(schema, indent=2, sort_keys=True).encode() + b"\n"
    return out


def write_schemas() -> list[Path]:
    """Regenerate catalog/*.schema.json (a test fails when they are stale)."""
    here = Path(__file__).parent
    for fname, data in json_schemas().items():
        (here / fname).write_bytes(data)
    return [here / f for f in SCHEMA_FILES]


if __name__ == "__main__":
    print("\n".join(f"wrote {p}" for p in write_schemas()))
