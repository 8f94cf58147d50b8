"""`make server` / `make stop`: a real Prefect server, worker and the local deployments on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_server_start_deploys_and_stop_ends_exactly_what_it_started(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["FACTORY_HOME"] = str(tmp_path / "home")
    factory = str(Path(sys.executable).parent / "factory")
    port = "4397"
    start = subprocess.run([factory, "server", "start", "--port", port], env=env, capture_output=True, text=True,
                           timeout=600)
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        assert f"http://127.0.0.1:{port}" in start.stdout
        pids = json.loads((tmp_path / "home" / "server" / "pids.json").read_text())["processes"]
        assert [p["name"] for p in pids] == ["server", "worker"]
        api = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        listed = subprocess.run([str(Path(sys.executable).parent / "prefect"), "deployment", "ls"], env=api,
                                capture_output=True, text=True, timeout=120)
        assert "specialize/local" in listed.stdout and "factory/local" in listed.stdout and "retrain/local" in listed.stdout
        again = subprocess.run([factory, "server", "start", "--port", port], env=env, capture_output=True, text=True,
                               timeout=120)
        assert again.returncode == 2 and "is running" in again.stderr
    finally:
        stop = subprocess.run([factory, "server", "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert "worker, server" in stop.stdout
    assert not [p for p in pids if _running(p["pid"])]


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie's parent, here init, may reap it late)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False
