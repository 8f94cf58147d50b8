"""What the UI shows: run names from parameters, tables that lead with the figures, cache keys by content."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


def test_markdown_table_puts_figures_first_and_paths_digests_errors_last():
    from dlm_factory.tasks.models import markdown_table

    rows = [{"path": "/very/long/path/models/stdlib-dlm", "model": "DLM", "bits_per_token": 7.95612, "digest": "sha256:ab",
             "error": None, "text": "a|b\nc"}]
    header, rule, row = markdown_table(rows).splitlines()
    assert header == "| model | bits_per_token | text | path | digest | error |"
    assert rule == "|---|---|---|---|---|---|"
    assert row == "| DLM | 7.956 | a\\|b ⏎ c | /very/long/path/models/stdlib-dlm | sha256:ab |  |"  # no broken cells


@pytest.mark.parametrize(("params", "name"), [
    ({"base_model": None, "profile": "smoke"}, "factory · smoke · stdlib"),
    ({"base_model": "s3://bucket/models/llama-ar/", "profile": "default"}, "factory · default · llama-ar"),
])
def test_factory_run_name_says_profile_and_base_model(monkeypatch, params, name):
    from prefect.runtime import flow_run

    from dlm_factory.flows.naming import run_name

    monkeypatch.setitem(flow_run.FIELDS, "parameters", lambda: params)  # what Prefect reads inside a run
    assert run_name("factory", extra="profile")() == name


def test_publish_and_specialize_names_say_model_and_users(monkeypatch):
    from prefect.runtime import flow_run

    from dlm_factory.flows.naming import run_name

    params = {}
    monkeypatch.setitem(flow_run.FIELDS, "parameters", lambda: params)
    params.update(src="/x/tiny-dlm", name="tiny", user=None)
    assert run_name("publish", base="src", users="user", extra="name", all_users=False)() == "publish · tiny · tiny-dlm"
    params.update(user="json")
    assert run_name("publish", base="src", users="user", extra="name", all_users=False)() == "publish · tiny · tiny-dlm · json"
    params.clear()
    params.update(general="/m/stdlib-dlm", users=["a", "b", "c", "d", "e"])
    assert run_name("specialize", base="general", users="users")() == "specialize · stdlib-dlm · a,b,c+2"


def test_cache_key_follows_model_content_not_its_path(tmp_path, tiny_dlm):
    import shutil

    from dlm_factory.dlm.evaluation.corpus import EvalConfig
    from dlm_factory.tasks.models import digest_cache_key

    key = digest_cache_key("model")
    ctx = SimpleNamespace(task=SimpleNamespace(name="evaluate"))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dlm, copy)
    cfg = EvalConfig(max_windows=4)
    same = key(ctx, {"model": str(copy), "config": cfg})
    assert same == key(ctx, {"model": tiny_dlm, "config": EvalConfig(max_windows=4)})  # same content, new objects
    assert same != key(ctx, {"model": tiny_dlm, "config": EvalConfig(max_windows=5)})  # other settings
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert same != key(ctx, {"model": str(copy), "config": cfg})  # other weights, same path
