"""images/: Dockerfiles that pass hadolint, bases pinned by digest, non-root users, a build context
that carries the sources and nothing else, tags from the git SHA, and a catalog image whose code
really runs without the training stack. No image is built here (no docker daemon in CI)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest

from tests.k8s.conftest import ROOT, tool

DOCKERFILES = {"trainer": ROOT / "images/trainer/Dockerfile", "catalog": ROOT / "images/catalog/Dockerfile"}
DIGESTS = {"CUDA_DEVEL_DIGEST": "sha256:" + "a" * 64, "CUDA_RUNTIME_DIGEST": "sha256:" + "b" * 64,
           "UV_DIGEST": "sha256:" + "c" * 64, "PYTHON_DIGEST": "sha256:" + "d" * 64}


def hadolint(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), *map(str, paths)],
                          capture_output=True, text=True, timeout=60)


def stages(dockerfile) -> list[dict]:
    """FROM lines and what follows them: [{'from': ..., 'alias': ..., 'lines': [...]}]."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out: list[dict] = []
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I):
            out.append({"from": m[1], "alias": m[2], "lines": []})
        elif out and line and not line.startswith("#"):
            out[-1]["lines"].append(line)
    return out


def test_dockerfiles_pass_hadolint():
    result = hadolint(*DOCKERFILES.values())
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_with_our_settings_still_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nUSER root\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest
    assert "DL3014" in result.stdout  # apt-get without -y


@pytest.mark.parametrize("name", DOCKERFILES)
def test_bases_are_pinned_by_a_digest_variable(name):
    text = DOCKERFILES[name].read_text()
    aliases = set()
    bases = (ROOT / "images/bases.env").read_text()
    for stage in stages(DOCKERFILES[name]):
        if stage["from"] in aliases:
            continue
        m = re.fullmatch(r"\$\{(\w+)_IMAGE\}@\$\{(\w+)_DIGEST\}", stage["from"])
        assert m and m[1] == m[2], f"{stage['from']}: not <image>@<digest> from build arguments"
        assert re.search(rf"^ARG {m[2]}_DIGEST$", text, re.M), "a digest must have no default"
        assert re.search(rf"^{m[1]}_IMAGE=\S+:\S+$", bases, re.M), f"{m[1]}_IMAGE missing in images/bases.env"
        aliases.add(stage["alias"])
    assert len(stages(DOCKERFILES[name])) >= 2, "multi-stage: the build tools stay out of the image"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_final_stage_runs_as_the_pods_non_root_user(name):
    final = stages(DOCKERFILES[name])[-1]
    users = [line.split()[1] for line in final["lines"] if line.upper().startswith("USER ")]
    # Numeric, equal to runAsUser in k8s/ and tasks/kubernetes.py (runAsNonRoot checks numbers).
    assert users and users[-1] == "10001:10001"


def _run_make(*args):
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], capture_output=True,
                          text=True, timeout=60)


def test_images_are_tagged_with_the_git_sha():
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    result = _run_make("images", "DOCKER=echo", "REGISTRY=reg.example", *[f"{k}={v}" for k, v in DIGESTS.items()])
    assert result.returncode == 0, result.stderr
    builds = [line for line in result.stdout.splitlines() if line.startswith("build ")]
    assert len(builds) == 2
    for line, image in zip(builds, ["dlm-factory-trainer", "dlm-factory-catalog"], strict=True):
        tag = re.search(rf"-t reg\.example/{image}:(\S+)", line)[1]
        assert re.fullmatch(rf"{sha}(-dirty)?", tag), tag
        assert line.rstrip().endswith(" ."), "the context is the repository root"
    assert f"CUDA_RUNTIME_DIGEST={DIGESTS['CUDA_RUNTIME_DIGEST']}" in builds[0]
    assert f"PYTHON_DIGEST={DIGESTS['PYTHON_DIGEST']}" in builds[1]


def test_unpinned_bases_refuse_to_build():
    result = _run_make("images", "DOCKER=echo", "CUDA_DEVEL_DIGEST=")
    assert result.returncode != 0
    assert "make pin-bases" in result.stderr
    assert "build " not in result.stdout  # refused before any docker command


def _glob(pattern: str) -> str:
    """A .dockerignore pattern as a regex: * and ? stay within one path segment, **/ spans any."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        regex = _glob(pattern.lstrip("!").rstrip("/"))
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not pattern.startswith("!")
    return ignored


def test_build_context_has_the_sources_and_nothing_else():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = []
    for dockerfile in DOCKERFILES.values():
        for stage in stages(dockerfile):
            for line in stage["lines"]:
                if line.startswith("COPY ") and "--from=" not in line:
                    copied += line.split()[1:-1]
    assert copied
    for src in copied:  # a COPY of an ignored path fails the build
        assert not _ignored(src, patterns), src
    for kept in ("pyproject.toml", "dlm/runtime.py", "tasks/kubernetes.py", "catalog/core.py",
                 "dlm_factory/cli/__init__.py", "images/catalog/requirements.txt"):
        assert not _ignored(kept, patterns), kept
    for dropped in (".venv/bin/python", ".factory/models/x/model.safetensors", ".git/config", "tests/conftest.py",
                    "dlm/__pycache__/runtime.cpython-311.pyc", "k8s/base/worker.yaml", "bench/results/x.json",
                    ".env", "images/trainer/Dockerfile"):
        assert _ignored(dropped, patterns), dropped


def test_image_pins_follow_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0].lower(): d.replace(" ", "") for d in project["dependencies"]}
    torch = deps["torch"].split("==")[1]
    for dockerfile in DOCKERFILES.values():
        assert f"ARG TORCH_VERSION={torch}" in dockerfile.read_text()
    reqs = [line.split("#")[0].strip() for line in (ROOT / "images/catalog/requirements.txt").read_text().splitlines()]
    reqs = [r for r in reqs if r]
    assert reqs
    for req in reqs:
        name = re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0].lower()
        assert deps.get(name) == req.replace(" ", ""), f"{req} differs from pyproject.toml"
        assert name not in {"deepspeed", "peft", "bitsandbytes", "prefect", "prefect-kubernetes", "kubernetes"}


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"deepspeed", "peft", "bitsandbytes", "prefect", "prefect_kubernetes", "kubernetes"}:
            raise ImportError("not in the catalog image: " + name)
sys.meta_path.insert(0, Block())
import dlm_factory.catalog.cli, dlm_factory.dlm.checkpoint.io, dlm_factory.dlm.sampling.generate
from dlm_factory.catalog import Catalog
from dlm_factory.dlm.checkpoint.io import load_model
sys.exit(dlm_factory.catalog.cli.main(["--help"]))
"""


def test_catalog_image_code_runs_without_the_training_stack():
    """What the catalog image runs (factory-catalog, the model loader, the sampler) imports nothing
    of DeepSpeed, PEFT, bitsandbytes, Prefect or the Kubernetes client."""
    result = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pull" in result.stdout
