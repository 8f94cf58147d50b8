"""A hostile checkpoint source: object keys cannot leave the download dir, and only the
safetensors files the loader itself lists and checks are ever read (issue 12, holes 2 and 3).

Sources: a local dir (file://) and an s3:// prefix on a real S3 API (moto); key escapes also
on fsspec's memory:// (file:// paths are not object keys: they never reach _fetch_fsspec).
Every refusal is one ``error:`` line with exit code 2 from ``factory eval`` and writes nothing
outside the download cache; ``torch.load`` (pickle) is never called.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pytest

from dlm_factory.cli import main
from dlm_factory.dlm.checkpoint.io import load_model
from dlm_factory.dlm.checkpoint.weights import weight_files
from dlm_factory.dlm.errors import FactoryError
from tests.dlm.helpers import plain_tokenizer, save_random_checkpoint

TEXTS = ["def add(a, b):\n    return a + b\n", "class A:\n    pass\n", "import os\nprint(os.sep)\n"] * 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint, one model.safetensors."""
    return save_random_checkpoint("llama", plain_tokenizer(TEXTS, 280), tmp_path_factory.mktemp("ck") / "tiny")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The same architecture saved in several safetensors shards with an index."""
    from transformers import AutoModelForCausalLM

    tok = plain_tokenizer(TEXTS, 280)
    dest = tmp_path_factory.mktemp("ck") / "sharded"
    save_random_checkpoint("llama", tok, dest)
    model = AutoModelForCausalLM.from_pretrained(dest)
    (dest / "model.safetensors").unlink()
    model.save_pretrained(dest, safe_serialization=True, max_shard_size="20KB")
    assert (dest / "model.safetensors.index.json").exists()
    return dest


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))


@pytest.fixture
def no_pickle(monkeypatch):
    """Any torch.load (pickle) is a test failure."""
    import torch

    def refuse(*a, **k):
        raise AssertionError("torch.load was called: a pickle was read")

    monkeypatch.setattr(torch, "load", refuse)


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and p.is_relative_to(skip):
            continue
        if p.is_symlink():
            out[str(p)] = "-> " + str(p.readlink())
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _eval_refused(capsys, src: str, *needles: str) -> str:
    code = main(["eval", "--model", src])
    _, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Remote sources (s3:// on moto, memory://)


@pytest.fixture(params=["s3", "memory"])
def remote(request, monkeypatch):
    """(fs, bucket path, url of that path) on a fresh prefix."""
    if request.param == "s3":
        import s3fs

        endpoint = request.getfixturevalue("moto_endpoint")
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False)
        bucket = f"hostile-{uuid.uuid4().hex[:10]}"
        fs.mkdir(bucket)
        return fs, bucket, f"s3://{bucket}"
    import fsspec

    fs = fsspec.filesystem("memory")
    prefix = f"/hostile-{uuid.uuid4().hex[:10]}"
    return fs, prefix, f"memory://{prefix}"


def _put_dir(fs, base: str, local: Path) -> None:
    for p in sorted(local.iterdir()):
        fs.pipe(f"{base}/{p.name}", p.read_bytes())


def _put_key(fs, base: str, rel: str, data: bytes) -> None:
    """Write an object whose key is ``base/rel`` exactly (no client-side normalization)."""
    if hasattr(fs, "call_s3"):
        bucket, _, prefix = base.partition("/")
        fs.call_s3("put_object", Bucket=bucket, Key=f"{prefix}/{rel}" if prefix else rel, Body=data)
    else:  # memory:// keeps keys as written
        fs.pipe(f"{base}/{rel}", data)


def _escape_keys(target: Path) -> list[str]:
    rel = str(target).lstrip("/")
    return ["../" * 24 + rel, "/" + rel, "a\\..\\..\\x.json", "./config2.json"]


@pytest.mark.parametrize("which", range(4))
def test_remote_keys_cannot_leave_the_download_dir(remote, tiny, tmp_path, capsys, which):
    fs, bucket, url = remote
    _put_dir(fs, f"{bucket}/m", tiny)
    target = tmp_path / "escape" / "f.json"
    key = _escape_keys(target)[which]
    _put_key(fs, f"{bucket}/m", key, b'{"escaped": true}')
    before = _snapshot(tmp_path, skip=tmp_path / "home")

    with pytest.raises(FactoryError, match="refusing object .* would leave the download dir"):
        load_model(f"{url}/m")
    _eval_refused(capsys, f"{url}/m", "refusing object", "would leave the download dir")

    assert not target.exists() and not target.parent.exists()
    assert _snapshot(tmp_path, skip=tmp_path / "home") == before
    remote_cache = tmp_path / "home" / "cache" / "remote"
    assert not remote_cache.exists() or list(remote_cache.iterdir()) == []  # nothing half-fetched kept


def test_remote_without_hostile_keys_still_loads(remote, tiny, no_pickle):
    fs, bucket, url = remote
    _put_dir(fs, f"{bucket}/m", tiny)
    loaded = load_model(f"{url}/m")
    assert (loaded.path / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------
# Safetensors only, by what the loader follows (local dir and s3://)


@pytest.fixture(params=["file", "s3"])
def publish_dir(request, monkeypatch):
    """Make a checkpoint dir available as a source: the local path, or a copy under s3://."""

    def local(path: Path) -> str:
        return str(path)

    if request.param == "file":
        return local
    import s3fs

    endpoint = request.getfixturevalue("moto_endpoint")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False)
    bucket = f"ck-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)

    def upload(path: Path) -> str:
        for p in sorted(path.rglob("*")):
            if p.is_file():
                fs.pipe(f"{bucket}/{path.name}/{p.relative_to(path).as_posix()}", p.read_bytes())
        return f"s3://{bucket}/{path.name}"

    return upload


def _variant(tmp_path: Path, base: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(base, out)
    return out


def _pickle_shard(model_dir: Path, name: str) -> None:
    """A real torch pickle of the weights (what torch.load would read)."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(model_dir / "model.safetensors"), model_dir / name)


def _index(model_dir: Path, target: str) -> None:
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict.fromkeys(keys, target)}))


def _case_index_to_pickle(d: Path) -> str:
    _pickle_shard(d, "pytorch_model-00001-of-00001.bin")
    _index(d, "pytorch_model-00001-of-00001.bin")
    (d / "model.safetensors").unlink()
    return "model.safetensors.index.json"


def _case_index_to_other_name(d: Path) -> str:
    _index(d, "weights.data")
    (d / "model.safetensors").rename(d / "weights.data")  # safetensors bytes, not a .safetensors name
    return "weights.data"


def _case_index_outside(d: Path) -> str:
    _index(d, "../outside.safetensors")
    (d / "model.safetensors").rename(d.parent / "outside.safetensors")
    return "../outside.safetensors"


def _case_config_redirect(d: Path) -> str:
    _pickle_shard(d, "adapter_model.bin")
    config = json.loads((d / "config.json").read_text())
    config["transformers_weights"] = "adapter_model.bin"
    (d / "config.json").write_text(json.dumps(config))
    return "transformers_weights"


def _case_pickle_adapter(d: Path) -> str:
    _pickle_shard(d, "adapter_model.bin")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(d),
                                                      "r": 2, "target_modules": ["q_proj"]}))
    return "adapter_model.safetensors"


def _case_loose_shard(d: Path) -> str:
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    return "without model.safetensors.index.json"


HOSTILE_CHECKPOINTS = {"index-to-pickle": _case_index_to_pickle, "index-to-other-name": _case_index_to_other_name,
                       "index-outside-dir": _case_index_outside, "config-redirect": _case_config_redirect,
                       "pickle-adapter": _case_pickle_adapter, "loose-shard": _case_loose_shard}


@pytest.mark.parametrize("case", sorted(HOSTILE_CHECKPOINTS))
def test_only_listed_safetensors_are_loaded(case, tiny, tmp_path, publish_dir, capsys, no_pickle):
    d = _variant(tmp_path / "src", tiny, "ck")
    needle = HOSTILE_CHECKPOINTS[case](d)
    src = publish_dir(d)
    before = _snapshot(tmp_path, skip=tmp_path / "home")
    with pytest.raises(FactoryError) as e:
        load_model(src)
    assert "\n" not in str(e.value) and needle in str(e.value), str(e.value)
    _eval_refused(capsys, src, needle)
    assert _snapshot(tmp_path, skip=tmp_path / "home") == before


def test_weight_files_lists_what_transformers_reads(tiny, sharded, tmp_path, publish_dir, no_pickle):
    assert weight_files(tiny) == [tiny / "model.safetensors"]
    shards = weight_files(sharded)
    assert len(shards) >= 2 and all(p.suffix == ".safetensors" and p.parent == sharded for p in shards)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert {p.name for p in shards} == set(index["weight_map"].values())
    loaded = load_model(publish_dir(sharded))  # a sound sharded checkpoint still loads
    assert loaded.spec is None and loaded.model.config.model_type == "llama"
