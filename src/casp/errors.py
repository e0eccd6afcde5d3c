"""The one exception type that the CLI turns into a one-line message."""


class CaspError(Exception):
    """A user-facing error: bad input, unsupported model, impossible option."""


def first_line(exc: BaseException) -> str:
    """An exception as one line of text ("Type: first line of its message"), for wrapping it in a CaspError."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if isinstance(exc, CaspError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
