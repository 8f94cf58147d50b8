"""``FACTORY_HOME``: the root of everything the embedded defaults write (stdlib only)."""

from __future__ import annotations

import os
from pathlib import Path


def factory_home(*, create: bool = False) -> Path:
    """``$FACTORY_HOME`` (default ``./.factory``), absolute; ``create`` makes it with its parents.

    Tools that create their own home without parents (Prefect's ``PREFECT_HOME``) need
    ``create=True`` on a fresh clone, where ``.factory`` does not exist yet.
    """
    home = Path(os.environ.get("FACTORY_HOME", ".factory")).expanduser().resolve()
    if create:
        home.mkdir(parents=True, exist_ok=True)
    return home
