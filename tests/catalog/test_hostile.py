"""Hostile names and paths are refused before any I/O; pickle is refused on publish and pull."""

from __future__ import annotations

import pytest

from dlm_factory.catalog import Catalog, CatalogError
from dlm_factory.catalog.core import Ref
from dlm_factory.catalog.schema import check_file_path, check_name
from tests.catalog.helpers import make_model

HOSTILE = [
    "../x", "a/b", "/etc/passwd", "", "a" * 65, "a\x00b", "\x00", "mоdel",  # Cyrillic 'о'
    "ｍodel", "modeⅼ", "Model", "-x", ".x", "..", ".", "a b", "a\nb", "x\n", "a:b", "a\\b",
    "~root", "%2e%2e", "ß",
]


class Bomb:
    """A filesystem on which any use at all is a test failure."""

    def __getattr__(self, name):
        raise AssertionError(f"I/O attempted: fs.{name}")


@pytest.fixture
def bomb_cats(tmp_path):
    return [Catalog("s3://bucket/prefix", fs=Bomb(), cache_dir=tmp_path / "c"),
            Catalog(f"file://{tmp_path}/store", fs=Bomb(), cache_dir=tmp_path / "c")]


def _calls(cat, bad, src, out):
    return [
        lambda: cat.publish(src, bad),
        lambda: cat.publish(src, "ok", kind="ensemble", user=bad),
        lambda: cat.publish(src, "ok", user=bad),
        lambda: cat.pull(bad, out),
        lambda: cat.pull(f"ok:{bad}", out),
        lambda: cat.pull("ok", out, user=bad),
        lambda: cat.show(bad),
        lambda: cat.verify(bad),
        lambda: cat.verify("ok:latest", user=bad),
        lambda: cat.list(user=bad),
        lambda: cat.list(name=bad),
    ]


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_names_refused_before_io(bad, bomb_cats, tmp_path):
    src = make_model(tmp_path / "m")
    for cat in bomb_cats:
        for call in _calls(cat, bad, src, tmp_path / "out"):
            with pytest.raises(CatalogError) as e:
                call()
            msg = str(e.value)
            assert "invalid" in msg and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "store").exists()


def test_valid_names():
    for good in ["a", "dlm-base", "spec.alice_v2", "0", "a" * 64, "a..b"]:
        assert check_name(good) == good
    assert Ref.parse("m:0123456789ab") == Ref("m", "0123456789ab")
    assert Ref.parse("m") == Ref("m", "latest") == Ref.parse("m:latest")
    for bad in ["m:", "m:v1", "m:0123456789AB", "m:0123456789abc", "m:../../x", "m:1:2"]:
        with pytest.raises(CatalogError):
            Ref.parse(bad)


@pytest.mark.parametrize("path", ["../x.json", "a/../../b", "/abs.json", "a//b", ".hidden", "x/.git/config",
                                  "a b.json", "wеights.safetensors", "a\x00b", "", "a/" * 9 + "b",
                                  "training_args.bin", "model.PT", "w.pth", "w.pkl", "w.ckpt", "w.pickle"])
def test_hostile_file_paths(path):
    with pytest.raises(CatalogError):
        check_file_path(path)


@pytest.mark.parametrize("fname", ["pytorch_model.bin", "training_args.bin", "sub/optimizer.pt", "rng.pth",
                                   "x.pkl", "last.ckpt"])
def test_publish_refuses_pickle_before_io(fname, bomb_cats, tmp_path):
    src = make_model(tmp_path / "m", extra={fname: b"\x80\x04pickle"})
    for cat in bomb_cats:
        with pytest.raises(CatalogError, match="pickle"):
            cat.publish(src, "m")


@pytest.mark.parametrize("fname", ["we ird.json", "caf\u00e9.json"])
def test_publish_refuses_odd_file_names_before_io(fname, bomb_cats, tmp_path):
    src = make_model(tmp_path / "m", extra={fname: b"{}"})
    for cat in bomb_cats:
        with pytest.raises(CatalogError, match="invalid file path"):
            cat.publish(src, "m")


def test_publish_refuses_symlinked_dir(bomb_cats, tmp_path):
    src = make_model(tmp_path / "m")
    (src / "link").symlink_to(tmp_path)
    for cat in bomb_cats:
        with pytest.raises(CatalogError, match="symlinked"):
            cat.publish(src, "m")


def _forge(cat, name: str, filename: str, payload: bytes) -> None:
    """Write a self-consistent version (digest, integrity, canonical bytes) the way a hostile
    store could, bypassing every check the publisher makes."""
    import hashlib
    import json

    from dlm_factory.catalog.schema import canonical_json

    card = b"card"
    files = [{"path": filename, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}]
    content = {"schema_version": 1, "kind": "general", "user": None, "files": files, "parents": [],
               "base_model": None, "base_model_relation": None, "tags": [], "license": "mit", "evals": []}
    digest = "sha256:" + hashlib.sha256(canonical_json(content)).hexdigest()
    data = {**content, "name": name, "version": digest[7:19], "digest": digest,
            "files": files + [{"path": "README.md", "size": len(card), "sha256": hashlib.sha256(card).hexdigest()}],
            "lineage": {"flow_run_id": None, "git_sha": None, "image": None, "data_digests": {}, "config": {}},
            "created": "2026-01-01T00:00:00Z"}
    data["integrity"] = hashlib.sha256(canonical_json(data)).hexdigest()
    vdir = f"models/{name}/{digest[7:19]}"
    cat.store.write(f"{vdir}/{filename}", payload)
    cat.store.write(f"{vdir}/README.md", card)
    cat.store.write(f"{vdir}/MANIFEST.json", json.dumps(data, sort_keys=True, indent=2).encode() + b"\n")
    cat.store.write(f"refs/{name}/latest", f"{digest[7:19]}\n".encode())


def test_pull_refuses_a_consistent_manifest_listing_pickle(cat, tmp_path):
    """A hostile store can forge a self-consistent manifest; pull still never fetches pickle."""
    _forge(cat, "fine", "weights.safetensors", b"not pickle")
    cat.pull("fine", tmp_path / "fine")  # the forgery is consistent: it pulls
    _forge(cat, "evil", "pytorch_model.bin", b"\x80\x04evil")
    with pytest.raises(CatalogError, match="pickle"):
        cat.pull("evil", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list((cat.cache.root / "blobs").rglob("*.bin"))


@pytest.mark.parametrize("key", ["../x", "models/../../x", "/etc/passwd", "a/./b", "a\\b", "a\x00b"])
def test_store_refuses_keys_escaping_the_root(key, tmp_path):
    from dlm_factory.catalog.store import Store

    for store in (Store(f"file://{tmp_path}", fs=Bomb()), Store("s3://bucket/p", fs=Bomb())):
        with pytest.raises(CatalogError, match="escapes the catalog root"):
            store.read(key)


@pytest.mark.parametrize("url", ["", "ftp://x/y", "s3://", "s3://key:secret@bucket/p", "s3://b/p?key=AKIA",
                                 "file://host/p", "file:///tmp\x00"])
def test_bad_root_urls(url):
    with pytest.raises(CatalogError) as e:
        Catalog(url)
    assert "secret" not in str(e.value) and "AKIA" not in str(e.value)
