"""User-facing catalog errors (CLI exit code 2)."""


class CatalogError(Exception):
    """Bad name, missing version, checksum mismatch, unreachable store: one clear line."""
