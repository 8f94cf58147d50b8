"""Publisher processes for crash and race tests.

Each worker is a real separate process (killable with SIGKILL), forked from a multiprocessing
forkserver that has already imported catalog and s3fs: a worker is ready in milliseconds
instead of the ~1.5 s a fresh interpreter needs on 2 cores. Modes:

- ``["publish", ROOT, SRC, NAME]``: publish, send {"version", "created"}.
- ``["create", ROOT, PREFIX, N, ID]``: exclusive-create PREFIX/0..N-1 with ID, send {"won": [...]}.

A worker sends "ready" once its store client exists, then waits for ``go`` (when given).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from multiprocessing.connection import Connection

import model_signing  # noqa: F401 - preloaded into the forkserver (publish signs)
import s3fs  # noqa: F401 - preloaded into the forkserver

from dlm_factory.catalog import Catalog

PART_SIZE = 5 << 20  # the S3 minimum part size: small multipart uploads in tests
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["tests.catalog.worker"])
    return _CTX


def _child(conn: Connection, args: list[str], env: dict[str, str], go: str | None) -> None:
    os.environ.clear()
    os.environ.update(env)  # the forkserver's environment is from when it started
    mode, root = args[0], args[1]
    cat = Catalog(root, part_size=PART_SIZE, workers=4)
    if not cat.store.local:
        cat.store.fs  # noqa: B018 - build the S3 client before "ready"
    conn.send("ready")
    while go and not os.path.exists(go):
        time.sleep(0.0005)
    if mode == "publish":
        res = cat.publish(args[2], args[3], lineage={"flow_run_id": f"pid-{os.getpid()}"}, progress=False)
        conn.send({"version": res.version, "created": res.created})
    elif mode == "create":
        prefix, n, ident = args[2], int(args[3]), args[4]
        conn.send({"won": [i for i in range(n) if cat.store.create(f"{prefix}/{i}", ident.encode())]})
    else:
        raise ValueError(mode)


class Worker:
    """One publisher process: ``wait_ready()``, then ``result()`` or ``kill()``."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, go: str | None = None):
        ctx = _context()
        self.conn, child = ctx.Pipe(duplex=False)
        full_env = {k: v for k, v in os.environ.items() if k != "FACTORY_CATALOG_CRASH_AT"} | (env or {})
        self.proc = ctx.Process(target=_child, args=(child, args, full_env, go), daemon=True)
        self.proc.start()
        child.close()

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.conn.poll(timeout), f"worker {self.proc.pid} never became ready"
        assert self.conn.recv() == "ready"

    def kill(self) -> None:
        self.proc.kill()

    def result(self, timeout: float = 120) -> dict | None:
        """The worker's message, or None when it died without one; always reaps it."""
        got = None
        if self.conn.poll(timeout):
            try:
                got = self.conn.recv()
            except EOFError:  # died (SIGKILL) before sending
                pass
        self.proc.join(timeout)
        return got

    @property
    def exitcode(self) -> int | None:
        return self.proc.exitcode
