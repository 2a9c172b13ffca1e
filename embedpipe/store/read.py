"""Reading a store: a read-only snapshot of its committed rows (``open_store``), several stores
side by side (``stack``, ``open_stores``), and feature reads in bounded chunks.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from ..provenance import IDENTITY_KEYS
from ._hdf5 import (
    _READ_ERRORS,
    _committed,
    _Damaged,
    _damaged,
    _open_swmr_read,
    _reading,
)
from .schema import (
    ERROR_FIELDS,
    FINETUNE_HASHES,
    ROW_FIELDS,
    STORE_ID,
    StoreError,
    _check_schema,
    _chunk_rows,
    _decode,
    get_finetune_hashes,
    read_meta,
)


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
    # sha256 (sorted S64) of the images the store's backbone was fine-tuned on (`embedpipe
    # finetune` weights; stacked: any member's); None for other weights (schema.py)
    finetune_hashes: np.ndarray | None = None

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
        bounded by ``max(chunk_rows, mixing window)`` rows, never the store.

        Rows are grouped by the HDF5 chunk (``block_rows`` rows) that holds them, so every
        chunk is read (and checksummed) once per pass. Without ``rng`` the groups come in store
        order. With it (a training epoch) their order is shuffled, and the rows are read in
        windows of at least ``MIX_BYTES`` of features (16 HDF5 chunks of 1 MiB; 3,276 rows at
        1280-d float32) whose rows are shuffled together before they are handed out
        ``chunk_rows`` at a time: in a store sorted by class folder one HDF5 chunk holds one or
        two classes, so chunks smaller than that window would hand stochastic gradient descent
        a run of one class at a time (bench/results/streaming.md, 10k Fashion-MNIST Lite0 rows,
        256-row chunks: logreg-sgd 0.840 without the window, 0.861 with it, 0.870 in one
        chunk; tests/test_sgd.py checks that every handed-out chunk mixes classes).
        Reads from memory when the store was opened with its features (the same chunks in the
        same order), else from the file (opened once per pass; a damaged chunk raises
        StoreError)."""
        rows = np.asarray(rows, dtype=np.int64)
        if chunk_rows < 1:
            raise StoreError(f"chunk_rows {chunk_rows}: pass a positive number of rows")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise StoreError(f"{self.path}: row {int(rows.max())} is past the {len(self)} "
                             "committed rows")
        read_rows = chunk_rows
        if rng is not None:  # a training epoch: read whole mixing windows, hand out pieces
            read_rows = max(chunk_rows, MIX_BYTES // (self.dim * self.features.dtype.itemsize))
        plan = _chunk_plan(rows, read_rows, self.block_rows or _chunk_rows(
            self.dim, self.features.dtype.itemsize), rng)
        if self.features_loaded:
            reads: Iterator[tuple[np.ndarray, np.ndarray]] = (
                (batch, self.features[rows[batch]]) for batch in plan)
        else:
            reads = _read_chunks(self.path, rows, plan, self.dim, self.features.dtype)
        for batch, X in reads:  # the window's rows are already shuffled (_chunk_plan)
            for i in range(0, len(batch), chunk_rows):
                yield batch[i:i + chunk_rows], X[i:i + chunk_rows]

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

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the features come from: the identity (model, weights source and sha256,
        data_config as JSON, pool, feature_dim, precision, dtype) plus when the store was
        created and the library versions of its runs (``created``, ``versions``); stacked
        stores: their identity (one per member)."""
        if "stacked" in self.meta:
            return self.identity
        return {**self.identity, "created": self.meta.get("created"),
                "versions": self.meta.get("versions")}

    def finetuned_rows(self, rows: Any) -> np.ndarray:
        """The rows among ``rows`` (store row indices) whose image the store's backbone was
        fine-tuned on (its content hash is in the fine-tuning record): a boolean mask aligned
        with ``rows``; all False for a store of other weights."""
        rows = np.asarray(rows, dtype=np.int64)
        rec = self.finetune_hashes
        if rec is None or not len(rec) or not len(rows):
            return np.zeros(len(rows), dtype=bool)
        h = np.array([self.hashes[i] for i in rows], dtype="S64")
        at = np.minimum(np.searchsorted(rec, h), len(rec) - 1)
        return rec[at] == h

    def label_names(self) -> list[str | None]:
        return [self.classes[i] if i >= 0 else None for i in self.labels]

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}


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
            finetune_hashes=get_finetune_hashes(f),
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
    from .._io import same_file

    if any(same_file(a.path, b.path) for j, b in enumerate(stores) for a in stores[:j]):
        # another spelling of its path, a symlink or a hard link to it: the same features twice
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
    same = same_feature_pairs(stores, rows)
    notes += _same_features_notes(stores, same)
    dtype = np.result_type(*(s.features.dtype for s in stores), np.float32)
    features = np.concatenate([s.features[r].astype(dtype, copy=False)
                               for s, r in zip(stores, rows)], axis=1)
    errors = list(dict.fromkeys(e for s in stores for e in s.errors))
    meta = {"stacked": [s.identity for s in stores], "stores": [str(s.path) for s in stores],
            "feature_dims": [int(s.features.shape[1]) for s in stores],  # their column spans
            # each file's creation id (None: written before stores had one), so that a head
            # can tell stores of one identity apart whatever their names (provenance.stack_order)
            "store_ids": [s.meta.get(STORE_ID) for s in stores],
            "same_features": [list(p) for p in same],  # same_feature_pairs: duplicates
            "feature_dim": int(features.shape[1])}
    return FeatureStore(  # path: for messages only ("a.h5+b.h5"), never opened
        path=Path("+".join(str(s.path) for s in stores)), meta=meta, features=features, labels=first.labels[rows[0]],
        paths=common, hashes=[first.hashes[i] for i in rows[0]], splits=first.splits[rows[0]],
        classes=first.classes, errors=errors, runs=[], notes=notes,
        finetune_hashes=_union([s.finetune_hashes for s in stores]))


def _union(records: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """The fine-tuning records of stacked stores as one (a row any member's backbone was tuned
    on is a seen row of the stack); None when no member has one."""
    have = [r for r in records if r is not None]
    return np.unique(np.concatenate(have)) if have else None


def finetuned_note(store: FeatureStore, rows: Any, scored: str = "rows scored",
                   fix: str | None = None, of: str | None = None) -> tuple[int, str | None]:
    """How many of ``rows`` (store row indices: the rows an accuracy is measured on) are
    images the store's backbone was fine-tuned on, and the one line that says so (without a
    ``note:`` prefix; None when there are none): the accuracy over them overrates the model,
    and what to do instead (``fix``; default: score a split with none of them, named when the
    store has one, or extract a store of images the run did not see). Every command that
    reports an accuracy over store rows says this line (cv, compare, fit, predict --store).
    ``of``: whose backbone, as the line names it (default: the store's path; predict from
    images names the head, its store being temporary)."""
    seen = store.finetuned_rows(rows)
    n = int(seen.sum())
    if not n:
        return 0, None
    if fix is None:
        splits = np.asarray(store.splits, dtype=object)
        mask = store.finetuned_rows(np.arange(len(store)))
        labeled = store.labels >= 0
        clean = sorted({str(sp) for sp in splits[labeled & ~mask] if sp}
                       - {str(sp) for sp in splits[mask]})
        pick = "test" if "test" in clean else (clean[0] if clean else None)
        fix = ((f"score the {pick!r} split instead, which finetune did not train on (e.g. "
                f"`embedpipe predict HEAD --store {store.path} --split {pick}`)")
               if pick else "")
        fix += ((", or " if fix else "") + "extract a store of images finetune did not see "
                "(`embedpipe extract OTHER --weights RUN.pt`) and score that")
    return n, (f"{n} of the {len(seen)} {scored} are images the backbone of "
               f"{of or store.path} was fine-tuned on (`embedpipe finetune`), so the accuracy "
               f"over them overrates the model; {fix}")


def same_features(a: FeatureStore, b: FeatureStore, rows_a: Sequence[int],
                  rows_b: Sequence[int]) -> bool:
    """Whether rows ``rows_a`` of store ``a`` and ``rows_b`` of ``b`` (the same paths, in the
    same order) hold the same images (content hashes) with features made the same way (every
    identity key: provenance.diff), e.g. in a copy of a store: features equal up to the float
    rounding of another runtime."""
    from ..provenance import diff

    return not diff(a.identity, b.identity) and all(
        a.hashes[p] == b.hashes[q] for p, q in zip(rows_a, rows_b))


def same_feature_pairs(stores: Sequence[FeatureStore],
                       rows: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """The pairs (i, j), i < j, of ``stores`` whose rows ``rows[i]`` and ``rows[j]`` (the same
    paths, in the same order) hold the same features (same_features)."""
    return [(i, j) for j in range(len(stores)) for i in range(j)
            if same_features(stores[i], stores[j], rows[i], rows[j])]


def _same_features_notes(stores: Sequence[FeatureStore],
                         pairs: Sequence[tuple[int, int]]) -> list[str]:
    """stack's note for each pair (i, j) of ``stores`` with the same features
    (same_feature_pairs): their columns repeat each other."""
    return [f"note: {stores[j].path} holds the same features as {stores[i].path} (the same "
            "images, backbone, weights, preprocessing and precision): stacking it repeats "
            "their columns and adds nothing; pass one of them"
            for i, j in pairs]


def refuse_duplicates(store: FeatureStore) -> None:
    """Refuse (StoreError) stacked stores (stack) two of which hold the same features (the
    same images, made the same way: same_feature_pairs), before a head is fitted on them: its
    columns would repeat each other, and nothing but the file would tell the two apart when
    it predicts from images (each would be extracted the same way). The line names both and
    the fix: pass one of them. Nothing for a single store."""
    pairs = store.meta.get("same_features") or []
    if not pairs:
        return
    files = store.meta["stores"]
    i, j = pairs[0]
    keep = [f for k, f in enumerate(files) if k != j]
    raise StoreError(f"{files[j]}: holds the same features as {files[i]} (the same images, "
                     "backbone, weights, preprocessing and precision): a head stacked on both "
                     "repeats their columns and adds nothing; pass "
                     + (f"{keep[0]} alone" if len(keep) == 1 else " ".join(map(str, keep)))
                     + f", or stack {files[i]} with a store of these images made with other "
                       "extraction options (another backbone, --img-size, --crop-pct, --pool, "
                       "--tta or precision)")


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


# A training epoch reads its rows in shuffled windows of at least this many bytes of features
# (iter_feature_chunks): 16 HDF5 chunks of the default 1 MiB
MIX_BYTES = 16 << 20


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


def has_finetune_record(path: str | Path) -> bool:
    """Whether the store holds the record of the images its fine-tuned backbone was trained
    on (schema.FINETUNE_HASHES), without reading it."""
    return _reading(Path(path), lambda f: FINETUNE_HASHES in f)


def read_runs(path: str | Path) -> list[dict[str, Any]]:
    """The run records of a store, oldest first (without reading its rows)."""
    path = Path(path)
    return _reading(path, lambda f: [json.loads(_decode(r)) for r in f["runs"][:]])
