"""One flipped byte in any stored file: verify and pull fail naming it; no partial dest dir."""

from __future__ import annotations

import pytest

from dlm_factory.catalog import CatalogError
from tests.catalog.helpers import flip_byte, make_model


def _no_leftovers(tmp_path, dest):
    assert not dest.exists()
    if not dest.parent.exists():
        return
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}")] == []


@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "README.md", "MANIFEST.json"])
def test_flipped_byte_in_model(cat, tmp_path, target):
    res = cat.publish(make_model(tmp_path / "m", weights=200_000), "m")
    flip_byte(cat, f"models/m/{res.version}/{target}")
    name = "MANIFEST.json" if target == "MANIFEST.json" else target
    with pytest.raises(CatalogError, match=name) as e:
        cat.verify("m")
    assert "\n" not in str(e.value)
    dest = tmp_path / "dest" / "m"
    with pytest.raises(CatalogError, match=name):
        cat.pull("m", dest)
    _no_leftovers(tmp_path, dest)


def test_every_byte_position_of_the_manifest(cat, tmp_path):
    """Stride through the stored MANIFEST.json (every position: tests/catalog/test_schema.py)."""
    res = cat.publish(make_model(tmp_path / "m", weights=1000), "m")
    key = f"models/m/{res.version}/MANIFEST.json"
    size = len(cat.store.read(key))
    step = 41 if cat.store.local else 97
    for i in range(0, size, step):
        flip_byte(cat, key, i)
        with pytest.raises(CatalogError, match="MANIFEST.json"):
            cat.resolve(f"m:{res.version}")
        flip_byte(cat, key, i)  # restore
    assert cat.verify("m").files == len(res.manifest.files)


@pytest.mark.parametrize("target", ["ENSEMBLE.json", "member"])
def test_flipped_byte_in_ensemble(cat, tmp_path, target):
    g = cat.publish(make_model(tmp_path / "g", seed=1, weights=50_000), "dlm-general")
    cat.ensemble_spec([("dlm-general", "general")]).write(tmp_path / "ens")
    e = cat.publish(tmp_path / "ens", "assistant", kind="ensemble", user="alice")
    if target == "member":
        key, name = f"models/dlm-general/{g.version}/model.safetensors", "model.safetensors"
    else:
        key, name = f"ensembles/alice/assistant/{e.version}/ENSEMBLE.json", "ENSEMBLE.json"
    flip_byte(cat, key)
    with pytest.raises(CatalogError, match=name):
        cat.verify("assistant", user="alice")
    dest = tmp_path / "dest" / "a"
    with pytest.raises(CatalogError, match=name) as err:
        cat.pull("assistant", dest, user="alice")
    if target == "member":
        assert "dlm-general" in str(err.value)
    _no_leftovers(tmp_path, dest)


def test_missing_file_is_named(cat, tmp_path):
    res = cat.publish(make_model(tmp_path / "m"), "m")
    cat.store.delete([f"models/m/{res.version}/tokenizer.json"])
    with pytest.raises(CatalogError, match="tokenizer.json: missing"):
        cat.verify("m")
    with pytest.raises(CatalogError, match="tokenizer.json"):
        cat.pull("m", tmp_path / "out")
    _no_leftovers(tmp_path, tmp_path / "out")


def test_pointer_to_garbage(cat, tmp_path):
    cat.publish(make_model(tmp_path / "m"), "m")
    cat.store.write("refs/m/latest", b"../../etc\n")
    with pytest.raises(CatalogError, match="corrupt pointer refs/m/latest"):
        cat.pull("m", tmp_path / "out")
