"""Writing a store, crash-safely.

A store is created complete under a temporary name and renamed into place; after that it is
only ever written in HDF5 SWMR mode, whose ordered metadata flushes keep the file readable even
if the writer is killed at any moment. Rows become visible only when the ``committed`` counter
that follows them is flushed. A writer that finds the file still marked open by a dead writer
copies the committed rows into a fresh file (atomically renamed), so a killed run costs nothing
but its unfinished batch.

Full disks: before each write the writer reserves the disk space the write may need
(fallocate with KEEP_SIZE on Linux, else a free-space check), so running out of space stops the
run with StoreFull before HDF5 writes anything, and the file closes cleanly with every
committed batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import h5py
import numpy as np

from ..errors import first_line
from ..provenance import IDENTITY_KEYS
from ._hdf5 import (
    _FALLOCATE,
    _NO_SPACE,
    no_space,
    _PUNCH_HOLE,
    _READ_ERRORS,
    _committed,
    _damaged,
    _lock,
    _make_parent,
    _open_swmr_read,
    _remove_stale_tmp,
    _swmr_fapl,
    _unlock,
    real_path,
)
from .read import read_identity
from .schema import (
    _DATASETS,
    _HASH,
    ERROR_FIELDS,
    FINETUNE_HASHES,
    ROW_FIELDS,
    SCHEMA_VERSION,
    STORE_ID,
    StoreBusy,
    StoreError,
    StoreFull,
    StoreMismatch,
    _check_schema,
    _decode,
    get_finetune_hashes,
    put_finetune_hashes,
    _identity_digest,
    _make_layout,
    describe_mismatch,
)

_COPY_BLOCK_BYTES = 64 << 20
# Reserve disk space before each write (see StoreWriter._reserve). Tests switch it off to reach
# HDF5's own out-of-space path.
_SPACE_RESERVE = True
_HDF5_BROKEN = False


def hdf5_broken() -> bool:
    """True after HDF5 failed to close a store whose write had failed (e.g. a disk that filled
    up behind the space reservation's back). The committed rows on disk are intact, but HDF5's
    in-memory state is not: it would print errors, and may crash, when the interpreter exits.
    The CLI ends the process with os._exit after printing its error line in that case."""
    return _HDF5_BROKEN


@dataclass
class RowIndex:
    """Where each committed path lives, with what the rerun logic needs to skip it."""

    row: dict[str, int]
    hash: list[str]
    mtime_ns: np.ndarray
    size: np.ndarray
    label: np.ndarray
    split: list[str]
    errors: dict[str, tuple[str, str, int, int]]  # path -> (reason, hash, mtime_ns, size)


class StoreWriter:
    """Appends committed batches to a store; use as a context manager.

    A writer holds the store's writer lock (see _lock) and keeps every dataset open: HDF5 then
    reports a chunk it cannot write at the flush that precedes the ``committed`` update, where
    closing a dataset after each use would swallow the error and let ``committed`` move past
    rows that never reached the disk. Every write first reserves the disk space it may need
    (see _reserve), so a full disk stops the run before HDF5 writes anything.
    """

    def __init__(self, path: Path, f: h5py.File, lock: int | None = None):
        self.path = path
        self._f = f
        self._lock = lock
        self._failed: StoreError | None = None
        self._ds = {name: f[name] for name in _DATASETS}
        self.n, self.n_err = _committed(f)
        self.classes = [_decode(c) for c in self._ds["class_names"][:]]
        self._err_row = {_decode(p): i
                         for i, p in enumerate(self._ds["errors/path"][: self.n_err])}
        self._run_row: int | None = None
        self._fd: int | None = None
        self._fallocate = _FALLOCATE is not None
        self._chunking: list[tuple[int, int]] | None = None
        self._space_needed(1)  # reads the chunk shapes while the file is open
        with contextlib.suppress(OSError):
            self._fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, identity: dict[str, Any], *, versions: dict[str, str],
             progress: Any = None, finetune_hashes: Any = None) -> "StoreWriter":
        """Open ``path`` for appending, creating it for ``identity`` if it does not exist.
        ``finetune_hashes``: for the weights of an `embedpipe finetune` run, the sha256 of the
        images it trained on (schema.put_finetune_hashes), written into a store that has no
        such record yet.

        Fails with StoreMismatch when the store was made with another identity, StoreBusy when
        another process is writing it.
        """
        path = Path(path)
        _make_parent(path)
        lock = _lock(path)  # beside the real file, whatever name `path` gives it
        path = real_path(path)  # recovery and rewrites rename onto the file, not a symlink
        try:
            _remove_stale_tmp(path)
            if path.exists():
                stored = read_identity(path)
                msg = describe_mismatch(path, stored, identity)
                if msg:
                    raise StoreMismatch(msg)
                if finetune_hashes is not None:
                    _add_finetune_hashes(path, finetune_hashes)
            else:
                _create(path, identity, versions, finetune_hashes)
            f = _open_swmr_write(path, progress)
            try:
                return cls(path, f, lock)
            except _READ_ERRORS as e:
                with contextlib.suppress(Exception):
                    f.close()
                raise _damaged(path, e) from None
        except BaseException:
            _unlock(lock)
            raise

    # -- reading what is there -----------------------------------------------------------
    def index(self) -> RowIndex:
        d, n, k = self._ds, self.n, self.n_err
        try:
            paths = [_decode(p) for p in d["paths"][:n]]
            errs = {
                _decode(p): (_decode(r), _decode(h), int(m), int(s))
                for p, r, h, m, s in zip(*(d["errors/" + x][:k] for x in ERROR_FIELDS))
            }
            return RowIndex(
                row={p: i for i, p in enumerate(paths)},
                hash=[_decode(h) for h in d["hash"][:n]],
                mtime_ns=d["mtime_ns"][:n],
                size=d["size"][:n],
                label=d["labels"][:n],
                split=[_decode(s) for s in d["split"][:n]],
                errors=errs,
            )
        except _READ_ERRORS as e:
            raise _damaged(self.path, e) from None

    # -- writing -------------------------------------------------------------------------
    def class_ids(self, names: Iterable[str]) -> dict[str, int]:
        """Indices for class names, appending new ones (existing labels never change)."""
        new = sorted(set(names) - set(self.classes))
        bad = [c for c in new if not c or "\0" in c]
        if bad:  # HDF5 would store it cut at the NUL, or blank, for good
            raise StoreError(f"{self.path}: class name {bad[0]!r} is empty or holds a NUL "
                             "character; fix the label in the data (nothing was written)")
        if new:
            with self._writing(len(new)):
                ds = self._ds["class_names"]
                ds.resize((len(self.classes) + len(new),))
                ds[len(self.classes):] = new
                self._f.flush()
            self.classes += new
        return {c: i for i, c in enumerate(self.classes)}

    def append(self, features: np.ndarray, *, paths: Sequence[str], labels: Sequence[int],
               hashes: Sequence[str], splits: Sequence[str], mtime_ns: Sequence[int],
               size: Sequence[int]) -> None:
        """Append one batch and commit it (visible to readers, kept across a crash)."""
        b = len(paths)
        if b == 0:
            return
        d, lo, hi = self._ds, self.n, self.n + len(paths)
        if features.shape != (b, d["features"].shape[1]):
            raise StoreError(f"{self.path}: batch of shape {features.shape} does not fit "
                             f"features (*, {d['features'].shape[1]})")
        cols = dict(labels=labels, paths=paths, hash=hashes, split=splits, mtime_ns=mtime_ns,
                    size=size)
        with self._writing(b):
            d["features"].resize(hi, axis=0)
            d["features"][lo:hi] = features.astype(d["features"].dtype, copy=False)
            for name in ROW_FIELDS:
                d[name].resize((hi,))
                d[name][lo:hi] = np.asarray(cols[name], dtype=d[name].dtype)
            self._commit(n=hi)

    def overwrite(self, rows: Sequence[int], features: np.ndarray, *, hashes: Sequence[str],
                  labels: Sequence[int], splits: Sequence[str], mtime_ns: Sequence[int],
                  size: Sequence[int]) -> None:
        """Replace rows of changed files. Hash and stat go last: a crash in between leaves a
        row whose hash no longer matches its file, so the next run extracts it again."""
        if not len(rows):
            return
        order = np.argsort(rows)
        idx = np.asarray(rows)[order]
        with self._writing(len(rows)):
            ds = self._ds["features"]
            ds[idx] = features[order].astype(ds.dtype, copy=False)
        self.relabel(rows, labels, splits)
        self.update_stat(rows, mtime_ns, size, hashes=hashes)

    def update_stat(self, rows: Sequence[int], mtime_ns: Sequence[int], size: Sequence[int],
                    *, hashes: Sequence[str] | None = None) -> None:
        """Refresh the recorded stat (and hash) of rows; for files whose content is unchanged."""
        if not len(rows):
            return
        order = np.argsort(rows)
        idx = np.asarray(rows)[order]
        with self._writing(len(rows)):
            if hashes is not None:
                self._ds["hash"][idx] = np.asarray(hashes, dtype=_HASH)[order]
            self._ds["mtime_ns"][idx] = np.asarray(mtime_ns)[order]
            self._ds["size"][idx] = np.asarray(size)[order]
            self._f.flush()

    def relabel(self, rows: Sequence[int], labels: Sequence[int], splits: Sequence[str]) -> None:
        """Change label/split of rows (a manifest that now says otherwise); features stay."""
        if not len(rows):
            return
        order = np.argsort(rows)
        idx = np.asarray(rows)[order]
        with self._writing(len(rows)):
            self._ds["labels"][idx] = np.asarray(labels)[order]
            self._ds["split"][idx] = np.asarray(splits, dtype=object)[order]
            self._f.flush()

    def record_errors(self, entries: Sequence[tuple[str, str, str, int, int]]) -> None:
        """Record (path, reason, hash, mtime_ns, size) for files that could not be used."""
        if not entries:
            return
        d = self._ds
        new = [e for e in entries if e[0] not in self._err_row]
        old = [e for e in entries if e[0] in self._err_row]
        with self._writing(len(entries)):
            for e in old:
                i = self._err_row[e[0]]
                for name, v in zip(ERROR_FIELDS, e):
                    d["errors/" + name][i] = v
            if new:
                lo, hi = self.n_err, self.n_err + len(new)
                for j, name in enumerate(ERROR_FIELDS):
                    ds = d["errors/" + name]
                    ds.resize((hi,))
                    ds[lo:hi] = np.asarray([e[j] for e in new], dtype=ds.dtype)
            self._commit(n_err=self.n_err + len(new))
        for i, e in enumerate(new):
            self._err_row[e[0]] = self.n_err - len(new) + i

    def forget_errors(self, paths: Iterable[str]) -> None:
        """Drop error records (file fixed or gone): rewrite the short error table compactly."""
        drop = set(paths) & set(self._err_row)
        if not drop:
            return
        d = self._ds
        with self._writing(0):
            cols = {name: d["errors/" + name][: self.n_err] for name in ERROR_FIELDS}
            keep = [i for p, i in sorted(self._err_row.items(), key=lambda t: t[1])
                    if p not in drop]
            self._commit(n_err=0)  # readers see no errors while the table is rewritten
            self._err_row = {}
            for name in ERROR_FIELDS:
                ds = d["errors/" + name]
                ds[: len(keep)] = cols[name][keep]
                ds.resize((len(keep),))
            self._commit(n_err=len(keep))
            self._err_row = {_decode(cols["path"][i]): j for j, i in enumerate(keep)}

    def log_run(self, record: dict[str, Any]) -> None:
        """Append a run record, or update this run's record when called again."""
        with self._writing(1):
            ds = self._ds["runs"]
            if self._run_row is None:
                ds.resize((ds.shape[0] + 1,))
                self._run_row = ds.shape[0] - 1
            ds[self._run_row] = json.dumps(record, sort_keys=True, default=str)
            self._f.flush()

    def _commit(self, n: int | None = None, n_err: int | None = None) -> None:
        """Flush everything written so far, then move the committed counter past it."""
        n = self.n if n is None else n
        n_err = self.n_err if n_err is None else n_err
        self._f.flush()
        self._ds["committed"][:] = [n, n_err]
        self._f.flush()
        self.n, self.n_err = n, n_err

    # -- failures and disk space ---------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self, rows: int) -> Iterator[None]:
        """Reserve space for a write of ``rows`` rows, then turn HDF5 write errors into one
        StoreError (StoreFull when the disk is full). Nothing is written after a failure."""
        if self._failed is not None:
            raise self._failed
        self._reserve(rows)
        try:
            yield
        except (OSError, RuntimeError) as e:
            if no_space(e):
                self._failed = self._full("No space left on device")
            else:
                self._failed = StoreError(
                    f"{self.path}: cannot write the store ({first_line(e, 160)}); the "
                    f"{self.n} rows committed before are kept: fix the cause and rerun the "
                    "same command to continue")
            raise self._failed from None

    def _full(self, why: str) -> StoreFull:
        return StoreFull(f"{self.path}: disk full ({why}); the {self.n} rows committed before "
                         "are kept: free space on that disk (or pass another --out) and rerun "
                         "the same command to continue")

    def _space_needed(self, rows: int) -> int:
        """Bytes one write of ``rows`` rows may add to the file: new chunks of every dataset
        (twice over), strings in the global heap, and 1 MiB for metadata."""
        if self._chunking is None:  # (chunk rows, bytes per row) of each chunked dataset
            self._chunking = [
                (ds.chunks[0], int(np.prod(ds.chunks[1:], dtype=np.int64))
                 * max(ds.dtype.itemsize, 16))
                for ds in self._ds.values() if ds.chunks is not None]
        total = 1 << 20
        for chunk_rows, per_row in self._chunking:
            total += (-(-max(rows, 1) // chunk_rows) + 1) * chunk_rows * per_row
        return total + rows * 4096

    def _reserve(self, rows: int) -> None:
        """Make sure the disk has room for the next write before HDF5 starts it.

        HDF5 cannot recover from running out of space in the middle of a flush (its file can
        no longer be closed, and it may crash at exit), so the space is claimed first: Linux
        allocates it past the end of the file without changing the file's size (fallocate
        KEEP_SIZE), and HDF5's writes then land in blocks that exist. Elsewhere, or on file
        systems without fallocate, the free space is checked instead (which another process
        can still take away in between)."""
        if not _SPACE_RESERVE:
            return
        need = self._space_needed(rows)
        if self._fd is not None and self._fallocate:
            try:
                _FALLOCATE(self._fd, os.fstat(self._fd).st_size, need)  # type: ignore[misc]
                return
            except OSError as e:
                if e.errno in _NO_SPACE:
                    raise self._full(e.strerror or "No space left on device") from None
                self._fallocate = False  # not supported here: check free space instead
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            return
        if free < need:
            raise StoreFull(f"{self.path}: not enough disk space for the next write "
                            f"({_mib(free)} free, up to {_mib(need)} needed: its new HDF5 "
                            f"chunks and metadata); the {self.n} rows committed before are "
                            "kept: free space on that disk (or pass another --out) and rerun "
                            "the same command to continue")

    def close(self) -> None:
        global _HDF5_BROKEN
        try:
            if self._f.id.valid:
                try:
                    self._f.close()
                except Exception as e:  # noqa: BLE001
                    if self._failed is None:
                        raise StoreError(f"{self.path}: cannot close the store "
                                         f"({first_line(e, 160)}); rerun the same command to "
                                         "continue") from None
                    # HDF5 failed mid-write and cannot close the file: keep its objects alive
                    # (their destructors would print errors) and let the CLI end the process.
                    _HDF5_BROKEN = True
                    _LEAKED.append((self._f, self._ds))
        finally:
            if self._fd is not None:
                if self._fallocate and _SPACE_RESERVE and not _HDF5_BROKEN:
                    # Give back what was reserved past the end: tmpfs and xfs free it with a
                    # punched hole, ext4 when the file is truncated to its own size.
                    with contextlib.suppress(OSError):
                        size = os.fstat(self._fd).st_size
                        if _PUNCH_HOLE is not None:
                            _PUNCH_HOLE(self._fd, size, 4 * self._space_needed(1))
                        os.ftruncate(self._fd, size)
                os.close(self._fd)
                self._fd = None
            _unlock(self._lock)
            self._lock = None

    def inherited_lock(self) -> int | None:
        """The writer lock's file descriptor, for a forked child (a loader worker) to close:
        a child keeps the lock held for as long as it lives, so an orphaned worker of a killed
        run would refuse the rerun as "another process is writing". Closing the child's copy
        leaves the parent's lock in place."""
        return self._lock

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
_LEAKED: list[Any] = []


def _add_finetune_hashes(path: Path, hashes: Any) -> None:
    """Add the fine-tuning record to an existing store that lacks it (one written before
    records, or from weights whose record was missing then), before the SWMR writer opens it
    (SWMR cannot create datasets). A store left marked by a dead writer is recovered first by
    the writer and keeps going without it: the record is a note's source, never a row's."""
    try:
        with h5py.File(path, "r") as f:
            if FINETUNE_HASHES in f:
                return
        with h5py.File(path, "r+", libver="latest") as f:
            put_finetune_hashes(f, hashes)
    except (OSError, RuntimeError):
        return


def _create(path: Path, identity: dict[str, Any], versions: dict[str, str],
            finetune_hashes: Any = None) -> None:
    dim = int(identity["feature_dim"])
    dtype = np.dtype(identity["dtype"])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w", libver="latest") as f:
            _make_layout(f, dim, dtype)
            for k in IDENTITY_KEYS:
                f.attrs[k] = identity[k]
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            f.attrs["versions"] = json.dumps(versions, sort_keys=True)
            f.attrs["identity_sha256"] = _identity_digest(f.attrs)
            f.attrs[STORE_ID] = uuid.uuid4().hex  # this file, whatever its name (schema.py)
            put_finetune_hashes(f, finetune_hashes)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _write_failed(path, e, "cannot create the store") from None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _write_failed(path: Path, e: BaseException, what: str) -> StoreError:
    if no_space(e):
        return StoreFull(f"{path}: disk full (No space left on device): {what}; free space on "
                         "that disk (or pass another --out) and rerun the same command")
    return StoreError(f"{path}: {what} ({first_line(e, 160)}); check that the folder is "
                      "writable and rerun the same command")


def _open_swmr_write(path: Path, progress: Any = None) -> h5py.File:
    """Open in SWMR-write mode directly (no unsafe window); recover after a dead writer."""
    from h5py import h5f

    def _open() -> h5py.File:
        return h5py.File(h5f.open(os.fsencode(path), h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE,
                                  fapl=_swmr_fapl()))

    try:
        f = _open()
    except OSError as e:
        msg = str(e)
        low = msg.lower()
        # HDF5's own file lock ("unable to lock file, errno = 11"); not any "lock" in the text:
        # a truncated file's message names "sblock->base_addr"
        if "unable to lock file" in low:
            raise StoreBusy(f"{path}: the store is open in another process (another extract "
                            "running?); wait for it to finish or pass another --out") from None
        if "already open for write" not in msg:
            if "permission denied" in low or "read-only file system" in low:
                raise _write_failed(path, e, "cannot open the store for writing") from None
            raise _damaged(path, e) from None  # truncated, not HDF5, a broken superblock
        # The last writer died (a live one would hold the lock we hold). Its committed rows are
        # intact and readable in SWMR-read mode; copy them into a fresh file, since HDF5 refuses
        # to reopen the marked file for writing.
        _recover(path, progress)
        f = _open()
    try:
        n, n_err = _committed(f)
        for name in ("features", *ROW_FIELDS):  # drop rows of a batch that never committed
            if f[name].shape[0] != n:
                f[name].resize(n, axis=0)
        for name in ERROR_FIELDS:
            if f["errors/" + name].shape[0] != n_err:
                f["errors/" + name].resize((n_err,))
    except _READ_ERRORS as e:
        with contextlib.suppress(Exception):
            f.close()
        raise _damaged(path, e) from None
    return f


def _recover(path: Path, progress: Any = None) -> None:
    try:
        with _open_swmr_read(path) as src:
            _check_schema(src, path)
            n, n_err = _committed(src)
            if progress:
                progress(f"recovering {path.name} after an interrupted run: keeping {n} "
                         "committed rows")
            try:
                _rewrite(src, path, keep=None, n=n, n_err=n_err)
            except _Unreadable:
                # A chunk the dead writer was rewriting is torn (its checksum fails): keep the
                # rows before it; the run extracts the others again.
                good = _readable_rows(src, n)
                if progress:
                    progress(f"{n - good} committed rows of {path.name} are in a damaged chunk "
                             "and will be extracted again")
                _rewrite(src, path, keep=None, n=good, n_err=n_err)
    except StoreError:
        raise
    except _READ_ERRORS as e:
        raise _damaged(path, e) from None


class _Unreadable(Exception):
    """Reading the source of a rewrite failed (the error is the cause)."""


def _read(fn: Any) -> Any:
    try:
        return fn()
    except (OSError, RuntimeError, ValueError) as e:
        raise _Unreadable(first_line(e)) from e


def _readable_rows(src: h5py.File, n: int) -> int:
    """How many leading rows of every row dataset read back without a checksum failure."""
    good = n
    for name in ("features", *ROW_FIELDS):
        ds = src[name]
        step = ds.chunks[0] if ds.chunks else max(1, n)
        for lo in range(0, good, step):
            try:
                ds[lo:min(good, lo + step)]
            except (OSError, RuntimeError, ValueError):
                good = lo
                break
    return good


def _rewrite(src: h5py.File, path: Path, *, keep: np.ndarray | None, n: int, n_err: int,
             keep_err: np.ndarray | None = None) -> None:
    """Copy ``src`` (its first n rows, or the rows in ``keep``) into a fresh file at ``path``.

    Raises _Unreadable when reading ``src`` fails, StoreError (StoreFull) when writing fails;
    the temporary file is removed either way."""
    rows = np.arange(n) if keep is None else np.asarray(keep, dtype=np.int64)
    errs = np.arange(n_err) if keep_err is None else np.asarray(keep_err, dtype=np.int64)
    feats = src["features"]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    runs = _read(lambda: src["runs"][:])
    classes = _read(lambda: src["class_names"][:])
    need = os.path.getsize(src.filename) + (1 << 20)
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path.parent).free
        if _SPACE_RESERVE and free < need:
            raise StoreFull(f"{path}: not enough disk space to rewrite the store "
                            f"({_mib(free)} free, about {_mib(need)} needed: a copy of it); "
                            "free space on that disk and "
                            "rerun the same command")
    try:
        with h5py.File(tmp, "w", libver="latest") as dst:
            _make_layout(dst, feats.shape[1], feats.dtype, len(rows), len(errs), len(classes),
                         len(runs))
            for k, v in src.attrs.items():
                dst.attrs[k] = v
            step = max(1, _COPY_BLOCK_BYTES // max(1, feats.shape[1] * feats.dtype.itemsize))
            for lo in range(0, len(rows), step):
                sel = rows[lo:lo + step]
                contiguous = sel[-1] - sel[0] == len(sel) - 1
                block = _read(lambda: feats[sel[0]:sel[-1] + 1] if contiguous else feats[sel])
                dst["features"][lo:lo + len(sel)] = block
            for name in ROW_FIELDS:
                if len(rows):
                    col = _read(lambda: src[name][:n][rows] if keep is not None
                                else src[name][:n])
                    dst[name][:] = col
            for name in ERROR_FIELDS:
                if len(errs):
                    col = _read(lambda: src["errors/" + name][:][errs])
                    dst["errors/" + name][:] = col
            if len(classes):
                dst["class_names"][:] = classes
            if len(runs):
                dst["runs"][:] = runs
            put_finetune_hashes(dst, _read(lambda: get_finetune_hashes(src)))
            dst["committed"][:] = [len(rows), len(errs)]
        os.replace(tmp, path)
    except _Unreadable:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _write_failed(path, e, "cannot rewrite the store") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
