"""Crash safety: a publisher SIGKILLed anywhere never leaves a half-visible version.

Each backend gets 16 trials (32 in all): 8 kills at injected checkpoints spread over the
upload, verify, manifest and pointer phases (FACTORY_CATALOG_CRASH_AT=phase:n), and 8 kills
at a random moment of the publish. After every kill: whatever ``list`` shows verifies,
``pull`` either refuses cleanly or returns the complete version, and re-running publish
completes it. Finally gc clears the staging leftovers and keeps every published version.
"""

from __future__ import annotations

import random
import signal
import time

import pytest

from dlm_factory.catalog import Catalog, CatalogError
from tests.catalog.helpers import make_model
from tests.catalog.worker import Worker

# (phase, n): the n-th checkpoint of that phase. The source has 7 payload files + the card, so
# upload:8 is the card; verify:5 is mid-verification.
INJECTED = [("upload", 1), ("upload", 4), ("upload", 8), ("verify", 1), ("verify", 5), ("manifest", 1),
            ("sign", 1), ("pointer", 1), ("done", 1)]
RANDOM_KILLS = 8


def _check_invariants(cat: Catalog, name: str, expected: dict[str, bytes], tmp_path) -> str:
    """Return the phase the crash left visible: 'none', 'unpointed' or 'latest'."""
    listed = cat.list(name=name, all_versions=True)
    assert len(listed) <= 1
    for row in listed:
        cat.verify(f"{name}:{row.version}")  # anything visible is complete
    dest = tmp_path / f"pull-{name}"
    try:
        cat.pull(name, dest)
    except CatalogError as e:
        assert "no published model" in str(e), e
        assert not dest.exists()
        return "unpointed" if listed else "none"
    got = {p.name: p.read_bytes() for p in dest.iterdir()
           if p.name not in ("README.md", "MANIFEST.json", "MANIFEST.json.sig", ".catalog-pull.json")}
    assert got == expected
    return "latest"


def test_sigkill_at_any_point_never_leaves_a_partial_version(root, tmp_path):
    cat = Catalog(root, cache_dir=tmp_path / "cache")
    big = random.Random(7).randbytes(6 << 20)  # a 2-part multipart upload on S3
    src = make_model(tmp_path / "src", seed=3, weights=200_000, shards=2, extra={"model-big.safetensors": big})
    expected = {p.name: p.read_bytes() for p in src.iterdir()}
    assert len(expected) == 7

    # How long does a publish take? (random kills land within that window after "ready")
    t0 = time.monotonic()
    cat.publish(src, "calibrate", progress=False)
    duration = time.monotonic() - t0

    rng = random.Random(1234)
    trials = [f"{p}:{n}" for p, n in INJECTED] + [None] * RANDOM_KILLS
    seen = []
    for i, crash_at in enumerate(trials):
        worker = Worker(["publish", root, str(src), f"m{i}"],
                        env={"FACTORY_CATALOG_CRASH_AT": crash_at} if crash_at else None)
        worker.wait_ready()
        if crash_at is None:
            time.sleep(rng.uniform(0.0, duration))
            worker.kill()
        got = worker.result()
        if crash_at:
            assert worker.exitcode == -signal.SIGKILL, (crash_at, got)
        else:  # a random kill can land after the publish finished
            assert worker.exitcode in (-signal.SIGKILL, 0), got
        seen.append((crash_at, _check_invariants(cat, f"m{i}", expected, tmp_path)))
    # Re-running publish completes it, whatever state the crash left.
    for i in range(len(trials)):
        name = f"m{i}"
        res = cat.publish(src, name, progress=False)
        assert cat.resolve(name).version == res.version
        assert _check_invariants(cat, name, expected, tmp_path / f"after{i}") == "latest"

    states = dict(seen)
    assert states["upload:1"] == states["verify:5"] == states["manifest:1"] == "none"
    assert states["sign:1"] == states["pointer:1"] == "unpointed" and states["done:1"] == "latest"
    # A kill between the manifest and its signature: re-running publish signed it.
    signed = cat.resolve(f"m{INJECTED.index(('sign', 1))}")
    assert cat.store.read(f"models/{signed.name}/{signed.version}/MANIFEST.json.sig") is not None

    # Staging leftovers are collectable; no published version is touched.
    report = cat.gc(apply=True, older_than_s=0)
    assert all(item.what != "version" for item in report.items), report.items
    assert cat.gc(older_than_s=0).items == []
    rows = cat.list()
    assert len(rows) == len(trials) + 1
    stored = set(cat.store.keys("models/"))
    for row in rows:  # gc removed no file of a published version
        assert {f"models/{row.name}/{row.version}/{f.path}" for f in cat.resolve(row.ref).files} <= stored


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_many_random_kills(root, tmp_path, seed):
    """More random-time kills (slow): the same invariants."""
    cat = Catalog(root, cache_dir=tmp_path / "cache")
    src = make_model(tmp_path / "src", seed=seed, weights=500_000, shards=4)
    expected = {p.name: p.read_bytes() for p in src.iterdir()}
    rng = random.Random(seed)
    for i in range(10):
        worker = Worker(["publish", root, str(src), f"r{i}"])
        worker.wait_ready()
        time.sleep(rng.uniform(0.0, 0.5))
        worker.kill()
        worker.result()
        _check_invariants(cat, f"r{i}", expected, tmp_path)
        cat.publish(src, f"r{i}", progress=False)
        assert _check_invariants(cat, f"r{i}", expected, tmp_path / f"a{i}") == "latest"
