"""The one exception type that the CLI turns into a one-line message."""


class CaspError(Exception):
    """A user-facing error: bad input, unsupported model, impossible option."""
