"""The ``specialize`` flow: users in parallel, a failing user reported without failing the others,
and a re-run with unchanged data trains nothing."""

from __future__ import annotations

from dlm_factory.dlm.data.users import write_demo_users


def test_specialize_flow_isolates_failures_and_skips_unchanged_users(tiny_dlm, tmp_path, monkeypatch, prefect_harness):
    from dlm_factory.dlm.stages.specialize import SpecializeConfig
    from dlm_factory.dlm.train.config import TrainConfig
    from dlm_factory.flows.specialize import specialize_flow

    home = tmp_path / "home"
    monkeypatch.setenv("FACTORY_HOME", str(home))
    write_demo_users(home, {"mail": "email"})
    (home / "users" / "blank" / "data").mkdir(parents=True)
    (home / "users" / "blank" / "data" / "empty.txt").write_text("  \n")
    (home / "users" / "Bad..Id").mkdir()  # not a valid id: never listed, never touched
    cfg = SpecializeConfig(seq_len=32, train=TrainConfig(steps=3, batch_size=4, warmup_steps=1), eval_windows=2,
                           mc_samples=2)
    out = specialize_flow(model=tiny_dlm, general=tiny_dlm, config=cfg)
    rows = {r["user"]: r for r in out["users"]}
    assert set(rows) == {"mail", "blank"} and out["failed"] == ["blank"]
    assert rows["mail"]["status"] == "trained" and "empty data" in rows["blank"]["error"]
    assert (home / "users" / "mail" / "specialist" / "stage.json").is_file()
    assert not (home / "users" / "blank" / "specialist").exists()
    again = specialize_flow(users=["mail"], model=tiny_dlm, general=tiny_dlm, config=cfg)
    assert again["users"][0]["status"] == "unchanged"
    assert again["users"][0]["data_digest"] == rows["mail"]["data_digest"]
