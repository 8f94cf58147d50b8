"""Someone with write access to the bucket (issue 12): writes any key, including a
self-consistent MANIFEST.json (digest, integrity, canonical bytes), README.md, pointers and
signatures, bypassing every check a publisher makes. Plus snapshots that prove a refusal
changed nothing outside DEST.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dlm_factory.catalog.schema import canonical_json

LINEAGE = {"flow_run_id": None, "git_sha": None, "image": None, "data_digests": {}, "config": {}}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HostileWriter:
    def __init__(self, cat):
        self.cat = cat
        self.store = cat.store

    def forge(self, name: str, files: dict[str, bytes | tuple[int, str]], *, kind: str = "general",
              user: str | None = None, point: bool = True, upload: bool = True, parents: list | None = None,
              extra: dict | None = None, lineage: dict | None = None) -> tuple[str, bytes]:
        """Write a version of ``name`` listing ``files`` (path -> bytes, or (size, sha256) to claim
        a digest without uploading bytes). Returns (version, MANIFEST.json bytes)."""
        card = b"# forged card\n"
        entries = []
        for path, data in files.items():
            size, digest = (len(data), sha(data)) if isinstance(data, bytes) else data
            entries.append({"path": path, "size": size, "sha256": digest})
        content = {"schema_version": 1, "kind": kind, "user": user, "files": entries,
                   "parents": parents or [], "base_model": None, "base_model_relation": None, "tags": [],
                   "license": "mit", "evals": []}
        content.update(extra or {})
        digest = "sha256:" + sha(canonical_json(content))
        version = digest[7:19]
        data = {**content, "name": name, "version": version, "digest": digest,
                "files": entries + [{"path": "README.md", "size": len(card), "sha256": sha(card)}],
                "lineage": lineage or LINEAGE, "created": "2026-01-01T00:00:00Z"}
        data["integrity"] = sha(canonical_json(data))
        raw = json.dumps(data, sort_keys=True, indent=2).encode() + b"\n"
        vdir = f"ensembles/{user}/{name}/{version}" if kind == "ensemble" else f"models/{name}/{version}"
        if upload:
            for path, payload in files.items():
                if isinstance(payload, bytes):
                    self.write(f"{vdir}/{path}", payload)
        self.write(f"{vdir}/README.md", card)
        self.write(f"{vdir}/MANIFEST.json", raw)
        if point:
            pointer = f"refs/ensembles/{user}/{name}/latest" if kind == "ensemble" else f"refs/{name}/latest"
            self.write(pointer, f"{version}\n".encode())
        return version, raw

    def write(self, key: str, data: bytes) -> None:
        """Any key, as the bucket's API takes it (no catalog key checks)."""
        if self.store.local:
            path = Path(self.store.base) / key
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                os.chmod(path, 0o644)
            path.write_bytes(data)
        else:
            bucket, _, prefix = self.store.base.partition("/")
            self.store.fs.call_s3("put_object", Bucket=bucket, Key=f"{prefix}/{key}" if prefix else key, Body=data)

    def keys(self) -> dict[str, str]:
        """Every object under the root -> sha256 of its bytes."""
        return {k: sha(self.store.read(k) or b"") for k in sorted(self.store.find(""))}


def snapshot(root: Path, *, skip: Path | None = None) -> dict[str, str]:
    """Every file, dir and link under ``root`` (except ``skip``) -> its sha256, mode and kind."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or p.is_relative_to(skip)):
            continue
        st = os.lstat(p)
        if p.is_symlink():
            out[str(p)] = f"link {os.readlink(p)}"
        elif p.is_dir():
            out[str(p)] = "dir"
        else:
            out[str(p)] = f"{sha(p.read_bytes())} {oct(st.st_mode & 0o7777)} ino={st.st_ino}"
    return out


def assert_untouched(before: dict[str, str], after: dict[str, str], *caches: Path) -> None:
    """Nothing that existed changed or vanished. New entries only in a blob cache (its dirs and
    the dirs above it), and only verified blobs there (a file named by its own sha256) or its
    partial/ dir."""
    changed = {k: (v, after.get(k)) for k, v in before.items() if after.get(k) != v}
    assert not changed, changed
    for k in sorted(set(after) - set(before)):
        p = Path(k)
        cache = next((c for c in caches if p.is_relative_to(c)), None)
        if cache is None:
            assert after[k] == "dir" and any(c.is_relative_to(p) for c in caches), f"new outside the cache: {k}"
            continue
        rel = p.relative_to(cache).parts
        if p.is_file() and rel[0] == "blobs":
            assert sha(p.read_bytes()) == p.name, f"unverified blob {k}"
        else:
            assert not rel or rel[0] in ("blobs", "partial"), k
