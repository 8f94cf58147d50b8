"""The umbrella ``factory`` flow and ``retrain``: reuse by digest on a re-run, a killed run resumed,
changed users retrained and republished while unchanged ones are skipped (smoke profile)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

TRAINED = ["models/stdlib-ar", "models/stdlib-dlm", "models/stdlib-dlm-instruct", "models/stdlib-dlm-instruct-judge",
           "models/specialist-ar", "models/specialist-dlm", "users/json/specialist", "users/email/specialist",
           "users/json/ensemble", "users/email/ensemble"]


def _records(home: Path) -> dict[str, float]:
    """Each finished output's record, by its mtime: a stage that ran again rewrites it."""
    found = {p: (home / p / "stage.json").stat().st_mtime_ns for p in TRAINED}
    for rung in (home / "scaling").rglob("rungs/*/*/stage.json"):
        found[str(rung.parent.relative_to(home))] = rung.stat().st_mtime_ns
    return found


def _task_runs_since(start) -> list:
    """Every task run (subflows' included) that started after ``start`` (a datetime)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(
                task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=start)), limit=200)

    return asyncio.run(read())


def _settled_task_runs_since(start, timeout: float = 60.0) -> list:
    """``_task_runs_since`` once every run has a final state, or after ``timeout`` seconds.

    Prefect 3 records task-run states from the client's events in the background (the
    server's task_run_recorder), retrying a flush that SQLite refuses ("database is
    locked" under load), so a finished task can still read as Running for a moment."""
    deadline = time.monotonic() + timeout
    while True:
        runs = _task_runs_since(start)
        if all(t.state.is_final() for t in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def _artifacts() -> dict[str, list]:
    """Key -> the artifacts (oldest first) under that key."""
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(limit=200)

    found: dict[str, list] = {}
    for a in sorted(asyncio.run(read()), key=lambda a: a.created):
        if a.key:
            found.setdefault(a.key, []).append(a)
    return found


def _check_artifacts(first: dict) -> None:
    """What the UI shows after a run: summary and tables (figures first), progress, images, catalog links."""
    arts = _artifacts()
    summary = arts["factory-summary"][-1]
    assert summary.type == "markdown"
    users = summary.data.split("**Users**")[1].strip().splitlines()
    assert users[0].startswith("| user | status | specialist | elbo_before | elbo_after |")  # figures first
    assert users[0].rstrip(" |").endswith("digest | pulled")  # digests and paths last
    for r in first["users"]:
        assert f"| {r['user']} | ok |" in summary.data
        link = arts[f"catalog-{r['user']}"][-1]
        # Prefect 3 stores a link artifact as the markdown link [text](url)
        assert re.fullmatch(rf"\[{r['user']}/assistant:[0-9a-f]+\]\(file://.+\)", link.data), link.data
    for stage in ("bootstrap-stdlib-ar", "convert-stdlib-dlm", "instruct-stdlib-dlm-instruct"):
        progress = arts[f"progress-{stage}"][-1]
        assert progress.type == "progress" and float(progress.data) == 100.0, stage
        image = arts[f"loss-{stage}"][-1]
        assert image.type == "image" and image.data.startswith("data:image/png;base64,"), stage
    assert arts["scale-plot"][-1].data.startswith("data:image/png;base64,")
    for r in first["users"]:  # each gate report, its checks table first
        gate = arts[f"gate-{r['user']}"][-1].data
        assert gate.startswith("# Validation gate: PASSED") and "| check | result | value | threshold |" in gate
    table = arts["instruct-stdlib-dlm-instruct"][-1].data
    assert table.splitlines()[2].startswith("| model | cond_bits_per_token |") and "**Samples**" in table


@pytest.mark.slow
def test_rerun_reuses_every_stage_then_retrain_redoes_only_the_changed_user(tmp_path, monkeypatch, prefect_harness):
    from dlm_factory.catalog.core import Catalog
    from dlm_factory.flows.factory import factory_flow
    from dlm_factory.flows.retrain import retrain_flow

    home = tmp_path / "home"
    monkeypatch.setenv("FACTORY_HOME", str(home))
    monkeypatch.setenv("FACTORY_CATALOG", f"file://{tmp_path / 'catalog'}")
    t0 = time.perf_counter()
    first = factory_flow(profile="smoke")
    t1 = time.perf_counter()
    assert first["failed"] == [], first["users"]
    _check_artifacts(first)
    before = _records(home)
    start = datetime.now(UTC)
    t2 = time.perf_counter()
    again = factory_flow(profile="smoke")
    t3 = time.perf_counter()
    ratio = (t1 - t0) / (t3 - t2)
    print(json.dumps({"first_run_s": round(t1 - t0, 1), "rerun_s": round(t3 - t2, 1), "ratio": round(ratio, 2),
                      "load": os.getloadavg()}))
    assert again["failed"] == [] and [r["answer"] for r in again["users"]] == [r["answer"] for r in first["users"]]
    assert _records(home) == before  # no stage wrote its output again
    runs = _settled_task_runs_since(start)
    assert len(runs) > 20  # every stage's tasks ran (and were reused), subflows' included
    assert all(t.state.is_completed() for t in runs), {t.name: t.state.name for t in runs if not t.state.is_completed()}
    cached = {t.name for t in runs if t.state.name == "Cached"}
    assert {"evaluate", "instruct-eval", "answer"} <= {n.split(" ")[0] for n in cached}, cached
    assert all(r["status"] == "unchanged" for r in again["specialize"]["users"])

    # retrain: nothing changed -> everyone skipped; then one user's data changes -> only they are redone
    skipped = retrain_flow(profile="smoke")
    assert skipped["changed"] == [] and sorted(skipped["unchanged"]) == ["email", "json"]
    cat = Catalog(f"file://{tmp_path / 'catalog'}", trust=False)
    old = {r.user: r.version for r in cat.list(kind="ensemble")}
    data = next((home / "users" / "json" / "data").rglob("*.py"))
    data.write_text(data.read_text() + "\n\ndef added_by_the_test():\n    return 'retrain me'\n")
    redone = retrain_flow(profile="smoke")
    assert redone["changed"] == ["json"] and redone["unchanged"] == ["email"] and redone["failed"] == []
    new = {r.user: r.version for r in cat.list(kind="ensemble")}
    assert new["email"] == old["email"] and new["json"] != old["json"]  # a new version for the changed user only
    assert cat.resolve("assistant", user="json").lineage.data_digests["json"] == \
        next(r for r in redone["users"] if r["user"] == "json")["data_digest"]


@pytest.mark.slow
def test_a_run_killed_mid_flow_is_resumed_without_redoing_finished_stages(tmp_path):
    """The process running the flow (as a worker's flow-run process would be) is killed with SIGKILL
    after instruction tuning finished; the re-run completes and leaves those outputs untouched."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FACTORY_"))}
    env["FACTORY_HOME"] = str(home)
    cmd = [str(Path(sys.executable).parent / "factory"), "demo", "--profile", "smoke"]
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    marker = home / "models" / "stdlib-dlm-instruct-judge" / "stage.json"
    deadline = time.monotonic() + 600
    while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the flow process and the API server it started
    proc.wait()
    log.close()
    done = {p: (home / p / "stage.json").stat().st_mtime_ns for p in TRAINED[:4]}
    assert not (home / "users" / "json" / "ensemble" / "stage.json").exists()  # killed before the users' stages
    rerun = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert {p: (home / p / "stage.json").stat().st_mtime_ns for p in TRAINED[:4]} == done
    out = rerun.stdout + rerun.stderr
    for stage in ("bootstrap", "convert", "instruct"):
        assert f"reusing {stage} at" in out, stage
    assert "Finished in state Completed('all 2 users ok')" in out
