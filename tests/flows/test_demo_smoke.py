"""`make demo`'s entry point on a fresh clone: `factory demo` with the smoke profile in a FACTORY_HOME
that does not exist yet (its parents neither), on Prefect's ephemeral API, as a new user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def test_demo_smoke_profile_in_a_factory_home_that_does_not_exist(tmp_path):
    home = tmp_path / "not" / "yet" / ".factory"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FACTORY_"))}
    env["FACTORY_HOME"] = str(home)
    factory = Path(sys.executable).parent / "factory"
    cmd = [str(factory) if factory.exists() else shutil.which("factory"), "demo", "--profile", "smoke"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    models = home / "models"
    for name, stage in [("stdlib-ar", "bootstrap"), ("stdlib-dlm", "convert"), ("stdlib-dlm-instruct", "instruct"),
                        ("stdlib-dlm-instruct-judge", "instruct")]:
        record = (models / name / "stage.json").read_text()
        assert f'"stage": "{stage}"' in record, name
    assert (home / "prefect").is_dir()  # Prefect's home was created under the new FACTORY_HOME
    assert "instruction-tuned DLM" in proc.stderr + proc.stdout  # the flow's closing comparison was printed
    assert not list(home.rglob(".tmp-*"))  # nothing half-written
