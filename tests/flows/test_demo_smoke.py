"""`make demo`'s entry point on a fresh clone: `factory demo` with the smoke profile in a FACTORY_HOME
that does not exist yet (its parents neither), on Prefect's ephemeral API, as a new user runs it:
the umbrella `factory` flow end to end, down to answers from ensembles pulled back from the catalog."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

USERS = ("json", "email")  # the smoke profile's users


def test_demo_smoke_profile_in_a_factory_home_that_does_not_exist(tmp_path):
    home = tmp_path / "not" / "yet" / ".factory"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FACTORY_"))}
    env["FACTORY_HOME"] = str(home)
    factory = Path(sys.executable).parent / "factory"
    cmd = [str(factory) if factory.exists() else shutil.which("factory"), "demo", "--profile", "smoke"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stderr + proc.stdout
    models = home / "models"
    for name, stage in [("stdlib-ar", "bootstrap"), ("stdlib-dlm", "convert"), ("stdlib-dlm-instruct", "instruct"),
                        ("stdlib-dlm-instruct-judge", "instruct"), ("specialist-dlm", "convert"), ("stdlib-dlm-distilled", "distill")]:
        record = (models / name / "stage.json").read_text()
        assert f'"stage": "{stage}"' in record, name
    assert (home / "scaling" / "stdlib-ar" / "scaling.png").stat().st_size > 0  # the ladder was fitted
    distill_row = next(line for line in out.splitlines() if line.startswith("| distill |"))
    assert "speculative tokens/verification" in distill_row and "stdlib-dlm-distilled" in distill_row
    assert (home / "prefect").is_dir()  # Prefect's home was created under the new FACTORY_HOME
    assert "instruction-tuned DLM" in out  # the instruct flow's closing comparison was printed

    from dlm_factory.catalog.core import Catalog

    cat = Catalog(f"file://{home / 'catalog'}", trust=False)
    ensembles = {r.user: r for r in cat.list(kind="ensemble")}
    assert sorted(ensembles) == sorted(USERS)  # the smoke gate passes every user (plumbing: z=0, margin -1)
    for user in USERS:
        pulled = home / "users" / user / "pulled"
        marker = json.loads((pulled / ".catalog-pull.json").read_text())
        assert marker["digest"] == ensembles[user].digest  # the published version came back, verified
        assert (pulled / "ENSEMBLE.json").is_file() and (pulled / "members").is_dir()
        row = next(line for line in out.splitlines() if line.startswith(f"| {user} |"))
        assert "| ok |" in row and f"import {user}" in row  # summary row: status and the prompt answered
    assert "Finished in state Completed('all 2 users ok')" in out
    assert "factory · smoke · stdlib" in out  # the run's name says flow, profile and base model
    assert not list(home.rglob(".tmp-*")) and not list(home.rglob("*.partial-*"))  # nothing half-written
