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
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

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
    if not path.is_file():
        raise StoreError(f"{path}: no such store; create it with `embedpipe extract DATA -o {path}`")
    try:
        return h5py.File(path, "r", libver="latest", swmr=True)
    except OSError as e:
        try:
            return h5py.File(path, "r")  # a store written by other HDF5 tools
        except OSError:
            raise StoreError(f"{path}: not a readable embedpipe store ({_first_line(e)}); move it "
                             "aside and extract again") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_schema(f: h5py.File, path: Path) -> None:
    if "features" not in f or "committed" not in f or "schema_version" not in f.attrs:
        raise StoreError(f"{path}: not an embedpipe feature store (no features/committed); "
                         "pass a file made by `embedpipe extract`")
    if int(f.attrs["schema_version"]) > SCHEMA_VERSION:
        raise StoreError(f"{path}: store schema {int(f.attrs['schema_version'])} is newer than "
                         f"this embedpipe ({SCHEMA_VERSION}); upgrade embedpipe")


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

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def identity(self) -> dict[str, Any]:
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


def open_store(path: str | Path, *, features: bool = True) -> FeatureStore:
    """Read a store: features (N×D), labels, paths, hashes, splits, classes, errors, meta."""
    path = Path(path)
    with _open_swmr_read(path) as f:
        _check_schema(f, path)
        n, n_err = (int(v) for v in f["committed"][:2])
        feats = (f["features"][:n] if features
                 else np.empty((n, f["features"].shape[1]), dtype=f["features"].dtype)[:0])
        return FeatureStore(
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
        )


def read_identity(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    with _open_swmr_read(path) as f:
        _check_schema(f, path)
        return {k: _decode(f.attrs.get(k)) for k in IDENTITY_KEYS}  # as stored (JSON strings)


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
    """Appends committed batches to a store; use as a context manager."""

    def __init__(self, path: Path, f: h5py.File):
        self.path = path
        self._f = f
        self.n, self.n_err = (int(v) for v in f["committed"][:2])
        self.classes = [_decode(c) for c in f["class_names"][:]]
        self._err_row = {_decode(p): i for i, p in enumerate(f["errors/path"][: self.n_err])}
        self._run_row: int | None = None

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, identity: dict[str, Any], *, versions: dict[str, str],
             progress: Any = None) -> "StoreWriter":
        """Open ``path`` for appending, creating it for ``identity`` if it does not exist.

        Fails with StoreMismatch when the store was made with another identity.
        """
        path = Path(path)
        if path.exists():
            stored = read_identity(path)
            msg = describe_mismatch(path, stored, identity)
            if msg:
                raise StoreMismatch(msg)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            _create(path, identity, versions)
        return cls(path, _open_swmr_write(path, progress))

    # -- reading what is there -----------------------------------------------------------
    def index(self) -> RowIndex:
        f, n, k = self._f, self.n, self.n_err
        paths = [_decode(p) for p in f["paths"][:n]]
        errs = {
            _decode(p): (_decode(r), _decode(h), int(m), int(s))
            for p, r, h, m, s in zip(*(f["errors/" + x][:k] for x in ERROR_FIELDS))
        }
        return RowIndex(
            row={p: i for i, p in enumerate(paths)},
            hash=[_decode(h) for h in f["hash"][:n]],
            mtime_ns=f["mtime_ns"][:n],
            size=f["size"][:n],
            label=f["labels"][:n],
            split=[_decode(s) for s in f["split"][:n]],
            errors=errs,
        )

    # -- writing -------------------------------------------------------------------------
    def class_ids(self, names: Iterable[str]) -> dict[str, int]:
        """Indices for class names, appending new ones (existing labels never change)."""
        new = sorted(set(names) - set(self.classes))
        if new:
            ds = self._f["class_names"]
            ds.resize((len(self.classes) + len(new),))
            ds[len(self.classes):] = new
            self.classes += new
            self._f.flush()
        return {c: i for i, c in enumerate(self.classes)}

    def append(self, features: np.ndarray, *, paths: Sequence[str], labels: Sequence[int],
               hashes: Sequence[str], splits: Sequence[str], mtime_ns: Sequence[int],
               size: Sequence[int]) -> None:
        """Append one batch and commit it (visible to readers, kept across a crash)."""
        b = len(paths)
        if b == 0:
            return
        f, lo, hi = self._f, self.n, self.n + len(paths)
        if features.shape != (b, f["features"].shape[1]):
            raise StoreError(f"{self.path}: batch of shape {features.shape} does not fit "
                             f"features (*, {f['features'].shape[1]})")
        cols = dict(labels=labels, paths=paths, hash=hashes, split=splits, mtime_ns=mtime_ns,
                    size=size)
        f["features"].resize(hi, axis=0)
        f["features"][lo:hi] = features.astype(f["features"].dtype, copy=False)
        for name in ROW_FIELDS:
            f[name].resize((hi,))
            f[name][lo:hi] = np.asarray(cols[name], dtype=f[name].dtype)
        self.n = hi
        self._commit()

    def overwrite(self, rows: Sequence[int], features: np.ndarray, *, hashes: Sequence[str],
                  labels: Sequence[int], splits: Sequence[str], mtime_ns: Sequence[int],
                  size: Sequence[int]) -> None:
        """Replace rows of changed files. Hash and stat go last: a crash in between leaves a
        row whose hash no longer matches its file, so the next run extracts it again."""
        if not len(rows):
            return
        order = np.argsort(rows)
        idx = np.asarray(rows)[order]
        self._f["features"][idx] = features[order].astype(self._f["features"].dtype, copy=False)
        self.relabel(rows, labels, splits)
        self.update_stat(rows, mtime_ns, size, hashes=hashes)

    def update_stat(self, rows: Sequence[int], mtime_ns: Sequence[int], size: Sequence[int],
                    *, hashes: Sequence[str] | None = None) -> None:
        """Refresh the recorded stat (and hash) of rows; for files whose content is unchanged."""
        if not len(rows):
            return
        order = np.argsort(rows)
        idx = np.asarray(rows)[order]
        if hashes is not None:
            self._f["hash"][idx] = np.asarray(hashes, dtype=_HASH)[order]
        self._f["mtime_ns"][idx] = np.asarray(mtime_ns)[order]
        self._f["size"][idx] = np.asarray(size)[order]
        self._f.flush()

    def relabel(self, rows: Sequence[int], labels: Sequence[int], splits: Sequence[str]) -> None:
        """Change label/split of rows (a manifest that now says otherwise); features stay."""
        if not len(rows):
            return
        order = np.argsort(rows)
        idx = np.asarray(rows)[order]
        self._f["labels"][idx] = np.asarray(labels)[order]
        self._f["split"][idx] = np.asarray(splits, dtype=object)[order]
        self._f.flush()

    def record_errors(self, entries: Sequence[tuple[str, str, str, int, int]]) -> None:
        """Record (path, reason, hash, mtime_ns, size) for files that could not be used."""
        if not entries:
            return
        f = self._f
        new = [e for e in entries if e[0] not in self._err_row]
        old = [e for e in entries if e[0] in self._err_row]
        for e in old:
            i = self._err_row[e[0]]
            for name, v in zip(ERROR_FIELDS, e):
                f["errors/" + name][i] = v
        if new:
            lo, hi = self.n_err, self.n_err + len(new)
            for j, name in enumerate(ERROR_FIELDS):
                ds = f["errors/" + name]
                ds.resize((hi,))
                ds[lo:hi] = np.asarray([e[j] for e in new], dtype=ds.dtype)
            for i, e in enumerate(new):
                self._err_row[e[0]] = lo + i
            self.n_err = hi
        self._commit()

    def forget_errors(self, paths: Iterable[str]) -> None:
        """Drop error records (file fixed or gone): rewrite the short error table compactly."""
        drop = set(paths) & set(self._err_row)
        if not drop:
            return
        f = self._f
        cols = {name: f["errors/" + name][: self.n_err] for name in ERROR_FIELDS}
        keep = [i for p, i in sorted(self._err_row.items(), key=lambda t: t[1]) if p not in drop]
        self.n_err = 0
        self._commit()  # readers see no errors while the table is rewritten
        for name in ERROR_FIELDS:
            ds = f["errors/" + name]
            ds[: len(keep)] = cols[name][keep]
            ds.resize((len(keep),))
        self._err_row = {_decode(cols["path"][i]): j for j, i in enumerate(keep)}
        self.n_err = len(keep)
        self._commit()

    def log_run(self, record: dict[str, Any]) -> None:
        """Append a run record, or update this run's record when called again."""
        ds = self._f["runs"]
        if self._run_row is None:
            self._run_row = ds.shape[0]
            ds.resize((self._run_row + 1,))
        ds[self._run_row] = json.dumps(record, sort_keys=True, default=str)
        self._f.flush()

    def _commit(self) -> None:
        self._f.flush()
        self._f["committed"][:] = [self.n, self.n_err]
        self._f.flush()

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _create(path: Path, identity: dict[str, Any], versions: dict[str, str]) -> None:
    dim = int(identity["feature_dim"])
    dtype = np.dtype(identity["dtype"])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with h5py.File(tmp, "w", libver="latest") as f:
        _make_layout(f, dim, dtype)
        for k in IDENTITY_KEYS:
            f.attrs[k] = identity[k]
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.attrs["versions"] = json.dumps(versions, sort_keys=True)
    os.replace(tmp, path)


def _make_layout(f: h5py.File, dim: int, dtype: np.dtype, n: int = 0, n_err: int = 0,
                 n_classes: int = 0, n_runs: int = 0) -> None:
    rows = _chunk_rows(dim, dtype.itemsize)
    f.create_dataset("features", shape=(n, dim), maxshape=(None, dim), dtype=dtype,
                     chunks=(rows, dim))
    for name in ROW_FIELDS:
        f.create_dataset(name, shape=(n,), maxshape=(None,), dtype=_row_dtype(name),
                         chunks=(4096,))
    for name in ERROR_FIELDS:
        f.create_dataset("errors/" + name, shape=(n_err,), maxshape=(None,),
                         dtype=_err_dtype(name), chunks=(256,))
    f.create_dataset("class_names", shape=(n_classes,), maxshape=(None,), dtype=_STR,
                     chunks=(256,))
    f.create_dataset("runs", shape=(n_runs,), maxshape=(None,), dtype=_STR, chunks=(64,))
    f.create_dataset("committed", data=np.array([n, n_err], dtype="i8"))


def _open_swmr_write(path: Path, progress: Any = None) -> h5py.File:
    """Open in SWMR-write mode directly (no unsafe window); recover after a dead writer."""
    from h5py import h5f, h5p

    def _open() -> h5py.File:
        fapl = h5p.create(h5p.FILE_ACCESS)
        fapl.set_libver_bounds(h5f.LIBVER_LATEST, h5f.LIBVER_LATEST)
        return h5py.File(h5f.open(os.fsencode(path), h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE,
                                  fapl=fapl))

    try:
        f = _open()
    except OSError as e:
        msg = str(e)
        if "lock" in msg.lower():
            raise StoreError(f"{path}: the store is open in another process (another extract "
                             "running?); wait for it to finish or pass another --out") from None
        if "already open for write" not in msg:
            raise StoreError(f"{path}: cannot open store for writing ({_first_line(e)}); move it "
                             "aside and extract again") from None
        # The last writer died. Its committed rows are intact and readable in SWMR-read mode;
        # copy them into a fresh file, since HDF5 refuses to reopen the marked file for writing.
        _recover(path, progress)
        f = _open()
    n, n_err = (int(v) for v in f["committed"][:2])
    for name in ("features", *ROW_FIELDS):  # drop rows of a batch that never committed
        if f[name].shape[0] != n:
            f[name].resize(n, axis=0)
    for name in ERROR_FIELDS:
        if f["errors/" + name].shape[0] != n_err:
            f["errors/" + name].resize((n_err,))
    return f


def _recover(path: Path, progress: Any = None) -> None:
    with _open_swmr_read(path) as src:
        _check_schema(src, path)
        n, n_err = (int(v) for v in src["committed"][:2])
        if progress:
            progress(f"recovering {path.name} after an interrupted run: keeping {n} committed rows")
        _rewrite(src, path, keep=None, n=n, n_err=n_err)


def _rewrite(src: h5py.File, path: Path, *, keep: np.ndarray | None, n: int, n_err: int,
             keep_err: np.ndarray | None = None) -> None:
    """Copy ``src`` (its first n rows, or the rows in ``keep``) into a fresh file at ``path``."""
    rows = np.arange(n) if keep is None else np.asarray(keep, dtype=np.int64)
    errs = np.arange(n_err) if keep_err is None else np.asarray(keep_err, dtype=np.int64)
    feats = src["features"]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    runs = src["runs"][:]
    classes = src["class_names"][:]
    with h5py.File(tmp, "w", libver="latest") as dst:
        _make_layout(dst, feats.shape[1], feats.dtype, len(rows), len(errs), len(classes),
                     len(runs))
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        step = max(1, _COPY_BLOCK_BYTES // max(1, feats.shape[1] * feats.dtype.itemsize))
        for lo in range(0, len(rows), step):
            sel = rows[lo:lo + step]
            contiguous = len(sel) and sel[-1] - sel[0] == len(sel) - 1
            block = (feats[sel[0]:sel[-1] + 1] if contiguous else feats[sel]) if len(sel) else None
            if block is not None:
                dst["features"][lo:lo + len(sel)] = block
        for name in ROW_FIELDS:
            if len(rows):
                dst[name][:] = src[name][:n][rows] if keep is not None else src[name][:n]
        for name in ERROR_FIELDS:
            if len(errs):
                dst["errors/" + name][:] = src["errors/" + name][:][errs]
        if len(classes):
            dst["class_names"][:] = classes
        if len(runs):
            dst["runs"][:] = runs
        dst["committed"][:] = [len(rows), len(errs)]
    os.replace(tmp, path)


def prune(path: str | Path, rows: set[str], errors: set[str] = frozenset()) -> list[str]:
    """Remove the rows whose path is in ``rows`` and the error records whose path is in
    ``errors``, by an atomic rewrite. Returns the removed row paths. The store must not be
    open for writing elsewhere."""
    path = Path(path)
    with _open_swmr_read(path) as src:
        _check_schema(src, path)
        n, n_err = (int(v) for v in src["committed"][:2])
        paths = [_decode(p) for p in src["paths"][:n]]
        epaths = [_decode(p) for p in src["errors/path"][:n_err]]
        keep = np.array([i for i, p in enumerate(paths) if p not in rows], dtype=np.int64)
        keep_err = np.array([i for i, p in enumerate(epaths) if p not in errors], dtype=np.int64)
        if len(keep) == n and len(keep_err) == n_err:
            return []
        _rewrite(src, path, keep=keep, n=n, n_err=n_err, keep_err=keep_err)
    return [p for p in paths if p in rows]


def merge(out: str | Path, inputs: Sequence[str | Path], *, versions: dict[str, str],
          block_rows: int = 8192, progress: Any = None) -> dict[str, int]:
    """Merge stores made with the same identity (e.g. ``extract --shard K/N`` workers) into
    ``out`` (created or extended). Rows already in ``out`` (same path and hash) are skipped;
    the same path with different content in two inputs is an error. Streams in blocks."""
    out = Path(out)
    identity = read_identity(inputs[0])
    for p in inputs[1:]:
        msg = describe_mismatch(Path(p), read_identity(p), identity)
        if msg:
            raise StoreMismatch(msg.replace("this run asks for", f"{inputs[0]} has"))
    counts = {"added": 0, "skipped": 0, "errors": 0}
    with StoreWriter.open(out, identity, versions=versions, progress=progress) as w:
        idx = w.index()
        have = {p: idx.hash[i] for p, i in idx.row.items()}
        all_classes: set[str] = set()
        for src_path in inputs:
            with _open_swmr_read(Path(src_path)) as src:
                all_classes.update(_decode(c) for c in src["class_names"][:])
        w.class_ids(all_classes)  # one sorted append, as a single extract run would do
        for src_path in inputs:
            with _open_swmr_read(Path(src_path)) as src:
                _check_schema(src, Path(src_path))
                n, n_err = (int(v) for v in src["committed"][:2])
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
                        if p in have:
                            if have[p] != h:
                                raise StoreError(f"{src_path}: {p} differs from the row already "
                                                 f"merged into {out}; merge shards of one data "
                                                 "snapshot, or re-extract that file")
                            counts["skipped"] += 1
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
                errs = [tuple(_decode(v) if not isinstance(v, np.integer) else int(v)
                              for v in row)
                        for row in zip(*(src["errors/" + x][:n_err] for x in ERROR_FIELDS))]
                errs = [e for e in errs if e[0] not in have]
                w.record_errors(errs)
                counts["errors"] += len(errs)
        w.log_run({"merged": [str(p) for p in inputs], "counts": counts,
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": "done"})
    return counts
