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
    _reading,
    _unlock,
    real_path,
)
from .read import _union, read_identity, verify
from .schema import (
    ERROR_FIELDS,
    ROW_FIELDS,
    StoreError,
    StoreMismatch,
    _check_schema,
    _decode,
    get_finetune_hashes,
)
from .write import StoreWriter, _rewrite, _Unreadable


def prune(path: str | Path, rows: set[str], errors: set[str] = frozenset()) -> list[str]:
    """Remove the rows whose path is in ``rows`` and the error records whose path is in
    ``errors``, by an atomic rewrite. Returns the removed row paths. Takes the store's writer
    lock (StoreBusy while another process writes it)."""
    lock = _lock(Path(path))
    path = real_path(path)  # rewrite the file, not a symlink to it
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


ON_CONFLICT = ("error", "first", "qualify")


class MergeConflict(StoreError):
    """Stores to merge hold different images under one path."""


def merge(out: str | Path, inputs: Sequence[str | Path], *, versions: dict[str, str],
          block_rows: int = 8192, progress: Any = None, rebuild: bool = False,
          on_conflict: str = "error") -> dict[str, Any]:
    """Merge stores made with the same identity (model, weights, preprocessing, precision,
    TTA, dtype: e.g. ``extract --shard K/N`` workers or the Ray engine's shard stores) into
    ``out``, created or extended (``rebuild``: made afresh from the inputs alone, in a
    temporary file that atomically replaces ``out``).

    A path in several stores with the same content (hash) is kept once, the first row winning
    in the order ``out`` (when extended), then the inputs in argument order; a path that is a
    row anywhere is not an error record; of several error records of a path the first wins.
    A path that holds *different* images (a conflict: e.g. stores of two folders that both
    have ``cat/img000.jpg``) is decided by ``on_conflict``, checked before anything is
    written:

    * ``error`` (default): MergeConflict naming the count, an example and the two stores;
    * ``first``: the first row wins; each dropped row is recorded in the merged store's run
      record (``dropped``: path, the store it came from, its hash), which ``info`` shows;
    * ``qualify``: every row and error record of input i is stored under ``<name_i>/<path>``,
      name_i the input's file stem (``-2``, ``-3`` ... appended when stems repeat), so rows of
      different stores never share a path; a conflict left after that is refused as by error.

    Counts: added, skipped (duplicates with the same content), conflicts (list of dropped
    paths, ``first`` only), errors, qualified (input → name, ``qualify`` only), twice (rows
    added whose image another input, or ``out``, already holds under another path: qualify's
    ``<store>/<path>`` or another folder layout; twice_example: one such path). Streams in
    blocks of ``block_rows``."""
    out = Path(out)
    if not inputs:
        raise StoreError("merge: no input stores; pass the shard stores to merge")
    if on_conflict not in ON_CONFLICT:
        raise StoreError(f"--on-conflict {on_conflict}: pass one of {', '.join(ON_CONFLICT)}")
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
    # the record of the images a fine-tuned backbone was trained on travels with its rows
    # (one identity is one set of weights, so the inputs' records are one run's: their union)
    tuned = _union([_reading(Path(p), get_finetune_hashes) for p in inputs])
    prefixes = _qualifiers(inputs) if on_conflict == "qualify" else [""] * len(inputs)
    conflicts = _conflicts(out if out.exists() and not rebuild else None, inputs, prefixes)
    if conflicts and on_conflict != "first":
        path, first, other = conflicts[0]
        raise MergeConflict(
            f"{out}: {len(conflicts)} path(s) hold different images in different stores "
            f"(e.g. {path} in {first} and {other})"
            + (" even with paths qualified by store name" if on_conflict == "qualify" else "")
            + "; a merge would drop them: pass --on-conflict qualify to keep every image "
            "under <store name>/<path>, or --on-conflict first to keep the first of each "
            "(the dropped ones are recorded and listed by `embedpipe info`)")
    if not rebuild:
        with StoreWriter.open(out, identity, versions=versions, progress=progress,
                              finetune_hashes=tuned) as w:
            return _merge_into(w, out, inputs, block_rows, prefixes)
    _make_parent(out)
    lock = _lock(out)
    out = real_path(out)  # replace the file, not a symlink to it
    tmp = out.with_name(f".{out.name}.{os.getpid()}.merge.h5")
    try:
        for leftover in (tmp, _lock_path(tmp)):
            with contextlib.suppress(OSError):
                leftover.unlink()
        with StoreWriter.open(tmp, identity, versions=versions, progress=progress,
                              finetune_hashes=tuned) as w:
            counts = _merge_into(w, out, inputs, block_rows, prefixes)
        os.replace(tmp, out)
        return counts
    finally:
        for leftover in (tmp, _lock_path(tmp)):
            with contextlib.suppress(OSError):
                leftover.unlink()
        _unlock(lock)


def _qualifiers(inputs: Sequence[str | Path]) -> list[str]:
    """``<file stem>/`` per input store, made unique by ``-2``, ``-3`` ... in argument order."""
    out, used = [], set()
    for p in inputs:
        stem = Path(p).stem or "store"
        name, k = stem, 1
        while name in used:
            k += 1
            name = f"{stem}-{k}"
        used.add(name)
        out.append(name + "/")
    return out


def _conflicts(out: Path | None, inputs: Sequence[str | Path],
               prefixes: Sequence[str]) -> list[tuple[str, str, str]]:
    """(path, store holding its first row, store with another image under it) for every row
    a merge would drop; reads only the paths and hashes."""
    have: dict[str, tuple[str, str]] = {}
    found = []
    for where, prefix in ([(out, "")] if out is not None else []) + list(zip(inputs, prefixes)):
        with _open_swmr_read(Path(where)) as src:
            _check_schema(src, Path(where))
            n, _ = _committed(src)
            for p, h in zip(src["paths"][:n], src["hash"][:n]):
                p, h = prefix + _decode(p), _decode(h)
                if p not in have:
                    have[p] = (h, str(where))
                elif have[p][0] != h:
                    found.append((p, have[p][1], str(where)))
    return found


def _check_labels(path: Path, labels: np.ndarray, n_classes: int) -> None:
    """Labels must index the store's class names (-1: unlabeled); else the store is damaged."""
    bad = np.flatnonzero((labels < -1) | (labels >= n_classes))
    if len(bad):
        raise StoreError(f"{path}: row {int(bad[0])} has label {int(labels[bad[0]])} but the "
                         f"store has {n_classes} class names ({len(bad)} such rows); the store "
                         "is damaged: extract its images again into a new store")


def _merge_into(w: "StoreWriter", out: Path, inputs: Sequence[str | Path],
                block_rows: int, prefixes: Sequence[str]) -> dict[str, Any]:
    counts: dict[str, Any] = {"added": 0, "skipped": 0, "conflicts": [], "errors": 0}
    dropped: list[dict[str, str]] = []
    idx = w.index()
    have = {p: idx.hash[i] for p, i in idx.row.items()}
    all_classes: set[str] = set()
    for src_path in inputs:
        with _open_swmr_read(Path(src_path)) as src:
            all_classes.update(_decode(c) for c in src["class_names"][:])
    w.class_ids(all_classes)  # one sorted append, as a single extract run would do
    errors: dict[str, tuple[Any, ...]] = {}
    # rows of an image that another store (or the target) already holds under another path
    # (qualify's <store>/<path>, or another folder layout) are kept once per path: counted,
    # said, since cross-validation can then put a copy and its original in different folds
    holder = {h: -1 for h in have.values()}  # image hash -> the input that added it (-1: out)
    counts["twice"], counts["twice_example"] = 0, None
    for src_i, (src_path, prefix) in enumerate(zip(inputs, prefixes)):
        with _open_swmr_read(Path(src_path)) as src:
            _check_schema(src, Path(src_path))
            n, n_err = _committed(src)
            names = [_decode(c) for c in src["class_names"][:]]
            ids = w.class_ids(names)
            remap = np.array([ids[c] for c in names] + [-1], dtype=np.int64)
            for lo in range(0, n, block_rows):
                hi = min(n, lo + block_rows)
                cols = {k: src[k][lo:hi] for k in ROW_FIELDS}
                paths = [prefix + _decode(p) for p in cols["paths"]]
                hashes = [_decode(h) for h in cols["hash"]]
                take = []
                for j, (p, h) in enumerate(zip(paths, hashes)):
                    if p in have:  # the first row of a path wins
                        if have[p] == h:
                            counts["skipped"] += 1
                        else:
                            counts["conflicts"].append(p)
                            dropped.append({"path": p, "store": str(src_path), "hash": h})
                        continue
                    have[p] = h
                    take.append(j)
                    if holder.setdefault(h, src_i) != src_i:
                        counts["twice"] += 1
                        counts["twice_example"] = counts["twice_example"] or p
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
                e = (prefix + e[0], *e[1:])
                errors.setdefault(e[0], e)  # the first record of a path wins
    known = set(w.index().errors)  # records already in ``out`` stay as they are ...
    w.forget_errors(known & set(have))  # ... unless the path now has a row
    errs = [e for p, e in errors.items() if p not in have and p not in known]
    w.record_errors(errs)
    counts["errors"] = len(errs)
    qualified = {str(p): q.rstrip("/") for p, q in zip(inputs, prefixes) if q}
    if qualified:
        counts["qualified"] = qualified
    w.log_run({"merged": [str(p) for p in inputs],
               "counts": {**counts, "conflicts": len(counts["conflicts"])},
               "dropped": dropped, **({"qualified": qualified} if qualified else {}),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": "done"})
    return counts
