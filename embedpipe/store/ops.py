"""Whole-store operations: ``merge`` several stores of one identity into one, ``prune`` rows.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..provenance import diff_fields
from ._hdf5 import (
    _READ_ERRORS,
    _committed,
    _damaged,
    _lock,
    _lock_path,
    _make_parent,
    _open_swmr_read,
    _unlock,
)
from .read import read_identity, verify
from .schema import (
    ERROR_FIELDS,
    ROW_FIELDS,
    StoreError,
    StoreMismatch,
    _check_schema,
    _decode,
)
from .write import StoreWriter, _rewrite, _Unreadable


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
        diffs = diff_fields(identity, read_identity(p))
        if diffs:
            raise StoreMismatch(f"{p}: cannot merge with {inputs[0]}: made with other "
                                f"settings ({'; '.join(diffs[:4])}); merge only stores of one "
                                "backbone, weights, preprocessing and precision")
    if out.exists() and not rebuild:
        diffs = diff_fields(read_identity(out), identity)
        if diffs:
            raise StoreMismatch(f"{out}: cannot merge {inputs[0]} into it: made with other "
                                f"settings ({'; '.join(diffs[:4])}); pass another -o")
    for p in inputs:  # a damaged input fails here, before anything is written
        verify(p)
        with _open_swmr_read(Path(p)) as src:
            _check_labels(Path(p), src["labels"][:_committed(src)[0]], len(src["class_names"]))
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


def _check_labels(path: Path, labels: np.ndarray, n_classes: int) -> None:
    """Labels must index the store's class names (-1: unlabeled); else the store is damaged."""
    bad = np.flatnonzero((labels < -1) | (labels >= n_classes))
    if len(bad):
        raise StoreError(f"{path}: row {int(bad[0])} has label {int(labels[bad[0]])} but the "
                         f"store has {n_classes} class names ({len(bad)} such rows); the store "
                         "is damaged: extract its images again into a new store")


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
