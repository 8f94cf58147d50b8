"""One catalog root on one fsspec filesystem: the only place that talks to storage.

Keys are POSIX paths relative to the root (``models/m/0123456789ab/config.json``). The
primitives the publish and pull protocols rest on:

- ``put_file`` / ``write``: the object appears whole or not at all (S3: one PUT or one
  completed multipart upload; file://: a temp file under ``.staging/`` renamed into place).
- ``create``: exclusive create, False when the key exists (S3: ``If-None-Match: *``;
  file://: ``os.link`` of a complete temp file, which fails with EEXIST).
- ``transfer``: many objects, each read from an offset (a ranged GET for resumes) into a
  sink that hashes and writes it, concurrently.

Root URLs: ``file:///abs/dir`` or a plain path, and ``s3://bucket/prefix``. S3 endpoint,
region and credentials come from the usual AWS environment/config (``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``AWS_PROFILE``, ...) or from the URL query: ``?endpoint_url=...&region=...
&profile=...``. Credentials are never accepted in the URL, never logged.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit

from dlm_factory.catalog.errors import CatalogError

CHUNK = 4 << 20  # read/write granularity
PART_SIZE = 16 << 20  # S3 multipart part size (files >= 2 parts go multipart)
STAGING = ".staging"  # file://: temp files, renamed into place; never read by readers
_URL_OPTIONS = {"endpoint_url": "endpoint_url", "endpoint": "endpoint_url", "region": "region",
                "profile": "profile"}


class Sink(Protocol):
    """Where ``Store.transfer`` puts one object's bytes (see there)."""

    def begin(self, fresh: bool) -> int | None: ...
    def write(self, data: bytes) -> None: ...
    def end(self) -> bool: ...
    def close(self) -> None: ...


class ObjectMissing(FileNotFoundError):
    """The store has no object at this key (as opposed to a local file being missing)."""


class StorageError(CatalogError):
    """The store failed (unreachable, denied, missing bucket): possibly transient, retryable."""


def parse_root(url: str) -> tuple[str, str, dict[str, str]]:
    """``url`` -> (protocol, base path, options). Raises CatalogError for unsupported URLs."""
    if not isinstance(url, str) or not url.strip() or "\x00" in url:
        raise CatalogError(f"invalid catalog root {url!r}")
    if "://" not in url:
        return "file", str(Path(url).expanduser().resolve()), {}
    parts = urlsplit(url)
    protocol = parts.scheme.lower()
    if parts.username or parts.password:
        raise CatalogError("credentials in the catalog root URL are not supported; "
                           "use the AWS environment or config files")
    if protocol == "file":
        if parts.query or parts.netloc not in ("", "localhost"):
            raise CatalogError(f"invalid file:// root {url!r}: use file:///absolute/path")
        return "file", str(Path(parts.path or "/").resolve()), {}
    if protocol in ("s3", "s3a"):
        if not parts.netloc:
            raise CatalogError(f"invalid S3 root {url!r}: expected s3://bucket[/prefix]")
        options = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in _URL_OPTIONS:
                raise CatalogError(f"unsupported option {key!r} in catalog root URL "
                                   f"(known: {', '.join(sorted(_URL_OPTIONS))})")
            options[_URL_OPTIONS[key]] = value
        base = (parts.netloc + parts.path).rstrip("/")
        return "s3", base, options
    raise CatalogError(f"unsupported catalog root {url!r}: use file:// or s3://")


class Store:
    """Storage for one catalog root. Nothing touches the filesystem until first used."""

    def __init__(self, url: str, fs=None, *, part_size: int = PART_SIZE):
        self.protocol, self.base, self.options = parse_root(url)
        self.url = (f"file://{self.base}" if self.protocol == "file"
                    else f"{self.protocol}://{self.base}")
        self.local = self.protocol == "file"
        self.part_size = part_size
        self._fs = fs
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    @property
    def fs(self):
        if self._fs is None:
            if self.local:
                from fsspec.implementations.local import LocalFileSystem

                self._fs = LocalFileSystem()
            else:
                import s3fs

                opts = dict(self.options)
                kw: dict = {"use_listings_cache": False}
                if "endpoint_url" in opts:
                    kw["endpoint_url"] = opts["endpoint_url"]
                if "region" in opts:
                    kw["client_kwargs"] = {"region_name": opts["region"]}
                if "profile" in opts:
                    kw["profile"] = opts["profile"]
                self._fs = s3fs.S3FileSystem(**kw)
        return self._fs

    def _threads(self, n: int) -> ThreadPoolExecutor:
        """A thread pool kept for the life of the store (starting threads per call is slow)."""
        if self._pool is None or self._pool_size < n:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool, self._pool_size = ThreadPoolExecutor(n, thread_name_prefix="catalog"), n
        return self._pool

    def path(self, key: str) -> str:
        """The fsspec path of ``key``; a key that could escape the root is refused (keys are
        built from checked names, so this is a second line of defence)."""
        parts = key.split("/")
        if key.startswith("/") or ".." in parts or "." in parts or "\x00" in key or "\\" in key:
            raise CatalogError(f"refusing key {key!r}: it escapes the catalog root")
        return f"{self.base}/{key}" if key else self.base

    def show(self, key: str) -> str:
        """A human-readable URL of ``key`` (no credentials)."""
        return f"{self.url}/{key}" if key else self.url

    def key(self, path: str) -> str:
        """Inverse of ``path``."""
        path = self.fs._strip_protocol(path) if not self.local else path
        prefix = self.base.rstrip("/") + "/"
        if not path.startswith(prefix):
            raise CatalogError(f"{path!r} is outside the catalog root")
        return path[len(prefix):]

    # -- reads --------------------------------------------------------------------------------

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        path = self.path(key)
        try:
            if self.local:
                return Path(path).read_bytes()
            return self.fs.cat_file(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        """Bulk read (concurrent on S3); missing keys map to None."""
        if not keys:
            return {}
        if self.local:
            return {k: self.read(k) for k in keys}
        paths = [self.path(k) for k in keys]
        got = self.fs.cat(paths, on_error="return")
        out = {}
        for k in keys:
            value = got.get(self.path(k))
            out[k] = value if isinstance(value, bytes) else None
            if isinstance(value, Exception) and not isinstance(value, FileNotFoundError):
                raise value
        return out

    def stream(self, key: str, offset: int = 0, chunk: int = CHUNK) -> Iterator[bytes]:
        """Yield the object's bytes from ``offset`` on, in chunks of up to ``chunk`` bytes."""
        if self.local:
            with open(self.path(key), "rb") as f:
                f.seek(offset)
                while data := f.read(chunk):
                    yield data
        else:  # S3 transfers use _s3_transfer; this serves other fsspec backends
            with self.fs.open(self.path(key), "rb", block_size=chunk) as f:
                f.seek(offset)
                while data := f.read(chunk):
                    yield data

    def transfer(self, items: list[tuple[str, Sink]], workers: int) -> list[BaseException | None]:
        """Stream each key into its sink, up to ``workers`` objects at a time.

        Per item: ``offset = sink.begin(False)`` (None: nothing to fetch), the object's bytes from
        ``offset`` in order to ``sink.write``, then ``sink.end()``; when that returns True the
        object is fetched once more from ``sink.begin(True)``. ``sink.close()`` always runs.
        Returns one exception (or None) per item. On S3: one coroutine per object on fsspec's
        loop, like ``s3fs.get``; big chunks are hashed/written in a thread while the next one
        downloads, and the per-file local work overlaps the other files' requests.
        """
        if not items:
            return []
        if self.protocol == "s3":
            from fsspec.asyn import sync

            jobs = [(self.path(k), s) for k, s in items]
            return sync(self.fs.loop, _s3_transfer, self.fs, jobs, workers, self._threads(workers))

        def one(item) -> BaseException | None:
            key, sink = item
            try:
                fresh = False
                while (offset := sink.begin(fresh)) is not None:
                    try:
                        chunks = self.stream(key, offset)
                        first = next(chunks, b"")
                    except FileNotFoundError as e:
                        raise ObjectMissing(key) from e
                    for data in itertools.chain((first,), chunks):
                        sink.write(data)
                    if not sink.end() or fresh:
                        break
                    fresh = True
            except Exception as e:  # noqa: BLE001 - reported per item
                return e
            finally:
                sink.close()
            return None

        return list(self._threads(workers).map(one, items))

    def find(self, prefix: str) -> dict[str, tuple[int, float]]:
        """Every object under ``prefix`` (recursive): key -> (size, mtime as epoch seconds)."""
        root = self.path(prefix).rstrip("/")
        if self.local:
            out = {}
            for dirpath, _dirs, files in os.walk(root):
                for fname in files:
                    full = os.path.join(dirpath, fname)
                    try:
                        st = os.stat(full)
                    except FileNotFoundError:
                        continue
                    out[self.key(full)] = (st.st_size, st.st_mtime)
            return out
        try:
            infos = self.fs.find(root, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for path, info in infos.items():
            if info.get("type") == "directory":
                continue
            mtime = info.get("LastModified") or info.get("mtime") or 0
            if isinstance(mtime, datetime):
                mtime = mtime.timestamp()
            out[self.key(path)] = (int(info.get("size") or 0), float(mtime))
        return out

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (one flat, paginated listing on S3)."""
        if self.local:
            return list(self.find(prefix))
        try:
            root = self.path(prefix).rstrip("/")
            return [self.key(p) for p in self.fs.find(root)]
        except FileNotFoundError:
            return []

    # -- writes -------------------------------------------------------------------------------

    def put_files(self, items: list[tuple[Path, str]], workers: int,
                  on_bytes: Callable[[int], None] | None = None,
                  after_each: Callable[[], None] | None = None) -> None:
        """Upload each (local file, key), overwriting; readers see the old or the whole new
        object. S3: one coroutine per file (multipart, parts in parallel, when a file has two
        parts or more); file://: a copy under .staging/ renamed into place."""
        if not items:
            return
        if self.protocol == "s3":
            from fsspec.asyn import sync

            sync(self.fs.loop, _s3_put, self.fs, [(str(lp), self.path(k)) for lp, k in items], workers,
                 self.part_size, _callback(on_bytes), after_each)
            return

        def one(item: tuple[Path, str]) -> None:
            local, key = item
            if self.local:
                tmp = self._staged_copy(local, on_bytes)
                os.makedirs(os.path.dirname(self.path(key)), exist_ok=True)
                os.replace(tmp, self.path(key))
            else:  # pragma: no cover - other fsspec backends
                self.fs.put_file(str(local), self.path(key), callback=_callback(on_bytes))
            if after_each:
                after_each()

        list(self._threads(workers).map(one, items))

    def write(self, key: str, data: bytes) -> None:
        """Atomically replace ``key`` with ``data``."""
        if self.local:
            tmp = self._staged_bytes(data)
            os.makedirs(os.path.dirname(self.path(key)), exist_ok=True)
            os.replace(tmp, self.path(key))
            return
        path = self.path(key)
        self.fs.pipe_file(path, data)

    def create(self, key: str, data: bytes) -> bool:
        """Exclusive create: write ``data`` at ``key`` unless it exists. True if we created it."""
        if self.local:
            tmp = self._staged_bytes(data)
            try:
                os.makedirs(os.path.dirname(self.path(key)), exist_ok=True)
                os.link(tmp, self.path(key))  # atomic; EEXIST when someone else won
                _fsync_dir(os.path.dirname(self.path(key)))
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            path = self.path(key)
            self.fs.pipe_file(path, data, mode="create")  # If-None-Match: *
            return True
        except FileExistsError:
            return False

    def delete(self, keys: list[str]) -> None:
        if not keys:
            return
        if self.local:
            for k in keys:
                try:
                    os.unlink(self.path(k))
                except FileNotFoundError:
                    pass
            self._prune_dirs({os.path.dirname(self.path(k)) for k in keys})
            return
        paths = [self.path(k) for k in keys]
        self.fs.rm(paths)

    def stale_uploads(self, older_than: float, now: float) -> list[tuple[str, str, float]]:
        """S3 multipart uploads under the root started more than ``older_than`` s ago:
        (key, upload id, age). file:// has none (its temp files live under .staging/)."""
        if self.protocol != "s3":
            return []
        bucket, _, prefix = self.base.partition("/")
        out, kw = [], {"Bucket": bucket, "Prefix": prefix + "/" if prefix else ""}
        while True:
            page = self.fs.call_s3("list_multipart_uploads", **kw)
            for up in page.get("Uploads", []):
                age = now - up["Initiated"].timestamp()
                if age >= older_than:
                    out.append((self.key(f"{bucket}/{up['Key']}"), up["UploadId"], age))
            if not page.get("IsTruncated"):
                return out
            kw.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])

    def abort_upload(self, key: str, upload_id: str) -> None:
        bucket, path, _ = self.fs.split_path(self.path(key))
        self.fs.abort_mpu(bucket, path, upload_id)

    # -- file:// helpers ----------------------------------------------------------------------

    def _staging_file(self) -> str:
        staging = os.path.join(self.base, STAGING)
        os.makedirs(staging, exist_ok=True)
        return os.path.join(staging, f"tmp-{os.getpid()}-{uuid.uuid4().hex}")

    def _staged_bytes(self, data: bytes) -> str:
        tmp = self._staging_file()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _staged_copy(self, local: Path, on_bytes: Callable[[int], None] | None) -> str:
        tmp = self._staging_file()
        with open(local, "rb") as src, open(tmp, "wb") as dst:
            while data := src.read(CHUNK):
                dst.write(data)
                if on_bytes:
                    on_bytes(len(data))
            dst.flush()
            os.fsync(dst.fileno())
        return tmp

    def _prune_dirs(self, dirs: set[str]) -> None:
        """Remove directories left empty by a delete, up to (not including) the root."""
        for d in sorted(dirs, key=len, reverse=True):
            while d.startswith(self.base + "/") and d != self.base:
                try:
                    os.rmdir(d)
                except OSError:
                    break
                d = os.path.dirname(d)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _callback(on_bytes: Callable[[int], None] | None):
    """An fsspec callback forwarding byte counts to ``on_bytes``."""
    from fsspec.callbacks import Callback, NoOpCallback

    if on_bytes is None:
        return NoOpCallback()

    class Forward(Callback):
        def relative_update(self, inc=1):
            on_bytes(inc)

        def absolute_update(self, value):
            pass

        def branched(self, path_1, path_2, **kwargs):
            return self

    return Forward()


async def _s3_put(fs, jobs: list[tuple[str, str]], workers: int, part_size: int, callback,
                  after_each: Callable[[], None] | None) -> None:
    gate = asyncio.Semaphore(workers)

    async def one(local: str, path: str) -> None:
        async with gate:
            await fs._put_file(local, path, callback=callback, chunksize=part_size)
            if after_each:
                after_each()

    await asyncio.gather(*(one(lp, p) for lp, p in jobs))


async def _s3_transfer(fs, jobs: list[tuple[str, Sink]], workers: int,
                       pool: ThreadPoolExecutor) -> list[BaseException | None]:
    """One coroutine per object. The event loop only moves bytes: every file-system call of a
    sink (create, lock, write, rename) runs in a thread, so one slow disk call never stalls
    the other downloads; a large object is written in CHUNK pieces while the next arrives."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(workers)

    def write_all(sink: Sink, chunks: list[bytes]) -> None:
        for data in chunks:
            sink.write(data)

    def finish(sink: Sink, chunks: list[bytes]) -> bool:
        write_all(sink, chunks)
        return sink.end()

    async def fetch(path: str, offset: int, sink: Sink) -> bool:
        bucket, key, _ = fs.split_path(path)
        kw = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, **kw)
        except FileNotFoundError as e:
            raise ObjectMissing(path) from e
        body, chunks, size, pending = resp["Body"], [], 0, None
        try:
            while data := await body.read(CHUNK):
                chunks.append(data)
                size += len(data)
                if size >= CHUNK:
                    if pending is not None:
                        await pending
                    pending = loop.run_in_executor(pool, write_all, sink, chunks)
                    chunks, size = [], 0
            if pending is not None:
                await pending
                pending = None
        finally:
            if pending is not None:  # never leave a write running after we report
                await asyncio.gather(pending, return_exceptions=True)
            body.close()
        return await loop.run_in_executor(pool, finish, sink, chunks)

    async def one(path: str, sink: Sink) -> None:
        async with gate:
            try:
                fresh = False
                while (offset := await loop.run_in_executor(pool, sink.begin, fresh)) is not None:
                    if not await fetch(path, offset, sink) or fresh:
                        break
                    fresh = True
            finally:
                sink.close()  # closes an fd: cheaper inline than a thread hop

    results = await asyncio.gather(*(one(*job) for job in jobs), return_exceptions=True)
    return [r if isinstance(r, BaseException) else None for r in results]
