"""Authenticity (issue 12): every published version is signed (OpenSSF model-signing, EC keys,
offline) and a trust policy refuses unsigned, otherwise-signed and tampered versions.

On file:// and moto S3. Refusals are one ``error:`` line, exit code 2, and change nothing
outside DEST (snapshot of the whole tmp dir, blob cache included).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat

import pytest

from dlm_factory.catalog import Catalog, CatalogError
from dlm_factory.catalog.cli import main
from dlm_factory.catalog.signing import Signer, TrustPolicy, fingerprint, generate_key
from tests.catalog.helpers import make_model
from tests.catalog.hostile import assert_untouched, snapshot

SIG = "MANIFEST.json.sig"


@pytest.fixture
def keys(tmp_path):
    """Two EC key pairs: (private, public) for 'a' and for 'b'."""
    out = {}
    for name in ("a", "b"):
        priv = tmp_path / "keys" / f"{name}.pem"
        out[name] = (priv, generate_key(priv))
    return out


def _cat(root, tmp_path, **kw) -> Catalog:
    return Catalog(root, cache_dir=tmp_path / "cache", **kw)


def _cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _refused(capsys, root, *args, needle):
    code, out, err = _cli(capsys, *args, "--root", root)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, (out, err)


def _caches(tmp_path):
    return tmp_path / "cache", tmp_path / "home" / "cache" / "catalog"


def test_signed_round_trip(root, tmp_path, keys, capsys):
    (priv, pub), _ = keys["a"], keys["b"]
    pub_res = _cat(root, tmp_path, sign_key=priv).publish(make_model(tmp_path / "m"), "m")
    trusting = _cat(root, tmp_path, trust=TrustPolicy(keys=(pub,), require=True))
    pulled = trusting.pull("m", tmp_path / "out")
    assert pulled.signed_by == fingerprint(pub.read_bytes())
    assert trusting.verify("m").signed_by == pulled.signed_by
    sig = (tmp_path / "out" / SIG).read_bytes()
    assert sig == trusting.store.read(f"models/m/{pub_res.version}/{SIG}")

    # The pulled dir verifies with model-signing itself (the signature pins MANIFEST.json).
    from model_signing import verifying

    verifying.Config().use_elliptic_key_verifier(public_key=pub).set_ignore_unsigned_files(True) \
        .verify(tmp_path / "out", tmp_path / "out" / SIG)
    statement = json.loads(base64.b64decode(json.loads(sig)["dsseEnvelope"]["payload"]))
    assert [r["name"] for r in statement["predicate"]["resources"]] == ["MANIFEST.json"]

    code, out, err = _cli(capsys, "pull", "m", str(tmp_path / "cli"), "--root", root, "--require-signed",
                          "--trusted-key", str(pub))
    assert code == 0 and f"signed by key {pulled.signed_by}" in out, err
    code, out, err = _cli(capsys, "verify", "m", "--root", root, "--require-signed", "--trusted-key", str(pub))
    assert code == 0 and "signed by key" in out, err


def test_unsigned_version_is_refused_under_a_policy(root, tmp_path, keys, capsys, monkeypatch):
    _, pub = keys["a"]
    _cat(root, tmp_path, sign_key=False).publish(make_model(tmp_path / "m"), "m")
    _cat(root, tmp_path).pull("m", tmp_path / "earlier")  # no policy: accepted
    before = snapshot(tmp_path)
    with pytest.raises(CatalogError, match="not signed"):
        _cat(root, tmp_path, trust=TrustPolicy(keys=(pub,), require=True)).pull("m", tmp_path / "out")
    _refused(capsys, root, "pull", "m", str(tmp_path / "out"), "--require-signed", "--trusted-key", str(pub),
             needle="not signed")
    _refused(capsys, root, "verify", "m", "--require-signed", "--trusted-key", str(pub), needle="not signed")
    _refused(capsys, root, "pull", "m", str(tmp_path / "out"), "--require-signed", needle="needs at least one")
    policy = tmp_path / "policy" / "trust.json"
    policy.parent.mkdir()
    policy.write_text(json.dumps({"require_signed": True, "trusted_keys": [os.path.relpath(pub, policy.parent)]}))
    monkeypatch.setenv("FACTORY_CATALOG_POLICY", str(policy))  # a serving node's standing policy
    before = snapshot(tmp_path)
    _refused(capsys, root, "pull", "m", str(tmp_path / "out"), needle="not signed")
    assert_untouched(before, snapshot(tmp_path), *_caches(tmp_path))
    assert not (tmp_path / "out").exists()


def _flip_signature(sig: bytes) -> bytes:
    bundle = json.loads(sig)
    raw = bytearray(base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"]))
    raw[len(raw) // 2] ^= 0x01
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    return json.dumps(bundle).encode()


def _swap_payload(sig: bytes, other: bytes) -> bytes:
    """The signature of one version with the statement (payload) of another."""
    bundle = json.loads(sig)
    bundle["dsseEnvelope"]["payload"] = json.loads(other)["dsseEnvelope"]["payload"]
    return json.dumps(bundle).encode()


@pytest.mark.parametrize("attack", ["resigned-by-other-key", "tampered-signature", "swapped-payload",
                                    "garbage", "copied-from-other-version", "forged-manifest"])
def test_wrong_signatures_are_refused(root, tmp_path, keys, capsys, hostile, attack):
    (priv_a, pub_a), (priv_b, _) = keys["a"], keys["b"]
    signer = _cat(root, tmp_path, sign_key=priv_a)
    res = signer.publish(make_model(tmp_path / "m", seed=1), "m")
    other = signer.publish(make_model(tmp_path / "o", seed=2), "other")
    trusting = _cat(root, tmp_path, trust=TrustPolicy(keys=(pub_a,), require=True))
    trusting.pull("m", tmp_path / "earlier")
    key = f"models/m/{res.version}/{SIG}"
    sig = trusting.store.read(key)
    other_sig = trusting.store.read(f"models/other/{other.version}/{SIG}")
    manifest = trusting.store.read(f"models/m/{res.version}/MANIFEST.json")
    needle = {"resigned-by-other-key": "signed by another key", "tampered-signature": "invalid signature",
              "swapped-payload": "signature", "garbage": "unreadable signature",
              "copied-from-other-version": "other MANIFEST.json bytes",
              "forged-manifest": "other MANIFEST.json bytes"}[attack]
    ref = "m"
    if attack == "resigned-by-other-key":
        hostile.write(key, Signer(priv_b).sign(manifest))
    elif attack == "tampered-signature":
        hostile.write(key, _flip_signature(sig))
    elif attack == "swapped-payload":
        hostile.write(key, _swap_payload(sig, other_sig))
    elif attack == "garbage":
        hostile.write(key, b'{"mediaType": "x"}')
    elif attack == "copied-from-other-version":
        hostile.write(key, other_sig)
    else:  # a self-consistent forgery of a new version, with a genuine signature beside it
        version, _ = hostile.forge("m", {"model.safetensors": b"evil weights", "config.json": b"{}"})
        hostile.write(f"models/m/{version}/{SIG}", sig)
    before = snapshot(tmp_path)
    with pytest.raises(CatalogError, match="signature does not verify") as e:
        trusting.pull(ref, tmp_path / "out")
    assert needle in str(e.value) and "\n" not in str(e.value)
    _refused(capsys, root, "pull", ref, str(tmp_path / "out"), "--trusted-key", str(pub_a), needle=needle)
    assert_untouched(before, snapshot(tmp_path), *_caches(tmp_path))


def test_ensemble_needs_signed_members(root, tmp_path, keys, capsys):
    (priv, pub) = keys["a"]
    unsigned = _cat(root, tmp_path, sign_key=False)
    signed = _cat(root, tmp_path, sign_key=priv)
    unsigned.publish(make_model(tmp_path / "g"), "g")
    signed.ensemble_spec([("g", "general")]).write(tmp_path / "ens")
    signed.publish(tmp_path / "ens", "e", kind="ensemble", user="alice")
    policy = TrustPolicy(keys=(pub,), require=True)
    with pytest.raises(CatalogError, match=r"g:\w+: not signed"):
        _cat(root, tmp_path, trust=policy).pull("e", tmp_path / "out", user="alice")
    assert not (tmp_path / "out").exists()
    signed.publish(tmp_path / "g", "g")  # same content: a no-op publish adds the missing signature
    got = _cat(root, tmp_path, trust=policy).pull("e", tmp_path / "out", user="alice")
    assert (got.members["g"] / SIG).is_file()


def test_default_key_is_created_once_and_never_logged(root, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.delenv("FACTORY_SIGNING_KEY", raising=False)
    with caplog.at_level(logging.DEBUG):
        code, out, err = _cli(capsys, "publish", str(make_model(tmp_path / "m")), "--name", "m", "--root", root)
    assert code == 0, err
    key = tmp_path / "home" / "keys" / "catalog-signing.pem"
    pub = key.with_name("catalog-signing.pub.pem")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and pub.is_file()
    body = "".join(key.read_text().splitlines()[1:-1])
    for chunk in (body[i:i + 16] for i in range(0, len(body), 16)):
        assert chunk not in caplog.text + out + err
    code, out, err = _cli(capsys, "pull", "m", str(tmp_path / "out"), "--root", root, "--require-signed",
                          "--trusted-key", str(pub))
    assert code == 0, err
    first = key.read_bytes()
    _cli(capsys, "publish", str(make_model(tmp_path / "m2", seed=5)), "--name", "m", "--root", root)
    assert key.read_bytes() == first  # never regenerated
    _refused(capsys, root, "publish", str(tmp_path / "m2"), "--name", "m", "--sign-key", str(tmp_path / "nokey"),
             needle="no such file")
