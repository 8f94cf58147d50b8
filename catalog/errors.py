"""User-facing catalog errors (CLI exit code 2)."""


class CatalogError(Exception):
    """Bad name, missing version, checksum mismatch, unreachable store: one clear line."""

    def __init__(self, message: str = ""):
        # One line, whatever a backend put into the message (the CLI prints it as is).
        super().__init__(" ".join(str(message).split()) if "\n" in str(message) else str(message))
