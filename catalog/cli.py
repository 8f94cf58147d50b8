"""``factory catalog ...`` (and ``python -m dlm_factory.catalog ...``): publish, pull, list, show, verify, gc.

The root is ``--root URL``, else ``$FACTORY_CATALOG``, else ``file://$FACTORY_HOME/catalog``.
Human tables by default, ``--json`` for machines. Any CatalogError prints one
``error: ...`` line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any

from dlm_factory.catalog.errors import CatalogError

KINDS = ("general", "specialist", "ensemble")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``catalog`` with its subcommands to the ``factory`` parser."""
    p = subparsers.add_parser("catalog", help="object-store model catalog",
                              description="Publish, pull and maintain models in the object-store catalog.")
    add_commands(p.add_subparsers(dest="catalog_command", required=True, metavar="COMMAND"))


def add_commands(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", metavar="URL", default=None,
                        help="catalog root: file:///dir or s3://bucket/prefix[?endpoint_url=..&region=..] "
                             "(default: $FACTORY_CATALOG, else file://$FACTORY_HOME/catalog)")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    user_help = "the ensemble's user id (ensembles live under ensembles/<user>/<name>)"

    p = sub.add_parser("publish", parents=[common], help="publish a model dir as a new version",
                       description="Upload DIR, verify it from the store, write MANIFEST.json, move latest. "
                                   "Publishing the same content again returns the existing version.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--name", required=True, help="model name (^[a-z0-9][a-z0-9._-]{0,63}$)")
    p.add_argument("--kind", choices=KINDS, default="general")
    p.add_argument("--user", metavar="ID", help="owner user id (required for ensembles)")
    p.add_argument("--base-model", metavar="NAME", help="card: base model (default: first parent)")
    p.add_argument("--relation", choices=("adapter", "merge", "quantized", "finetune"),
                   help="card: base_model_relation")
    p.add_argument("--parent", action="append", default=[], metavar="REF",
                   help="parent model: NAME[:VERSION] in this catalog, or sha256:<digest> (repeatable)")
    p.add_argument("--tag", action="append", default=[], help="card tag (repeatable)")
    p.add_argument("--license", default="apache-2.0")
    p.add_argument("--lineage", metavar="FILE", help="JSON file with lineage fields (data_digests, config, ...)")
    sign = p.add_mutually_exclusive_group()
    sign.add_argument("--sign-key", metavar="PEM",
                      help="EC private key that signs the version (default: $FACTORY_SIGNING_KEY, else "
                           "$FACTORY_HOME/keys/catalog-signing.pem, created on first use)")
    sign.add_argument("--no-sign", action="store_true", help="publish without a signature")
    p.set_defaults(func=_publish)

    trust = argparse.ArgumentParser(add_help=False)
    trust.add_argument("--trusted-key", action="append", default=[], metavar="PEM",
                       help="public key whose signatures are trusted (repeatable; also $FACTORY_TRUSTED_KEYS)")
    trust.add_argument("--require-signed", action="store_true",
                       help="refuse a version (or ensemble member) not signed by a trusted key")
    trust.add_argument("--policy", metavar="FILE",
                       help='trust policy JSON {"require_signed": true, "trusted_keys": [...]} '
                            "(default: $FACTORY_CATALOG_POLICY)")

    p = sub.add_parser("pull", parents=[common, trust], help="download and verify a version into DEST",
                       description="Resolve NAME[:VERSION] (default latest), download through the local cache, "
                                   "verify every sha256, then rename the complete dir to DEST. Ensemble "
                                   "members land in DEST/members/<name>/.")
    p.add_argument("ref", metavar="NAME[:VERSION]")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--user", metavar="ID", help=user_help)
    p.add_argument("--force", action="store_true", help="replace DEST if an earlier pull created it")
    p.set_defaults(func=_pull)

    p = sub.add_parser("list", parents=[common], help="list published models",
                       description="One row per name (its latest version); --all for every version.")
    p.add_argument("--kind", choices=KINDS)
    p.add_argument("--user", metavar="ID")
    p.add_argument("--base-model", metavar="NAME")
    p.add_argument("--name", metavar="NAME")
    p.add_argument("--all", action="store_true", help="every version, not only the latest")
    p.set_defaults(func=_list)

    p = sub.add_parser("show", parents=[common], help="show one version and its model card")
    p.add_argument("ref", metavar="NAME[:VERSION]")
    p.add_argument("--user", metavar="ID", help=user_help)
    p.set_defaults(func=_show)

    p = sub.add_parser("verify", parents=[common, trust], help="re-hash a stored version in place",
                       description="Exit 0 when every file (and every ensemble member) matches its manifest; "
                                   "exit 2 naming each bad file otherwise.")
    p.add_argument("ref", metavar="NAME[:VERSION]")
    p.add_argument("--user", metavar="ID", help=user_help)
    p.set_defaults(func=_verify)

    p = sub.add_parser("gc", parents=[common], help="remove staging leftovers and unreferenced versions",
                       description="Dry run unless --apply. Collects staging leftovers and versions not "
                                   "referenced by a latest pointer or an ensemble, older than --older-than.")
    p.add_argument("--apply", action="store_true", help="delete (default: only report)")
    p.add_argument("--older-than", type=float, default=24.0, metavar="HOURS",
                   help="only collect things older than this (default 24)")
    p.set_defaults(func=_gc)


def main(argv: list[str] | None = None) -> int:
    """``python -m dlm_factory.catalog``: the catalog subcommands without the rest of the factory."""
    parser = argparse.ArgumentParser(prog="python -m dlm_factory.catalog",
                                     description="Object-store model catalog: publish, pull, list, show, verify, gc.")
    add_commands(parser.add_subparsers(dest="catalog_command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except CatalogError as e:
        print(f"error: {printable(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
# Handlers


def _catalog(args):
    from dlm_factory.catalog.core import Catalog
    from dlm_factory.catalog.signing import TrustPolicy

    kw: dict[str, Any] = {}
    if getattr(args, "no_sign", False):
        kw["sign_key"] = False
    elif getattr(args, "sign_key", None):
        kw["sign_key"] = args.sign_key
    if hasattr(args, "trusted_key"):
        trust = TrustPolicy.build(args.trusted_key, args.require_signed, args.policy)
        kw["trust"] = trust if trust is not None else False
    return Catalog(args.root, **kw)


def _progress(args):
    return False if args.quiet or args.json else None


def _publish(args) -> int:
    lineage = None
    if args.lineage:
        from dlm_factory.catalog.schema import load_json

        try:
            with open(args.lineage, "rb") as f:
                raw = f.read(1 << 24)
        except OSError as e:
            raise CatalogError(f"--lineage {args.lineage}: {e.strerror or e}") from None
        lineage = load_json(raw, f"--lineage {args.lineage}")
        if not isinstance(lineage, dict):
            raise CatalogError(f"--lineage {args.lineage}: expected a JSON object")
    res = _catalog(args).publish(args.dir, args.name, kind=args.kind, user=args.user, base_model=args.base_model,
                                 base_model_relation=args.relation, parents=args.parent, tags=args.tag,
                                 license=args.license, lineage=lineage, progress=_progress(args))
    if args.json:
        _print_json(res.model_dump(mode="json"))
    else:
        what = "published" if res.created else "already published"
        print(f"{what} {res.ref}  {res.digest}  {_size(res.manifest.size)}  {res.url}")
    return 0


def _pull(args) -> int:
    res = _catalog(args).pull(args.ref, args.dest, user=args.user, force=args.force, progress=_progress(args))
    if args.json:
        _print_json(res.model_dump(mode="json", exclude={"manifest"}) | {"digest": res.manifest.digest})
    else:
        members = f", {len(res.members)} members" if res.members else ""
        signed = f", signed by key {res.signed_by}" if res.signed_by else ""
        print(f"pulled {res.ref} into {printable(res.path)} ({_size(res.downloaded_bytes)} downloaded, "
              f"{res.cached_files} files from cache{members}); every sha256 verified{signed}")
    return 0


def _list(args) -> int:
    rows = _catalog(args).list(kind=args.kind, user=args.user, base_model=args.base_model, name=args.name,
                               all_versions=args.all)
    if args.json:
        _print_json([r.model_dump(mode="json") for r in rows])
        return 0
    table = [[r.name, r.version + (" *" if r.latest else ""), r.kind, r.user or "-", printable(r.base_model or "-"),
              _size(r.size), r.created.strftime("%Y-%m-%d %H:%M")] for r in rows]
    print(_table(["NAME", "VERSION", "KIND", "USER", "BASE MODEL", "SIZE", "CREATED (UTC)"], table))
    if not rows:
        print("(no published models)")
    return 0


def _show(args) -> int:
    res = _catalog(args).show(args.ref, user=args.user)
    m = res.manifest
    if args.json:
        _print_json({"ref": res.ref, "url": res.url, "latest": res.latest,
                     "manifest": m.model_dump(mode="json"), "card": res.card})
        return 0
    lin = m.lineage
    rows = [["ref", res.ref + ("  (latest)" if res.latest else "")], ["url", res.url], ["kind", m.kind],
            ["user", m.user or "-"], ["digest", m.digest], ["size", f"{_size(m.size)} in {len(m.files)} files"],
            ["created", m.created.isoformat()], ["flow run", lin.flow_run_id or "-"],
            ["git sha", lin.git_sha or "-"], ["image", lin.image or "-"]]
    rows += [["base model", m.base_model or "-"], ["license", m.license], ["tags", ", ".join(m.tags) or "-"]]
    rows += [[f"data {k}", v] for k, v in sorted(lin.data_digests.items())]
    print(_table(["FIELD", "VALUE"], [[printable(a), printable(b)] for a, b in rows]))
    print()
    print(printable(res.card, keep="\n"))
    return 0


def _verify(args) -> int:
    res = _catalog(args).verify(args.ref, user=args.user, progress=_progress(args))
    if args.json:
        _print_json(res.model_dump(mode="json") | {"ok": True})
    else:
        members = f" (+ members {', '.join(res.members)})" if res.members else ""
        signed = f", signed by key {res.signed_by}" if res.signed_by else ""
        print(f"ok {res.ref}{members}: {res.files} files, {_size(res.bytes)}, every sha256 matches{signed}")
    return 0


def _gc(args) -> int:
    if not math.isfinite(args.older_than) or args.older_than < 0:
        raise CatalogError(f"--older-than must be a finite number of hours >= 0, not {args.older_than}")
    res = _catalog(args).gc(apply=args.apply, older_than_s=args.older_than * 3600.0)
    if args.json:
        _print_json(res.model_dump(mode="json") | {"bytes": res.bytes})
        return 0
    rows = [[i.what, printable(i.key), _size(i.bytes), f"{i.age_s / 3600:.1f}h", i.reason] for i in res.items]
    rows += [["skipped", printable(s.key), "-", "-", printable(s.reason)] for s in res.skipped]
    print(_table(["WHAT", "KEY", "SIZE", "AGE", "REASON"], rows))
    verb = "deleted" if res.applied else "would delete"
    hint = "" if res.applied else " (dry run: pass --apply to delete)"
    skipped = f"; skipped {len(res.skipped)} keys it cannot use" if res.skipped else ""
    print(f"{verb} {len(res.items)} items, {_size(res.bytes)}{hint}{skipped}")
    return 0


# ---------------------------------------------------------------------------------------------
# Output


def printable(value: object, keep: str = "") -> str:
    """``value`` as text with every control character escaped (what a bucket writer put into a
    manifest must not drive the terminal); characters in ``keep`` (e.g. newlines) stay."""
    text = str(value)
    if text.isprintable() and not keep:
        return text
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)
