"""The publish flow on a temporary Prefect server (``prefect_harness`` from tests/flows/conftest.py):
the flow run id lands in the manifest lineage."""

from __future__ import annotations

from tests.catalog.helpers import make_model


def test_publish_flow_records_flow_run_id(prefect_harness, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    from dlm_factory.catalog import Catalog
    from dlm_factory.flows.publish import publish_flow

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FACTORY_GIT_SHA", "a" * 40)
    monkeypatch.setenv("FACTORY_IMAGE", "factory-catalog:test")
    root = f"file://{tmp_path / 'store'}"
    src = make_model(tmp_path / "m")
    state = publish_flow(str(src), "dlm-base", root=root, lineage={"data_digests": {"email": "sha256:00"}},
                         return_state=True)
    assert state.is_completed(), state
    out = state.result()
    run_id = str(state.state_details.flow_run_id)

    m = Catalog(root).resolve("dlm-base")
    assert out["version"] == m.version and out["created"]
    assert m.lineage.flow_run_id == run_id
    assert (m.lineage.git_sha, m.lineage.image) == ("a" * 40, "factory-catalog:test")
    assert m.lineage.data_digests == {"email": "sha256:00"}

    import asyncio

    async def artifact():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    arts = {a.key: a for a in asyncio.run(artifact())}
    assert "catalog-dlm-base" in arts and f"dlm-base:{m.version}" in arts["catalog-dlm-base"].data

    again = publish_flow(str(src), "dlm-base", root=root)
    assert again["version"] == m.version and not again["created"]  # re-runs are no-ops


def test_publish_flow_refuses_bad_name_without_retrying(prefect_harness, tmp_path, monkeypatch):
    from dlm_factory.flows.publish import publish_flow

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    state = publish_flow(str(make_model(tmp_path / "m")), "Bad/Name", root=f"file://{tmp_path / 's'}",
                         return_state=True)
    assert state.is_failed()
    assert "invalid name" in str(state.message) or "invalid name" in repr(state.result(raise_on_failure=False))
