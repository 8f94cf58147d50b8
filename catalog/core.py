"""The catalog: publish, pull, list, show, verify and gc over one store root.

Layout (keys relative to the root URL)::

    models/<name>/<version>/{...payload..., README.md, MANIFEST.json}
    ensembles/<user>/<name>/<version>/{ENSEMBLE.json, ..., README.md, MANIFEST.json}
    refs/<name>/latest                      text: the current version of models/<name>
    refs/ensembles/<user>/<name>/latest     text: the current version of an ensemble
    .staging/                               file:// temp files (renamed into place)

Publish protocol (crash-safe; see docs/catalog.md for the argument):
upload every file into the version dir -> read each back and check size and sha256 ->
exclusive-create MANIFEST.json -> move the ``latest`` pointer. A version dir without
MANIFEST.json does not exist for readers. The version id is derived from the content digest,
so different contents never share a version dir and re-publishing is a no-op.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from dlm_factory.catalog.cache import BlobCache
from dlm_factory.catalog.card import render_card
from dlm_factory.catalog.errors import CatalogError
from dlm_factory.catalog.progress import Progress, ProgressArg
from dlm_factory.catalog.schema import (
    CARD_FILE,
    ENSEMBLE_FILE,
    KINDS,
    MANIFEST_FILE,
    RESERVED_MODEL_NAMES,
    SIGNATURE_FILE,
    Content,
    EnsembleMember,
    EnsembleSpec,
    EvalResult,
    FileEntry,
    Lineage,
    Manifest,
    Parent,
    build_manifest,
    canonical_json,
    check_digest,
    check_file_path,
    check_json_depth,
    check_layout,
    check_name,
    check_text,
    check_version,
    check_weight_files,
    load_json,
    manifest_bytes,
    parse_ensemble,
    parse_manifest,
)
from dlm_factory.catalog.signing import Signer, TrustPolicy
from dlm_factory.catalog.store import ObjectMissing, StorageError, Store
from dlm_factory.digest import sha256_file
from dlm_factory.home import factory_home

log = logging.getLogger(__name__)

EVAL_FILE = "eval_results.json"  # optional in a published dir: a list of EvalResult
PULL_MARKER = ".catalog-pull.json"  # in every pulled dir: what --force may replace
DEFAULT_WORKERS = 16
GC_DEFAULT_AGE_S = 24 * 3600.0


def _now() -> float:
    """The clock of pointer marks and gc (one place, so tests can move it)."""
    return time.time()


# ---------------------------------------------------------------------------------------------
# Configuration and references


def default_root() -> str:
    """``$FACTORY_CATALOG``, else ``file://$FACTORY_HOME/catalog`` (FACTORY_HOME: ./.factory)."""
    return os.environ.get("FACTORY_CATALOG") or f"file://{factory_home() / 'catalog'}"


def default_cache_dir() -> Path:
    env = os.environ.get("FACTORY_CATALOG_CACHE")
    return Path(env).expanduser().resolve() if env else factory_home() / "cache" / "catalog"


@dataclass(frozen=True)
class Ref:
    """``name[:version]`` of a model, or of a user's ensemble when ``user`` is set."""

    name: str
    version: str = "latest"
    user: str | None = None

    def check_stored(self) -> None:
        """Raise CatalogError unless name, version and user are valid (a ref read from a bucket key)."""
        check_name(self.name)
        check_version(self.version)
        if self.user:
            check_name(self.user)

    @classmethod
    def parse(cls, text: str, user: str | None = None) -> Ref:
        """Parse and check ``NAME[:VERSION]`` (no I/O). ``user`` selects ensembles/<user>/."""
        if not isinstance(text, str):
            raise CatalogError(f"invalid reference {text!r}")
        name, sep, version = text.partition(":")
        check_name(name)
        if sep and version != "latest":
            check_version(version)
        if user is not None:
            check_name(user, "user id")
        return cls(name, version if sep else "latest", user)

    def at(self, version: str) -> Ref:
        return Ref(self.name, version, self.user)

    @property
    def prefix(self) -> str:
        return f"ensembles/{self.user}/{self.name}" if self.user else f"models/{self.name}"

    @property
    def pointer(self) -> str:
        return f"refs/ensembles/{self.user}/{self.name}/latest" if self.user else f"refs/{self.name}/latest"

    @property
    def dir(self) -> str:
        return f"{self.prefix}/{self.version}"

    def mark(self, version: str | None = None) -> str:
        """Key recording when ``version`` was last named by this name's ``latest`` pointer."""
        return f"{self.pointer.rsplit('/', 1)[0]}/pointed/{version or self.version}"

    def __str__(self) -> str:
        who = f"{self.user}/" if self.user else ""
        return f"{who}{self.name}:{self.version}"


# ---------------------------------------------------------------------------------------------
# Results


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True)


class Published(_Result):
    ref: str  # name:version (user/name:version for ensembles)
    name: str
    version: str
    user: str | None
    kind: str
    digest: str
    created: bool  # False: this content was already published (no-op)
    url: str
    manifest: Manifest


class Pulled(_Result):
    ref: str
    path: Path
    manifest: Manifest
    members: dict[str, Path]  # ensemble member name -> its dir (inside path/members/)
    downloaded_bytes: int
    cached_files: int
    signed_by: str | None = None  # fingerprint of the trusted key that signed it (trust policy)


class VersionInfo(_Result):
    ref: str
    name: str
    version: str
    kind: str
    user: str | None
    base_model: str | None
    digest: str
    size: int
    files: int
    created: datetime
    latest: bool
    license: str
    tags: tuple[str, ...]
    url: str


class Shown(_Result):
    ref: str
    url: str
    latest: bool
    manifest: Manifest
    card: str


class Verified(_Result):
    ref: str
    files: int
    bytes: int
    members: list[str]
    signed_by: str | None = None  # fingerprint of the trusted key that signed it (trust policy)


class GcItem(_Result):
    what: Literal["staging", "upload", "version"]
    key: str  # a version dir, a staging prefix or an object key
    bytes: int
    age_s: float
    reason: str


class GcSkip(_Result):
    key: str  # a key gc could not use or delete (reported, never fatal)
    reason: str


class GcReport(_Result):
    applied: bool
    older_than_s: float
    items: list[GcItem]
    skipped: list[GcSkip] = []

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.items)


# ---------------------------------------------------------------------------------------------
# Crash-injection hook (tests): FACTORY_CATALOG_CRASH_AT=phase[:n] SIGKILLs this process at the
# n-th checkpoint of that phase. Phases: upload, verify, manifest, pointer, done.

_crash_lock = threading.Lock()
_crash_counts: Counter[str] = Counter()


def checkpoint(phase: str) -> None:
    spec = os.environ.get("FACTORY_CATALOG_CRASH_AT")
    if not spec:
        return
    target, _, n = spec.partition(":")
    if target != phase:
        return
    with _crash_lock:
        _crash_counts[phase] += 1
        hit = _crash_counts[phase] == int(n or 1)
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)


def detect_lineage(lineage: Lineage | dict | None = None) -> Lineage:
    """Fill what the caller left empty: git SHA (``FACTORY_GIT_SHA`` or ``git rev-parse HEAD``),
    image (``FACTORY_IMAGE``), flow run id (``FACTORY_FLOW_RUN_ID`` or Prefect's
    ``PREFECT__FLOW_RUN_ID``; tasks/ pass ``prefect.runtime.flow_run.id`` explicitly)."""
    if isinstance(lineage, Lineage):
        values = lineage.model_dump()
    else:
        check_json_depth(lineage, "lineage")
        try:
            values = Lineage(**(lineage or {})).model_dump()
        except ValidationError as e:
            raise CatalogError(f"invalid lineage: {e.errors()[0]['msg']}") from None
    if not values.get("git_sha"):
        values["git_sha"] = os.environ.get("FACTORY_GIT_SHA") or _git_sha()
    if not values.get("image"):
        values["image"] = os.environ.get("FACTORY_IMAGE") or None
    if not values.get("flow_run_id"):
        values["flow_run_id"] = (os.environ.get("FACTORY_FLOW_RUN_ID")
                                 or os.environ.get("PREFECT__FLOW_RUN_ID") or None)
    try:
        out = Lineage(**values)
        canonical_json(out.model_dump(mode="json"))  # JSON-only config: no NaN, no objects
    except (ValidationError, ValueError, TypeError) as e:
        raise CatalogError(f"invalid lineage: {str(e).splitlines()[0]}") from None
    return out


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


# ---------------------------------------------------------------------------------------------
# The catalog


class Catalog:
    """A model catalog at ``root`` (a URL; default: see :func:`default_root`).

    ``fs`` injects an fsspec filesystem (tests); ``cache_dir`` is the local blob cache used by
    pull; ``workers`` bounds parallel transfers.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, fs=None, cache_dir: str | os.PathLike | None = None,
                 workers: int | None = None, part_size: int | None = None,
                 sign_key: str | os.PathLike | Signer | bool | None = None,
                 trust: TrustPolicy | bool | None = None):
        url = os.fspath(root) if root is not None else default_root()
        self.store = Store(url, fs, **({"part_size": part_size} if part_size else {}))
        self.url = self.store.url
        self.cache = BlobCache(Path(cache_dir) if cache_dir else default_cache_dir())
        self.workers = workers or int(os.environ.get("FACTORY_CATALOG_WORKERS", DEFAULT_WORKERS))
        # Signing (publish): a key path or Signer; None: $FACTORY_SIGNING_KEY, else the embedded
        # default key; False: publish unsigned. Trust (pull, verify): None reads the environment.
        self._sign_key = sign_key
        self.trust = None if trust is False else trust if trust is not None else TrustPolicy.build()

    def __repr__(self) -> str:
        return f"Catalog({self.url!r})"

    # -- publish ------------------------------------------------------------------------------

    def publish(self, src: str | os.PathLike, name: str, *, kind: str = "general", user: str | None = None,
                base_model: str | None = None, base_model_relation: str | None = None,
                tags: Iterable[str] = (), license: str = "apache-2.0",
                evals: Iterable[EvalResult | dict] | None = None,
                parents: Iterable[str | Parent | dict] = (), lineage: Lineage | dict | None = None,
                progress: ProgressArg = None) -> Published:
        """Publish the model dir ``src`` as a new immutable version of ``name``.

        Same content again returns the existing version (``created=False``) and points
        ``latest`` at it. For ``kind="ensemble"`` the dir holds ENSEMBLE.json and ``user`` is
        required. Raises CatalogError for bad input and StorageError for store failures.
        """
        # Everything about the request is checked before the store is touched.
        check_name(name)
        check_text(base_model, "base model")
        if user is not None:
            check_name(user, "user id")
        if kind not in KINDS:
            raise CatalogError(f"invalid kind {kind!r}: expected one of {', '.join(KINDS)}")
        if kind == "ensemble" and user is None:
            raise CatalogError("an ensemble is published under a user: pass --user ID")
        if kind != "ensemble" and name in RESERVED_MODEL_NAMES:
            raise CatalogError(f"the model name {name!r} is reserved")
        tags = tuple(tags)
        for t in tags:
            if not isinstance(t, str) or not t or len(t) > 128 or not t.isprintable():
                raise CatalogError(f"invalid tag {t!r}")
        if not isinstance(license, str) or not license or not license.isprintable():
            raise CatalogError(f"invalid license {license!r}")
        ref = Ref(name, "latest", user if kind == "ensemble" else None)
        parent_specs = list(parents)
        for p in parent_specs:  # refs/digests are checked now; catalog refs are resolved below
            if isinstance(p, str) and not p.startswith("sha256:"):
                Ref.parse(p)
            elif isinstance(p, str):
                check_digest(p)
        lineage = detect_lineage(lineage)
        src = Path(src).expanduser()
        files = _scan_source(src, kind)
        spec = parse_ensemble((src / ENSEMBLE_FILE).read_bytes(), str(src / ENSEMBLE_FILE)) \
            if kind == "ensemble" else None
        eval_list = _load_evals(src, evals)
        signer = self._signer()
        if signer is not None:
            signer.prepare()
        sizes = {rel: p.stat().st_size for rel, p in files}
        hashing = Progress(f"hash {name}", sum(sizes.values()), progress)
        with ThreadPoolExecutor(self.workers) as pool:
            hashed = list(pool.map(lambda f: sha256_file(f[1], hashing.advance), files))
        hashing.close()
        entries = tuple(FileEntry(path=rel, size=size, sha256=sha)
                        for (rel, _), (size, sha) in zip(files, hashed, strict=True))

        with self._storage("publishing"):
            parent_list = self._resolve_parents(parent_specs, spec)
            if base_model is None and parent_list:
                general = [p for p in parent_list if p.role == "general"]
                base_model = (general or parent_list)[0].name
            if base_model_relation is None and base_model and kind != "ensemble":
                base_model_relation = "adapter" if any(e.path.endswith("adapter_config.json")
                                                       for e in entries) else "finetune"
            auto_tags = {"dlm-factory", kind}
            if any(e.path == "diffusion.json" for e in entries):
                auto_tags.add("diffusion-lm")
            try:
                content = Content(kind=kind, user=user, files=entries, parents=tuple(parent_list),
                                  base_model=base_model, base_model_relation=base_model_relation,
                                  tags=tuple(sorted(auto_tags | set(tags))), license=license,
                                  evals=tuple(eval_list))
            except ValidationError as e:
                raise CatalogError(f"invalid publish request: {e.errors()[0]['msg']}") from None
            digest = content.digest()
            ref = ref.at(digest[7:19])

            existing = self._manifest_if_any(ref)
            if existing is not None:
                self._sign_once(ref, signer)
                self._point_latest(ref)
                if self._manifest_if_any(ref) is not None:
                    log.info("%s is already published (%s)", ref, digest)
                    return self._published(ref, existing, created=False)
                # gc unpublished it between our read and the pointer move: publish it again.
                log.warning("%s was collected while it was re-published; uploading it again", ref)

            card = render_card(name, ref.version, content, spec)
            card_entry = FileEntry(path=CARD_FILE, size=len(card), sha256=_sha256_bytes(card))
            total = sum(sizes.values()) + len(card)

            uploading = Progress(f"upload {ref}", total, progress)

            self.store.put_files([(local, f"{ref.dir}/{rel}") for rel, local in files], self.workers,
                                 uploading.advance, lambda: checkpoint("upload"))
            self.store.write(f"{ref.dir}/{CARD_FILE}", card)
            uploading.advance(len(card))
            uploading.close()
            checkpoint("upload")

            checking = Progress(f"verify {ref}", total, progress)
            bad = self._check_stored(ref, (*entries, card_entry), checking)
            checking.close()
            if bad:
                raise CatalogError(f"publish {ref}: stored files failed verification, nothing was "
                                   f"published: {'; '.join(bad)}")

            manifest = build_manifest(name, content, card_entry, lineage)
            checkpoint("manifest")
            created = self.store.create(f"{ref.dir}/{MANIFEST_FILE}", manifest_bytes(manifest))
            if not created:  # a concurrent publisher of the same content won: use theirs
                manifest = self._manifest_if_any(ref)
                if manifest is None:
                    raise StorageError(f"{ref}: MANIFEST.json exists but cannot be read")
            checkpoint("sign")
            self._sign_once(ref, signer)
            checkpoint("pointer")
            self._point_latest(ref, check=False)
            checkpoint("done")
            log.info("published %s (%s) to %s", ref, digest, self.store.show(ref.dir))
            return self._published(ref, manifest, created=created)

    def ensemble_spec(self, members: Iterable[tuple[str, str]], *, rule: str = "product_of_experts",
                      weights: dict[str, float] | None = None, router: dict[str, Any] | None = None,
                      **combination: Any) -> EnsembleSpec:
        """Pin ``members`` ((ref, role) pairs, e.g. ("dlm-base", "general")) to their current
        versions and digests. Write the result with ``spec.write(dir)`` and publish ``dir`` with
        ``kind="ensemble"``."""
        pinned = []
        parsed = [(Ref.parse(r), role) for r, role in members]
        with self._storage("resolving ensemble members"):
            for ref, role in parsed:
                m, _ = self._resolve(ref)
                pinned.append(EnsembleMember(name=m.name, version=m.version, digest=m.digest, role=role))
        try:
            return EnsembleSpec(members=tuple(pinned), router=router,
                                combination={"rule": rule, "weights": weights or {}, **combination})
        except ValidationError as e:
            raise CatalogError(f"invalid ensemble: {e.errors()[0]['msg']}") from None

    # -- pull ---------------------------------------------------------------------------------

    def pull(self, ref: str, dest: str | os.PathLike, *, user: str | None = None, force: bool = False,
             progress: ProgressArg = None) -> Pulled:
        """Download ``ref`` into ``dest``, every sha256 verified before the dir appears.

        An ensemble's members land in ``dest/members/<member name>/``. Files come from (and go
        into) the local blob cache, so a second pull of the same version downloads nothing;
        pulled files are copies (never links into the cache). ``dest`` must not exist or be
        empty; ``force`` replaces a dir that an earlier pull created (it holds
        ``.catalog-pull.json``), never anything else. With a trust policy, every version (an
        ensemble and each member) must pass it before any of its files is downloaded.
        """
        r = Ref.parse(ref, user)
        dest = self._check_dest(dest, force)

        with self._storage("pulling"):
            manifest, raw = self._resolve(r)
            r = r.at(manifest.version)
            sig, signed_by = self._signature(r, raw)
            parts: list[_Part] = [_Part("", r, manifest, raw, sig)]
            stats = self._fetch(r, manifest, progress)
            if manifest.kind == "ensemble":
                spec_raw = self._cached_bytes(r, manifest.file(ENSEMBLE_FILE))
                spec = parse_ensemble(spec_raw, f"{r}/{ENSEMBLE_FILE}")
                for member in spec.members:
                    mref, mman, mraw = self._member(r, member)
                    msig, _ = self._signature(mref, mraw)
                    parts.append(_Part(f"members/{member.name}", mref, mman, mraw, msig))
                    got = self._fetch(mref, mman, progress)
                    stats = (stats[0] + got[0], stats[1] + got[1])

        tmp = dest.parent / f".{dest.name[:64]}.partial-{uuid.uuid4().hex[:8]}"
        made = _missing_ancestor(dest.parent)
        try:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp.mkdir()
            except OSError as e:
                raise CatalogError(f"cannot create {dest}: {e.strerror or e}") from None
            self._build(tmp, parts)
            marker = json.dumps({"ref": str(r), "digest": manifest.digest, "root": self.url}) + "\n"
            try:
                _write_new(tmp / PULL_MARKER, marker.encode(), 0o644)
            except OSError as e:
                raise CatalogError(f"cannot write {tmp / PULL_MARKER}: {e.strerror or e}") from None
            _swap_into_place(tmp, dest, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if made is not None:  # parents this pull created (now empty again): removed
                _remove_empty_dirs(dest.parent, made)
            raise
        members = {p.sub.split("/", 1)[1]: dest / p.sub for p in parts if p.sub}
        log.info("pulled %s into %s", r, dest)
        return Pulled(ref=str(r), path=dest, manifest=manifest, members=members,
                      downloaded_bytes=stats[0], cached_files=stats[1], signed_by=signed_by)

    def _check_dest(self, dest: str | os.PathLike, force: bool) -> Path:
        """Normalize ``dest`` and refuse what a pull must never write or replace."""
        text = os.fspath(dest) if isinstance(dest, str | os.PathLike) else None
        if not text or "\x00" in str(text):
            raise CatalogError(f"invalid destination {dest!r}")
        path = Path(os.path.abspath(os.path.expanduser(text)))  # "x/.." is the cwd: seen as such
        if path == Path(path.anchor):
            raise CatalogError(f"refusing to pull into {path}")
        if len(os.fsencode(path.name)) > 255:
            raise CatalogError(f"destination name {path.name[:40]}... is too long (at most 255 bytes)")
        try:
            path = path.parent.resolve() / path.name
            protected = {Path.cwd().resolve(): "the current directory", factory_home().resolve(): "FACTORY_HOME"}
            if self.store.local:
                protected[Path(self.store.base).resolve()] = "the catalog root"
            protected[self.cache.root.resolve()] = "the blob cache"
            for place, what in protected.items():
                if place == path or place.is_relative_to(path):
                    raise CatalogError(f"refusing to pull into {path}: it is or holds {what}")
                if what in ("the catalog root", "the blob cache") and path.is_relative_to(place):
                    raise CatalogError(f"refusing to pull into {path}: it is inside {what}")
            above = path.parent  # the nearest existing ancestor must be a directory
            while not above.exists() and not above.is_symlink() and above != above.parent:
                above = above.parent
            if not above.is_dir():
                raise CatalogError(f"cannot create {path}: {above} is not a directory")
            if path.is_symlink():
                raise CatalogError(f"destination {path} is a symlink; refusing to replace it")
            if path.exists():
                if not path.is_dir():
                    raise CatalogError(f"destination {path} exists and is not a directory")
                if any(path.iterdir()):
                    if not force:
                        raise CatalogError(f"destination {path} exists and is not empty "
                                           f"(use --force to replace an earlier pull)")
                    if not _is_pulled_dir(path):
                        raise CatalogError(f"destination {path} was not created by a pull (no {PULL_MARKER}); "
                                           f"--force only replaces earlier pulls")
        except OSError as e:
            raise CatalogError(f"cannot use destination {path}: {e.strerror or e}") from None
        return path

    def _cached_bytes(self, ref: Ref, entry: FileEntry) -> bytes:
        """A file of ``ref`` from the verified cache (fetched again if the cached copy is bad)."""
        data = self.cache.read(entry)
        if data is None:
            self.cache.fetch_many(self.store, [(f"{ref.dir}/{entry.path}", entry, f"{ref}/{entry.path}")],
                                  self.workers)
            data = self.cache.read(entry)
        if data is None:
            raise CatalogError(f"{ref}/{entry.path}: the cached copy does not match its sha256")
        return data

    def _build(self, tmp: Path, parts: list[_Part]) -> None:
        """Lay out every part under ``tmp``: verified copies, MANIFEST.json (+ signature). A blob
        found corrupt while copying is fetched again once; a second mismatch is an error."""
        try:
            for attempt in (1, 2):
                bad = []
                for part in parts:
                    base = tmp / part.sub if part.sub else tmp
                    for f in part.manifest.files:
                        target = base / f.path
                        if attempt == 2 and target.exists():
                            continue
                        target.parent.mkdir(parents=True, exist_ok=True)
                        if not self.cache.place(f, target):
                            bad.append((part, f))
                if not bad:
                    break
                if attempt == 2:
                    part, f = bad[0]
                    raise CatalogError(f"{part.ref}/{f.path}: the cached copy does not match its sha256")
                log.warning("%d cached file(s) did not match their sha256; fetching them again", len(bad))
                with self._storage("pulling"):
                    self.cache.fetch_many(self.store, [(f"{p.ref.dir}/{f.path}", f, f"{p.ref}/{f.path}")
                                                       for p, f in bad], self.workers)
            for part in parts:
                base = tmp / part.sub if part.sub else tmp
                _write_new(base / MANIFEST_FILE, part.raw)
                if part.sig is not None:
                    _write_new(base / SIGNATURE_FILE, part.sig)
                paths = [f.path for f in part.manifest.files]
                check_weight_files(paths, lambda p, b=base: (b / p).read_bytes(), str(part.ref))
        except OSError as e:
            raise CatalogError(f"cannot write the pulled files ({e.strerror or e}: {e.filename})") from None

    # -- browse -------------------------------------------------------------------------------

    def list(self, *, kind: str | None = None, user: str | None = None, base_model: str | None = None,
             name: str | None = None, all_versions: bool = False) -> list[VersionInfo]:
        """Published versions (only the ``latest`` of each name unless ``all_versions``)."""
        if kind is not None and kind not in KINDS:
            raise CatalogError(f"invalid kind {kind!r}: expected one of {', '.join(KINDS)}")
        if user is not None:
            check_name(user, "user id")
        if name is not None:
            check_name(name)
        if name and user:
            prefixes = [f"models/{name}/", f"ensembles/{user}/{name}/"]
        elif name:
            prefixes = [f"models/{name}/", "ensembles/"]
        elif user:
            prefixes = ["models/", f"ensembles/{user}/"]
        else:
            prefixes = ["models/", "ensembles/"]
        with self._storage("listing"):
            manifests, latest = self._scan(k for prefix in prefixes for k in self.store.keys(prefix))
        rows: dict[tuple, list[tuple[Ref, Manifest]]] = {}
        for ref, m in manifests:
            rows.setdefault((ref.user, ref.name), []).append((ref, m))
        out = []
        for (_, _), versions in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0] or "")):
            versions.sort(key=lambda rm: rm[1].created, reverse=True)
            pointed = [rm for rm in versions if latest.get(rm[0].pointer) == rm[0].version]
            chosen = versions if all_versions else (pointed or versions[:1])
            for ref, m in chosen:
                if kind and m.kind != kind or user and m.user != user or name and m.name != name:
                    continue
                if base_model and m.base_model != base_model:
                    continue
                out.append(VersionInfo(ref=str(ref), name=m.name, version=m.version, kind=m.kind, user=m.user,
                                       base_model=m.base_model, digest=m.digest, size=m.size,
                                       files=len(m.files), created=m.created,
                                       latest=latest.get(ref.pointer) == ref.version, license=m.license,
                                       tags=m.tags, url=self.store.show(ref.dir)))
        return out

    def show(self, ref: str, *, user: str | None = None) -> Shown:
        """One version's manifest and model card (the card's sha256 is checked)."""
        r = Ref.parse(ref, user)
        with self._storage("reading"):
            m, _ = self._resolve(r)
            r = r.at(m.version)
            card = self.store.read(f"{r.dir}/{CARD_FILE}")
            pointer = self.store.read(r.pointer)
        entry = m.file(CARD_FILE)
        if card is None or len(card) != entry.size or _sha256_bytes(card) != entry.sha256:
            raise CatalogError(f"{r}/{CARD_FILE}: checksum mismatch or missing")
        return Shown(ref=str(r), url=self.store.show(r.dir), manifest=m, card=card.decode("utf-8", "replace"),
                     latest=pointer is not None and pointer.decode(errors="replace").strip() == m.version)

    def resolve(self, ref: str, *, user: str | None = None) -> Manifest:
        """The manifest ``ref`` names (``latest`` followed)."""
        r = Ref.parse(ref, user)
        with self._storage("reading"):
            return self._resolve(r)[0]

    def verify(self, ref: str, *, user: str | None = None, progress: ProgressArg = None) -> Verified:
        """Re-hash every stored file of ``ref`` (and of an ensemble's members) in place.

        Raises CatalogError naming every file that is missing or does not match.
        """
        r = Ref.parse(ref, user)
        with self._storage("verifying"):
            m, mraw = self._resolve(r)
            r = r.at(m.version)
            signed_by = self._signature(r, mraw)[1]
            todo: list[tuple[Ref, Manifest]] = [(r, m)]
            bad = []
            if m.kind == "ensemble":
                raw = self._read_verified(r, m.file(ENSEMBLE_FILE))
                if raw is None:
                    bad.append(f"{ENSEMBLE_FILE}: missing or checksum mismatch")
                else:
                    for member in parse_ensemble(raw, f"{r}/{ENSEMBLE_FILE}").members:
                        mref, mman, member_raw = self._member(r, member)
                        self._signature(mref, member_raw)
                        todo.append((mref, mman))
            total = sum(x.size for _, man in todo for x in man.files)
            checking = Progress(f"verify {r}", total, progress)
            for vref, man in todo:
                problems = self._check_stored(vref, man.files, checking)
                bad += [p if vref == r else f"{vref}/{p}" for p in problems]
            checking.close()
        if bad:
            raise CatalogError(f"verify {r} failed: {'; '.join(bad)}")
        return Verified(ref=str(r), files=sum(len(man.files) for _, man in todo), bytes=total,
                        members=[str(x) for x, _ in todo[1:]], signed_by=signed_by)

    # -- gc -----------------------------------------------------------------------------------

    def gc(self, *, apply: bool = False, older_than_s: float = GC_DEFAULT_AGE_S) -> GcReport:
        """Find (and with ``apply`` delete) what no reader needs, older than ``older_than_s``:

        - staging leftovers: ``.staging/`` temp files, version dirs without MANIFEST.json,
          incomplete S3 multipart uploads;
        - versions not reachable from any ``latest`` pointer or from a kept ensemble's members,
          and not pointed to within the threshold (pointer moves leave a time mark on both the
          old and the new version: a reader may still be pulling what ``latest`` named a minute
          ago) nor published within it.

        Refuses to run while a pointer or a kept ENSEMBLE.json is unreadable. Keys that are not
        valid catalog keys are skipped and reported, never fatal. Just before a version is
        deleted its pointer and time mark are read again; it is unpublished MANIFEST.json first,
        and its manifest is put back if a pointer moved to it meanwhile.
        """
        if not isinstance(older_than_s, int | float) or not math.isfinite(older_than_s) or older_than_s < 0:
            raise CatalogError(f"older_than must be a finite number >= 0, not {older_than_s!r}")
        now = _now()
        items: list[GcItem] = []
        skipped: list[GcSkip] = []
        with self._storage("collecting garbage"):
            objects = self.store.find("")
            for key in list(objects):
                try:
                    self.store.path(key)
                except CatalogError as e:
                    skipped.append(GcSkip(key=key, reason=str(e)))
                    del objects[key]
            manifests, latest = self._scan(objects, strict=True)
            marks = self._marks(objects)
            # 1. Group objects by the version dir (or staging area) they belong to.
            groups: dict[str, list[str]] = {}
            for key in objects:
                parts = key.split("/")
                if parts[0] == ".staging":
                    items.append(self._gc_item("staging", key, [key], objects, now, "temp file"))
                elif parts[0] == "models" and len(parts) >= 4:
                    groups.setdefault("/".join(parts[:3]), []).append(key)
                elif parts[0] == "ensembles" and len(parts) >= 5:
                    groups.setdefault("/".join(parts[:4]), []).append(key)
            published = {ref.dir: (ref, m) for ref, m in manifests}
            for ref, _ in manifests:  # a version's time mark goes with it
                if ref.mark() in objects:
                    groups.setdefault(ref.dir, []).append(ref.mark())
            for vdir, keys in groups.items():
                if vdir not in published and f"{vdir}/{MANIFEST_FILE}" not in keys:
                    items.append(self._gc_item("staging", vdir, keys, objects, now, "no MANIFEST.json"))
            for key, upload_id, age in self.store.stale_uploads(older_than_s, now):
                items.append(GcItem(what="upload", key=f"{key}#{upload_id}", bytes=0, age_s=age,
                                    reason="incomplete multipart upload"))
            # 2. Reachability: pointers, recently pointed or published versions, kept ensembles' members.
            keep = self._reachable(manifests, latest, marks, now, older_than_s)
            for vdir in sorted(published):
                if vdir not in keep:  # its age: since it was published or last pointed to
                    newest = max(objects.get(f"{vdir}/{MANIFEST_FILE}", (0, 0.0))[1],
                                 published[vdir][1].created.timestamp(), marks.get(vdir, 0.0))
                    items.append(self._gc_item("version", vdir, groups.get(vdir, []), objects, now,
                                               "not referenced by a pointer or an ensemble", newest))
            items = [i for i in items if i.what == "upload" or i.age_s >= older_than_s]
            items.sort(key=lambda i: (i.what, i.key))
            if apply:
                # Pointers may have moved since the scan: read them (and the marks) again.
                pointers = sorted({r.pointer for r, _ in manifests})
                fresh = {k: v.decode(errors="replace").strip()
                         for k, v in self.store.read_many(pointers).items() if v is not None}
                keep |= self._reachable(manifests, fresh, self._marks(self.store.find("refs/")), _now(),
                                        older_than_s)
                done = []
                for item in items:
                    if item.what == "version" and item.key in keep:
                        continue
                    try:
                        with self._storage(f"deleting {item.key}"):
                            if self._gc_apply(item, groups, published, older_than_s):
                                done.append(item)
                    except CatalogError as e:
                        skipped.append(GcSkip(key=item.key, reason=str(e)))
                items = done
        return GcReport(applied=apply, older_than_s=older_than_s, items=items, skipped=skipped)

    def _marks(self, objects: dict[str, tuple[int, float]]) -> dict[str, float]:
        """Version dir -> when a pointer last named it (refs/.../pointed/<version>): the later of
        the time written in the mark and the object's own mtime."""
        keys = {}
        for key in objects:
            parts = key.split("/")
            if parts[0] != "refs" or len(parts) < 4 or parts[-2] != "pointed":
                continue
            if len(parts) == 4:
                ref = Ref(parts[1], parts[3])
            elif len(parts) == 6 and parts[1] == "ensembles":
                ref = Ref(parts[3], parts[5], parts[2])
            else:
                continue
            try:
                ref.check_stored()
            except CatalogError:
                continue
            keys[key] = ref
        raws = self.store.read_many(sorted(keys))
        out: dict[str, float] = {}
        for key, ref in keys.items():
            when = objects.get(key, (0, 0.0))[1]
            with contextlib.suppress(ValueError, AttributeError):
                value = float(raws.get(key).decode("ascii").strip())
                when = max(when, value) if math.isfinite(value) else when
            out[ref.dir] = max(out.get(ref.dir, 0.0), when)
        return out

    def _reachable(self, manifests: list[tuple[Ref, Manifest]], latest: dict[str, str], marks: dict[str, float],
                   now: float, older_than_s: float) -> set[str]:
        """Version dirs gc keeps: pointed to now or within the threshold, published within it,
        and every member of an ensemble kept for those reasons."""
        keep = {ref.dir for ref, _ in manifests if latest.get(ref.pointer) == ref.version}
        keep |= {vdir for vdir, when in marks.items() if now - when < older_than_s}
        keep |= {ref.dir for ref, m in manifests if now - m.created.timestamp() < older_than_s}
        for ref, m in manifests:
            if ref.dir in keep and m.kind == "ensemble":
                raw = self.store.read(f"{ref.dir}/{ENSEMBLE_FILE}")
                entry = m.file(ENSEMBLE_FILE)
                if raw is None or _sha256_bytes(raw) != entry.sha256:
                    raise CatalogError(f"{ref}/{ENSEMBLE_FILE}: checksum mismatch; fix it before gc")
                for member in parse_ensemble(raw, f"{ref}/{ENSEMBLE_FILE}").members:
                    keep.add(Ref(member.name, member.version).dir)
        return keep

    def _gc_item(self, what, key, keys, objects, now, reason, newest: float | None = None) -> GcItem:
        if newest is None:
            newest = max((objects[k][1] for k in keys if k in objects), default=now)
        return GcItem(what=what, key=key, bytes=sum(objects[k][0] for k in keys if k in objects),
                      age_s=now - newest, reason=reason)

    def _gc_apply(self, item: GcItem, groups: dict[str, list[str]],
                  published: dict[str, tuple[Ref, Manifest]], older_than_s: float) -> bool:
        """Delete one item; False when a version turned out to be in use (left as it was)."""
        if item.what == "upload":
            key, _, upload_id = item.key.rpartition("#")
            self.store.abort_upload(key, upload_id)
        elif item.what == "staging" and item.key.startswith(".staging/"):
            self.store.delete([item.key])
        elif item.what == "staging":
            keys = groups.get(item.key, [])
            if f"{item.key}/{MANIFEST_FILE}" in keys or self.store.read(f"{item.key}/{MANIFEST_FILE}") is not None:
                return False  # published since the scan
            self.store.delete(keys)
        else:
            ref, _ = published[item.key]
            if self._in_use(ref, older_than_s):
                return False
            manifest = f"{item.key}/{MANIFEST_FILE}"
            raw = self.store.read(manifest)
            self.store.delete([manifest])  # unpublish first: readers stop seeing it atomically
            if self._in_use(ref, older_than_s):  # a pointer moved to it meanwhile: put it back
                if raw is not None:
                    self.store.create(manifest, raw)
                log.warning("gc: %s was pointed to while being collected; kept", ref)
                return False
            self.store.delete([k for k in groups.get(item.key, []) if k != manifest])
        log.info("gc: deleted %s %s", item.what, item.key)
        return True

    def _in_use(self, ref: Ref, older_than_s: float) -> bool:
        """Read now: does ``latest`` name ``ref``, or did it within the threshold?"""
        raws = self.store.read_many([ref.pointer, ref.mark()])
        pointer = raws[ref.pointer]
        if pointer is not None and pointer.decode("ascii", "replace").strip() == ref.version:
            return True
        mark = raws[ref.mark()]
        with contextlib.suppress(ValueError):
            if mark is not None and _now() - float(mark.decode("ascii", "replace").strip()) < older_than_s:
                return True
        return False

    # -- internals ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _storage(self, action: str) -> Iterator[None]:
        """Turn backend exceptions into one-line StorageErrors (CatalogErrors pass through)."""
        try:
            yield
        except CatalogError:
            raise
        except _backend_errors() as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StorageError(f"storage error at {self.url} while {action}: {msg[:300]}") from e

    def _published(self, ref: Ref, m: Manifest, created: bool) -> Published:
        return Published(ref=str(ref), name=m.name, version=m.version, user=m.user, kind=m.kind,
                         digest=m.digest, created=created, url=self.store.show(ref.dir), manifest=m)

    def _manifest_if_any(self, ref: Ref) -> Manifest | None:
        raw = self.store.read(f"{ref.dir}/{MANIFEST_FILE}")
        if raw is None:
            return None
        return self._checked(ref, parse_manifest(raw, str(ref)))

    def _checked(self, ref: Ref, m: Manifest) -> Manifest:
        """A manifest must describe the place it was read from."""
        ensemble = ref.user is not None
        if (m.name != ref.name or m.version != ref.version or (m.kind == "ensemble") != ensemble
                or (ensemble and m.user != ref.user)):
            raise CatalogError(f"{ref}: MANIFEST.json describes {m.user + '/' if m.user else ''}"
                               f"{m.name}:{m.version} ({m.kind}), not this location")
        return m

    def _resolve(self, ref: Ref) -> tuple[Manifest, bytes]:
        version = ref.version
        what = f"ensemble {ref.user}/{ref.name}" if ref.user else f"model {ref.name}"
        if version == "latest":
            raw = self.store.read(ref.pointer)
            if raw is None:
                raise CatalogError(f"no published {what} in {self.url}")
            version = raw.decode("ascii", "replace").strip()
            try:
                check_version(version)
            except CatalogError:
                raise CatalogError(f"corrupt pointer {ref.pointer} in {self.url}") from None
        vref = ref.at(version)
        raw = self.store.read(f"{vref.dir}/{MANIFEST_FILE}")
        if raw is None:
            raise CatalogError(f"no version {version} of {what} in {self.url}")
        return self._checked(vref, parse_manifest(raw, str(vref))), raw

    def _member(self, ensemble: Ref | str, member: EnsembleMember) -> tuple[Ref, Manifest, bytes]:
        mref = Ref(member.name, member.version)
        try:
            m, raw = self._resolve(mref)
        except CatalogError as e:
            raise CatalogError(f"{ensemble}: member {mref}: {e}") from None
        if m.digest != member.digest:
            raise CatalogError(f"{ensemble}: member {mref} has digest {m.digest}, ENSEMBLE.json pins "
                               f"{member.digest}")
        return mref, m, raw

    def _point_latest(self, ref: Ref, check: bool = True) -> None:
        """Move ``latest`` to ``ref.version``. First mark the time on the version it leaves (it
        was pointed to until now: a reader may have just resolved it) and on the new one; gc
        keeps every version pointed to within its threshold."""
        raw = self.store.read(ref.pointer)
        current = raw.decode("ascii", "replace").strip() if raw is not None else None
        if check and current == ref.version:
            return
        stamp = f"{_now():.3f}\n".encode()
        if current and current != ref.version:
            with contextlib.suppress(CatalogError):  # a garbage pointer names no version to mark
                check_version(current)
                self.store.write(ref.mark(current), stamp)
        self.store.write(ref.mark(), stamp)
        self.store.write(ref.pointer, f"{ref.version}\n".encode())

    def _signer(self) -> Signer | None:
        if self._sign_key is False:
            return None
        if isinstance(self._sign_key, Signer):
            return self._sign_key
        if self._sign_key is None or self._sign_key is True:
            return Signer.default()
        return Signer(self._sign_key)

    def _sign_once(self, ref: Ref, signer: Signer | None) -> None:
        """Sign the stored MANIFEST.json of ``ref`` unless a signature is already there."""
        if signer is None or self.store.read(f"{ref.dir}/{SIGNATURE_FILE}") is not None:
            return
        raw = self.store.read(f"{ref.dir}/{MANIFEST_FILE}")
        if raw is None:
            return
        parse_manifest(raw, str(ref))  # never sign bytes that are not a valid manifest
        if self.store.create(f"{ref.dir}/{SIGNATURE_FILE}", signer.sign(raw)):
            log.info("signed %s with %s", ref, signer)

    def _signature(self, ref: Ref, raw: bytes) -> tuple[bytes | None, str | None]:
        """The stored signature of ``ref`` and the trusted key that made it (None: unsigned or
        no trust policy). Refuses what the trust policy refuses."""
        sig = self.store.read(f"{ref.dir}/{SIGNATURE_FILE}")
        if self.trust is None:
            return sig, None
        return sig, self.trust.check(str(ref), raw, sig)

    def _resolve_parents(self, specs: list, ensemble: EnsembleSpec | None) -> list[Parent]:
        out: list[Parent] = []
        if ensemble is not None:
            for member in ensemble.members:
                m = self._member("ENSEMBLE.json", member)[1]
                if m.kind != member.role:
                    raise CatalogError(f"member {member.name}:{member.version} is a {m.kind} model, "
                                       f"ENSEMBLE.json gives it the role {member.role}")
                out.append(Parent(digest=member.digest, name=member.name, version=member.version,
                                  role=member.role))
        for p in specs:
            if isinstance(p, Parent):
                out.append(p)
            elif isinstance(p, dict):
                try:
                    out.append(Parent(**p))
                except ValidationError as e:
                    raise CatalogError(f"invalid parent {p!r}: {e.errors()[0]['msg']}") from None
            elif p.startswith("sha256:"):
                out.append(Parent(digest=p))
            else:
                m, _ = self._resolve(Ref.parse(p))
                out.append(Parent(digest=m.digest, name=m.name, version=m.version, role="base"))
        return out

    def _scan(self, keys: Iterable[str], strict: bool = False) -> tuple[list[tuple[Ref, Manifest]], dict[str, str]]:
        """Published versions among ``keys`` (corrupt manifests are logged and skipped) and the
        ``latest`` pointer of each name found: (versions, pointer key -> version). ``strict``
        (gc): a pointer that exists but names no valid version is an error."""
        refs = []
        for key in keys:
            parts = key.split("/")
            if parts[-1] != MANIFEST_FILE:
                continue
            if parts[0] == "models" and len(parts) == 4:
                ref = Ref(parts[1], parts[2])
            elif parts[0] == "ensembles" and len(parts) == 5:
                ref = Ref(parts[2], parts[3], parts[1])
            else:
                continue
            try:
                ref.check_stored()
            except CatalogError as e:
                log.warning("skipping %r: %s", key, e)
                continue
            refs.append(ref)
        pointers = sorted({r.pointer for r in refs})
        raws = self.store.read_many([f"{r.dir}/{MANIFEST_FILE}" for r in refs] + pointers)
        manifests = []
        for ref in refs:
            raw = raws[f"{ref.dir}/{MANIFEST_FILE}"]
            try:
                if raw is not None:
                    manifests.append((ref, self._checked(ref, parse_manifest(raw, str(ref)))))
            except CatalogError as e:
                log.warning("skipping %s: %s", ref, e)
        latest = {k: raws[k].decode(errors="replace").strip() for k in pointers if raws[k] is not None}
        if strict:
            for k, v in latest.items():
                try:
                    check_version(v)
                except CatalogError:
                    raise CatalogError(f"corrupt pointer {k} in {self.url}: fix it before gc") from None
        return manifests, latest

    def _fetch(self, ref: Ref, m: Manifest, progress: ProgressArg) -> tuple[int, int]:
        """All files of ``m`` into the verified blob cache: (bytes downloaded, files cached)."""
        todo = [f for f in m.files if not self.cache.has(f)]
        bar = Progress(f"pull {ref}", sum(f.size for f in todo), progress)
        jobs = [(f"{ref.dir}/{f.path}", f, f"{ref}/{f.path}") for f in todo]
        downloaded = self.cache.fetch_many(self.store, jobs, self.workers, bar.advance)
        bar.close()
        return downloaded, len(m.files) - len(todo)

    def _check_stored(self, ref: Ref, entries: Iterable[FileEntry], bar: Progress) -> list[str]:
        """Hash each stored file in place; return one problem string per bad file."""
        entries = list(entries)
        hashers = [_Hasher(bar.advance) for _ in entries]
        errors = self.store.transfer([(f"{ref.dir}/{f.path}", h) for f, h in zip(entries, hashers, strict=True)],
                                     self.workers)
        problems = []
        for f, h, err in zip(entries, hashers, errors, strict=True):
            if isinstance(err, ObjectMissing):
                problems.append(f"{f.path}: missing")
                continue
            if err is not None:
                raise err
            checkpoint("verify")
            if h.size != f.size:
                problems.append(f"{f.path}: size {h.size} != {f.size}")
            elif h.hexdigest() != f.sha256:
                problems.append(f"{f.path}: sha256 mismatch")
        return problems

    def _read_verified(self, ref: Ref, entry: FileEntry) -> bytes | None:
        raw = self.store.read(f"{ref.dir}/{entry.path}")
        if raw is None or len(raw) != entry.size or _sha256_bytes(raw) != entry.sha256:
            return None
        return raw


# ---------------------------------------------------------------------------------------------
# Helpers


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Hasher:
    """A ``Store.transfer`` sink that only hashes and counts (verification in place)."""

    def __init__(self, on_bytes: Callable[[int], None]):
        self.h, self.size, self.on_bytes = hashlib.sha256(), 0, on_bytes

    def begin(self, fresh: bool) -> int | None:
        return None if fresh else 0

    def write(self, data: bytes) -> None:
        self.h.update(data)
        self.size += len(data)
        self.on_bytes(len(data))

    def end(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _backend_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    with contextlib.suppress(ImportError):
        import aiohttp

        errors.append(aiohttp.ClientError)
    return tuple(errors)


def _scan_source(src: Path, kind: str) -> list[tuple[str, Path]]:
    """The files to publish from ``src``: (relative POSIX path, local path), sorted.

    Dot-files and the catalog's own README.md/MANIFEST.json are skipped (the catalog writes
    those); for an ensemble, a pulled ``members/`` dir is skipped. Pickle files, symlinked
    dirs, odd names and special files are refused.
    """
    if not src.is_dir():
        raise CatalogError(f"{src}: not a directory")
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        rel_dir = here.relative_to(src).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        for d in list(dirnames):
            if d.startswith(".") or (kind == "ensemble" and not rel_dir and d == "members"):
                dirnames.remove(d)
            elif (here / d).is_symlink():
                raise CatalogError(f"{here / d}: symlinked directories are not published")
        dirnames.sort()
        for fname in sorted(filenames):
            rel = rel_dir + fname
            if fname.startswith(".") or rel in (CARD_FILE, MANIFEST_FILE, SIGNATURE_FILE):
                continue
            if (here / fname).is_symlink():  # it could name any file the publisher can read
                raise CatalogError(f"{here / fname}: symlinks are not published (copy the file: cp -L)")
            check_file_path(rel)
            if not (here / fname).is_file():
                raise CatalogError(f"{here / fname}: not a regular file")
            out.append((rel, here / fname))
    if not out:
        raise CatalogError(f"{src}: nothing to publish")
    names = {rel for rel, _ in out}
    check_layout(sorted(names), kind)
    local = dict(out)
    check_weight_files(sorted(names), lambda rel: local[rel].read_bytes(), str(src))
    if kind == "ensemble" and ENSEMBLE_FILE not in names:
        raise CatalogError(f"{src}: an ensemble dir needs {ENSEMBLE_FILE}")
    if kind != "ensemble" and not any(rel.endswith(".safetensors") for rel in names):
        raise CatalogError(f"{src}: no *.safetensors weights (safetensors only)")
    return out


def _load_evals(src: Path, evals: Iterable[EvalResult | dict] | None) -> list[EvalResult]:
    """Explicit ``evals``, else ``src/eval_results.json`` (a list, or {"results": [...]})."""
    where = "evals"
    if evals is None:
        path = src / EVAL_FILE
        if not path.is_file():
            return []
        where = str(path)
        data = load_json(path.read_bytes(), str(path))
        evals = data.get("results", []) if isinstance(data, dict) else data
        if not isinstance(evals, list):
            raise CatalogError(f"{path}: expected a list of eval results")
    try:
        return [e if isinstance(e, EvalResult) else EvalResult(**e) for e in evals]
    except (ValidationError, TypeError) as e:
        msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        raise CatalogError(f"{where}: invalid eval result ({msg})") from None


@dataclass(frozen=True)
class _Part:
    """One version laid out by pull: at ``sub`` ("" or members/<name>) under DEST."""

    sub: str
    ref: Ref
    manifest: Manifest
    raw: bytes
    sig: bytes | None


def _write_new(path: Path, data: bytes, mode: int = 0o444) -> None:
    """Write ``data`` into a file that must not exist yet (never through or over a path)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise CatalogError(f"{path}: already exists; refusing to write over it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _missing_ancestor(path: Path) -> Path | None:
    """The topmost ancestor-or-self of ``path`` that does not exist (None if it exists)."""
    top = None
    while not path.exists() and not path.is_symlink() and path != path.parent:
        top, path = path, path.parent
    return top


def _remove_empty_dirs(path: Path, top: Path) -> None:
    """rmdir ``path`` and its parents up to ``top`` included, stopping at the first non-empty."""
    while True:
        try:
            path.rmdir()
        except OSError:
            return
        if path == top or path == path.parent:
            return
        path = path.parent


def _is_pulled_dir(path: Path) -> bool:
    marker = path / PULL_MARKER
    return marker.is_file() and not marker.is_symlink()


def _swap_into_place(tmp: Path, dest: Path, force: bool) -> None:
    """Rename the complete ``tmp`` dir to ``dest``. An empty ``dest`` dir is replaced by the
    rename itself; a non-empty one only with ``force`` and only when an earlier pull made it
    (moved aside, then deleted). Anything that appeared meanwhile (a concurrent pull) is an
    error, never a traceback, and leaves ``dest`` as it was."""
    aside = None
    try:
        if dest.is_dir() and not dest.is_symlink() and any(dest.iterdir()):
            if not force:
                raise CatalogError(f"destination {dest} exists and is not empty (use --force to replace it)")
            if not _is_pulled_dir(dest):
                raise CatalogError(f"destination {dest} was not created by a pull (no {PULL_MARKER}); "
                                   f"--force only replaces earlier pulls")
            aside = dest.parent / f".{dest.name[:64]}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dest, aside)
        elif dest.exists() or dest.is_symlink():
            if not dest.is_dir() or dest.is_symlink():
                raise CatalogError(f"destination {dest} exists and is not a directory")
        os.rename(tmp, dest)
    except OSError as e:
        if aside is not None and not dest.exists():
            with contextlib.suppress(OSError):
                os.rename(aside, dest)
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise CatalogError(f"destination {dest} appeared while pulling (another pull into it?); "
                               f"left as it is") from None
        raise CatalogError(f"cannot move the pulled files to {dest}: {e.strerror or e}") from None
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
