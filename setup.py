"""Packages only (metadata lives in pyproject.toml): one import root, ``dlm_factory``.

Generic top-level names (``tasks``, ``flows``, ``catalog``) would collide with other
distributions in site-packages, so the design's top-level folders are installed as
subpackages of ``dlm_factory`` (``dlm/`` -> ``dlm_factory.dlm``, ...). Subpackages are
discovered, so a new folder under one of them needs no change here. See docs/layout.md.
"""

from setuptools import find_packages, setup

FOLDERS = ["dlm", "tasks", "flows", "catalog"]  # repository folder == subpackage name

packages = [f"dlm_factory.{p}" for p in find_packages(include=[f"{f}" for f in FOLDERS] + [f"{f}.*" for f in FOLDERS])]
packages += find_packages(include=["dlm_factory", "dlm_factory.*"])

setup(packages=packages, package_dir={"dlm_factory": "dlm_factory", **{f"dlm_factory.{f}": f for f in FOLDERS}})
