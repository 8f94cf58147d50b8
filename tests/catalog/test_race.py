"""Races between processes: exclusive create is atomic, racing publishers never overwrite."""

from __future__ import annotations

import json
from collections import Counter

from dlm_factory.catalog import Catalog
from tests.catalog.helpers import make_model
from tests.catalog.worker import Worker

N_PROCS = 4


def _race(args_list: list[list[str]], go) -> list[dict]:
    """Start the workers, wait until every one is ready, release them at once (by creating
    the file ``go``), return their results."""
    workers = [Worker(args, go=str(go)) for args in args_list]
    for w in workers:
        w.wait_ready()
    go.touch()
    results = [w.result() for w in workers]
    assert all(w.exitcode == 0 for w in workers), [w.exitcode for w in workers]
    return results


def test_exclusive_create_is_atomic_across_processes(root, tmp_path):
    """The primitive under MANIFEST.json: N processes create the same keys; one winner each."""
    cat = Catalog(root)
    n = 40
    results = _race([["create", root, "race", str(n), f"w{i}"] for i in range(N_PROCS)],
                                  tmp_path / "go")
    winners = Counter(k for r in results for k in r["won"])
    assert sorted(winners) == list(range(n)) and set(winners.values()) == {1}, winners
    for i, r in enumerate(results):
        for k in r["won"]:
            assert cat.store.read(f"race/{k}") == f"w{i}".encode()


def test_racing_publishers_of_different_content(root, tmp_path):
    cat = Catalog(root, cache_dir=tmp_path / "cache")
    srcs = [make_model(tmp_path / f"src{i}", seed=i, weights=100_000, shards=2) for i in range(N_PROCS)]
    results = _race([["publish", root, str(s), "shared"] for s in srcs], tmp_path / "go")
    versions = [r["version"] for r in results]
    assert len(set(versions)) == N_PROCS and all(r["created"] for r in results)
    listed = {r.version for r in cat.list(name="shared", all_versions=True)}
    assert listed == set(versions)
    for v in versions:
        cat.verify(f"shared:{v}")
    latest = cat.resolve("shared").version
    assert latest in versions
    pulled = cat.pull("shared", tmp_path / "out")
    seed = json.loads((pulled.path / "config.json").read_text())["seed"]
    assert versions[seed] == latest  # latest is one complete publish, files and all


def test_racing_publishers_of_the_same_content(root, tmp_path):
    cat = Catalog(root, cache_dir=tmp_path / "cache")
    src = make_model(tmp_path / "src", seed=5, weights=100_000, shards=2)
    results = _race([["publish", root, str(src), "same"] for _ in range(N_PROCS)], tmp_path / "go")
    assert len({r["version"] for r in results}) == 1
    assert sum(r["created"] for r in results) == 1  # exactly one MANIFEST.json writer won
    (row,) = cat.list(name="same", all_versions=True)
    assert row.latest
    flow_runs = cat.resolve("same").lineage.flow_run_id
    assert flow_runs.startswith("pid-")
    cat.verify("same")
