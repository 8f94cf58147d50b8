"""Issue 12: the catalog against someone who can write any key of the bucket.

One test (or a few) per hole, each on file:// and on moto S3 (the ``root`` fixture). Every
refusal is one ``error:`` line with exit code 2 from the CLI, and leaves every file outside
DEST as it was: a snapshot of the test's whole tmp dir (blob cache, earlier pulls, the
file:// store) is compared before and after; the blob cache may only gain verified blobs.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from dlm_factory.catalog import Catalog, CatalogError
from dlm_factory.catalog import core as catalog_core
from dlm_factory.catalog.cli import main
from dlm_factory.catalog.schema import parse_manifest
from tests.catalog.helpers import make_model
from tests.catalog.hostile import assert_untouched, sha, snapshot


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _refused(capsys, root: str, *args: str, needle: str) -> str:
    code, out, err = _cli(capsys, *args, "--root", root)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    return err


def _caches(tmp_path: Path) -> tuple[Path, Path]:
    """The blob caches of the ``cat`` fixture and of the CLI (FACTORY_HOME's)."""
    return tmp_path / "cache", tmp_path / "home" / "cache" / "catalog"


@pytest.fixture
def victim(cat, tmp_path):
    """A legitimately published model and an earlier pull of it."""
    src = make_model(tmp_path / "victim-src", seed=11)
    pub = cat.publish(src, "victim")
    cat.pull("victim", tmp_path / "earlier")
    return pub, src


def _weights(pub) -> tuple[int, str]:
    f = pub.manifest.file("model.safetensors")
    return f.size, f.sha256


# ---------------------------------------------------------------------------------------------
# 1. Overwrite through the cache


@pytest.mark.parametrize("path", ["MANIFEST.json", "manifest.JSON", "MANIFEST.json.sig"])
def test_forged_manifest_listing_a_reserved_name_cannot_overwrite_another_model(root, cat, hostile, victim, tmp_path,
                                                                                capsys, path):
    pub, src = victim
    weights = (src / "model.safetensors").read_bytes()
    hostile.forge("evil", {path: weights, "w.safetensors": b"x"})  # the victim's bytes, self-consistent
    before = snapshot(tmp_path)
    with pytest.raises(CatalogError, match="reserved"):
        cat.pull("evil", tmp_path / "dest")
    _refused(capsys, root, "pull", "evil", str(tmp_path / "dest2"), needle="reserved")
    assert_untouched(before, snapshot(tmp_path), *_caches(tmp_path))
    assert (tmp_path / "earlier" / "model.safetensors").read_bytes() == weights
    assert cat.pull("victim", tmp_path / "again").path.joinpath("model.safetensors").read_bytes() == weights


def test_forged_ensemble_cannot_write_into_its_members_dir(root, cat, hostile, victim, tmp_path, capsys,
                                                           monkeypatch):
    pub, src = victim
    spec = cat.ensemble_spec([("victim", "general")])
    ens = json.dumps(spec.model_dump(mode="json")).encode()
    parents = [{"digest": pub.digest, "name": "victim", "version": pub.version, "role": "general"}]
    # members/victim/model.safetensors claims the victim's weights digest: the old pull linked
    # it to the blob, then copied the member's file over that same inode.
    hostile.forge("evil", {"ENSEMBLE.json": ens, "members/victim/model.safetensors": _weights(pub)},
                  kind="ensemble", user="alice", parents=parents, upload=False)
    hostile.write(f"ensembles/alice/evil/{cat.store.read('refs/ensembles/alice/evil/latest').decode().strip()}"
                  "/ENSEMBLE.json", ens)
    before = snapshot(tmp_path)
    with pytest.raises(CatalogError, match="reserved in an ensemble"):  # the victim's blob is cached
        cat.pull("evil", tmp_path / "dest", user="alice")
    monkeypatch.setenv("FACTORY_CATALOG_CACHE", str(cat.cache.root))  # the CLI on the same cache
    _refused(capsys, root, "pull", "evil", "--user", "alice", str(tmp_path / "dest"), needle="reserved")
    assert_untouched(before, snapshot(tmp_path), *_caches(tmp_path))
    assert (tmp_path / "earlier" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_pulled_files_are_copies_and_place_never_writes_over_a_path(root, cat, victim, tmp_path):
    pub, src = victim
    entry = pub.manifest.file("model.safetensors")
    blob = cat.cache.blob(entry.sha256)
    pulled = tmp_path / "earlier" / "model.safetensors"
    assert os.stat(pulled).st_ino != os.stat(blob).st_ino and os.stat(pulled).st_nlink == 1
    assert not os.access(pulled, os.W_OK) or os.getuid() == 0  # read-only files (root may write anyway)
    os.chmod(pulled, 0o644)
    pulled.write_bytes(b"edited through the pulled copy")
    assert sha(blob.read_bytes()) == entry.sha256  # the cache never shares the inode
    for existing in (tmp_path / "earlier" / "config.json", tmp_path / "link"):
        if existing.name == "link":
            existing.symlink_to(tmp_path / "earlier" / "tokenizer.json")
        target = existing.resolve()
        old = target.read_bytes()
        with pytest.raises(CatalogError, match="refusing to write over it"):
            cat.cache.place(entry, existing)
        assert target.read_bytes() == old


def test_modified_blob_with_mtime_restored_is_not_placed(cat, victim, tmp_path):
    pub, src = victim
    entry = pub.manifest.file("model.safetensors")
    blob = cat.cache.blob(entry.sha256)
    st = os.stat(blob)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))  # the verification stamp is back
    assert cat.cache.has(entry)  # the stamp alone still says "verified"...
    got = cat.pull("victim", tmp_path / "second")
    assert (got.path / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert sha(blob.read_bytes()) == entry.sha256  # ...but place checked it, and it was fetched again


# ---------------------------------------------------------------------------------------------
# 3. Safetensors only, by what an index or config points to


@pytest.mark.parametrize("case", ["index-to-other-file", "index-outside", "config-redirect", "pickle-adapter"])
def test_weight_redirects_are_refused_at_publish_and_pull(root, cat, hostile, victim, tmp_path, capsys, case):
    w = b"safetensors bytes"
    files = {"config.json": b"{}", "model-1.safetensors": w}
    if case == "index-to-other-file":
        files |= {"weights.data": w, "model.safetensors.index.json": json.dumps(
            {"weight_map": {"a": "model-1.safetensors", "b": "weights.data"}}).encode()}
    elif case == "index-outside":
        files |= {"model.safetensors.index.json": json.dumps({"weight_map": {"a": "../x.safetensors"}}).encode()}
    elif case == "config-redirect":
        files["config.json"] = json.dumps({"transformers_weights": "model-1.safetensors"}).encode()
    else:
        files |= {"adapter_config.json": b"{}", "adapter_model.weights": w}
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    store_before = hostile.keys()
    _refused(capsys, root, "publish", str(src), "--name", "redirect", needle="safetensors")
    assert hostile.keys() == store_before  # refused before anything was uploaded

    hostile.forge("redirect", files)
    before = snapshot(tmp_path)
    _refused(capsys, root, "pull", "redirect", str(tmp_path / "dest"), needle="safetensors")
    with pytest.raises(CatalogError, match="safetensors"):  # refused after download: parents it made go too
        cat.pull("redirect", tmp_path / "new" / "deep" / "dest")
    assert not (tmp_path / "dest").exists() and not (tmp_path / "new").exists()
    assert_untouched(before, snapshot(tmp_path), *_caches(tmp_path))


# ---------------------------------------------------------------------------------------------
# 4. Publish never follows symlinks


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_publish_refuses_file_symlinks(root, cat, hostile, tmp_path, capsys, target):
    secret = tmp_path / "home-aws-credentials"
    secret.write_text("[default]\naws_secret_access_key = SECRET-KEY-MATERIAL\n")
    src = make_model(tmp_path / "m")
    (src / "credentials").symlink_to(secret if target == "outside" else src / "config.json")
    store_before = hostile.keys()
    err = _refused(capsys, root, "publish", str(src), "--name", "m", needle="symlinks are not published")
    assert "SECRET" not in err
    assert hostile.keys() == store_before
    assert not any(b"SECRET-KEY-MATERIAL" in (cat.store.read(k) or b"") for k in cat.store.find(""))


# ---------------------------------------------------------------------------------------------
# 5. gc against pointer moves and bad keys


def test_gc_keeps_a_version_repointed_between_scan_and_delete(root, cat, tmp_path, monkeypatch):
    src_a, src_b = make_model(tmp_path / "a", seed=1), make_model(tmp_path / "b", seed=2)
    a = cat.publish(src_a, "m")
    b = cat.publish(src_b, "m")
    other = Catalog(root, cache_dir=tmp_path / "cache2")
    scan = catalog_core.Catalog._scan
    fired = []

    def scan_then_republish(self, keys, strict=False):
        out = scan(self, keys, strict)
        if strict and not fired:  # gc's scan is done: a no-op re-publish moves latest back to a
            fired.append(other.publish(src_a, "m"))
        return out

    monkeypatch.setattr(catalog_core.Catalog, "_scan", scan_then_republish)
    report = cat.gc(apply=True, older_than_s=0)
    assert fired and not fired[0].created
    assert f"models/m/{a.version}" not in [i.key for i in report.items]
    assert cat.resolve("m").version == a.version
    pulled = cat.pull("m", tmp_path / "out")
    assert (pulled.path / "model.safetensors").read_bytes() == (src_a / "model.safetensors").read_bytes()
    cat.verify("m")
    assert cat.verify(f"m:{b.version}")  # b was latest at the scan: kept in this run


def test_gc_keeps_a_version_put_back_while_it_was_being_deleted(cat, tmp_path, monkeypatch):
    """The pointer moves after gc's last read but before the manifest delete returns."""
    src_a = make_model(tmp_path / "a", seed=1)
    a = cat.publish(src_a, "m")
    cat.publish(make_model(tmp_path / "b", seed=2), "m")
    delete = type(cat.store).delete
    moved = []

    def delete_then_repoint(store, keys):
        delete(store, keys)
        if not moved and any(k.endswith(f"{a.version}/MANIFEST.json") for k in keys):
            store.write("refs/m/latest", f"{a.version}\n".encode())
            moved.append(keys)

    monkeypatch.setattr(type(cat.store), "delete", delete_then_repoint)
    cat.gc(apply=True, older_than_s=0)
    assert moved
    assert cat.resolve("m").version == a.version
    cat.verify("m")  # manifest put back, no file deleted


def test_gc_protects_by_the_time_a_version_was_last_pointed_to(cat, tmp_path, monkeypatch):
    clock = [catalog_core._now()]
    monkeypatch.setattr(catalog_core, "_now", lambda: clock[0])
    day, minute = 24 * 3600.0, 60.0
    models = {k: make_model(tmp_path / k, seed=i) for i, k in enumerate("abcd")}
    a = cat.publish(models["a"], "m")
    b = cat.publish(models["b"], "m")
    clock[0] += day
    c = cat.publish(models["c"], "m")  # b was latest until now
    clock[0] += day
    cat.publish(models["a"], "m")  # a no-op re-publish: a (manifest two days old) is latest again
    clock[0] += 10 * minute
    d = cat.publish(models["d"], "m")
    clock[0] += 10 * minute
    # Threshold 24 h: a was pointed to 10 minutes ago and c 20 minutes ago (both kept, whatever
    # their manifests' age); b was last pointed to a day ago.
    report = cat.gc(apply=True)
    assert {i.key for i in report.items} == {f"models/m/{b.version}"}, report.items
    cat.verify(f"m:{a.version}")
    cat.verify(f"m:{c.version}")
    assert cat.resolve("m").version == d.version
    clock[0] += 2 * day
    assert {i.key for i in cat.gc(apply=True).items} == {f"models/m/{a.version}", f"models/m/{c.version}"}
    cat.verify("m")


def test_gc_refuses_to_run_on_an_unreadable_pointer(root, cat, hostile, tmp_path, capsys):
    cat.publish(make_model(tmp_path / "a", seed=1), "m")
    cat.publish(make_model(tmp_path / "b", seed=2), "m")
    hostile.write("refs/m/latest", b"\x1b[2Jnot a version\n")
    before = hostile.keys()
    err = _refused(capsys, root, "gc", "--apply", "--older-than", "0", needle="corrupt pointer refs/m/latest")
    assert "\x1b" not in err
    assert hostile.keys() == before


def test_gc_skips_and_reports_a_bad_key(root, cat, hostile, tmp_path, capsys):
    a = cat.publish(make_model(tmp_path / "a", seed=1), "m")
    cat.publish(make_model(tmp_path / "b", seed=2), "m")
    bad = f"models/m/{a.version}/a\\b.json"
    hostile.write(bad, b"x")
    hostile.write("models/junk/0123456789ab/w.safetensors", b"staging")
    code, out, err = _cli(capsys, "gc", "--apply", "--older-than", "0", "--root", root, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert [s["key"] for s in res["skipped"]] == [bad]
    assert {i["key"] for i in res["items"]} == {f"models/m/{a.version}", "models/junk/0123456789ab"}
    keys = set(cat.store.find(""))
    assert bad in keys and not any(k.startswith("models/junk/") for k in keys)
    assert not any(k.startswith(f"models/m/{a.version}/") and k != bad for k in keys)
    code, out, _ = _cli(capsys, "gc", "--older-than", "0", "--root", root)
    assert code == 0 and "skipped" in out and "a\\\\b.json" in out


# ---------------------------------------------------------------------------------------------
# 6. --force replaces only earlier pulls


def test_force_replaces_only_an_earlier_pull(root, cat, victim, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "work"
    (cwd / "sub").mkdir(parents=True)
    (cwd / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd / "sub")
    (cwd / "sub" / "x").mkdir()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("keep")
    home = Path(os.environ["FACTORY_HOME"])
    targets = [("", "invalid destination"), (".", "current directory"), ("..", "current directory"),
               ("x/..", "current directory"), (str(home), "FACTORY_HOME"), (str(home.parent), "it is or holds"),
               (str(home / "cache" / "catalog"), "blob cache"),  # the CLI's cache
               (str(home / "cache" / "catalog" / "blobs" / "x"), "inside the blob cache"),
               (str(mine), "not created by a pull"), ("/", "refusing to pull into /")]
    if cat.store.local:
        targets.append((cat.store.base, "catalog root"))
    before = snapshot(tmp_path)
    for dest, needle in targets:
        _refused(capsys, root, "pull", "victim", dest, "--force", needle=needle)
    assert_untouched(before, snapshot(tmp_path), *_caches(tmp_path))
    got = cat.pull("victim", tmp_path / "earlier", force=True)  # an earlier pull: replaced
    assert (got.path / ".catalog-pull.json").is_file()


# ---------------------------------------------------------------------------------------------
# 7. Paths that nest under a file


def test_paths_nested_under_a_file_are_refused(root, cat, hostile, tmp_path, capsys):
    # (on file:// such keys cannot even exist; the manifest alone is what pull must refuse)
    hostile.forge("nested", {"config.json": b"{}", "config.json/x.json": (2, sha(b"{}")), "w.safetensors": b"w"})
    before = snapshot(tmp_path)
    _refused(capsys, root, "pull", "nested", str(tmp_path / "dest"), needle="nested under the file")
    assert_untouched(before, snapshot(tmp_path), *_caches(tmp_path))

    g = cat.publish(make_model(tmp_path / "g"), "g")
    spec = cat.ensemble_spec([("g", "general")])
    ens = spec.write(tmp_path / "ens").parent
    (ens / "members").write_text("a file where members are pulled")
    _refused(capsys, root, "publish", str(ens), "--name", "e", "--kind", "ensemble", "--user", "alice",
             needle="reserved in an ensemble")
    (ens / "members").unlink()
    (ens / "Config.json").write_text("{}")
    (ens / "config.json").write_text("{}")
    _refused(capsys, root, "publish", str(ens), "--name", "e", "--kind", "ensemble", "--user", "alice",
             needle="differ only by case")
    parents = [{"digest": g.digest, "name": "g", "version": g.version, "role": "general"}]
    hostile.forge("e2", {"ENSEMBLE.json": (ens / "ENSEMBLE.json").read_bytes(), "members": b"file"},
                  kind="ensemble", user="alice", parents=parents)
    before = snapshot(tmp_path)
    _refused(capsys, root, "pull", "e2", "--user", "alice", str(tmp_path / "d2"), needle="members")
    assert_untouched(before, snapshot(tmp_path), *_caches(tmp_path))


# ---------------------------------------------------------------------------------------------
# 8. One error line, never a traceback


def test_bad_destinations_are_one_error_line(root, cat, victim, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    before = snapshot(tmp_path)
    for dest, needle in [(afile / "sub", "not a directory"), (afile, "not a directory"),
                         (tmp_path / ("n" * 256), "too long"), (Path("/proc/dlm-factory-test"), "cannot")]:
        _refused(capsys, root, "pull", "victim", str(dest), needle=needle)
    assert_untouched(before, snapshot(tmp_path), *_caches(tmp_path))
    long = tmp_path / ("n" * 250)  # a long but valid name pulls (its temp dir name is bounded)
    assert (cat.pull("victim", long).path / "config.json").exists()


def test_a_pull_that_loses_the_race_for_dest_is_one_error_line(root, cat, victim, tmp_path, monkeypatch, capsys):
    """Two pulls into one DEST: the second finds DEST filled by the first just before its own
    rename (the ENOTEMPTY that concurrent pulls hit about 5% of the time), deterministically."""
    place = type(cat.cache).place
    other = Catalog(root, cache_dir=tmp_path / "cache-other")
    raced = []

    def place_then_race(cache, entry, dest):
        if not raced and cache is cat.cache:
            raced.append(None)
            raced[0] = other.pull("victim", tmp_path / "race")  # the other pull wins
        return place(cache, entry, dest)

    monkeypatch.setattr(type(cat.cache), "place", place_then_race)
    with pytest.raises(CatalogError, match="exists and is not empty|appeared while pulling") as e:
        cat.pull("victim", tmp_path / "race")
    assert "\n" not in str(e.value) and raced
    assert json.loads((tmp_path / "race" / ".catalog-pull.json").read_text())["ref"] == raced[0].ref
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_concurrent_pulls_into_one_dest(root, cat, victim, tmp_path):
    """Real threads: exactly one pull per round creates DEST, the others fail cleanly."""
    results: list[object] = []

    def one() -> None:
        try:
            results.append(Catalog(root, cache_dir=cat.cache.root).pull("victim", tmp_path / "race"))
        except CatalogError as e:
            results.append(e)
        except BaseException as e:  # noqa: BLE001 - what the test forbids
            results.append(("traceback", e))

    for _ in range(3):
        results.clear()
        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not [r for r in results if isinstance(r, tuple)], results
        assert len([r for r in results if not isinstance(r, CatalogError)]) == 1, results
        assert all("\n" not in str(r) for r in results if isinstance(r, CatalogError))
        assert (tmp_path / "race" / "config.json").exists()
        assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]
        import shutil

        shutil.rmtree(tmp_path / "race")


def test_deep_json_and_nan_are_one_error_line(root, cat, tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    lineage = tmp_path / "lineage.json"
    lineage.write_text('{"config": {"x": ' + deep + "}}")
    src = make_model(tmp_path / "m")
    _refused(capsys, root, "publish", str(src), "--name", "m", "--lineage", str(lineage), needle="nested")
    lineage.write_text('{"config": ' + '{"a": ' * 80 + "1" + "}" * 80 + "}")  # deep, not recursion-deep
    _refused(capsys, root, "publish", str(src), "--name", "m", "--lineage", str(lineage), needle="nested deeper")
    (src / "eval_results.json").write_text(deep)
    _refused(capsys, root, "publish", str(src), "--name", "m", needle="nested")
    (src / "eval_results.json").unlink()
    for value in ("nan", "inf", "-1"):
        _refused(capsys, root, "gc", "--older-than", value, needle="--older-than")
    with pytest.raises(CatalogError, match="finite"):
        cat.gc(older_than_s=float("nan"))


def test_control_characters_are_refused_and_never_printed(root, cat, hostile, tmp_path, capsys):
    src = make_model(tmp_path / "m")
    _refused(capsys, root, "publish", str(src), "--name", "m", "--base-model", "x\x1b]0;pwned\x07",
             needle="invalid base model")
    hostile.forge("shady", {"w.safetensors": b"w"}, extra={"tags": ["\x1b[31mred"], "license": "mit\x1b[0m"},
                  lineage={**json.loads(json.dumps({"flow_run_id": None, "git_sha": "\x1b[2J", "image": None,
                                                    "data_digests": {"\x1b[1m": "x"}, "config": {}}))})
    code, out, err = _cli(capsys, "show", "shady", "--root", root)
    assert code == 0, err
    assert "\x1b" not in out and "\\x1b[31mred" in out and "\\x1b[2J" in out
    code, out, _ = _cli(capsys, "list", "--root", root)
    assert code == 0 and "\x1b" not in out and "shady" in out
    raw = cat.store.read(f"models/shady/{cat.resolve('shady').version}/MANIFEST.json")
    assert parse_manifest(raw, "x").tags == ("\x1b[31mred",)  # stored as written; only printing escapes
    assert hashlib.sha256(raw).hexdigest()
