"""`factory catalog ...` subcommands (placeholder until the catalog issue lands)."""

import argparse

from catalog.errors import CatalogError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("catalog", help="object-store model catalog")
    p.set_defaults(func=_not_ready)


def _not_ready(args: argparse.Namespace) -> int:
    raise CatalogError("the catalog is not implemented yet")
