"""Local blob cache keyed by sha256: pulls download each distinct file once, verified.

Layout under the cache dir (default ``$FACTORY_HOME/cache/catalog``, or
``$FACTORY_CATALOG_CACHE``)::

    blobs/<sha[:2]>/<sha256>     verified, read-only
    partial/<sha256>.part        a download in progress or interrupted (resumed by range)

A blob enters ``blobs/`` only by rename after its sha256 matched. Its mtime is stamped at
verification with a marker in the nanoseconds (``VERIFIED_NS``), so a blob whose size or
marker is off is re-hashed before it counts as present (no download needed). That stamp is
only a hint: a blob modified with its mtime restored still carries it. What makes a pulled
file trustworthy is :meth:`BlobCache.place`: it *copies* the blob (a reflink where the
filesystem can, else bytes) into a new file that did not exist before, hashing what lands
there, and a blob whose bytes do not match is removed so that the pull fetches it again.
Pulled files never share an inode with the cache (a write to a pulled file cannot reach the
cache or any other pull), and nothing is ever written through or over an existing path.
Concurrent pulls of one blob serialize on an flock of its partial file. The cache can be
deleted at any time. It is not fsynced: after a power loss, delete it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from dlm_factory.catalog.errors import CatalogError
from dlm_factory.catalog.schema import FileEntry
from dlm_factory.catalog.store import CHUNK, ObjectMissing, Store
from dlm_factory.digest import sha256_file


def _stamp(target: Path | int) -> None:
    """Mark a blob (path or fd) verified: its mtime gets the VERIFIED_NS marker."""
    now = time.time_ns() // 10**9 * 10**9 + VERIFIED_NS
    os.utime(target, ns=(now, now))


VERIFIED_NS = 271_828_182  # st_mtime_ns % 1e9 of a verified blob


class _Download:
    """A ``Store.transfer`` sink: one blob downloaded into its locked partial file, hashed as it
    arrives, renamed into ``blobs/`` only when its size and sha256 match."""

    def __init__(self, cache: BlobCache, key: str, entry: FileEntry, where: str,
                 on_bytes: Callable[[int], None] | None):
        self.cache, self.key, self.entry, self.where, self.on_bytes = cache, key, entry, where, on_bytes
        self.partial = cache.root / "partial" / f"{entry.sha256}.part"
        self.file = None
        self.downloaded = 0

    def begin(self, fresh: bool) -> int | None:
        if self.file is None:
            self.file = open(self.partial, "a+b")  # noqa: SIM115 - closed in close()
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)  # another puller of this blob goes first
            if self.cache.has(self.entry):
                self.partial.unlink(missing_ok=True)
                return None
        self.offset = self.file.seek(0, os.SEEK_END)
        if fresh or self.offset > self.entry.size:
            self.file.truncate(0)
            self.offset = 0
        self.hash, self.size = hashlib.sha256(), self.offset
        self.file.seek(0)
        left = self.offset
        while left and (data := self.file.read(min(CHUNK, left))):  # re-hash the resumed prefix
            self.hash.update(data)
            left -= len(data)
        if self.offset and self.offset == self.entry.size:  # complete already: no request needed
            if self._ok():
                self._commit()
                return None
            return self.begin(True)
        return self.offset

    def write(self, data: bytes) -> None:
        self.file.write(data)  # "a+b": always appends
        self.hash.update(data)
        self.size += len(data)
        self.downloaded += len(data)
        if self.on_bytes:
            self.on_bytes(len(data))

    def end(self) -> bool:
        """Commit a matching blob; True asks for one fresh download when a resumed one failed."""
        if self._ok():
            self._commit()
            return False
        if self.offset > 0:  # our resumed prefix may be what is wrong
            return True
        self.file.truncate(0)
        got = f"{self.size} bytes" if self.size != self.entry.size else f"sha256 {self.hash.hexdigest()[:12]}…"
        raise CatalogError(f"{self.where}: checksum mismatch (manifest: {self.entry.size} bytes, "
                           f"sha256 {self.entry.sha256[:12]}…; store: {got})")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def _ok(self) -> bool:
        return self.size == self.entry.size and self.hash.hexdigest() == self.entry.sha256

    def _commit(self) -> None:
        self.file.flush()
        blob = self.cache.blob(self.entry.sha256)
        blob.parent.mkdir(parents=True, exist_ok=True)
        os.fchmod(self.file.fileno(), 0o444)
        _stamp(self.file.fileno())
        os.replace(self.partial, blob)


class BlobCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def blob(self, sha: str) -> Path:
        return self.root / "blobs" / sha[:2] / sha

    def has(self, entry: FileEntry) -> bool:
        """True if a verified blob for ``entry`` is present (re-hashed if it was touched)."""
        path = self.blob(entry.sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        if st.st_size == entry.size and st.st_mtime_ns % 10**9 == VERIFIED_NS:
            return True
        if st.st_size == entry.size and sha256_file(path)[1] == entry.sha256:
            _stamp(path)
            return True
        path.unlink(missing_ok=True)
        return False

    def fetch_many(self, store: Store, jobs: list[tuple[str, FileEntry, str]], workers: int,
                   on_bytes: Callable[[int], None] | None = None) -> int:
        """Make every ``(key, entry, where)`` a verified blob, downloading what is missing.

        Partial files are resumed where they stopped (a resumed file that fails its checksum is
        downloaded once more from scratch). Returns the bytes downloaded; raises CatalogError
        naming ``where`` for a file that is missing or does not match.
        """
        (self.root / "partial").mkdir(parents=True, exist_ok=True)
        sinks = [_Download(self, key, entry, where, on_bytes) for key, entry, where in jobs]
        errors = store.transfer([(s.key, s) for s in sinks], workers)
        for sink, err in zip(sinks, errors, strict=True):
            if isinstance(err, ObjectMissing):
                raise CatalogError(f"{sink.where}: missing from the store")
            if err is not None:
                raise err
        return sum(s.downloaded for s in sinks)

    def place(self, entry: FileEntry, dest: Path) -> bool:
        """Copy the blob for ``entry`` into the new file ``dest`` (read-only), checking its sha256.

        ``dest`` must not exist: it is created with O_EXCL|O_NOFOLLOW, so nothing is ever
        written through a link or over another file (a collision raises CatalogError). The copy
        is a reflink (FICLONE) where the filesystem supports it, else a byte copy; either way
        the bytes that landed in ``dest`` are hashed. False (``dest`` and the blob removed, so
        the caller can fetch it again) when they do not match ``entry``.
        """
        try:
            src = os.open(self.blob(entry.sha256), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, OSError):
            return False
        try:
            try:
                fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                raise CatalogError(f"{dest}: already exists; refusing to write over it") from None
            try:
                h, size = _clone_or_copy(src, fd)
                os.fchmod(fd, 0o444)
            finally:
                os.close(fd)
        finally:
            os.close(src)
        if size == entry.size and h == entry.sha256:
            return True
        dest.unlink(missing_ok=True)
        self.blob(entry.sha256).unlink(missing_ok=True)
        return False

    def read(self, entry: FileEntry) -> bytes | None:
        """The blob's bytes if they match ``entry`` (a mismatching blob is removed), else None."""
        try:
            data = self.blob(entry.sha256).read_bytes()
        except FileNotFoundError:
            return None
        if len(data) == entry.size and hashlib.sha256(data).hexdigest() == entry.sha256:
            return data
        self.blob(entry.sha256).unlink(missing_ok=True)
        return None


_FICLONE = 0x40049409  # linux/fs.h: share the source's extents (btrfs, XFS, bcachefs)


def _clone_or_copy(src: int, dst: int) -> tuple[str, int]:
    """Reflink ``src`` into ``dst`` where possible, else copy; return (sha256, size) of ``dst``."""
    h, size = hashlib.sha256(), 0
    try:
        fcntl.ioctl(dst, _FICLONE, src)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                           errno.EBADF, errno.EPERM):
            raise
        while data := os.read(src, CHUNK):  # hash the bytes we write: they are what dest holds
            h.update(data)
            size += len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view):]
        return h.hexdigest(), size
    while data := os.pread(dst, CHUNK, size):  # a clone: hash what dest now holds
        h.update(data)
        size += len(data)
    return h.hexdigest(), size
