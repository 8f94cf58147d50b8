"""Sources on a real S3 API (moto on 127.0.0.1): models and data by s3:// URL, endpoint from the AWS env."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from dlm.data import read_documents
from dlm.errors import FactoryError
from dlm.modeling import load_model
from dlm.paths import sha256_file


@pytest.fixture
def bucket(moto_endpoint, monkeypatch, tmp_path):
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)  # how MinIO/Ceph users configure it too
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    name = f"models-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint)
    fs.mkdir(name)
    return fs, name


def test_load_model_from_s3_skips_pickles_and_caches(bucket, tiny_ar, tmp_path):
    fs, name = bucket
    fs.put(tiny_ar, f"{name}/ar", recursive=True)
    fs.pipe(f"{name}/ar/evil.bin", b"not loaded, not even fetched")
    loaded = load_model(f"s3://{name}/ar")
    assert loaded.spec is None and loaded.path.is_relative_to(tmp_path / "home" / "cache" / "remote")
    assert not (loaded.path / "evil.bin").exists()
    assert sha256_file(loaded.path / "model.safetensors") == sha256_file(Path(tiny_ar) / "model.safetensors")
    assert load_model(f"s3://{name}/ar").path == loaded.path  # second load: from the cache


def test_data_from_s3_and_missing_prefix(bucket):
    fs, name = bucket
    fs.pipe(f"{name}/data/a.py", b"def f():\n    return 1\n")
    docs = read_documents(f"s3://{name}/data")
    assert [d.text for d in docs] == ["def f():\n    return 1\n"]
    with pytest.raises(FactoryError, match="no such object"):
        load_model(f"s3://{name}/nothing-here")
