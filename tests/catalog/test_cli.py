"""The CLI: ``python -m catalog`` (serving nodes) and ``factory catalog`` share one implementation."""

from __future__ import annotations

import json
import subprocess
import sys

from dlm_factory.catalog.cli import main
from tests.catalog.helpers import REPO, flip_byte, make_model


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_round_trip(root, tmp_path, capsys):
    src = make_model(tmp_path / "m")
    lineage = tmp_path / "lineage.json"
    lineage.write_text(json.dumps({"data_digests": {"email": "sha256:00"}, "config": {"steps": 3}}))
    code, out, _ = _cli(capsys, "publish", str(src), "--name", "dlm-base", "--root", root, "--json",
                        "--tag", "demo", "--lineage", str(lineage))
    assert code == 0
    pub = json.loads(out)
    assert pub["created"] and pub["manifest"]["lineage"]["config"] == {"steps": 3}
    version = pub["version"]

    code, out, _ = _cli(capsys, "publish", str(src), "--name", "dlm-base", "--root", root, "--tag", "demo")
    assert code == 0 and out.startswith(f"already published dlm-base:{version}")

    code, out, _ = _cli(capsys, "list", "--root", root)
    assert code == 0 and out.splitlines()[0].split() == ["NAME", "VERSION", "KIND", "USER", "BASE", "MODEL",
                                                           "SIZE", "CREATED", "(UTC)"]
    assert f"dlm-base  {version} *  general" in out
    code, out, _ = _cli(capsys, "list", "--root", root, "--json", "--kind", "specialist")
    assert json.loads(out) == []

    code, out, _ = _cli(capsys, "show", f"dlm-base:{version}", "--root", root)
    assert code == 0 and "sha256:00" in out and "base_model" not in out.split("---")[1] and "# dlm-base" in out
    code, out, _ = _cli(capsys, "show", "dlm-base", "--root", root, "--json")
    assert json.loads(out)["manifest"]["version"] == version

    code, out, _ = _cli(capsys, "verify", "dlm-base", "--root", root)
    assert code == 0 and out.startswith(f"ok dlm-base:{version}")

    code, out, _ = _cli(capsys, "pull", "dlm-base", str(tmp_path / "out"), "--root", root, "--json")
    assert code == 0 and json.loads(out)["path"] == str(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").exists()

    code, out, _ = _cli(capsys, "gc", "--root", root)
    assert code == 0 and "dry run" in out


def test_cli_errors_are_one_line_exit_2(root, tmp_path, capsys):
    src = make_model(tmp_path / "m")
    for args, needle in [
        (["publish", str(src), "--name", "../x"], "invalid name '../x'"),
        (["pull", "nope", str(tmp_path / "o")], "no published model nope"),
        (["show", "m:v1"], "invalid version 'v1'"),
        (["publish", str(tmp_path / "missing"), "--name", "m"], "not a directory"),
        (["verify", "m", "--user", "Alice"], "invalid user id 'Alice'"),
    ]:
        code, out, err = _cli(capsys, *args, "--root", root)
        assert code == 2, (args, out, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err

    code, out, _ = _cli(capsys, "publish", str(src), "--name", "m", "--root", root, "--json")
    version = json.loads(out)["version"]
    from dlm_factory.catalog import Catalog

    flip_byte(Catalog(root), f"models/m/{version}/model.safetensors")
    code, _, err = _cli(capsys, "verify", "m", "--root", root)
    assert code == 2 and "model.safetensors: sha256 mismatch" in err and err.count("\n") == 1
    code, _, err = _cli(capsys, "pull", "m", str(tmp_path / "dest"), "--root", root)
    assert code == 2 and "model.safetensors" in err and not (tmp_path / "dest").exists()


def test_root_from_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FACTORY_CATALOG", f"file://{tmp_path / 'envroot'}")
    code, _, _ = _cli(capsys, "publish", str(make_model(tmp_path / "m")), "--name", "m", "--json")
    assert code == 0 and (tmp_path / "envroot" / "refs" / "m" / "latest").exists()
    monkeypatch.delenv("FACTORY_CATALOG")
    code, _, _ = _cli(capsys, "publish", str(make_model(tmp_path / "m")), "--name", "m", "--json")
    assert code == 0 and (tmp_path / "home" / "catalog" / "refs" / "m" / "latest").exists()


def test_python_dash_m_catalog_without_torch_or_prefect(tmp_path):
    """The serving-node entry point: a subprocess that must never import torch or prefect."""
    src = make_model(tmp_path / "m")
    root = f"file://{tmp_path / 'store'}"
    code = (
        "import sys, runpy\n"
        "sys.argv = ['catalog', 'publish', sys.argv[1], '--name', 'm', '--root', sys.argv[2], '--json']\n"
        "try:\n    runpy.run_module('dlm_factory.catalog', run_name='__main__')\n"
        "except SystemExit as e:\n    rc = e.code\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'prefect', 'transformers')]\n"
        "print('IMPORTED', bad)\nsys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(src), root], capture_output=True, text=True,
                          cwd=REPO, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                                         "FACTORY_HOME": str(tmp_path / "home"), "FACTORY_GIT_SHA": "0" * 40})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("IMPORTED []")
    proc = subprocess.run([sys.executable, "-m", "dlm_factory.catalog", "pull", "m:zz", str(tmp_path / "o"), "--root", root],
                          capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and proc.stderr == "error: invalid version 'zz': expected 'latest' or 12 hex digits\n"


def test_factory_catalog_is_wired(tmp_path, capsys):
    from dlm_factory import cli
    src = make_model(tmp_path / "m")
    root = f"file://{tmp_path / 'store'}"
    assert cli.main(["catalog", "publish", str(src), "--name", "m", "--root", root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "m"
    assert cli.main(["catalog", "pull", "../m", str(tmp_path / "o"), "--root", root]) == 2
    assert capsys.readouterr().err == "error: invalid name '../m': must match ^[a-z0-9][a-z0-9._-]{0,63}$\n"
