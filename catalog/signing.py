"""Authenticity: signatures over MANIFEST.json with OpenSSF model-signing, and a trust policy.

Integrity (sha256 of every file, pinned by MANIFEST.json) says the bytes are the ones the
manifest names; it cannot say *who* wrote the manifest: anyone who can write the bucket can
write a self-consistent one. A signature can. Each published version gets
``MANIFEST.json.sig`` beside its manifest: a Sigstore bundle in model-signing's format whose
in-toto statement pins ``sha256(MANIFEST.json)``. The manifest pins the name, version,
content digest, every file's sha256, lineage and card, so one signature authenticates the
whole version; a stolen signature cannot be moved to another name or version.

- Signing is key-based by default (an EC private key in PEM: P-256/384/521), offline:
  ``--sign-key`` / ``$FACTORY_SIGNING_KEY`` (password, if any, in
  ``$FACTORY_SIGNING_KEY_PASSWORD``), else the embedded default key
  ``$FACTORY_HOME/keys/catalog-signing.pem``, created on first use (0600, with the public key
  beside it as ``catalog-signing.pub.pem``). Key material is never logged: only paths and
  fingerprints.
- Verification follows a :class:`TrustPolicy`: trusted public keys and whether a signature is
  required. Clusters that sign keyless with Sigstore pass a ``model_signing.signing.Config`` /
  ``model_signing.verifying.Config`` of their own (``signer=`` / ``TrustPolicy(verifiers=...)``).

model-signing is imported only when signing or verifying (it is not light to import).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlm_factory.catalog.errors import CatalogError
from dlm_factory.catalog.schema import MANIFEST_FILE
from dlm_factory.home import factory_home

log = logging.getLogger(__name__)

KEY_ENV = "FACTORY_SIGNING_KEY"
KEY_PASSWORD_ENV = "FACTORY_SIGNING_KEY_PASSWORD"
TRUSTED_KEYS_ENV = "FACTORY_TRUSTED_KEYS"  # os.pathsep-separated public key paths
POLICY_ENV = "FACTORY_CATALOG_POLICY"  # a JSON policy file (see TrustPolicy.load)
MAX_SIGNATURE_BYTES = 1 << 20


def default_key_path() -> Path:
    return factory_home() / "keys" / "catalog-signing.pem"


def public_key_path(private_key: Path) -> Path:
    name = private_key.name.removesuffix(".pem")
    return private_key.with_name(f"{name}.pub.pem")


def generate_key(path: str | os.PathLike) -> Path:
    """Create an EC P-256 private key at ``path`` (0600, never overwritten) and its public key
    beside it (``<name>.pub.pem``). Returns the public key path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # Written whole under a temp name, then linked into place: a concurrent first use sees no
    # key or a complete one, and exactly one key wins (FileExistsError for the others).
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    pub = public_key_path(path)
    tmp_pub = pub.with_name(f".{pub.name}.{os.getpid()}-{os.urandom(4).hex()}")
    tmp_pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    os.replace(tmp_pub, pub)
    return pub


def fingerprint(public_key_pem: bytes) -> str:
    """sha256 of the DER public key, 16 hex digits (what logs and results show of a key)."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except ValueError as e:
        raise CatalogError(f"not a PEM public key ({e.__class__.__name__})") from None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def _signing_config(key: Path):
    """A model-signing Config for the EC private key at ``key``."""
    from model_signing import signing

    if not key.is_file():
        raise CatalogError(f"signing key {key}: no such file")
    password = os.environ.get(KEY_PASSWORD_ENV) or None
    try:
        return signing.Config().use_elliptic_key_signer(private_key=key, password=password)
    except (ValueError, TypeError) as e:  # wrong password, not an EC key, unsupported curve
        raise CatalogError(f"signing key {key}: unusable ({_first_line(e)})") from None


def _hashing_config():
    from model_signing import hashing

    return hashing.Config().use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)


class Signer:
    """Signs MANIFEST.json bytes. ``key``: an EC private key PEM path; ``config``: any
    ``model_signing.signing.Config`` (e.g. Sigstore keyless on a cluster) instead."""

    def __init__(self, key: str | os.PathLike | None = None, *, config: Any = None):
        self.key = Path(key).expanduser() if key is not None else None
        self._config = config
        if config is None and self.key is None:
            raise CatalogError("a Signer needs a key path or a model_signing signing Config")

    @classmethod
    def default(cls) -> Signer:
        """``$FACTORY_SIGNING_KEY``, else the embedded default key (created on first use)."""
        env = os.environ.get(KEY_ENV)
        if env:
            return cls(env)
        key = default_key_path()
        if not key.exists():
            try:
                pub = generate_key(key)
                log.info("created the catalog signing key %s (public key: %s)", key, pub)
            except FileExistsError:  # another publisher created it first
                pass
        return cls(key)

    def __repr__(self) -> str:
        return f"Signer({str(self.key) if self.key else 'custom config'})"

    def prepare(self) -> Signer:
        """Load the key now (publish calls this before it uploads anything)."""
        if self._config is None:
            self._config = _signing_config(self.key)
        return self

    def sign(self, manifest_raw: bytes) -> bytes:
        config = self.prepare()._config
        config.set_hashing_config(_hashing_config())
        with tempfile.TemporaryDirectory(prefix="catalog-sign-") as tmp:
            model = Path(tmp) / "version"
            model.mkdir()
            (model / MANIFEST_FILE).write_bytes(manifest_raw)
            try:
                config.sign(model, Path(tmp) / "sig")
            except CatalogError:
                raise
            except Exception as e:  # noqa: BLE001 - the library raises many kinds; one line
                raise CatalogError(f"signing failed ({_first_line(e)})") from None
            return (Path(tmp) / "sig").read_bytes()


@dataclass(frozen=True)
class TrustPolicy:
    """Which signatures a reader accepts.

    ``keys``: trusted EC public key PEM paths. ``require``: every version read (an ensemble and
    each member) must carry a signature by one of them; unsigned or otherwise signed versions
    are refused. Without ``require``, a present signature is still checked (a wrong one is
    refused: someone changed the version), and an unsigned version is accepted.
    ``verifiers``: extra ``model_signing.verifying.Config`` objects (e.g. Sigstore keyless).
    """

    keys: tuple[Path, ...] = ()
    require: bool = False
    verifiers: tuple[Any, ...] = field(default=(), compare=False)

    def __post_init__(self):
        if self.require and not self.keys and not self.verifiers:
            raise CatalogError("--require-signed needs at least one trusted key (--trusted-key PEM)")
        for k in self.keys:
            if not Path(k).is_file():
                raise CatalogError(f"trusted key {k}: no such file")

    @property
    def active(self) -> bool:
        return bool(self.keys or self.verifiers)

    @classmethod
    def build(cls, keys: Iterable[str | os.PathLike] = (), require: bool = False,
              policy_file: str | os.PathLike | None = None) -> TrustPolicy | None:
        """Explicit keys/require, plus ``policy_file`` (or ``$FACTORY_CATALOG_POLICY``) and
        ``$FACTORY_TRUSTED_KEYS``. None when nothing is configured."""
        keys = [Path(k).expanduser() for k in keys]
        env_keys = os.environ.get(TRUSTED_KEYS_ENV)
        if env_keys:
            keys += [Path(k).expanduser() for k in env_keys.split(os.pathsep) if k]
        policy_file = policy_file or os.environ.get(POLICY_ENV) or None
        if policy_file:
            loaded = cls.load(policy_file)
            keys += list(loaded.keys)
            require = require or loaded.require
        if not keys and not require:
            return None
        return cls(keys=tuple(dict.fromkeys(keys)), require=require)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrustPolicy:
        """A JSON policy file: ``{"require_signed": true, "trusted_keys": ["pub.pem", ...]}``
        (relative key paths are relative to the file)."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError) as e:
            raise CatalogError(f"trust policy {path}: unreadable ({_first_line(e)})") from None
        if not isinstance(data, dict) or set(data) - {"require_signed", "trusted_keys"} \
                or not isinstance(data.get("trusted_keys", []), list) \
                or not all(isinstance(k, str) for k in data.get("trusted_keys", [])) \
                or not isinstance(data.get("require_signed", False), bool):
            raise CatalogError(f"trust policy {path}: expected {{\"require_signed\": bool, "
                               f"\"trusted_keys\": [paths]}}")
        keys = tuple((path.parent / k).expanduser() for k in data.get("trusted_keys", []))
        return cls(keys=keys, require=bool(data.get("require_signed", False)))

    def check(self, where: str, manifest_raw: bytes, signature: bytes | None) -> str | None:
        """Check ``signature`` over ``manifest_raw``: the trusted key's fingerprint, None when
        unsigned and not required; CatalogError (one line) otherwise."""
        if signature is None:
            if self.require:
                raise CatalogError(f"{where}: not signed, and a signature is required (--require-signed)")
            return None
        if len(signature) > MAX_SIGNATURE_BYTES:
            raise CatalogError(f"{where}: signature is larger than {MAX_SIGNATURE_BYTES} bytes")
        from model_signing import verifying

        reasons = []
        with tempfile.TemporaryDirectory(prefix="catalog-verify-") as tmp:
            model = Path(tmp) / "version"
            model.mkdir()
            (model / MANIFEST_FILE).write_bytes(manifest_raw)
            sig = Path(tmp) / "sig"
            sig.write_bytes(signature)
            candidates = [(str(k), lambda k=k: verifying.Config().use_elliptic_key_verifier(public_key=k))
                          for k in self.keys]
            candidates += [(f"verifier {i}", lambda v=v: v) for i, v in enumerate(self.verifiers)]
            for name, make in candidates:
                try:
                    config = make()
                    config.set_hashing_config(_hashing_config())
                    config.verify(model, sig)
                except Exception as e:  # noqa: BLE001 - key mismatch, bad bundle, bad signature
                    reasons.append(_reason(e))
                    continue
                if name.startswith("verifier "):
                    return name
                return fingerprint(Path(name).read_bytes())
        why = "; ".join(dict.fromkeys(reasons)) or "no trusted key"
        raise CatalogError(f"{where}: signature does not verify with any trusted key ({why[:300]})")


def _reason(e: BaseException) -> str:
    text = _first_line(e)
    if "Key mismatch" in text or "public key hash" in text:
        return "signed by another key"
    if "Signature mismatch" in text or "Hash mismatch" in text:
        return "signature is for other MANIFEST.json bytes"
    if "InvalidSignature" in type(e).__name__ or "signature" in text.lower():
        return "invalid signature"
    return f"unreadable signature ({type(e).__name__})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
