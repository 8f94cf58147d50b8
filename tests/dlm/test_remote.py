"""Sources on a real S3 API (moto on 127.0.0.1): models and data by s3:// URL, endpoint from the AWS env."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from dlm_factory.digest import sha256_file
from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.data.corpus import read_documents
from dlm_factory.dlm.errors import FactoryError


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


def test_instruction_data_from_s3_tunes_and_reports_bad_lines(bucket, tiny_dlm, tmp_path):
    """JSONL instructions by s3:// URL on a real S3 API: both formats, bad lines named by object and line."""
    import json

    from dlm_factory.dlm.stages.instruct import InstructConfig, instruct
    from dlm_factory.dlm.train.config import TrainConfig

    fs, name = bucket
    lines = [json.dumps({"prompt": f"Implement `add{i}(x)`.", "response": f"return x + {i}"}) for i in range(7)]
    lines.append(json.dumps({"messages": [{"role": "user", "content": "Implement `one()`."},
                                          {"role": "assistant", "content": "return 1"}]}))
    fs.pipe(f"{name}/instr/a.jsonl", ("\n".join(lines) + "\n").encode())
    fs.pipe(f"{name}/instr/b.jsonl", b'{"prompt": "p", "response": "r"}\nnot json\n')
    cfg = InstructConfig(data=f"s3://{name}/instr", response_len=16, max_bad_fraction=0.2,
                         train=TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1))
    result = instruct(tiny_dlm, tmp_path / "tuned", cfg, progress=False)
    assert result.data["rows"] == 9 and result.data["bad_lines"] == 1
    bad = load_model(tmp_path / "tuned").spec.stages[-1].result["data"]["bad_line_numbers"]
    assert len(bad) == 1 and bad[0].startswith("b.jsonl:2: ")
    with pytest.raises(FactoryError, match=r"1 of 10 lines .*b\.jsonl:2"):
        instruct(tiny_dlm, tmp_path / "strict", cfg.model_copy(update={"max_bad_fraction": 0.05}), progress=False)
    assert not (tmp_path / "strict").exists()
