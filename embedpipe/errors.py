"""The one base class of errors a user can fix: the CLI prints them as one line and exits 2."""

from contextlib import contextmanager
from typing import Iterator


class UserError(Exception):
    """Bad input, options or environment; str(e) is one line naming the file and the fix."""


def located(e: UserError, where: str, why: str = "") -> UserError:
    """``e`` (the same class) as a line that begins with ``where``, the file it concerns, and
    ``why`` after it: '<where>: [<why>: ]<e without a leading "<where>: ">'."""
    text = str(e).removeprefix(f"{where}: ")
    if f"(stacked as {where}): " in text:  # it names the stacked store(s) already, first
        return e
    return type(e)(f"{where}: {why + ': ' if why else ''}{text}")


@contextmanager
def naming(where: str) -> Iterator[None]:
    """A UserError raised inside names ``where`` (the store being fitted on) first: the heads'
    own refusals (fewshot, --search, streaming) know the rows, not the file they came from."""
    try:
        yield
    except UserError as e:
        raise located(e, where) from None


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) during a head's fit (heads.fit._Quiet installs the handler that raises
    it). Not a KeyboardInterrupt, on purpose: scikit-learn's MLPClassifier catches
    KeyboardInterrupt, warns "Training interrupted by user" and returns the half-trained
    model, which `fit` would then save and `cv` would score; and not an Exception, so that no
    ``except Exception`` (GridSearchCV's error_score) turns it into a failed fit. The CLI treats
    it as Ctrl-C: exit 130, nothing written."""


class InterruptedRun(KeyboardInterrupt):
    """Ctrl-C (SIGINT) that a command caught to say what it kept and how to go on; str(e) is
    the one line the CLI prints instead of its generic one (exit 130). Still a
    KeyboardInterrupt, so a library caller's ``except KeyboardInterrupt`` sees Ctrl-C."""


RAY_MISSING = ("--engine ray needs Ray, which is not installed here: pip install "
               "'embedpipe[ray]' (or drop --engine ray to extract in-process)")


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of ``str(e)`` (its type name when the message is empty), cut to ``limit``
    characters: what a one-line error shows of an underlying exception."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if limit is None else text[:limit]
