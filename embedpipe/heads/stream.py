"""Out-of-core heads: fit, search and score in chunks streamed from a store (no torch).

Heads marked ``streaming`` in heads.py (sgd, logreg-sgd) never see the feature matrix whole:
``FeatureStore.iter_feature_chunks`` hands them ``chunk_rows`` rows at a time, so memory is
bounded by the chunk size, not by the store. A fit makes one pass per stateful preprocessing
step (``StandardScaler.partial_fit``; ``pca=N`` becomes an ``IncrementalPCA``), then
``max_iter`` epochs of ``SGDClassifier.partial_fit`` over the rows in a new shuffled order each
epoch (HDF5 chunks in random order, rows shuffled within each read chunk; seeded). The result
is a plain scikit-learn Pipeline, saved and loaded like any head.

When the store was opened with its features (e.g. by `cv` next to in-memory heads), the same
chunks are sliced from memory in the same order, so a streaming head scores the same either
way. Search, cv and calibration reach these functions through the one row source,
source.Labeled.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .. import checks
from ..errors import UserError
from ..store.read import FeatureStore
from .compact import predict_scored

DEFAULT_CHUNK_ROWS = 65536

Tick = Callable[[int], None]
Note = Callable[[str], None]


class StreamError(UserError):
    """A bad option for a streamed fit; one line naming it and the fix."""


def check_chunk_rows(chunk_rows: Any) -> int:
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise StreamError(f"--chunk-rows {chunk_rows}: pass a positive number of rows per "
                          f"chunk (default {DEFAULT_CHUNK_ROWS}); a chunk holds about rows x "
                          "feature dim x 4 bytes of features in memory")
    return chunk_rows


def _nothing(*_: Any) -> None:
    return None


def build(head: str, params: dict[str, Any] | None, y: np.ndarray, *,
          class_weight: str | None = None, seed: int = 0) -> Any:
    """The unfitted pipeline, made streamable: ``class_weight="balanced"`` becomes the
    explicit per-class weights of ``y`` (partial_fit refuses "balanced"), PCA becomes an
    IncrementalPCA of the same size."""
    from . import registry as heads

    pipe = heads.build(head, params, class_weight=class_weight, seed=seed)
    if class_weight is not None:
        from sklearn.utils.class_weight import compute_class_weight

        classes = np.unique(y)
        w = compute_class_weight("balanced", classes=classes, y=y)
        pipe.set_params(clf__class_weight={str(c): float(v) for c, v in zip(classes, w)})
    if "lda" in pipe.named_steps:  # it needs every row's class statistics at once
        raise StreamError(f"--param prep={(params or {}).get('prep')}: the streaming head "
                          f"{head} cannot learn the lda step chunk by chunk; pass prep=l2, "
                          "scale, l2+scale, sqrt+l2, sqrt+scale or none, or use an in-memory "
                          "head (logreg, knn, ...)")
    pca = pipe.named_steps["pca"]
    if pca != "passthrough":
        n = pca.n_components
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
            raise StreamError(f"--param pca={n}: the streaming head {head} takes a number of "
                              "components (e.g. pca=128), not a variance fraction")
        from sklearn.decomposition import IncrementalPCA

        pipe.set_params(pca=IncrementalPCA(n_components=int(n)))
    return pipe


def passes(head: str, params: dict[str, Any] | None, seed: int = 0) -> int:
    """How many times a fit reads its rows: stateful preprocessing passes plus the epochs."""
    from . import registry as heads

    pipe = heads.build(head, params, seed=seed)
    pre = sum(hasattr(s, "partial_fit") for _, s in pipe.steps[:-1] if s != "passthrough")
    return pre + int(pipe.steps[-1][1].max_iter)


def work(head: str, params: dict[str, Any] | None, n: int, *, search: bool = False,
         inner_folds: int = 3, seed: int = 0) -> int:
    """Rows a fit (with its search, if asked) reads: the total of a progress bar."""
    total = passes(head, params, seed) * n
    if search:
        for cand in _candidates(head, params, seed):
            total += inner_folds * passes(head, {**(params or {}), **cand}, seed) * n * (
                inner_folds - 1) // inner_folds + n
    return total


def _candidates(head: str, params: dict[str, Any] | None, seed: int) -> list[dict[str, Any]]:
    from sklearn.model_selection import ParameterGrid

    from . import registry as heads

    grid = heads.param_grid(head, params, seed=seed)
    return [heads.short_params(c) for c in ParameterGrid(grid)] if grid else []


def _transform(steps: list[Any], X: np.ndarray) -> np.ndarray:
    for s in steps:
        X = s.transform(X)
    return X


def fit_rows(store: FeatureStore, rows: np.ndarray, y: np.ndarray, head: str,
             params: dict[str, Any] | None = None, *, class_weight: str | None = None,
             seed: int = 0, chunk_rows: int = DEFAULT_CHUNK_ROWS, tick: Tick = _nothing,
             note: Note = _nothing, scope: np.ndarray | None = None) -> Any:
    """Fit ``head`` on store rows ``rows`` (labels ``y``, aligned) by streaming them. The first
    pass refuses NaN, infinite or huge features (checks.unusable_rows; InputError), counting and
    naming them over ``scope`` (store row indices; None: ``rows``)."""
    rows = np.asarray(rows, dtype=np.int64)
    pipe = build(head, params, y, class_weight=class_weight, seed=seed)
    fitted: list[Any] = []
    checked = False  # whether a whole pass has seen every row finite

    def finite(X: np.ndarray) -> None:
        if not checked:  # unusable rows stop the first pass over the raw features (whichever)
            checks.refuse_unusable_chunk(X, store, rows if scope is None else scope,
                                          chunk_rows)

    for name, step in pipe.steps[:-1]:
        if step == "passthrough":
            continue
        if not hasattr(step, "partial_fit"):  # stateless (Normalizer, SignedSqrt): one row
            for _, X in store.iter_feature_chunks(rows[:1], 1):
                finite(X)
                step.fit(_transform(fitted, X))
            fitted.append(step)
            continue
        note(f"{name} pass")
        need = getattr(step, "n_components", None) or 1  # IncrementalPCA's first batch
        held: list[np.ndarray] = []
        for idx, X in store.iter_feature_chunks(rows, chunk_rows):
            finite(X)
            held.append(_transform(fitted, X))
            if sum(len(h) for h in held) >= need or hasattr(step, "components_"):
                step.partial_fit(np.concatenate(held) if len(held) > 1 else held[0])
                held = []
            tick(len(idx))
        if held:
            if not hasattr(step, "components_") and need > 1:
                raise StreamError(f"--param pca={need}: more components than the "
                                  f"{len(rows)} training rows; pass a smaller pca")
            step.partial_fit(np.concatenate(held))
        fitted.append(step)
        checked = True
    clf = pipe.steps[-1][1]
    epochs = int(clf.max_iter)
    classes = np.unique(y)
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        note(f"epoch {epoch + 1}/{epochs}")
        for idx, X in store.iter_feature_chunks(rows, chunk_rows, rng=rng):
            finite(X)  # no stateful step: the first epoch is the first pass
            clf.partial_fit(_transform(fitted, X), y[idx], classes=classes)
            tick(len(idx))
        checked = True
    return pipe


def predict_rows(estimator: Any, store: FeatureStore, rows: np.ndarray, *,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, use_proba: bool = True,
                 tick: Tick = _nothing, scope: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Predicted class (str) and its score for each of ``rows``, in store order, chunk by
    chunk; and whether the scores are probabilities (see compact.class_scores). A chunk holding
    NaN, infinite or huge features is refused (InputError) before it is scored, counting and
    naming them over ``scope`` (store row indices; None: ``rows``)."""
    rows = np.asarray(rows, dtype=np.int64)
    pred = np.empty(len(rows), dtype=object)
    conf = np.zeros(len(rows))
    calibrated = True
    for idx, X in store.iter_feature_chunks(rows, chunk_rows):
        checks.refuse_unusable_chunk(X, store, rows if scope is None else scope, chunk_rows)
        pred[idx], _, conf[idx], cal = predict_scored(estimator, X, use_proba=use_proba)
        calibrated &= cal
        tick(len(idx))
    return pred.astype(str), conf, bool(calibrated)


def read_rows(store: FeatureStore, rows: np.ndarray, chunk_rows: int,
              scope: np.ndarray | None = None) -> np.ndarray:
    """The features of ``rows`` in that order, in memory (for a few rows only: a calibration
    hold-out). NaN, infinite or huge features are refused (InputError), counted and named over
    ``scope`` (store row indices; None: ``rows``)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), store.dim), dtype=store.features.dtype)
    for idx, X in store.iter_feature_chunks(rows, chunk_rows):
        checks.refuse_unusable_chunk(X, store, rows if scope is None else scope, chunk_rows)
        out[idx] = X
    return out
