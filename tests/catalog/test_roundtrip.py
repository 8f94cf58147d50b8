"""Publish -> list -> show -> pull -> verify on file:// and on a real S3 API (moto)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dlm_factory.catalog import Catalog, CatalogError, EvalResult
from dlm_factory.catalog.schema import MANIFEST_FILE, parse_manifest
from tests.catalog.helpers import make_model


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_publish_pull_roundtrip(cat, tmp_path):
    src = make_model(tmp_path / "m", seed=1, shards=2, extra={"eval_results.json": json.dumps(
        [{"dataset": "stdlib-email", "split": "heldout", "metric": "bits_per_token", "value": 2.25}]).encode()})
    res = cat.publish(src, "dlm-base", lineage={"flow_run_id": "run-1", "data_digests": {"corpus": "sha256:ab"}})
    assert res.created and res.version == res.digest[7:19] and res.ref == f"dlm-base:{res.version}"
    m = res.manifest
    assert sorted(f.path for f in m.files) == sorted([*_tree(src), "README.md"])
    assert m.lineage.flow_run_id == "run-1" and m.lineage.git_sha == "0" * 40
    assert m.evals == (EvalResult(dataset="stdlib-email", split="heldout", metric="bits_per_token", value=2.25),)
    assert "diffusion-lm" in m.tags and "general" in m.tags

    rows = cat.list()
    assert [(r.name, r.version, r.latest) for r in rows] == [("dlm-base", res.version, True)]

    shown = cat.show("dlm-base")
    assert shown.latest and shown.manifest == m and shown.card.startswith("---\n")

    assert cat.verify("dlm-base").files == len(m.files)

    pulled = cat.pull("dlm-base", tmp_path / "out")
    got = _tree(tmp_path / "out")
    assert {k: v for k, v in got.items()
            if k not in ("README.md", MANIFEST_FILE, "MANIFEST.json.sig", ".catalog-pull.json")} == _tree(src)
    assert json.loads(got[".catalog-pull.json"])["digest"] == m.digest
    assert parse_manifest(got[MANIFEST_FILE], "pulled") == m
    assert pulled.downloaded_bytes == m.size and pulled.cached_files == 0
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_republish_is_noop_and_new_content_moves_latest(cat, tmp_path):
    a = cat.publish(make_model(tmp_path / "a", seed=1), "m", lineage={"flow_run_id": "first"})
    again = cat.publish(make_model(tmp_path / "a2", seed=1), "m", lineage={"flow_run_id": "second"})
    assert not again.created and again.version == a.version
    assert again.manifest.lineage.flow_run_id == "first"  # the existing version, untouched
    b = cat.publish(make_model(tmp_path / "b", seed=2), "m")
    assert b.created and b.version != a.version
    assert cat.resolve("m").version == b.version
    assert {r.version for r in cat.list(all_versions=True)} == {a.version, b.version}
    assert [r.version for r in cat.list()] == [b.version]
    # pulling an older version by id still works; republishing it makes it latest again
    cat.pull(f"m:{a.version}", tmp_path / "old")
    assert json.loads((tmp_path / "old" / "config.json").read_text())["seed"] == 1
    assert cat.publish(tmp_path / "a", "m").version == a.version
    assert cat.resolve("m:latest").version == a.version


def test_second_pull_is_served_from_cache(cat, tmp_path, monkeypatch):
    res = cat.publish(make_model(tmp_path / "m", weights=2_000_000), "m")
    cat.pull("m", tmp_path / "one")
    calls = []
    original = cat.store.transfer
    monkeypatch.setattr(cat.store, "transfer", lambda items, w: calls.extend(items) or original(items, w))
    second = cat.pull(f"m:{res.version}", tmp_path / "two")
    assert calls == [] and second.downloaded_bytes == 0 and second.cached_files == len(res.manifest.files)
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")


def test_pull_resumes_partial_download(cat, tmp_path, monkeypatch):
    res = cat.publish(make_model(tmp_path / "m", weights=1_000_000), "m")
    entry = res.manifest.file("model.safetensors")
    partial = cat.cache.root / "partial" / f"{entry.sha256}.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes((tmp_path / "m" / "model.safetensors").read_bytes()[:400_000])
    offsets = []
    original = cat.store.transfer

    def spy(items, workers):  # record the offset each download starts from
        for key, sink in items:
            begin = sink.begin
            sink.begin = lambda fresh, _b=begin, _k=key: offsets.append((_k.rsplit("/", 1)[1], o := _b(fresh))) or o
        return original(items, workers)

    monkeypatch.setattr(cat.store, "transfer", spy)
    pulled = cat.pull("m", tmp_path / "out")
    assert ("model.safetensors", 400_000) in offsets
    assert pulled.downloaded_bytes == res.manifest.size - 400_000
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "m" / "model.safetensors").read_bytes()


def test_cache_dir_deleted_between_pulls(cat, tmp_path):
    import shutil

    cat.publish(make_model(tmp_path / "m"), "m")
    cat.pull("m", tmp_path / "one")
    shutil.rmtree(cat.cache.root)
    assert cat.pull("m", tmp_path / "two").cached_files == 0


def test_corrupt_partial_is_redownloaded(cat, tmp_path):
    res = cat.publish(make_model(tmp_path / "m", weights=500_000), "m")
    entry = res.manifest.file("model.safetensors")
    partial = cat.cache.root / "partial" / f"{entry.sha256}.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"garbage" * 1000)
    cat.pull("m", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "m" / "model.safetensors").read_bytes()


def test_touched_cache_blob_is_rehashed(cat, tmp_path):
    cat.publish(make_model(tmp_path / "m"), "m")
    cat.pull("m", tmp_path / "one")
    target = tmp_path / "one" / "config.json"  # a hardlink of the cache blob
    os.chmod(target, 0o644)
    target.write_text('{"evil": true}')
    cat.pull("m", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "config.json").read_text())["seed"] == 0


def test_ensemble_publish_and_pull_with_members(cat, tmp_path):
    general = cat.publish(make_model(tmp_path / "g", seed=1), "dlm-general")
    spec_model = cat.publish(make_model(tmp_path / "s", seed=2), "spec-alice", kind="specialist", user="alice",
                             base_model="dlm-general")
    assert spec_model.manifest.base_model_relation == "finetune"
    spec = cat.ensemble_spec([("dlm-general", "general"), ("spec-alice", "specialist")],
                             weights={"spec-alice": 0.7}, router={"rule": "prefix_elbo", "prefix_tokens": 32})
    spec.write(tmp_path / "ens")
    with pytest.raises(CatalogError, match="--user"):
        cat.publish(tmp_path / "ens", "assistant", kind="ensemble")
    ens = cat.publish(tmp_path / "ens", "assistant", kind="ensemble", user="alice")
    assert ens.ref == f"alice/assistant:{ens.version}"
    assert [(p.name, p.role, p.digest) for p in ens.manifest.parents] == [
        ("dlm-general", "general", general.digest), ("spec-alice", "specialist", spec_model.digest)]
    assert ens.manifest.base_model == "dlm-general"
    assert [r.kind for r in cat.list(user="alice")] == ["ensemble", "specialist"]
    assert [r.name for r in cat.list(kind="ensemble")] == ["assistant"]
    assert [r.name for r in cat.list(base_model="dlm-general")] == ["assistant", "spec-alice"]

    with pytest.raises(CatalogError, match="no published model assistant"):
        cat.pull("assistant", tmp_path / "wrong")  # ensembles are addressed with their user
    pulled = cat.pull("assistant", tmp_path / "out", user="alice")
    assert set(pulled.members) == {"dlm-general", "spec-alice"}
    assert pulled.members["dlm-general"] == tmp_path / "out" / "members" / "dlm-general"
    assert (tmp_path / "out" / "members" / "spec-alice" / "model.safetensors").read_bytes() == \
        (tmp_path / "s" / "model.safetensors").read_bytes()
    verified = cat.verify("assistant", user="alice")
    assert len(verified.members) == 2
    card = cat.show("assistant", user="alice").card
    assert "## Ensemble" in card and "| spec-alice | specialist |" in card


def test_ensemble_member_digest_mismatch_is_refused(cat, tmp_path):
    cat.publish(make_model(tmp_path / "g", seed=1), "dlm-general")
    spec = cat.ensemble_spec([("dlm-general", "general")])
    bad = spec.model_copy(update={"members": (spec.members[0].model_copy(update={"digest": "sha256:" + "1" * 64}),)})
    bad.write(tmp_path / "ens")
    with pytest.raises(CatalogError, match="ENSEMBLE.json pins"):
        cat.publish(tmp_path / "ens", "e", kind="ensemble", user="bob")


def test_pull_destination_rules(cat, tmp_path):
    cat.publish(make_model(tmp_path / "m"), "m")
    (tmp_path / "empty").mkdir()
    cat.pull("m", tmp_path / "empty")  # an empty dir is fine
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(CatalogError, match="--force"):
        cat.pull("m", tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").exists()
    with pytest.raises(CatalogError, match="not created by a pull"):  # --force replaces pulls only
        cat.pull("m", tmp_path / "full", force=True)
    assert (tmp_path / "full" / "keep.txt").exists()
    os.chmod(tmp_path / "empty" / "config.json", 0o644)  # a pulled dir, modified: force replaces it
    (tmp_path / "empty" / "config.json").write_text("edited")
    cat.pull("m", tmp_path / "empty", force=True)
    assert json.loads((tmp_path / "empty" / "config.json").read_text())["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_missing_things_are_one_line_errors(cat, tmp_path):
    with pytest.raises(CatalogError, match="no published model nope"):
        cat.pull("nope", tmp_path / "x")
    res = cat.publish(make_model(tmp_path / "m"), "m")
    missing = "0" * 12 if res.version != "0" * 12 else "1" * 12
    with pytest.raises(CatalogError, match=f"no version {missing} of model m"):
        cat.verify(f"m:{missing}")
    with pytest.raises(CatalogError, match="no \\*.safetensors"):
        cat.publish(_no_weights(tmp_path), "x")
    assert not (tmp_path / "x").exists()


def _no_weights(tmp_path: Path) -> Path:
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def test_source_readme_and_dotfiles_are_not_published(cat, tmp_path):
    src = make_model(tmp_path / "m", extra={"README.md": b"peft card", ".cache/x": b"y", "MANIFEST.json": b"{}"})
    m = cat.publish(src, "m").manifest
    assert ".cache/x" not in [f.path for f in m.files]
    assert b"peft card" not in cat.store.read(f"models/m/{m.version}/README.md")


def test_progress_callback(cat, tmp_path):
    seen = []
    cat.publish(make_model(tmp_path / "m", weights=1_000_000), "m", progress=lambda *a: seen.append(a))
    labels = {s[0].split()[0] for s in seen}
    assert labels == {"hash", "upload", "verify"}
    assert all(done <= total for _, done, total in seen)


def test_default_root_is_under_factory_home(tmp_path, monkeypatch):
    cat = Catalog()
    assert cat.url == f"file://{tmp_path / 'home' / 'catalog'}"
    monkeypatch.setenv("FACTORY_CATALOG", "s3://bucket/prefix")
    assert Catalog().url == "s3://bucket/prefix"
