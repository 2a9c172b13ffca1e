"""The HDF5 feature store: schema, crash-safe append/resume, validation, and a read API.

Needs numpy + h5py only (never torch). Only this module knows the HDF5 layout:

  /features   float32|float16 (N, D), chunked by rows
  /labels     int32 (N,)         index into /class_names, -1 = unlabeled
  /paths      utf-8 str (N,)     path relative to the data root (or as written in a manifest)
  /hash       ascii (N,)         sha256 of the file's bytes
  /split      utf-8 str (N,)     train/val/test/... or "" when the data has no splits
  /mtime_ns, /size  int64 (N,)   stat of the file when extracted: lets a rerun skip hashing
  /class_names utf-8 str (C,)    class index → name (append-only, so labels never change meaning)
  /errors/{path,reason,hash,mtime_ns,size}   files that could not be used, and why
  /runs       utf-8 str (R,)     one JSON record per extract run (options, counts, versions)
  /committed  int64 (2,)         [rows, errors] that are complete; everything past them is junk
  attributes  identity (model, weights_source, weights_sha256, data_config, pool, feature_dim,
              precision, dtype), schema_version, created, versions

Crash safety: a store is created complete under a temporary name and renamed into place; after
that it is only ever written in HDF5 SWMR mode, whose ordered metadata flushes keep the file
readable even if the writer is killed at any moment. Rows become visible only when the
``committed`` counter that follows them is flushed. A writer that finds the file still marked
open by a dead writer copies the committed rows into a fresh file (atomically renamed), so a
killed run costs nothing but its unfinished batch.

One writer at a time: a writer holds an advisory lock (flock) on ``.<store>.lock`` beside the
store from before it creates or recovers the file until it closes it, so a second writer is
refused instead of mistaking a live writer for a dead one. Readers take no lock.

Full disks: before each write the writer reserves the disk space the write may need
(fallocate with KEEP_SIZE on Linux, else a free-space check), so running out of space stops the
run with StoreFull before HDF5 writes anything, and the file closes cleanly with every
committed batch. Fixed-size datasets carry HDF5 Fletcher-32 checksums, so damaged features are
refused when read instead of being used.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import h5py
import numpy as np

from .errors import UserError

SCHEMA_VERSION = 1
IDENTITY_KEYS = ("model", "weights_source", "weights_sha256", "data_config", "pool",
                 "feature_dim", "precision", "dtype")
ROW_FIELDS = ("labels", "paths", "hash", "split", "mtime_ns", "size")
ERROR_FIELDS = ("path", "reason", "hash", "mtime_ns", "size")
_STR = h5py.string_dtype("utf-8")
_HASH = h5py.string_dtype("ascii", 64)
_COPY_BLOCK_BYTES = 64 << 20


class StoreError(UserError):
    """A store cannot be used as asked; the message is one line naming the file and the fix."""


class StoreMismatch(StoreError):
    pass


class StoreBusy(StoreError):
    """Another process is writing the store."""


class StoreFull(StoreError):
    """The disk holding the store is full; committed rows are kept."""


# Fixed-size datasets get Fletcher-32 checksums (HDF5 cannot filter variable-length strings).
_CHECKSUMMED = ("features", "labels", "hash", "mtime_ns", "size")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
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


def _row_dtype(name: str) -> Any:
    return {"labels": "i4", "paths": _STR, "hash": _HASH, "split": _STR,
            "mtime_ns": "i8", "size": "i8"}[name]


def _err_dtype(name: str) -> Any:
    return {"path": _STR, "reason": _STR, "hash": _HASH, "mtime_ns": "i8", "size": "i8"}[name]


def _chunk_rows(dim: int, itemsize: int) -> int:
    return max(16, min(4096, (1 << 20) // max(1, dim * itemsize)))


def _decode(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.generic):
        return v.item()
    return v


def _open_swmr_read(path: Path) -> h5py.File:
    if path.is_dir():
        raise StoreError(f"{path}: is a folder, not a store; pass the .h5 file made by "
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
            raise StoreError(f"{path}: not a readable embedpipe store ({_first_line(e)}); move it "
                             "aside and extract again") from None


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


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_schema(f: h5py.File, path: Path) -> None:
    if "features" not in f or "committed" not in f or "schema_version" not in f.attrs:
        raise StoreError(f"{path}: not an embedpipe feature store (no features/committed); "
                         "pass a file made by `embedpipe extract`")
    if int(f.attrs["schema_version"]) > SCHEMA_VERSION:
        raise StoreError(f"{path}: store schema {int(f.attrs['schema_version'])} is newer than "
                         f"this embedpipe ({SCHEMA_VERSION}); upgrade embedpipe")
    digest = f.attrs.get("identity_sha256")
    if digest is not None and _decode(digest) != _identity_digest(f.attrs):
        raise StoreError(f"{path}: the store's identity attributes (model, weights, "
                         "preprocessing, ...) do not match their checksum: the file was edited "
                         "or is damaged; move it aside and run `embedpipe extract` again")


def _identity_digest(attrs: Any) -> str:
    """sha256 of the identity attributes as stored. HDF5 does not checksum attribute values
    (a store keeps them in a fractal heap), so this catches a damaged or naively edited
    identity; it is no signature: whoever edits the attributes can recompute it."""
    ident = {k: _decode(attrs.get(k)) for k in IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class FeatureStore:
    """A read-only snapshot of the committed rows of a store (numpy + h5py only)."""

    path: Path
    meta: dict[str, Any]
    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    hashes: list[str]
    splits: np.ndarray
    classes: list[str]
    errors: list[tuple[str, str]]
    runs: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)  # what stacking left out (see stack)
    block_rows: int = 0  # rows per HDF5 chunk of /features (the unit of a read); 0: unknown

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def features_loaded(self) -> bool:
        return len(self.features) == len(self.paths)

    def iter_feature_chunks(self, rows: np.ndarray, chunk_rows: int, *,
                            rng: np.random.Generator | None = None
                            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The features of ``rows`` (store row indices), ``chunk_rows`` rows at a time, as
        ``(positions, X)``: ``X[j]`` is the feature row ``rows[positions[j]]``. Memory is
        bounded by ``chunk_rows`` rows, never the store.

        Rows are grouped by the HDF5 chunk (``block_rows`` rows) that holds them, so every
        chunk is read (and checksummed) once per pass. Without ``rng`` the groups come in store
        order; with it, their order and the rows within each yielded chunk are shuffled, which
        mixes classes even in a store sorted by class folder. Reads from memory when the store
        was opened with its features (the same chunks in the same order), else from the file
        (opened once per pass; a damaged chunk raises StoreError)."""
        rows = np.asarray(rows, dtype=np.int64)
        if chunk_rows < 1:
            raise StoreError(f"chunk_rows {chunk_rows}: pass a positive number of rows")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise StoreError(f"{self.path}: row {int(rows.max())} is past the {len(self)} "
                             "committed rows")
        plan = _chunk_plan(rows, chunk_rows, self.block_rows or _chunk_rows(
            self.dim, self.features.dtype.itemsize), rng)
        if self.features_loaded:
            for batch in plan:
                yield batch, self.features[rows[batch]]
            return
        yield from _read_chunks(self.path, rows, plan, self.dim, self.features.dtype)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def identity(self) -> dict[str, Any]:
        """What made the features: backbone, weights, preprocessing, ... (IDENTITY_KEYS); for
        stacked stores ``{"stacked": [identity of each store], "feature_dim": total}``."""
        if "stacked" in self.meta:
            return {"stacked": self.meta["stacked"], "feature_dim": self.dim}
        return {k: self.meta.get(k) for k in IDENTITY_KEYS}

    def label_names(self) -> list[str | None]:
        return [self.classes[i] if i >= 0 else None for i in self.labels]

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}


def read_meta(f: h5py.File) -> dict[str, Any]:
    meta = {k: _decode(v) for k, v in f.attrs.items()}
    for k in ("data_config", "versions"):
        if isinstance(meta.get(k), str):
            meta[k] = json.loads(meta[k])
    return meta


class _Damaged(Exception):
    """The file opens but its content is inconsistent (see _committed)."""


# What reading a damaged file raises: HDF5 (checksum, truncation), bad strings and JSON.
_READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, _Damaged)


def _damaged(path: Path, e: BaseException) -> StoreError:
    why = _first_line(e)
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


def open_store(path: str | Path, *, features: bool = True) -> FeatureStore:
    """Read a store: features (N×D), labels, paths, hashes, splits, classes, errors, meta.

    A store that is damaged (checksum mismatch, truncated, inconsistent) raises StoreError."""
    path = Path(path)

    def read(f: h5py.File) -> FeatureStore:
        n, n_err = _committed(f)
        feats = (f["features"][:n] if features
                 else np.empty((0, f["features"].shape[1]), dtype=f["features"].dtype))
        store = FeatureStore(
            path=path,
            meta=read_meta(f),
            features=feats,
            labels=f["labels"][:n].astype(np.int64),
            paths=[_decode(p) for p in f["paths"][:n]],
            hashes=[_decode(h) for h in f["hash"][:n]],
            splits=np.array([_decode(s) for s in f["split"][:n]], dtype=object),
            classes=[_decode(c) for c in f["class_names"][:]],
            errors=[(_decode(p), _decode(r)) for p, r in
                    zip(f["errors/path"][:n_err], f["errors/reason"][:n_err])],
            runs=[json.loads(_decode(r)) for r in f["runs"][:]],
            block_rows=int((f["features"].chunks or (0,))[0]),
        )
        if len(store.labels) and not (-1 <= store.labels.min() and
                                      store.labels.max() < len(store.classes)):
            raise _Damaged(f"labels outside the {len(store.classes)} class names")
        return store

    return _reading(path, read)


def stack(stores: Sequence[FeatureStore]) -> FeatureStore:
    """The features of several stores of the same images side by side (e.g. two backbones):
    one row per path that every store holds, in the first store's order, its features the
    concatenation of each store's (in argument order). Labels and splits must agree; rows that
    some store lacks are left out, with a note saying how many."""
    if len(stores) == 1:
        return stores[0]
    first = stores[0]
    names = " + ".join(str(s.path) for s in stores)
    if len({str(s.path.resolve()) for s in stores}) < len(stores):
        raise StoreError(f"{names}: the same store is given twice; pass each store once")
    index = [{p: i for i, p in enumerate(s.paths)} for s in stores]
    common = [p for p in first.paths if all(p in m for m in index[1:])]
    if not common:
        raise StoreError(f"{names}: the stores share no image paths, so their features cannot "
                         "be stacked; extract the same folder with each backbone")
    rows = [np.array([m[p] for p in common], dtype=np.int64) for m in index]
    for s, r in zip(stores[1:], rows[1:]):
        mine = [first.classes[k] if k >= 0 else None for k in first.labels[rows[0]]]
        theirs = [s.classes[k] if k >= 0 else None for k in s.labels[r]]
        for p, a, b, sa, sb in zip(common, mine, theirs, first.splits[rows[0]], s.splits[r]):
            if a != b or sa != sb:
                raise StoreError(f"{p}: class {a!r} split {sa!r} in {first.path} but class "
                                 f"{b!r} split {sb!r} in {s.path}; stack stores extracted from "
                                 "the same labeled folder (or re-extract the stale one)")
    notes = [note for s, m in zip(stores, index) for note in
             ([f"note: {len(m) - len(common)} rows of {s.path} are not in every stacked store "
               "and are left out"] if len(m) > len(common) else [])]
    dtype = np.result_type(*(s.features.dtype for s in stores), np.float32)
    features = np.concatenate([s.features[r].astype(dtype, copy=False)
                               for s, r in zip(stores, rows)], axis=1)
    errors = list(dict.fromkeys(e for s in stores for e in s.errors))
    meta = {"stacked": [s.identity for s in stores], "stores": [str(s.path) for s in stores],
            "feature_dim": int(features.shape[1])}
    return FeatureStore(  # path: for messages only ("a.h5+b.h5"), never opened
        path=Path("+".join(str(s.path) for s in stores)), meta=meta, features=features, labels=first.labels[rows[0]],
        paths=common, hashes=[first.hashes[i] for i in rows[0]], splits=first.splits[rows[0]],
        classes=first.classes, errors=errors, runs=[], notes=notes)


def open_stores(paths: str | Path | Sequence[str | Path], *,
                features: bool = True) -> FeatureStore:
    """open_store for one path (``features=False``: features are read in chunks later, see
    FeatureStore.iter_feature_chunks); several are stacked side by side in memory (see stack),
    whatever ``features`` says."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if len(paths) == 1:
        return open_store(paths[0], features=features)
    return stack([open_store(p) for p in paths])


def _chunk_plan(rows: np.ndarray, chunk_rows: int, block: int,
                rng: np.random.Generator | None) -> list[np.ndarray]:
    """Positions into ``rows`` in read batches of at most ``chunk_rows``: rows grouped by the
    ``block``-row HDF5 chunk holding them, groups (and rows within a batch) shuffled by
    ``rng`` when given."""
    if not len(rows):
        return []
    order = np.argsort(rows, kind="stable")
    keys = rows[order] // max(1, block)
    groups = np.split(order, np.flatnonzero(np.diff(keys)) + 1)
    if chunk_rows < block:  # a batch smaller than an HDF5 chunk: split the groups
        groups = [g[i:i + chunk_rows] for g in groups for i in range(0, len(g), chunk_rows)]
    if rng is not None:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    plan: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    size = 0
    for g in groups:
        if size + len(g) > chunk_rows and batch:
            plan.append(np.concatenate(batch))
            batch, size = [], 0
        batch.append(g)
        size += len(g)
    if batch:
        plan.append(np.concatenate(batch))
    if rng is not None:
        plan = [p[rng.permutation(len(p))] for p in plan]
    return plan


def _read_chunks(path: Path, rows: np.ndarray, plan: list[np.ndarray], dim: int,
                 dtype: np.dtype) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Read the batches of ``plan`` from the file, a contiguous span per group of rows."""
    f = _open_swmr_read(path)
    try:
        try:
            _check_schema(f, path)
            n, _ = _committed(f)
            if len(rows) and rows.max() >= n:
                raise _Damaged(f"row {int(rows.max())} asked for, {n} committed")
            feats = f["features"]
        except _READ_ERRORS as e:
            raise _damaged(path, e) from None
        for batch in plan:
            store_rows = rows[batch]
            out = np.empty((len(batch), dim), dtype=dtype)
            # read each run of rows as one span: sort the batch by store row, split into runs
            # that share a span no longer than twice their length (one HDF5 chunk or so)
            srt = np.argsort(store_rows, kind="stable")
            sr = store_rows[srt]
            cuts = np.flatnonzero(np.diff(sr) > 1) + 1
            starts = np.concatenate([[0], cuts])
            ends = np.concatenate([cuts, [len(sr)]])
            try:
                for a, b in _spans(sr, starts, ends):
                    lo, hi = int(sr[a]), int(sr[b - 1]) + 1
                    block = feats[lo:hi]
                    out[srt[a:b]] = block[sr[a:b] - lo]
            except _READ_ERRORS as e:
                raise _damaged(path, e) from None
            yield batch, out
    finally:
        with contextlib.suppress(Exception):
            f.close()


def _spans(sr: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> Iterator[tuple[int, int]]:
    """Merge runs of consecutive rows (sorted ``sr``) into spans worth reading whole: a gap is
    bridged while the span stays at most twice the rows it delivers (plus 256)."""
    a = int(starts[0]) if len(starts) else 0
    for k in range(len(starts)):
        b = int(ends[k])
        nxt = k + 1
        if nxt < len(starts):
            span = int(sr[int(ends[nxt]) - 1]) - int(sr[a]) + 1
            if span <= 2 * (int(ends[nxt]) - a) + 256:
                continue  # bridge the gap to the next run
        yield a, b
        a = int(starts[nxt]) if nxt < len(starts) else b


def verify(path: str | Path, block_rows: int = 8192) -> int:
    """Read every committed row of a store block by block (checksums are checked on read);
    StoreError when it is damaged. Returns the number of rows."""
    path = Path(path)

    def read(f: h5py.File) -> int:
        n, n_err = _committed(f)
        for lo in range(0, n, block_rows):
            for name in ("features", *ROW_FIELDS):
                f[name][lo:min(n, lo + block_rows)]
        for name in ERROR_FIELDS:
            f["errors/" + name][:n_err]
        [json.loads(_decode(r)) for r in f["runs"][:]]
        return n

    return _reading(path, read)


def read_identity(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    return _reading(path, lambda f: {k: _decode(f.attrs.get(k)) for k in IDENTITY_KEYS})


def read_runs(path: str | Path) -> list[dict[str, Any]]:
    """The run records of a store, oldest first (without reading its rows)."""
    path = Path(path)
    return _reading(path, lambda f: [json.loads(_decode(r)) for r in f["runs"][:]])


def describe_mismatch(path: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    diffs = [k for k in IDENTITY_KEYS if _norm(stored.get(k)) != _norm(wanted.get(k))]
    if not diffs:
        return None
    parts = "; ".join(f"{k}: store has {stored.get(k)!r}, this run asks for {wanted.get(k)!r}"
                      for k in diffs[:3])
    return (f"{path}: store was made with other settings ({parts}); a store never mixes them — "
            "pass another --out, or the options the store was made with")


def _norm(v: Any) -> Any:
    if isinstance(v, str) and v[:1] in "{[":
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


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
             progress: Any = None) -> "StoreWriter":
        """Open ``path`` for appending, creating it for ``identity`` if it does not exist.

        Fails with StoreMismatch when the store was made with another identity, StoreBusy when
        another process is writing it.
        """
        path = Path(path)
        _make_parent(path)
        lock = _lock(path)
        try:
            _remove_stale_tmp(path)
            if path.exists():
                stored = read_identity(path)
                msg = describe_mismatch(path, stored, identity)
                if msg:
                    raise StoreMismatch(msg)
            else:
                _create(path, identity, versions)
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
            text = str(e)
            if getattr(e, "errno", None) in _NO_SPACE or any(
                    s in text for s in ("errno = 28", "errno = 122", "No space left",
                                        "Disk quota exceeded")):
                self._failed = self._full("No space left on device")
            else:
                self._failed = StoreError(
                    f"{self.path}: cannot write the store ({_first_line(e)[:160]}); the "
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
            raise self._full(f"{free // 1024} KiB free, the next write may need "
                             f"{need // 1024} KiB")

    def close(self) -> None:
        global _HDF5_BROKEN
        try:
            if self._f.id.valid:
                try:
                    self._f.close()
                except Exception as e:  # noqa: BLE001
                    if self._failed is None:
                        raise StoreError(f"{self.path}: cannot close the store "
                                         f"({_first_line(e)[:160]}); rerun the same command to "
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


_DATASETS = ("features", *ROW_FIELDS, *(f"errors/{x}" for x in ERROR_FIELDS), "class_names",
             "runs", "committed")
_LEAKED: list[Any] = []


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


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _lock(path: Path) -> int | None:
    """Take the store's writer lock (an flock on ``.<name>.lock`` beside it), or fail with
    StoreBusy. Returns the lock's file descriptor (None where advisory locks do not exist)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: HDF5's own file locking is all there is
        return None
    try:
        fd = os.open(_lock_path(path), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                     0o666)
    except OSError as e:
        raise StoreError(f"{path}: cannot create its lock file {_lock_path(path).name} "
                         f"({e.strerror}); pass an --out in a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StoreBusy(f"{path}: another process is writing this store (an `embedpipe "
                            "extract` or `merge` still running); wait for it to finish, or "
                            "pass another --out") from None
        return None  # the file system has no locks (ENOLCK, EOPNOTSUPP): HDF5's are left
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
            raise StoreBusy(f"{path}: another process is writing this store (an `embedpipe "
                            "extract` or `merge` still running); wait for it to finish, or "
                            "pass another --out") from None
    finally:
        os.close(fd)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{path.parent}: cannot create this folder for the store "
                         f"({e.strerror}); pass an --out in a writable place") from None


def _remove_stale_tmp(path: Path) -> None:
    """Remove temporary files of writers that died while creating or rewriting ``path``.
    Only called under the store's lock, when no other writer can be using one."""
    prefix = f".{path.name}."
    with contextlib.suppress(OSError):
        for name in os.listdir(path.parent):
            if name.startswith(prefix) and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    (path.parent / name).unlink()


def _create(path: Path, identity: dict[str, Any], versions: dict[str, str]) -> None:
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
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _write_failed(path, e, "cannot create the store") from None


def _write_failed(path: Path, e: BaseException, what: str) -> StoreError:
    text = str(e)
    if getattr(e, "errno", None) in _NO_SPACE or "errno = 28" in text or "No space left" in text:
        return StoreFull(f"{path}: disk full (No space left on device): {what}; free space on "
                         "that disk (or pass another --out) and rerun the same command")
    return StoreError(f"{path}: {what} ({_first_line(e)[:160]}); check that the folder is "
                      "writable and rerun the same command")


def _make_layout(f: h5py.File, dim: int, dtype: np.dtype, n: int = 0, n_err: int = 0,
                 n_classes: int = 0, n_runs: int = 0) -> None:
    rows = _chunk_rows(dim, dtype.itemsize)
    f.create_dataset("features", shape=(n, dim), maxshape=(None, dim), dtype=dtype,
                     chunks=(rows, dim), fletcher32=True)
    for name in ROW_FIELDS:
        f.create_dataset(name, shape=(n,), maxshape=(None,), dtype=_row_dtype(name),
                         chunks=(4096,), fletcher32=name in _CHECKSUMMED)
    for name in ERROR_FIELDS:
        f.create_dataset("errors/" + name, shape=(n_err,), maxshape=(None,),
                         dtype=_err_dtype(name), chunks=(256,))
    f.create_dataset("class_names", shape=(n_classes,), maxshape=(None,), dtype=_STR,
                     chunks=(256,))
    f.create_dataset("runs", shape=(n_runs,), maxshape=(None,), dtype=_STR, chunks=(64,))
    f.create_dataset("committed", data=np.array([n, n_err], dtype="i8"))


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
        if "lock" in msg.lower():
            raise StoreBusy(f"{path}: the store is open in another process (another extract "
                            "running?); wait for it to finish or pass another --out") from None
        if "already open for write" not in msg:
            raise StoreError(f"{path}: cannot open store for writing ({_first_line(e)}); move it "
                             "aside and extract again") from None
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
        raise _Unreadable(_first_line(e)) from e


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
            raise StoreFull(f"{path}: disk full ({free // 1024} KiB free): rewriting the store "
                            f"needs about {need // 1024} KiB; free space on that disk and "
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


def prune(path: str | Path, rows: set[str], errors: set[str] = frozenset()) -> list[str]:
    """Remove the rows whose path is in ``rows`` and the error records whose path is in
    ``errors``, by an atomic rewrite. Returns the removed row paths. Takes the store's writer
    lock (StoreBusy while another process writes it)."""
    path = Path(path)
    lock = _lock(path)
    try:
        with _open_swmr_read(path) as src:
            _check_schema(src, path)
            n, n_err = _committed(src)
            paths = [_decode(p) for p in src["paths"][:n]]
            epaths = [_decode(p) for p in src["errors/path"][:n_err]]
            keep = np.array([i for i, p in enumerate(paths) if p not in rows], dtype=np.int64)
            keep_err = np.array([i for i, p in enumerate(epaths) if p not in errors],
                                dtype=np.int64)
            if len(keep) == n and len(keep_err) == n_err:
                return []
            _rewrite(src, path, keep=keep, n=n, n_err=n_err, keep_err=keep_err)
    except (_Unreadable, *_READ_ERRORS) as e:
        raise _damaged(path, e.__cause__ or e) from None
    finally:
        _unlock(lock)
    return [p for p in paths if p in rows]


def identity_diffs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The provenance keys on which two identities differ, as ``key: a vs b`` (a differing
    data_config names its differing fields, e.g. ``data_config.input_size: [3, 224, 224] vs
    [3, 192, 192]``)."""
    out = []
    for k in IDENTITY_KEYS:
        va, vb = _norm(a.get(k)), _norm(b.get(k))
        if va == vb:
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            out += [f"{k}.{f}: {va.get(f, '(none)')!r} vs {vb.get(f, '(none)')!r}"
                    for f in sorted(set(va) | set(vb)) if va.get(f) != vb.get(f)]
        else:
            out.append(f"{k}: {va!r} vs {vb!r}")
    return out


def merge(out: str | Path, inputs: Sequence[str | Path], *, versions: dict[str, str],
          block_rows: int = 8192, progress: Any = None, rebuild: bool = False) -> dict[str, Any]:
    """Merge stores made with the same identity (model, weights, preprocessing, precision,
    TTA, dtype: e.g. ``extract --shard K/N`` workers or the Ray engine's shard stores) into
    ``out``, created or extended (``rebuild``: made afresh from the inputs alone, in a
    temporary file that atomically replaces ``out``).

    Duplicate paths are dropped deterministically: the first row of a path wins, in the order
    ``out`` (when extended), then the inputs in argument order; a path that is a row anywhere
    is not an error record; of several error records of a path the first wins. Counts:
    added, skipped (duplicates with the same content), conflicts (duplicates with other
    content: list of paths, the first kept), errors. Streams in blocks of ``block_rows``."""
    out = Path(out)
    if not inputs:
        raise StoreError("merge: no input stores; pass the shard stores to merge")
    identity = read_identity(inputs[0])
    for p in inputs[1:]:
        diffs = identity_diffs(identity, read_identity(p))
        if diffs:
            raise StoreMismatch(f"{p}: cannot merge with {inputs[0]}: made with other "
                                f"settings ({'; '.join(diffs[:4])}); merge only stores of one "
                                "backbone, weights, preprocessing and precision")
    if out.exists() and not rebuild:
        diffs = identity_diffs(read_identity(out), identity)
        if diffs:
            raise StoreMismatch(f"{out}: cannot merge {inputs[0]} into it: made with other "
                                f"settings ({'; '.join(diffs[:4])}); pass another -o")
    for p in inputs:  # a damaged input fails here, before anything is written
        verify(p)
    if not rebuild:
        with StoreWriter.open(out, identity, versions=versions, progress=progress) as w:
            return _merge_into(w, out, inputs, block_rows)
    _make_parent(out)
    lock = _lock(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.merge.h5")
    try:
        for leftover in (tmp, _lock_path(tmp)):
            with contextlib.suppress(OSError):
                leftover.unlink()
        with StoreWriter.open(tmp, identity, versions=versions, progress=progress) as w:
            counts = _merge_into(w, out, inputs, block_rows)
        os.replace(tmp, out)
        return counts
    finally:
        for leftover in (tmp, _lock_path(tmp)):
            with contextlib.suppress(OSError):
                leftover.unlink()
        _unlock(lock)


def _merge_into(w: "StoreWriter", out: Path, inputs: Sequence[str | Path],
                block_rows: int) -> dict[str, Any]:
    counts: dict[str, Any] = {"added": 0, "skipped": 0, "conflicts": [], "errors": 0}
    idx = w.index()
    have = {p: idx.hash[i] for p, i in idx.row.items()}
    all_classes: set[str] = set()
    for src_path in inputs:
        with _open_swmr_read(Path(src_path)) as src:
            all_classes.update(_decode(c) for c in src["class_names"][:])
    w.class_ids(all_classes)  # one sorted append, as a single extract run would do
    errors: dict[str, tuple[Any, ...]] = {}
    for src_path in inputs:
        with _open_swmr_read(Path(src_path)) as src:
            _check_schema(src, Path(src_path))
            n, n_err = _committed(src)
            names = [_decode(c) for c in src["class_names"][:]]
            ids = w.class_ids(names)
            remap = np.array([ids[c] for c in names] + [-1], dtype=np.int64)
            for lo in range(0, n, block_rows):
                hi = min(n, lo + block_rows)
                cols = {k: src[k][lo:hi] for k in ROW_FIELDS}
                paths = [_decode(p) for p in cols["paths"]]
                hashes = [_decode(h) for h in cols["hash"]]
                take = []
                for j, (p, h) in enumerate(zip(paths, hashes)):
                    if p in have:  # the first row of a path wins
                        if have[p] == h:
                            counts["skipped"] += 1
                        else:
                            counts["conflicts"].append(p)
                        continue
                    have[p] = h
                    take.append(j)
                if not take:
                    continue
                feats = src["features"][lo:hi][take]
                w.append(feats, paths=[paths[j] for j in take],
                         labels=remap[cols["labels"][take]],
                         hashes=[hashes[j] for j in take],
                         splits=[_decode(x) for x in cols["split"][take]],
                         mtime_ns=cols["mtime_ns"][take], size=cols["size"][take])
                counts["added"] += len(take)
            for row in zip(*(src["errors/" + x][:n_err] for x in ERROR_FIELDS)):
                e = tuple(int(v) if isinstance(v, np.integer) else _decode(v) for v in row)
                errors.setdefault(e[0], e)  # the first record of a path wins
    known = set(w.index().errors)  # records already in ``out`` stay as they are ...
    w.forget_errors(known & set(have))  # ... unless the path now has a row
    errs = [e for p, e in errors.items() if p not in have and p not in known]
    w.record_errors(errs)
    counts["errors"] = len(errs)
    w.log_run({"merged": [str(p) for p in inputs],
               "counts": {**counts, "conflicts": len(counts["conflicts"])},
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": "done"})
    return counts
