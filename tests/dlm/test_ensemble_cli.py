"""`factory ensemble ...` and `factory generate --ensemble`: results, routing, and bad input (one line, exit 2)."""

from __future__ import annotations

import json
import shutil

import pytest

from dlm_factory.cli import main
from tests.dlm.test_cli import assert_one_line_error, run

TINY = ["--seq-len", "64", "--max-windows", "8", "--mc-samples", "4", "--lambdas", "0.5,1", "--gate-prompts", "0"]


@pytest.fixture(scope="module")
def ensembles(tiny_dlm, tiny_specialist, email_specialist, demo_root, tmp_path_factory):
    """<root>/json and <root>/email: one ensemble per demo user, built through the CLI."""
    root = tmp_path_factory.mktemp("ensembles")
    for user, spec in (("json", tiny_specialist), ("email", email_specialist)):
        code = main(["ensemble", "build", "--general", tiny_dlm, "--specialist", spec, "--user", user,
                     "--data-root", demo_root, "--output", str(root / user), "--form", "poe", *TINY,
                     "--name", f"specialist=spec-{user}"])
        assert code in (0, 1)  # built; the gate's verdict is the model's business
    return root


def test_build_prints_the_choice_and_the_gate_exit_code(capsys, ensembles):
    code, out, err = run(capsys, "ensemble", "show", str(ensembles / "json"))
    assert code == 0 and "user: json" in out and "form: product_of_experts" in out and "spec-json:" in out
    gate = json.loads((ensembles / "json" / "gate.json").read_text())
    assert [c["name"] for c in gate["checks"]] == ["elbo_beats_tiny-dlm", "elbo_beats_spec-json"]


def test_generate_with_a_named_user_and_with_routing(capsys, ensembles):
    code, out, _ = run(capsys, "generate", "--ensemble", str(ensembles), "--user", "json", "--prompt", "def f(x):\n",
                       "--length", "8", "--block-size", "8", "--json")
    assert code == 0
    line = json.loads(out)
    assert line["users"] == ["json"] and not line["routed"] and len(line["texts"]) == 1
    code, out, _ = run(capsys, "generate", "--ensemble", str(ensembles), "--prompt", "import json\n\ndef load(fp):\n",
                       "--prompt", "from email.message import Message\n", "--length", "8", "--block-size", "8", "--json")
    line = json.loads(out)
    assert code == 0 and line["routed"] and line["users"] == ["json", "email"] and len(line["texts"]) == 2
    code, out, _ = run(capsys, "ensemble", "route", "--ensemble", str(ensembles), "--prompt", "x = 1\ny = 2\n", "--json")
    scores = json.loads(out)
    assert code == 0 and scores["users"][0] == min(scores["scores"][0], key=scores["scores"][0].get)
    code, out, _ = run(capsys, "generate", "--ensemble", str(ensembles / "email"), "--prompt", "x = 1\n",
                       "--length", "8", "--block-size", "8", "--json")
    assert code == 0 and json.loads(out)["users"] == ["email"]


def test_each_ensemble_carries_its_users_router_and_a_tampered_one_is_refused(capsys, ensembles, tmp_path):
    spec = json.loads((ensembles / "json" / "ENSEMBLE.json").read_text())
    router = spec["router"]
    assert router["rule"] == "prefix_ngram" and router["file"] == "router.safetensors" and router["ngrams"] > 0
    assert (ensembles / "json" / "router.safetensors").stat().st_size == router["bytes"]
    copy = tmp_path / "users"
    shutil.copytree(ensembles, copy)
    path = copy / "email" / "router.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one count changed
    path.write_bytes(bytes(data))
    code, _, err = run(capsys, "ensemble", "route", "--ensemble", str(copy), "--prompt", "x = 1\n")
    assert_one_line_error(code, err, "router.safetensors", "does not match")
    path.unlink()
    code, _, err = run(capsys, "generate", "--ensemble", str(copy), "--prompt", "x = 1\n", "--prompt", "y\n")
    assert_one_line_error(code, err, "has no router.safetensors")
    # an ENSEMBLE.json from before the n-gram router (no rule): its specialists route, as they did then
    for user in ("email", "json"):
        spec_path = copy / user / "ENSEMBLE.json"
        legacy = json.loads(spec_path.read_text())
        legacy["router"] = {"prefix_tokens": 16, "mc_samples": 4, "seed": 0, "batch_size": 128}
        spec_path.write_text(json.dumps(legacy))
    code, out, _ = run(capsys, "ensemble", "route", "--ensemble", str(copy), "--prompt", "x = 1\n", "--json")
    assert code == 0 and json.loads(out)["rule"] == "prefix_elbo" and json.loads(out)["prefix_tokens"] == 16
    # with one user named, nothing is routed: the router is not needed
    code, _, _ = run(capsys, "generate", "--ensemble", str(copy), "--user", "email", "--prompt", "x", "--length", "8",
                     "--block-size", "8")
    assert code == 0


def test_eval_scores_the_ensemble_and_each_member(capsys, ensembles, demo_root):
    code, out, _ = run(capsys, "ensemble", "eval", str(ensembles / "json"), "--data-root", demo_root, "--seq-len", "64",
                       "--max-windows", "4", "--mc-samples", "4")
    line = json.loads(out)
    assert code == 0 and {"ensemble", "general", "specialist", "general-ensemble"} <= set(line)


def test_a_user_that_does_not_exist(capsys, ensembles, tiny_dlm, tiny_specialist, demo_root, tmp_path):
    code, _, err = run(capsys, "generate", "--ensemble", str(ensembles), "--user", "ghost", "--prompt", "x")
    assert_one_line_error(code, err, "ghost", "users: email, json")
    code, _, err = run(capsys, "generate", "--ensemble", str(ensembles / "json"), "--user", "email", "--prompt", "x")
    assert_one_line_error(code, err, "email")
    code, _, err = run(capsys, "ensemble", "build", "--general", tiny_dlm, "--specialist", tiny_specialist,
                       "--user", "ghost", "--data-root", demo_root, "--output", str(tmp_path / "o"), *TINY)
    assert_one_line_error(code, err, "ghost")
    code, _, err = run(capsys, "generate", "--ensemble", str(ensembles), "--user", "../json", "--prompt", "x")
    assert_one_line_error(code, err, "invalid user id")
    assert not (tmp_path / "o").exists()


def test_members_with_different_tokenizers(capsys, tiny_dlm, foreign_dlm, demo_root, tmp_path):
    code, _, err = run(capsys, "ensemble", "build", "--general", tiny_dlm, "--specialist", foreign_dlm, "--user", "json",
                       "--data-root", demo_root, "--output", str(tmp_path / "o"), *TINY)
    assert_one_line_error(code, err, "must share a tokenizer")
    assert not (tmp_path / "o").exists()


def test_lambda_out_of_range(capsys, tiny_dlm, tiny_specialist, demo_root, tmp_path):
    for flags in (["--lambda", "12"], ["--lambda", "-1"], ["--lambdas", "0.5,9"]):
        code, _, err = run(capsys, "ensemble", "build", "--general", tiny_dlm, "--specialist", tiny_specialist,
                           "--user", "json", "--data-root", demo_root, "--output", str(tmp_path / "o"), *TINY, *flags)
        assert_one_line_error(code, err, "out of range")
    assert not (tmp_path / "o").exists()


def test_a_missing_or_unverifiable_member(capsys, ensembles, tmp_path):
    copy = tmp_path / "json"
    shutil.copytree(ensembles / "json", copy)
    local = json.loads((copy / ".ensemble-local.json").read_text())
    moved = tmp_path / "moved-spec"
    shutil.copytree(local["members"]["spec-json"], moved)
    local["members"]["spec-json"] = str(moved)
    (copy / ".ensemble-local.json").write_text(json.dumps(local))
    (moved / "tokenizer_config.json").write_text((moved / "tokenizer_config.json").read_text() + "\n")
    code, _, err = run(capsys, "generate", "--ensemble", str(copy), "--prompt", "x")
    assert_one_line_error(code, err, "member spec-json", "unverifiable")
    shutil.rmtree(moved)
    code, _, err = run(capsys, "generate", "--ensemble", str(copy), "--prompt", "x")
    assert_one_line_error(code, err, "member spec-json", "missing")
    code, _, err = run(capsys, "generate", "--ensemble", str(tmp_path / "nowhere"), "--prompt", "x")
    assert_one_line_error(code, err, "nowhere")


def test_model_and_ensemble_flags(capsys, tiny_dlm):
    code, _, err = run(capsys, "generate", "--model", tiny_dlm, "--user", "json", "--prompt", "x")
    assert_one_line_error(code, err, "--ensemble only")
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x"])  # neither --model nor --ensemble: argparse usage error
