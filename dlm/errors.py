"""The one user-facing error type of the core library."""


class FactoryError(Exception):
    """Bad input or an unusable artifact, reported as one clear line (CLI exit code 2).

    Raise it for anything the user can fix (a wrong path, an encoder-only model,
    empty data, a sequence longer than the model's positions). Bugs stay ordinary
    exceptions with tracebacks.
    """
