"""Bad input through the `factory` CLI: one clear error line, exit code 2, no partial output."""

from __future__ import annotations

import json

import pytest

from dlm_factory.cli import main
from tests.dlm.helpers import leftovers


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = run(capsys, "convert", "--base-model", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert_one_line_error(code, err, "nope", "no such file")
    assert not (tmp_path / "out").exists()


def test_dir_without_config(capsys, tmp_path):
    code, _, err = run(capsys, "eval", "--model", str(tmp_path))
    assert_one_line_error(code, err, "no config.json")


def test_encoder_only_model_is_refused(capsys, tmp_path, tiny_ar):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(bert)
    code, _, err = run(capsys, "convert", "--base-model", str(bert), "--output", str(tmp_path / "out"))
    assert_one_line_error(code, err, "bert", "not a decoder-only causal LM")
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_pickle_only_checkpoint_is_refused(capsys, tmp_path, tiny_ar):
    import shutil

    ck = tmp_path / "pickled"
    shutil.copytree(tiny_ar, ck)
    (ck / "model.safetensors").rename(ck / "pytorch_model.bin")
    code, _, err = run(capsys, "eval", "--model", str(ck))
    assert_one_line_error(code, err, "pytorch_model.bin", "refused")


def test_empty_and_non_utf8_data(capsys, tmp_path, tiny_ar):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.py").write_text("   \n")
    code, _, err = run(capsys, "convert", "--base-model", tiny_ar, "--output", str(tmp_path / "o1"),
                       "--data", str(empty), "--steps", "1", "--anneal-steps", "0")
    assert_one_line_error(code, err, "empty data")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"def f():\n    return '\xff\xfe'\n")
    code, _, err = run(capsys, "convert", "--base-model", tiny_ar, "--output", str(tmp_path / "o2"),
                       "--data", str(bad), "--steps", "1", "--anneal-steps", "0")
    assert_one_line_error(code, err, "bad.txt", "not UTF-8")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert leftovers(tmp_path) == []


def test_sequence_longer_than_positions(capsys, tmp_path, tiny_ar):
    code, _, err = run(capsys, "convert", "--base-model", tiny_ar, "--output", str(tmp_path / "o"),
                       "--seq-len", "1024", "--steps", "1", "--anneal-steps", "0")
    assert_one_line_error(code, err, "1024", "256 positions")
    code, _, err = run(capsys, "eval", "--model", tiny_ar, "--seq-len", "1024")
    assert_one_line_error(code, err, "1024", "256 positions")


def test_invalid_option_values(capsys, tmp_path, tiny_ar):
    code, _, err = run(capsys, "convert", "--base-model", tiny_ar, "--output", str(tmp_path / "o"), "--steps", "0")
    assert_one_line_error(code, err, "steps")
    code, _, err = run(capsys, "convert", "--base-model", tiny_ar, "--output", str(tmp_path / "o"), "--steps", "10")
    assert_one_line_error(code, err, "anneal_steps 100 must be below the training steps (10)")
    assert "Value error" not in err and "invalid :" not in err


def test_existing_output_is_not_overwritten(capsys, tmp_path, tiny_ar):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "convert", "--base-model", tiny_ar, "--output", str(out), "--steps", "1", "--anneal-steps", "0",
                       "--data", "stdlib:heldout")
    assert_one_line_error(code, err, "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_converting_a_diffusion_model_again_is_refused(capsys, tmp_path, tiny_dlm):
    code, _, err = run(capsys, "convert", "--base-model", tiny_dlm, "--output", str(tmp_path / "o"), "--steps", "1", "--anneal-steps", "0")
    assert_one_line_error(code, err, "already a diffusion model")


def test_eval_prints_one_json_line_for_ar_and_dlm(capsys, tiny_ar, tiny_dlm):
    code, out, _ = run(capsys, "eval", "--model", tiny_ar, "--seq-len", "64", "--max-blocks", "4")
    ar = json.loads(out)
    # rolling windows of 64 over a long held-out file: 63 scored, then 32 per window with 32 of context
    assert code == 0 and ar["kind"] == "nll" and ar["tokens"] == 63 + 3 * 32 and ar["windows"] == 4
    code, out, _ = run(capsys, "eval", "--model", tiny_dlm, "--seq-len", "64", "--max-blocks", "4",
                       "--mc-samples", "8")
    dlm = json.loads(out)
    assert code == 0 and dlm["kind"] == "elbo" and dlm["tokens"] == ar["tokens"] and dlm["samples"] == 8
    assert dlm["stderr"] > 0


def test_convert_from_file_url_end_to_end(capsys, tmp_path, tiny_ar):
    out = tmp_path / "dlm"
    code, stdout, err = run(capsys, "convert", "--base-model", f"file://{tiny_ar}", "--output", str(out),
                            "--steps", "2", "--seq-len", "32", "--batch-size", "4", "--anneal-steps", "1",
                            "--data", "stdlib:heldout", "--no-shift")
    assert code == 0, err
    assert json.loads(stdout)["output"] == str(out)
    spec = json.loads((out / "diffusion.json").read_text())
    assert spec["shift"] is False and spec["stages"][0]["config"]["anneal_steps"] == 1


@pytest.mark.parametrize("cmd", ["bootstrap", "convert", "eval", "demo", "catalog"])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    assert "usage: factory" in capsys.readouterr().out
