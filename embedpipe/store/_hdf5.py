"""HDF5 plumbing of the store: SWMR opening with bounded metadata retries, reads that retry a
snapshot and turn damage into one StoreError, the one-writer lock, and disk-space reservation.

One writer at a time: a writer holds an advisory lock (flock) on ``.<store>.lock`` beside the
store from before it creates or recovers the file until it closes it, so a second writer is
refused instead of mistaking a live writer for a dead one. Readers take no lock.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from pathlib import Path
from typing import Any

import h5py

from ..errors import first_line
from .schema import ERROR_FIELDS, ROW_FIELDS, StoreBusy, StoreError, _check_schema

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space(e: BaseException) -> bool:
    """Whether ``e`` says the disk (or the user's quota) is full: its errno, or the text HDF5
    puts in the errors it raises for a failed write (``errno = 28``/``122``)."""
    text = str(e)
    return getattr(e, "errno", None) in _NO_SPACE or any(
        s in text for s in ("errno = 28", "errno = 122", "No space left", "Disk quota exceeded"))


def _open_swmr_read(path: Path) -> h5py.File:
    if path.is_dir():
        raise StoreError(f"{path} is a folder, not a store; pass the .h5 file made by "
                         "`embedpipe extract`")
    if not path.is_file():
        raise StoreError(f"{path}: no such store; create it with `embedpipe extract DATA -o {path}`")
    try:
        from h5py import h5f

        return h5py.File(h5f.open(os.fsencode(path), h5f.ACC_RDONLY | h5f.ACC_SWMR_READ,
                                  fapl=_swmr_fapl()))
    except OSError as e:
        try:
            return h5py.File(path, "r")  # a store written by other HDF5 tools
        except OSError:
            import zipfile

            if zipfile.is_zipfile(path):  # a head file (skops: a zip) where a store belongs
                raise StoreError(f"{path} is a head file (made by `embedpipe fit`), not a "
                                 "store; pass the store (.h5) made by `embedpipe extract`, and "
                                 "use the head with `embedpipe predict`") from None
            other = _not_hdf5(path)
            if other is not None:
                raise StoreError(other) from None
            raise StoreError(f"{path}: not a readable embedpipe store ({first_line(e)}); move it "
                             "aside and extract again") from None


def _not_hdf5(path: Path) -> str | None:
    """The one-line error for a file given as a store that is no HDF5 file at all (an image, a
    features file, anything else), naming what to do instead; None for an HDF5 file (a damaged
    one is the caller's "move it aside" case: extracting again is the fix there, not here)."""
    try:
        if h5py.is_hdf5(path):
            return None
    except OSError:
        return None
    from ..data import IMAGE_EXTENSIONS
    from ..features_io import SUFFIXES as FEATURES_SUFFIXES

    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return (f"{path} is an image, not a feature store; make a store of the images "
                "(`embedpipe extract FOLDER -o store.h5`) and pass that, or classify images with "
                f"`embedpipe predict HEAD {path}`")
    if suffix in FEATURES_SUFFIXES:
        return (f"{path} is a features file, not a feature store; import it into one: "
                f"`embedpipe import-features {path} -o {path.with_suffix('.h5')}`")
    return (f"{path} is not an HDF5 file, so not a feature store; pass the .h5 file made by "
            "`embedpipe extract` (to extract into this path, move this file aside first)")


_SWMR_READ_ATTEMPTS = 16
_FAPL: list[Any] = []


def _swmr_fapl() -> Any:
    """File access properties for SWMR reading and writing: the latest format, no HDF5 file
    locks, and a bounded number of metadata read attempts.

    In SWMR mode HDF5 retries a metadata block whose checksum fails (a writer may be rewriting
    it), 100 times by default with an exponential back-off: on a damaged file that takes hours.
    16 attempts take microseconds; our reads retry whole snapshots instead (see _reading).
    h5py does not expose H5Pset_metadata_read_attempts, so it is called in the HDF5 library
    h5py loaded; where that library cannot be found, HDF5's default stays."""
    if _FAPL:
        return _FAPL[0]
    from h5py import h5f, h5p

    fapl = h5p.create(h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5f.LIBVER_LATEST, h5f.LIBVER_LATEST)
    # No HDF5 file locks: a SWMR reader's shared lock would make a writer that starts while it
    # reads fail to open the store. Writers exclude each other with the store's own lock
    # (_lock); SWMR is what makes reading during a write safe.
    with contextlib.suppress(AttributeError, ValueError):  # HDF5 < 1.12.1
        fapl.set_file_locking(False, True)
    try:
        import ctypes

        lib = _hdf5_library()
        if lib is not None:
            fn = ctypes.CDLL(lib).H5Pset_metadata_read_attempts
            fn.argtypes = [ctypes.c_int64, ctypes.c_uint]
            fn.restype = ctypes.c_int
            fn(fapl.id, _SWMR_READ_ATTEMPTS)
    except (ImportError, OSError, AttributeError):
        pass
    _FAPL.append(fapl)
    return fapl


def _hdf5_library() -> str | None:
    """Path of the libhdf5 this process loaded for h5py (Linux), else None."""
    try:
        with open("/proc/self/maps") as maps:
            libs = {line.split()[-1] for line in maps if "libhdf5" in line and ".so" in line}
    except OSError:
        return None
    libs = {p for p in libs if "libhdf5_hl" not in p and os.path.isfile(p)}
    return sorted(libs)[0] if len(libs) == 1 else None



class _Damaged(Exception):
    """The file opens but its content is inconsistent (see _committed)."""


# What reading a damaged file raises: HDF5 (checksum, truncation), bad strings and JSON.
_READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, _Damaged)


def _damaged(path: Path, e: BaseException) -> StoreError:
    why = first_line(e)
    if "filter returned failure" in why or "checksum" in why.lower():
        why = f"checksum mismatch: {why}"
    return StoreError(f"{path}: the store is damaged ({why[:200]}); its rows cannot be trusted: "
                      "move it aside and run `embedpipe extract` again")


def _reading(path: Path, read: Any, attempts: int = 3) -> Any:
    """Run ``read(f)`` on the store opened for SWMR reading; errors become one StoreError.

    A failure is retried: a reader can catch a chunk while a live writer rewrites it (its
    checksum then fails once), or the file while a recovering writer replaces it."""
    for attempt in range(attempts):
        try:
            with _open_swmr_read(path) as f:
                _check_schema(f, path)
                return read(f)
        except StoreError:
            raise
        except _READ_ERRORS as e:
            if attempt == attempts - 1:
                raise _damaged(path, e) from None
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def _committed(f: h5py.File) -> tuple[int, int]:
    """The committed [rows, errors], checked against what the datasets can hold."""
    n, n_err = (int(v) for v in f["committed"][:2])
    shortest = min(f[name].shape[0] for name in ("features", *ROW_FIELDS))
    shortest_err = min(f["errors/" + name].shape[0] for name in ERROR_FIELDS)
    if not (0 <= n <= shortest and 0 <= n_err <= shortest_err):
        raise _Damaged(f"the committed counter says {n} rows and {n_err} skipped files, the "
                       f"datasets hold {shortest} and {shortest_err}")
    dim = f.attrs.get("feature_dim")
    if dim is not None and int(dim) != f["features"].shape[1]:
        raise _Damaged(f"feature_dim attribute {int(dim)} but features have "
                       f"{f['features'].shape[1]} columns")
    return n, n_err


def _fallocate_fn(mode: int) -> Any:
    """fallocate(2) with ``mode`` as fn(fd, offset, length), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int

    def call(fd: int, offset: int, length: int) -> None:
        if fn(fd, mode, offset, length) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return call


_FALLOCATE = _fallocate_fn(0x01)  # FALLOC_FL_KEEP_SIZE
_PUNCH_HOLE = _fallocate_fn(0x01 | 0x02)  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def real_path(path: str | Path) -> Path:
    """The file a store name stands for: symlinks (of the file and of its folders) resolved,
    so that every name of one store locks, recovers and renames the same file."""
    return Path(os.path.realpath(path))


def _lock_path(path: Path) -> Path:
    """``.<name>.lock`` beside the real file (see real_path), whatever name ``path`` gives it."""
    real = real_path(path)
    return real.with_name(f".{real.name}.lock")


def _busy(path: Path) -> StoreBusy:
    real = real_path(path)
    also = f" (as {real})" if real != Path(os.path.abspath(path)) else ""
    return StoreBusy(f"{path}: another process is writing this store{also} (an `embedpipe "
                     "extract` or `merge` still running); wait for it to finish, or pass "
                     "another --out")


def _check_one_name(path: Path) -> None:
    """Refuse a store file with several hard links: the lock is a file beside one name, so a
    writer through another name would not see it (and a rewrite, renamed over one name,
    would split the names into two stores)."""
    try:
        links = os.stat(path).st_nlink
    except OSError:
        return  # not there yet
    if links > 1:
        raise StoreError(f"{path}: this store file has {links} hard links (other names for "
                         "the same file), which its one-writer lock cannot see; remove the "
                         "other links, or copy the store (cp) and write the copy")


def _lock(path: Path) -> int | None:
    """Take the store's writer lock (an flock on ``.<name>.lock`` beside the real file, symlinks
    resolved), or fail with StoreBusy; a store file with several hard links is refused
    (StoreError). Returns the lock's file descriptor (None where advisory locks do not
    exist)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: HDF5's own file locking is all there is
        return None
    lock_path = _lock_path(path)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        raise StoreError(f"{path}: cannot create its lock file {lock_path} "
                         f"({e.strerror}); pass a store path in a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _busy(path) from None
        return None  # the file system has no locks (ENOLCK, EOPNOTSUPP): HDF5's are left
    try:
        _check_one_name(path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def check_not_busy(path: str | Path) -> None:
    """Fail with StoreBusy now if another process is writing ``path`` (a cheap early check
    before slow set-up; StoreWriter.open checks again for real). Creates no file."""
    path = Path(path)
    try:
        import fcntl

        fd = os.open(_lock_path(path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except (ImportError, OSError):
        return  # no lock file: nobody has written this store yet
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _busy(path) from None
    finally:
        os.close(fd)
    _check_one_name(path)


def writer_alive(path: str | Path) -> bool | None:
    """Whether a process holds ``path``'s writer lock now (an extract or merge writing it):
    True, False, or None where this cannot be known (no advisory locks here). A run record
    that says "running" while no writer holds the lock is of a killed run. Creates no file;
    the probe takes a shared lock for an instant, as check_not_busy does."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(_lock_path(Path(path)), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False  # no lock file: no writer ever took it here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return True if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    finally:
        os.close(fd)
    return False


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{path.parent}: cannot create this folder for the store "
                         f"({e.strerror}); pass a store path in a writable place") from None


def _remove_stale_tmp(path: Path) -> None:
    """Remove temporary files of writers that died while creating or rewriting ``path``.
    Only called under the store's lock, when no other writer can be using one."""
    prefix = f".{path.name}."
    with contextlib.suppress(OSError):
        for name in os.listdir(path.parent):
            if name.startswith(prefix) and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    (path.parent / name).unlink()
