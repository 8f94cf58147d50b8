"""Per-user data: one resolver keeps every job inside its user's prefix; deterministic split; data digest."""

from __future__ import annotations

import pytest

from dlm_factory.dlm.data.users import (
    check_user_id,
    user_data_digest,
    user_dir,
    user_documents,
    write_demo_users,
)
from dlm_factory.dlm.errors import FactoryError

HOSTILE = ["../b", "a/../../b", "/etc", "a/b", "", ".", "..", "A", "a" * 65, "alice\0", "аlice",  # Cyrillic а
           "a\\b", " a", "-a", "a..b"]


@pytest.mark.parametrize("user", HOSTILE)
def test_hostile_user_ids_are_refused(user, tmp_path):
    with pytest.raises(FactoryError, match="invalid user id"):
        user_dir(str(tmp_path), user, "data")


@pytest.mark.parametrize("root", ["{tmp}", "s3://bucket/prefix", "file://{tmp}"])
def test_paths_stay_under_the_user_prefix(root, tmp_path):
    root = root.format(tmp=tmp_path)
    path = user_dir(root, "alice-1.x_y", "data")
    assert path.endswith("/users/alice-1.x_y/data")
    for part in ["..", "a/b", "", "../bob"]:
        with pytest.raises(FactoryError):
            user_dir(root, "alice", part)
    assert check_user_id("0.a_b-c") == "0.a_b-c"


def test_split_is_deterministic_and_the_digest_follows_content(tmp_path):
    write_demo_users(tmp_path, {"js": "json"})
    train = user_documents(str(tmp_path), "js", "train")
    held = user_documents(str(tmp_path), "js", "heldout", heldout_fraction=0.5)
    assert {d.name for d in user_documents(str(tmp_path), "js", "heldout", heldout_fraction=0.5)} == {d.name for d in held}
    assert not {d.name for d in train} & {d.name for d in user_documents(str(tmp_path), "js", "heldout")}
    digest = user_data_digest(str(tmp_path), "js")
    write_demo_users(tmp_path, {"js": "json"})  # rewriting unchanged data keeps the digest
    assert user_data_digest(str(tmp_path), "js") == digest
    (tmp_path / "users" / "js" / "data" / "json" / "extra.py").write_text("x = 1\n")
    assert user_data_digest(str(tmp_path), "js") != digest


def test_missing_or_empty_user_data_is_one_error(tmp_path):
    with pytest.raises(FactoryError, match="user ghost: .*no such file"):
        user_documents(str(tmp_path), "ghost")
    empty = tmp_path / "users" / "blank" / "data"
    empty.mkdir(parents=True)
    (empty / "a.txt").write_text("   \n")
    with pytest.raises(FactoryError, match="user blank: .*empty data"):
        user_documents(str(tmp_path), "blank")
