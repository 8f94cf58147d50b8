"""MANIFEST.json / ENSEMBLE.json schema, digests pinned to golden values, the model card."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

import dlm_factory.catalog.schema as schema
from dlm_factory.catalog import CatalogError
from dlm_factory.catalog.card import render_card
from dlm_factory.catalog.schema import (
    Content,
    EnsembleSpec,
    EvalResult,
    FileEntry,
    Lineage,
    Parent,
    build_manifest,
    manifest_bytes,
    parse_manifest,
)

SHA = {c: c * 64 for c in "abcdef"}
CONTENT = Content(
    kind="specialist", user="alice",
    files=(FileEntry(path="config.json", size=10, sha256=SHA["a"]),
           FileEntry(path="model.safetensors", size=1000, sha256=SHA["b"])),
    parents=(Parent(digest="sha256:" + SHA["c"], name="dlm-base", version="cccccccccccc", role="base"),),
    base_model="dlm-base", base_model_relation="adapter", tags=("dlm-factory", "specialist"), license="apache-2.0",
    evals=(EvalResult(dataset="stdlib-email", split="heldout", metric="bits_per_token", value=2.5, lower_is_better=True),))
CREATED = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
LINEAGE = Lineage(flow_run_id="run-1", git_sha="f" * 40, image="factory:abc", data_digests={"email": "sha256:" + SHA["d"]},
                  config={"lr": 0.001, "steps": 3})
GOLDEN_DIGEST = "sha256:f4c4a839efa4a134ceb90a9b3b5d87b1b1be3b1e76a0cf13efbb1aba98118f9d"


def _golden():
    card = render_card("spec-alice", GOLDEN_DIGEST[7:19], CONTENT)
    entry = FileEntry(path="README.md", size=len(card), sha256=__import__("hashlib").sha256(card).hexdigest())
    return build_manifest("spec-alice", CONTENT, entry, LINEAGE, created=CREATED), card


def test_golden_manifest_fields():
    m, _ = _golden()
    assert m.digest == GOLDEN_DIGEST, m.digest  # changing the digest input breaks re-publish no-ops
    assert m.version == GOLDEN_DIGEST[7:19]
    data = json.loads(manifest_bytes(m))
    assert data["schema_version"] == 1
    assert (data["name"], data["kind"], data["user"]) == ("spec-alice", "specialist", "alice")
    assert data["created"] == "2026-01-02T03:04:05.678901Z"
    assert data["files"][-1]["path"] == "README.md"
    assert data["parents"] == [{"digest": "sha256:" + SHA["c"], "name": "dlm-base", "version": "cccccccccccc",
                                "role": "base"}]
    assert data["lineage"] == {"flow_run_id": "run-1", "git_sha": "f" * 40, "image": "factory:abc",
                               "data_digests": {"email": "sha256:" + SHA["d"]}, "config": {"lr": 0.001, "steps": 3}}
    assert data["evals"][0]["value"] == 2.5 and data["license"] == "apache-2.0"
    assert sorted(data) == sorted(schema.Manifest.model_fields)


def test_digest_ignores_lineage_and_time_but_not_content():
    m1, _ = _golden()
    card = m1.file("README.md")
    m2 = build_manifest("spec-alice", CONTENT, card, Lineage(flow_run_id="other"))
    assert m2.digest == m1.digest and m2.integrity != m1.integrity
    changed = CONTENT.model_copy(update={"license": "mit"})
    assert changed.digest() != CONTENT.digest()
    renamed = CONTENT.model_copy(update={"files": (CONTENT.files[0], FileEntry(path="w.safetensors", size=1000,
                                                                               sha256=SHA["b"]))})
    assert renamed.digest() != CONTENT.digest()


def test_every_single_byte_flip_of_a_manifest_is_detected():
    m, _ = _golden()
    raw = manifest_bytes(m)
    assert parse_manifest(raw, "x") == m
    for i in range(len(raw)):
        for bit in (0x01, 0x20, 0x80):
            bad = bytearray(raw)
            bad[i] ^= bit
            with pytest.raises(CatalogError, match="corrupt MANIFEST.json"):
                parse_manifest(bytes(bad), "x")


def test_manifest_refuses_inconsistency():
    m, _ = _golden()
    data = json.loads(manifest_bytes(m))
    for field, value in [("version", "0" * 12), ("name", "../x"), ("kind", "ensemble"),
                         ("files", data["files"][:-1])]:
        forged = dict(data, **{field: value})
        with pytest.raises(CatalogError, match="corrupt"):
            parse_manifest(json.dumps(forged, sort_keys=True, indent=2).encode() + b"\n", "x")


def test_published_json_schemas_are_current_and_validate():
    jsonschema = pytest.importorskip("jsonschema")
    here = Path(schema.__file__).parent
    for fname, data in schema.json_schemas().items():
        assert (here / fname).read_bytes() == data, (
            f"{fname} is stale: python -c 'import dlm_factory.catalog.schema as s; s.write_schemas()'")
    m, _ = _golden()
    jsonschema.validate(json.loads(manifest_bytes(m)), json.loads((here / "manifest.schema.json").read_text()))
    spec = EnsembleSpec(members=[{"name": "g", "version": "a" * 12, "digest": "sha256:" + SHA["a"], "role": "general"}],
                        combination={"rule": "product_of_experts", "weights": {"g": 1.0}, "temperature": 0.7})
    jsonschema.validate(spec.model_dump(mode="json"), json.loads((here / "ensemble.schema.json").read_text()))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**json.loads(manifest_bytes(m)), "kind": "weird"},
                            json.loads((here / "manifest.schema.json").read_text()))


def test_ensemble_spec_rules():
    member = {"name": "g", "version": "a" * 12, "digest": "sha256:" + SHA["a"], "role": "general"}
    with pytest.raises(ValueError, match="unique"):
        EnsembleSpec(members=[member, member])
    with pytest.raises(ValueError, match="unknown members"):
        EnsembleSpec(members=[member], combination={"weights": {"nope": 1.0}})
    with pytest.raises(ValueError):
        EnsembleSpec(members=[{**member, "name": "../g"}])
    with pytest.raises(ValueError):
        EnsembleSpec(members=[])


def test_card_front_matter_is_hf_yaml():
    yaml = pytest.importorskip("yaml")
    _, card = _golden()
    text = card.decode()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == "dlm-base" and front["base_model_relation"] == "adapter"
    assert front["license"] == "apache-2.0" and front["tags"] == ["dlm-factory", "specialist"]
    (result,) = front["model-index"][0]["results"]
    assert front["model-index"][0]["name"] == "spec-alice"
    assert result["task"] == {"type": "text-generation"}
    assert result["dataset"] == {"name": "stdlib-email", "type": "stdlib-email", "split": "heldout"}
    assert result["metrics"] == [{"type": "bits_per_token", "value": 2.5}]
    assert "## Evaluation" in text and "factory catalog pull spec-alice:" in text
    tiny = CONTENT.model_copy(update={"evals": (EvalResult(dataset="d", metric="m", value=1e-05),)})
    front = yaml.safe_load(render_card("x", "0" * 12, tiny).decode().split("---\n")[1])
    assert front["model-index"][0]["results"][0]["metrics"][0]["value"] == 1e-05  # a float, not a string
