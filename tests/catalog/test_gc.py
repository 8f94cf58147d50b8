"""gc: dry run by default; collects staging leftovers and unreferenced versions, nothing else."""

from __future__ import annotations

import os
import time

import pytest

from dlm_factory.catalog import CatalogError
from dlm_factory.catalog.schema import manifest_bytes
from tests.catalog.helpers import make_model


def _keys(cat) -> set[str]:
    return set(cat.store.find(""))


def test_staging_leftovers(cat, tmp_path):
    kept = cat.publish(make_model(tmp_path / "m"), "m")
    # What a crashed publisher leaves: payload without MANIFEST.json (and, on file://, a temp file).
    cat.store.write("models/m/0123456789ab/model.safetensors", b"half")
    cat.store.write("ensembles/alice/e/0123456789ab/ENSEMBLE.json", b"{}")
    if cat.store.local:
        os.makedirs(cat.store.path(".staging"), exist_ok=True)
        with open(cat.store.path(".staging/tmp-1-abc"), "wb") as f:
            f.write(b"x" * 10)
    before = _keys(cat)

    assert cat.gc().items == []  # default threshold: 24 h, everything here is fresh
    report = cat.gc(older_than_s=0)
    assert not report.applied
    expected = {("staging", "models/m/0123456789ab"), ("staging", "ensembles/alice/e/0123456789ab")}
    if cat.store.local:
        expected.add(("staging", ".staging/tmp-1-abc"))
    assert {(i.what, i.key) for i in report.items} == expected
    assert _keys(cat) == before  # a dry run deletes nothing

    applied = cat.gc(older_than_s=0, apply=True)
    assert applied.applied and applied.bytes == report.bytes
    assert cat.gc(older_than_s=0).items == []
    assert cat.verify("m").ref == kept.ref
    if cat.store.local:
        assert not os.path.exists(cat.store.path("models/m/0123456789ab"))


def test_unreferenced_versions_and_ensemble_members(cat, tmp_path):
    old = cat.publish(make_model(tmp_path / "m1", seed=1), "m")
    new = cat.publish(make_model(tmp_path / "m2", seed=2), "m")
    g1 = cat.publish(make_model(tmp_path / "g1", seed=3), "g")
    cat.ensemble_spec([("g", "general")]).write(tmp_path / "ens")
    ens = cat.publish(tmp_path / "ens", "e", kind="ensemble", user="alice")
    g2 = cat.publish(make_model(tmp_path / "g2", seed=4), "g")  # latest g moves on; g1 is a member

    assert cat.gc().items == []  # versions younger than the threshold are kept
    report = cat.gc(older_than_s=0)
    assert [(i.what, i.key) for i in report.items] == [("version", f"models/m/{old.version}")]
    sig = cat.store.read(f"models/m/{old.version}/MANIFEST.json.sig")
    mark = cat.store.read(f"refs/m/pointed/{old.version}")  # when latest last named it
    assert sig is not None and mark is not None
    assert report.items[0].bytes == old.manifest.size + len(manifest_bytes(old.manifest)) + len(sig) + len(mark)

    cat.gc(older_than_s=0, apply=True)
    with pytest.raises(CatalogError, match=f"no version {old.version}"):
        cat.pull(f"m:{old.version}", tmp_path / "out")
    for ref, user in [(f"m:{new.version}", None), (f"g:{g1.version}", None), (f"g:{g2.version}", None),
                      (f"e:{ens.version}", "alice")]:
        cat.verify(ref, user=user)
    assert not any(k.startswith(f"models/m/{old.version}/") for k in _keys(cat))
    assert f"refs/m/pointed/{old.version}" not in _keys(cat)


def test_incomplete_multipart_uploads_are_aborted(s3_root, tmp_path):
    from dlm_factory.catalog import Catalog

    cat = Catalog(s3_root, cache_dir=tmp_path / "cache")
    bucket, _, prefix = cat.store.base.partition("/")
    up = cat.store.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=f"{prefix}/models/x/0123456789ab/w.safetensors")
    cat.store.fs.call_s3("create_multipart_upload", Bucket=bucket, Key="outside-the-root/w")
    time.sleep(0.01)
    report = cat.gc(older_than_s=0)
    assert [(i.what, i.key) for i in report.items] == [("upload", f"models/x/0123456789ab/w.safetensors#{up['UploadId']}")]
    cat.gc(older_than_s=0, apply=True)
    remaining = cat.store.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in remaining] == ["outside-the-root/w"]
