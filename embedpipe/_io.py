"""Writing output files safely: one implementation for every command that writes a file.

* **Atomic.** ``atomic_output(path)`` yields a temporary path beside ``path`` (same folder,
  so same file system); the caller writes it; on success it is renamed over ``path``
  (``os.replace``: a reader sees the old file or the new one, never half of one), on any
  failure it is removed and an older ``path`` is left as it was.
* **Checked before the work.** ``check_output(path, inputs)`` is every check that can be made
  before a command spends minutes: not an input, not a folder, not a feature store, and a
  folder it can write in.
* **Never over a feature store.** A head, CSV, ONNX or JSON file is never written over an
  HDF5 file (refuse_store): a typo in ``-o`` must not destroy hours of extraction.
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


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # the first 8 bytes of an HDF5 file (an embedpipe store)


def _is_hdf5(path: Path) -> bool:
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE
    return False


def refuse_store(out: str | Path, *, flag: str = "--out", kind: str = "this file") -> None:
    """Raise OutputError when ``out`` is an existing HDF5 file (a feature store: hours of
    extraction) that a command writing ``kind`` (a head, a CSV, an ONNX file) would replace."""
    out = Path(out)
    if out.is_file() and _is_hdf5(out):
        raise OutputError(f"{flag} {out}: is a feature store (HDF5); writing {kind} over it "
                          "would destroy its features: pass another path")


def check_output(out: str | Path, inputs: Iterable[str | Path | None] = (), *,
                 flag: str = "--out", kind: str = "this file", example: str = "out") -> None:
    """Every check of an output path that can be made before any work starts, so that a
    command does not fit, cross-validate or export for minutes and then fail to write: not one
    of ``inputs`` (refuse_inputs), not an existing folder (``example``: a file name to
    suggest in it), not a feature store (refuse_store), not a head file unless ``kind`` is
    "a head" (a refit replaces its head), and a folder this process can create a
    file in (a probe file, created and removed at once; a folder not made yet: its nearest
    existing parent must be writable). Raises OutputError, one line naming ``flag``."""
    out = Path(out)
    refuse_inputs(out, inputs, flag=flag)
    if out.is_dir():
        raise OutputError(f"{flag} {out}: is a folder; pass a file name such as "
                          f"{out / example}")
    refuse_store(out, flag=flag, kind=kind)
    if kind != "a head" and _is_head(out):
        raise OutputError(f"{flag} {out}: is a head file; writing {kind} over it would destroy "
                          "the fitted head: pass another path")
    check_writable(out, flag=flag)


def _is_head(path: Path) -> bool:
    """Whether ``path`` is an embedpipe head file (a skops zip holding schema.json and
    embedpipe's own members)."""
    import zipfile

    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return False
        with contextlib.suppress(zipfile.BadZipFile, OSError):
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            return "schema.json" in names and any(n.startswith("embedpipe/") for n in names)
    return False


def check_writable(out: str | Path, *, flag: str = "--out") -> None:
    """Raise OutputError unless this process can create ``out``'s folder or a file in it (a
    probe file, created and removed at once)."""
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.exists():
        up = folder
        while not up.exists() and up.parent != up:
            up = up.parent
        if not up.is_dir() or not os.access(up, os.W_OK | os.X_OK):
            raise OutputError(f"{flag} {out}: cannot create its folder ({up} is not a "
                              "writable folder); pass a path in a writable folder")
        return
    if not folder.is_dir():
        raise OutputError(f"{flag} {out}: {folder} is not a folder; pass another path")
    probe = tmp_path(out, "probe")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    except OSError as e:
        raise write_failed(out, e, flag=flag) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def refuse_among(out: str | Path, files: Iterable[str | Path], *, flag: str = "--out",
                 what: str = "one of the images given") -> None:
    """Raise OutputError when ``out`` is one of ``files`` (e.g. the images a folder or a
    manifest given as input holds): an input named on the command line is refused by
    refuse_inputs, an image inside an input folder only here, once the folder is read."""
    out = Path(out)
    try:
        target = out.resolve()
    except (OSError, RuntimeError):
        return
    for f in files:
        with contextlib.suppress(OSError, RuntimeError):
            if Path(f).resolve() == target:
                raise OutputError(f"{flag} {out}: that is {what} ({f}); writing it would "
                                  "destroy it: pass another output path")


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
    Removes temporaries of ``path`` left by killed runs first (clean_stale). A ``path`` that
    is a symlink writes the file it names (the link stays a link)."""
    path = Path(path)
    refuse_inputs(path, inputs, flag=flag)
    if path.is_symlink():  # write the file it names, not a regular file in the link's place
        path = Path(os.path.realpath(path))
    refuse_store(path, flag=flag)  # no command writes a store through here
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
