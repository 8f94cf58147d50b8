"""Object-store model catalog (fsspec/s3fs/pydantic only; never imports torch).

Python API (mirrors ``factory catalog``)::

    from dlm_factory.catalog import Catalog
    cat = Catalog("s3://bucket/catalog")          # or None: $FACTORY_CATALOG / ./.factory/catalog
    res = cat.publish("out/dlm", "dlm-base", kind="general", evals=[...], lineage={...})
    cat.pull("dlm-base", "/srv/models/dlm-base")  # NAME[:VERSION], verified
    cat.list(kind="specialist", user="alice")
    cat.show("dlm-base:" + res.version); cat.verify("dlm-base"); cat.gc(apply=False)

The module-level functions below take ``root=`` and do the same. See docs/catalog.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dlm_factory.catalog.errors import CatalogError

if TYPE_CHECKING:
    from dlm_factory.catalog.core import (
        Catalog,
        GcReport,
        Published,
        Pulled,
        Ref,
        Shown,
        Verified,
        VersionInfo,
    )
    from dlm_factory.catalog.schema import (
        SCHEMA_VERSION,
        Combination,
        EnsembleMember,
        EnsembleSpec,
        EvalResult,
        FileEntry,
        Lineage,
        Manifest,
        Parent,
    )
    from dlm_factory.catalog.store import StorageError

# Loaded on first use, so that `from catalog.errors import CatalogError` (the factory CLI does
# it at startup) does not pay for pydantic models and the core.
_LAZY = {
    **dict.fromkeys(["Catalog", "GcReport", "Published", "Pulled", "Ref", "Shown", "Verified",
                     "VersionInfo"], "dlm_factory.catalog.core"),
    **dict.fromkeys(["SCHEMA_VERSION", "Combination", "EnsembleMember", "EnsembleSpec", "EvalResult",
                     "FileEntry", "Lineage", "Manifest", "Parent"], "dlm_factory.catalog.schema"),
    "StorageError": "dlm_factory.catalog.store",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dlm_factory.catalog' has no attribute {name!r}")


__all__ = [
    "SCHEMA_VERSION", "Catalog", "CatalogError", "Combination", "EnsembleMember", "EnsembleSpec",
    "EvalResult", "FileEntry", "GcReport", "Lineage", "Manifest", "Parent", "Published", "Pulled",
    "Ref", "Shown", "StorageError", "Verified", "VersionInfo", "gc", "list_models", "publish",
    "pull", "show", "verify",
]


def _cat(root):
    from dlm_factory.catalog.core import Catalog

    return Catalog(root)


def publish(src, name: str, *, root: str | None = None, **kwargs):
    """``Catalog(root).publish(src, name, **kwargs)``."""
    return _cat(root).publish(src, name, **kwargs)


def pull(ref: str, dest, *, root: str | None = None, **kwargs):
    """``Catalog(root).pull(ref, dest, **kwargs)``."""
    return _cat(root).pull(ref, dest, **kwargs)


def list_models(*, root: str | None = None, **kwargs):
    """``Catalog(root).list(**kwargs)``."""
    return _cat(root).list(**kwargs)


def show(ref: str, *, root: str | None = None, **kwargs):
    """``Catalog(root).show(ref, **kwargs)``."""
    return _cat(root).show(ref, **kwargs)


def verify(ref: str, *, root: str | None = None, **kwargs):
    """``Catalog(root).verify(ref, **kwargs)``."""
    return _cat(root).verify(ref, **kwargs)


def gc(*, root: str | None = None, **kwargs):
    """``Catalog(root).gc(**kwargs)``."""
    return _cat(root).gc(**kwargs)
