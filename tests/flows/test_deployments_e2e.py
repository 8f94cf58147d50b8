"""The UI path end to end: `factory server start` (a real Prefect server and worker on 127.0.0.1, every
local deployment of prefect.yaml deployed), a deployment triggered with parameters through the API as
the UI's "Run" form does, the worker runs it, and the catalog holds the result; the nightly `retrain`
schedule is registered. `factory server stop` ends what was started."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

PORT = "4398"


@pytest.mark.slow
def test_a_deployment_triggered_through_the_api_runs_on_the_worker_and_publishes(tmp_path, tiny_dlm):
    from prefect.client.orchestration import PrefectClient

    from dlm_factory.catalog.core import Catalog

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FACTORY_"))}
    env["FACTORY_HOME"] = str(tmp_path / "home")
    factory = str(Path(sys.executable).parent / "factory")
    start = subprocess.run([factory, "server", "start", "--port", PORT], env=env, capture_output=True, text=True,
                           timeout=600)
    catalog = f"file://{tmp_path / 'catalog'}"
    try:
        assert start.returncode == 0, start.stderr[-3000:]

        async def drive():
            async with PrefectClient(f"http://127.0.0.1:{PORT}/api") as client:
                flows = {f.id: f.name for f in await client.read_flows()}
                by_flow = {flows[d.flow_id]: d for d in await client.read_deployments()}  # each is <flow>/local
                schedules = await client.read_deployment_schedules(by_flow["retrain"].id)
                publish = by_flow["publish"]
                # What the UI's Run form sends: the deployment id and the parameters typed in.
                run = await client.create_flow_run_from_deployment(
                    publish.id, parameters={"src": tiny_dlm, "name": "tiny-dlm", "root": catalog})
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    run = await client.read_flow_run(run.id)
                    if run.state.is_final():
                        break
                    await asyncio.sleep(2)
                return sorted(by_flow), schedules, run

        flows, schedules, run = asyncio.run(drive())
    finally:
        stop = subprocess.run([factory, "server", "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert {"factory", "retrain", "convert", "scale", "instruct", "specialize", "validate", "publish"} <= set(flows)
    assert [(s.schedule.cron, s.active) for s in schedules] == [("0 2 * * *", True)]  # retrain, nightly
    assert run.state.is_completed(), (run.state, (tmp_path / "home" / "server" / "worker.log").read_text()[-3000:])
    assert run.name.startswith("publish · tiny-dlm · ")  # flow, model and where it came from, not a random name
    listed = Catalog(catalog, trust=False).list()
    assert [(r.name, r.kind) for r in listed] == [("tiny-dlm", "general")]
    assert "worker, server" in stop.stdout
