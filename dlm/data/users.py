"""Per-user data: ``<root>/users/<user_id>/data/`` (text files and JSONL), isolated by one resolver.

Every path or URL of a user's data or outputs is made by ``user_dir`` (and only
there): it validates the id (``^[a-z0-9][a-z0-9._-]{0,63}$``: no ``/``, no ``..``, no
look-alike letters, nothing empty) and checks that the result stays under the root,
so a job for user A can only read A's prefix and write A's output prefix.

The split into train and held-out documents is deterministic by a hash of the
document's name (``dlm.data.corpus.heldout``), so it is the same on every machine and
every re-run, and a digest over the user's documents (names and contents) tells
whether the user's data changed since the last specialist.

The embedded demo has users whose data is one standard-library package each
(``write_demo_users``): ``email``, ``asyncio``, ``json``, ``unittest``. The general
model and the specialist base must not have seen a user's data, or a specialist has
nothing left to learn (and the held-out figures measure memory): their embedded
defaults train on ``GENERAL_TRAIN``, the stdlib train split without the demo
packages, and evaluate on ``GENERAL_HELDOUT``.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from dlm_factory.dlm.data.corpus import (
    Document,
    documents_digest,
    heldout,
    read_documents,
    stdlib_documents,
    stdlib_source,
)
from dlm_factory.dlm.errors import FactoryError

USER_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
DEMO_USERS = {"email": "email", "asyncio": "asyncio", "json": "json", "unittest": "unittest"}  # user -> package
# The general corpus of the embedded defaults: the stdlib without any demo user's package.
GENERAL_TRAIN = stdlib_source("train", exclude=DEMO_USERS.values())  # stdlib:train:exclude=asyncio,email,json,unittest
GENERAL_HELDOUT = stdlib_source("heldout", exclude=DEMO_USERS.values())
HELDOUT_FRACTION = 0.2  # a user's held-out share (more than the corpus's 0.05: users have few documents)
MAX_USER_CHARS = 20_000_000  # a user's data above this is refused (a specialist is small; so is its data)


def check_user_id(user: str) -> str:
    """``user`` if it is a valid user id, else one FactoryError line (ASCII only: no look-alikes)."""
    if not isinstance(user, str) or not USER_ID.fullmatch(user) or user in {".", ".."} or ".." in user:
        raise FactoryError(f"invalid user id {user!r}: expected ^[a-z0-9][a-z0-9._-]{{0,63}}$ (lowercase ASCII)")
    return user


def user_dir(root: str, user: str, *parts: str) -> str:
    """``<root>/users/<user>/<parts...>`` for a local dir or an fsspec URL, contained under the root.

    The one place user paths are made. ``parts`` are fixed names chosen by the code
    ("data", "specialist"), never user input; they are checked all the same.
    """
    check_user_id(user)
    for p in parts:
        if not p or p in {".", ".."} or "/" in p or "\\" in p or "\0" in p:
            raise FactoryError(f"invalid path part {p!r} under user {user!r}")
    if "://" in root:
        scheme, rest = root.split("://", 1)
        base = posixpath.join(rest.rstrip("/"), "users", user)
        full = posixpath.normpath(posixpath.join(base, *parts))
        if full != base and not full.startswith(base + "/"):
            raise FactoryError(f"{user!r}: path escapes the user's prefix")
        return f"{scheme}://{full}"
    base = (Path(root).expanduser().resolve() / "users" / user)
    full = base.joinpath(*parts).resolve()
    if full != base and base not in full.parents:
        raise FactoryError(f"{user!r}: path escapes the user's prefix")
    return str(full)


def user_documents(root: str, user: str, split: str = "train", *,
                   heldout_fraction: float = HELDOUT_FRACTION) -> list[Document]:
    """The user's documents of one split (``train``, ``heldout`` or ``all``), in name order."""
    if split not in {"train", "heldout", "all"}:
        raise FactoryError(f"unknown split {split!r} (train, heldout or all)")
    src = user_dir(root, user, "data")
    try:
        docs = read_documents(src)
    except FactoryError as e:
        raise FactoryError(f"user {user}: {e}") from e
    size = sum(len(d.text) for d in docs)
    if size > MAX_USER_CHARS:
        raise FactoryError(f"user {user}: {size} characters of data, above the cap of {MAX_USER_CHARS}")
    if split == "all":
        return docs
    picked = [d for d in docs if heldout(d.name, heldout_fraction) == (split == "heldout")]
    if not picked:
        raise FactoryError(f"user {user}: no {split} documents ({len(docs)} in all; the split holds out "
                           f"{heldout_fraction:.0%} by name hash)")
    return picked


def user_data_digest(root: str, user: str) -> str:
    """Digest over the names and contents of all the user's documents: unchanged data, unchanged digest."""
    return documents_digest(user_documents(root, user, "all"))


def write_demo_users(root: str | Path, users: dict[str, str] | None = None) -> list[str]:
    """Write the demo users' data (one stdlib package each) under a local ``root``; returns the user ids.

    Files are rewritten only when their content changed, so the data digest of an
    unchanged user stays the same across demo runs.
    """
    users = DEMO_USERS if users is None else users
    for user, package in users.items():
        docs = stdlib_documents("all", packages=[package])
        if not docs:
            raise FactoryError(f"demo user {user}: the standard library has no package {package!r}")
        data = Path(user_dir(str(root), user, "data"))
        for d in docs:
            path = data / d.name
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.is_file() or path.read_text(encoding="utf-8") != d.text:
                path.write_text(d.text, encoding="utf-8")
    return list(users)
