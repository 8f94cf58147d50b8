"""The one path/URL resolver of the factory, plus atomic output directories.

Sources may be a local path, a ``file://`` or any fsspec URL (``s3://`` through
s3fs), or a Hugging Face hub id (only where the machine has network). Remote
sources are copied into ``$FACTORY_HOME/cache/remote/`` once and reused.
Pickle-format weights are never fetched: only the files a safetensors checkpoint
or a text corpus needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from dlm_factory.dlm.errors import FactoryError
from dlm_factory.home import factory_home

# Files worth fetching from a remote model source: no *.bin/*.pt/*.pkl, ever.
MODEL_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.md", "*.jinja")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def materialize(src: str | os.PathLike, *, patterns: tuple[str, ...] = MODEL_PATTERNS) -> Path:
    """Return a local path holding ``src`` (a file or a directory).

    Raises FactoryError when the source does not exist or cannot be fetched.
    """
    s = os.fspath(src)
    if not s:
        raise FactoryError("empty source path")
    if "://" in s:
        if s.startswith("file://"):
            return _existing(Path(s[len("file://") :]), s)
        return _fetch_fsspec(s, patterns)
    path = Path(s).expanduser()
    if path.exists():
        return path.resolve()
    if _HUB_ID.match(s) and not s.startswith((".", "/")):
        return _fetch_hub(s, patterns)
    raise FactoryError(f"{s}: no such file or directory")


def _existing(path: Path, shown: str) -> Path:
    if not path.exists():
        raise FactoryError(f"{shown}: no such file or directory")
    return path.resolve()


def _fetch_fsspec(url: str, patterns: tuple[str, ...]) -> Path:
    import fsspec

    dest = factory_home() / "cache" / "remote" / hashlib.sha256(url.encode()).hexdigest()[:20]
    if dest.exists():
        return _single_file_or_dir(dest)
    try:
        fs, root = fsspec.core.url_to_fs(url)
        if not fs.exists(root):
            raise FactoryError(f"{url}: no such object or prefix")
        with atomic_dir(dest) as tmp:
            if fs.isdir(root):
                for remote in fs.find(root):
                    rel = remote[len(root.rstrip("/")) + 1 :]
                    if any(Path(rel).match(p) for p in patterns):
                        local = _contained(tmp, rel, url)
                        local.parent.mkdir(parents=True, exist_ok=True)
                        fs.get(remote, str(local))
            else:
                fs.get(root, str(_contained(tmp, Path(root).name, url)))
    except FactoryError:
        raise
    except Exception as e:  # network, credentials, missing bucket: one clear line
        raise FactoryError(f"{url}: cannot fetch ({type(e).__name__}: {e})") from e
    return _single_file_or_dir(dest)


def _contained(base: Path, rel: str, url: str) -> Path:
    """``base / rel`` for an object key's relative path, refusing any that could leave ``base``:
    absolute, empty or ``.``/``..`` parts (``a//b``, ``a/../../x``), NUL or backslash."""
    parts = rel.split("/")
    if (not rel or rel.startswith("/") or "\x00" in rel or "\\" in rel
            or any(p in ("", ".", "..") for p in parts)):
        raise FactoryError(f"{url}: refusing object {rel!r}: its path would leave the download dir")
    path = base.joinpath(*parts)
    if not path.resolve().is_relative_to(base.resolve()):  # a second line of defence
        raise FactoryError(f"{url}: refusing object {rel!r}: its path would leave the download dir")
    return path


def _single_file_or_dir(dest: Path) -> Path:
    entries = list(dest.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_file() else dest


def _fetch_hub(repo_id: str, patterns: tuple[str, ...]) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except Exception as e:
        raise FactoryError(f"{repo_id}: not a local path and not fetchable from the hub ({type(e).__name__})") from e


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``dest``; rename it to ``dest`` only if the block succeeds.

    On any exception the temp dir is removed, so a failed stage never leaves a
    partial output directory behind.
    """
    dest = Path(dest).resolve()
    if dest.exists() and not overwrite:
        raise FactoryError(f"{dest}: output already exists (choose another --output or remove it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():  # overwrite: swap in, then drop the old one
        trash = dest.parent / f".trash-{dest.name}-{uuid.uuid4().hex[:8]}"
        dest.rename(trash)
        tmp.rename(dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(dest)


UPLOAD_MARKER = "_COMMITTED"


def is_remote(dest: str | os.PathLike) -> bool:
    """Whether ``dest`` is an object-store URL (``file://`` counts: it goes through fsspec too)."""
    return "://" in os.fspath(dest)


def upload_dir(local: str | os.PathLike, url: str, *, last: tuple[str, ...] = ()) -> str:
    """Copy the files of ``local`` under ``url``, the files named in ``last`` after all others, then the
    marker ``_COMMITTED`` (its files and sizes): a reader that finds no marker ignores the prefix, so
    an upload cut short is never taken for a complete one. Returns ``url``."""
    import json

    import fsspec

    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(local).as_posix() in last)  # stable: the named ones go last
    try:
        fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        if fs.exists(f"{root}/{UPLOAD_MARKER}"):
            fs.rm(f"{root}/{UPLOAD_MARKER}")  # replacing: the prefix is incomplete until the new marker
        for p in files:
            rel = p.relative_to(local).as_posix()
            fs.makedirs(f"{root}/{Path(rel).parent.as_posix()}".rstrip("/."), exist_ok=True)
            fs.put_file(str(p), f"{root}/{rel}")
        manifest = {p.relative_to(local).as_posix(): p.stat().st_size for p in files}
        with fs.open(f"{root}/{UPLOAD_MARKER}", "w") as f:
            f.write(json.dumps({"files": manifest}, indent=1) + "\n")
    except Exception as e:  # network, credentials, missing bucket: one clear line
        raise FactoryError(f"{url}: cannot upload ({type(e).__name__}: {e})") from e
    return url


def upload_complete(url: str) -> bool:
    """Whether an upload under ``url`` finished (its marker is there)."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
        return fs.exists(f"{root.rstrip('/')}/{UPLOAD_MARKER}")
    except Exception:  # noqa: BLE001 - unreachable counts as not complete
        return False
