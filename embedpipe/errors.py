"""The one base class of errors a user can fix: the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input, options or environment; str(e) is one line naming the file and the fix."""


RAY_MISSING = ("--engine ray needs Ray, which is not installed here: pip install "
               "'embedpipe[ray]' (or drop --engine ray to extract in-process)")


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of ``str(e)`` (its type name when the message is empty), cut to ``limit``
    characters: what a one-line error shows of an underlying exception."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if limit is None else text[:limit]
