"""The stage record and the one is_done(): inputs by digest (not by path), config, legacy specs, early refusal."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from dlm_factory.dlm.checkpoint.record import (
    RECORD_FILE,
    StageKey,
    is_done,
    model_digest,
    read_record,
)
from dlm_factory.dlm.checkpoint.spec import DiffusionSpec
from dlm_factory.dlm.errors import FactoryError
from dlm_factory.dlm.stages import convert as convert_stage
from tests.conftest import tiny_convert_config


def test_convert_key_names_inputs_by_content_not_path(tiny_ar, tiny_dlm, tmp_path, monkeypatch):
    cfg = tiny_convert_config()
    assert is_done(tiny_dlm, convert_stage.convert_key(tiny_ar, cfg))
    monkeypatch.chdir(os.path.dirname(tiny_ar))  # ./tiny-ar and /abs/tiny-ar are the same input
    assert is_done(tiny_dlm, convert_stage.convert_key("./" + os.path.basename(tiny_ar), cfg))
    copy = shutil.copytree(tiny_ar, tmp_path / "moved-ar")  # same bytes elsewhere: still the same input
    assert is_done(tiny_dlm, convert_stage.convert_key(copy, cfg))
    assert not is_done(tiny_dlm, convert_stage.convert_key(tiny_ar, tiny_convert_config(anneal_steps=3)))
    assert not is_done(tiny_dlm, convert_stage.convert_key(tiny_dlm, cfg))  # another base model


def test_changed_weights_change_the_model_digest(tiny_ar, tmp_path):
    copy = shutil.copytree(tiny_ar, tmp_path / "ar")
    before = model_digest(copy)
    (copy / RECORD_FILE).write_text("{}")  # records are not part of a model's identity
    assert model_digest(copy) == before
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert model_digest(copy) != before


def test_unreadable_or_foreign_record_is_not_done(tmp_path):
    key = StageKey(stage="convert", inputs={"base": "sha256:x"}, config={"a": 1})
    assert not is_done(tmp_path / "missing", key)
    (tmp_path / RECORD_FILE).write_text("{not json")
    assert read_record(tmp_path) is None and not is_done(tmp_path, key)
    (tmp_path / RECORD_FILE).write_text(json.dumps({**key.model_dump(), "stage": "instruct"}))
    assert not is_done(tmp_path, key)
    (tmp_path / RECORD_FILE).write_text(json.dumps(key.model_dump()))
    assert is_done(tmp_path, key)


def test_legacy_spec_with_untyped_stages_still_loads(tiny_dlm, tmp_path):
    spec = json.loads((DiffusionSpec.read(tiny_dlm)).model_dump_json())
    spec["stages"] = [{"stage": "convert", "mask_token": "reused", "config": {"seq_len": 64}, "final_loss": 5.0}]
    (tmp_path / "diffusion.json").write_text(json.dumps(spec))
    old = DiffusionSpec.read(tmp_path)
    assert old.stage_names() == ["convert"] and old.stages[0].config == {"seq_len": 64}
    assert old.stages[0].result == {"mask_token": "reused", "final_loss": 5.0}


def test_existing_output_is_refused_before_any_training(tiny_ar, tmp_path, monkeypatch):
    out = tmp_path / "exists"
    out.mkdir()
    monkeypatch.setattr(convert_stage, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    monkeypatch.setattr(convert_stage, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(FactoryError, match="output already exists"):
        convert_stage.convert(tiny_ar, out, tiny_convert_config(), progress=False)
