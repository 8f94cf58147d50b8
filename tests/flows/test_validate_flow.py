"""The ``validate`` flow: build and gate a user's ensemble; publish it (members pinned) only when the gate passes."""

from __future__ import annotations

import json


def test_validate_flow_publishes_exactly_the_passing_ensembles(tiny_dlm, tmp_path, monkeypatch, prefect_harness):
    from dlm_factory.catalog.core import Catalog
    from dlm_factory.dlm.data.users import user_documents, write_demo_users
    from dlm_factory.dlm.stages.ensemble import EnsembleConfig, gate_passed
    from dlm_factory.flows.validate import validate_flow
    from tests.dlm.conftest import finetune_dlm

    home = tmp_path / "home"
    monkeypatch.setenv("FACTORY_HOME", str(home))
    monkeypatch.setenv("FACTORY_CATALOG", f"file://{tmp_path / 'catalog'}")
    write_demo_users(home, {"json": "json"})
    finetune_dlm(tiny_dlm, user_documents(str(home), "json", "train"), home / "users" / "json" / "specialist")
    cfg = EnsembleConfig(user="json", lambdas=[1.0], seq_len=32, max_windows=6, mc_samples=2)
    out = validate_flow(users=["json", "ghost"], general=tiny_dlm, base=tiny_dlm, config=cfg)
    rows = {r["user"]: r for r in out["users"]}
    assert rows["ghost"]["status"] == "failed" and "ghost" in out["not_published"]  # no such user: reported, no stop
    passed = gate_passed(home / "users" / "json" / "ensemble")
    verdict = json.loads((home / "users" / "json" / "ensemble" / "gate.json").read_text())
    assert rows["json"]["status"] == ("published" if passed else "gate failed"), verdict
    cat = Catalog(f"file://{tmp_path / 'catalog'}", sign_key=False, trust=False)
    listed = [(r.kind, r.user, r.name) for r in cat.list()]
    assert (("ensemble", "json", "assistant") in listed) is passed
