"""The one base class of errors a user can fix: the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input, options or environment; str(e) is one line naming the file and the fix."""


RAY_MISSING = ("--engine ray needs Ray, which is not installed here: pip install "
               "'embedpipe[ray]' (or drop --engine ray to extract in-process)")
