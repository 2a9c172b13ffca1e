"""Writing output files safely: one implementation for every command that writes a file.

* **Atomic.** ``atomic_output(path)`` yields a temporary path beside ``path`` (same folder,
  so same file system); the caller writes it; on success it is renamed over ``path``
  (``os.replace``: a reader sees the old file or the new one, never half of one), on any
  failure it is removed and an older ``path`` is left as it was.
* **Never over an input.** ``refuse_inputs(out, inputs)`` raises OutputError when ``out`` is
  one of the command's own inputs: the same resolved path, or the same file under another
  name (``os.path.samefile``: a symlink or a hard link to it).
* **One line on a full or read-only disk.** ENOSPC, EDQUOT, EROFS, EACCES and EPERM while
  writing become an OutputError naming the file and the fix (exit 2), not a traceback.
* **No stale temporaries.** Temporary names are ``.<name>.<pid>.embedpipe.tmp``; before
  writing ``path``, ``clean_stale(path)`` removes those of ``path`` whose owner process is
  gone (or that are over a day old); a killed run's leftovers go with the next run, and a
  live run's temporary file is never touched.

Standard library only (no numpy, no torch).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError

TMP_SUFFIX = ".embedpipe.tmp"
STALE_AFTER_S = 24 * 3600  # a temporary file older than this is stale even if its pid lives
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}


class OutputError(UserError):
    """An output that cannot or must not be written; one line naming it and the fix."""


def tmp_path(path: str | Path, tag: str = "") -> Path:
    """The temporary name of ``path`` for this process: ``.<name>[.tag].<pid>.embedpipe.tmp``
    in the same folder (recognised by clean_stale)."""
    path = Path(path)
    tag = f".{tag}" if tag else ""
    return path.with_name(f".{path.name}{tag}.{os.getpid()}{TMP_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale(path: str | Path) -> list[Path]:
    """Remove the temporary files that an earlier, killed run left for ``path``: names
    ``.<name>[.tag].<pid>.embedpipe.tmp`` whose pid is not a live process, or older than
    STALE_AFTER_S. Only our own pattern, only for this ``path``; returns what was removed."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(r"^\." + re.escape(path.name) + r"(\.[^/]*?)?\.(\d+)"
                         + re.escape(TMP_SUFFIX) + "$")
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = pattern.match(entry.name)
        if not m:
            continue
        with contextlib.suppress(OSError):
            old = now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            if old or not _pid_alive(int(m.group(2))):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same resolved path, or (both existing) the
    same inode (a symlink or hard link)."""
    a, b = Path(a), Path(b)
    with contextlib.suppress(OSError, RuntimeError):
        if a.resolve() == b.resolve():
            return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def refuse_inputs(out: str | Path, inputs: Iterable[str | Path | None], *,
                  flag: str = "--out") -> None:
    """Raise OutputError when ``out`` is one of ``inputs`` (by resolved path, symlink or hard
    link), before any work starts: writing it would destroy that input."""
    for given in inputs:
        if given is not None and str(given) != "-" and same_file(out, given):
            raise OutputError(f"{flag} {out}: that is an input of this command ({given}); "
                              "writing it would destroy it: pass another output path")


def write_failed(path: str | Path, e: OSError, *, flag: str = "--out") -> OutputError:
    """The one-line error for an OSError while writing ``path``."""
    code = getattr(e, "errno", None)
    folder = Path(path).parent
    if code in _FULL:
        free = ""
        with contextlib.suppress(OSError):
            free = f", {shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
        return OutputError(f"{flag} {path}: disk full ({e.strerror or 'No space left on device'}"
                           f"{free}); nothing was written and any older {Path(path).name} is "
                           "unchanged: free space on that disk or pass another path")
    if code in _DENIED:
        return OutputError(f"{flag} {path}: cannot write there ({e.strerror or e}); nothing was "
                           "written: pass a path in a writable folder")
    return OutputError(f"{flag} {path}: cannot write ({e.strerror or e}); nothing was written: "
                       "check the path and the disk, or pass another path")


@contextlib.contextmanager
def atomic_output(path: str | Path, *, inputs: Iterable[str | Path | None] = (),
                  flag: str = "--out", tag: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; rename it to ``path`` when the block
    ends without an exception, remove it otherwise. Refuses (OutputError) a ``path`` that is
    one of ``inputs``; an OSError of a full or read-only disk becomes one line (OutputError).
    Removes temporaries of ``path`` left by killed runs first (clean_stale)."""
    path = Path(path)
    refuse_inputs(path, inputs, flag=flag)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failed(path, e, flag=flag) from None
    clean_stale(path)
    tmp = tmp_path(path, tag)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        named = getattr(e, "filename", None)
        if named is not None and Path(named) not in (tmp, path):
            raise  # about another file (an input): not ours to explain
        if named is None and e.errno not in _FULL | _DENIED:
            raise
        raise write_failed(path, e, flag=flag) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes, **kw: object) -> Path:
    """``path.write_bytes(data)``, atomically (atomic_output)."""
    with atomic_output(path, **kw) as tmp:  # type: ignore[arg-type]
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str, **kw: object) -> Path:
    """``path.write_text(text)`` in UTF-8, atomically (atomic_output)."""
    return write_bytes(path, text.encode("utf-8"), **kw)
