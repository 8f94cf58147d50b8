"""Catalog fixtures: a real S3 API (moto's ThreadedMotoServer on 127.0.0.1) and file:// roots.

Key tests take the ``root`` fixture, parametrized over ``file`` and ``s3``. The S3 root
carries its endpoint in the URL query (``?endpoint_url=...``), so subprocesses (crash and race
tests) reach the same server with nothing but the URL and the fake credentials that the
session-wide ``moto_endpoint`` fixture (tests/conftest.py) puts in the environment.
"""

from __future__ import annotations

import uuid

import pytest


def make_bucket(endpoint: str) -> str:
    import s3fs

    name = f"cat-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False).mkdir(name)
    return name


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path) -> str:
    """A fresh, empty catalog root URL on each backend."""
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    endpoint = request.getfixturevalue("moto_endpoint")
    return f"s3://{make_bucket(endpoint)}/catalog?endpoint_url={endpoint}"


@pytest.fixture
def s3_root(moto_endpoint) -> str:
    return f"s3://{make_bucket(moto_endpoint)}/catalog?endpoint_url={moto_endpoint}"


@pytest.fixture(autouse=True)
def _factory_home(tmp_path, monkeypatch):
    """Keep every default (cache, default root) inside the test's tmp dir."""
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FACTORY_GIT_SHA", "0" * 40)
    for k in ("FACTORY_CATALOG", "FACTORY_CATALOG_CACHE", "FACTORY_CATALOG_CRASH_AT", "FACTORY_IMAGE",
              "FACTORY_FLOW_RUN_ID", "PREFECT__FLOW_RUN_ID"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def cat(root, tmp_path):
    from dlm_factory.catalog import Catalog

    return Catalog(root, cache_dir=tmp_path / "cache")


@pytest.fixture
def hostile(cat):
    """A bucket writer who forges self-consistent manifests, pointers and signatures."""
    from tests.catalog.hostile import HostileWriter

    return HostileWriter(cat)
