"""The layout's rules, checked in fresh interpreters: the core knows nothing of orchestration or the CLI,
the catalog never needs torch, and every module imports on its own (no hidden cycles)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import dlm_factory.catalog
import dlm_factory.dlm

PROBE = """
import importlib, json, pkgutil, sys
import {root} as pkg
names = [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(json.dumps({{"imported": names, "modules": sorted(sys.modules)}}))
"""


def _fresh_import(root: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=root)], capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _modules(pkg) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".") if not m.name.endswith("__main__")]


def test_core_imports_no_orchestration_and_no_cli():
    seen = _fresh_import("dlm_factory.dlm")
    assert set(seen["imported"]) == set(_modules(dlm_factory.dlm)) and len(seen["imported"]) >= 25
    forbidden = [m for m in seen["modules"] if m.split(".")[0] == "prefect"
                 or m.startswith(("dlm_factory.flows", "dlm_factory.tasks", "dlm_factory.cli"))]
    assert forbidden == []
    # The core is only reachable under the one import root: no stray top-level `dlm`, `tasks`, `flows`.
    assert not {"dlm", "tasks", "flows", "catalog"} & {m.split(".")[0] for m in seen["modules"]}


def test_catalog_imports_without_torch_or_core():
    seen = _fresh_import("dlm_factory.catalog")
    assert "dlm_factory.catalog.core" in seen["imported"]
    heavy = [m for m in seen["modules"] if m.split(".")[0] in {"torch", "transformers", "prefect"}
             or m.startswith("dlm_factory.dlm")]
    assert heavy == []


def test_top_level_package_import_is_light():
    code = "import sys, dlm_factory.dlm, dlm_factory.cli; print('torch' in sys.modules, 'prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]
