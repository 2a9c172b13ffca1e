"""Exact cosine neighbour search in blocks of rows (numpy only): near-duplicate pairs and
k-nearest-neighbour distances in one pass over the rows.

Two views of the features: ``normalize`` (plain L2-normalised rows, for kNN distances, label
errors and the map) and ``duplicate_view`` (power-normalised first, for near duplicates).
Memory: both views (2 x N x D float32) plus a few similarity blocks of at most ``BLOCK_BYTES``
(rows x N float32), so 60,000 x 1280 features need ~0.6 GB + ~0.2 GB, never an N x N matrix.
Time: 2 x N^2 x D multiply-adds (BLAS), quadratic in the number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

BLOCK_BYTES = 64 * 1024 * 1024  # one similarity block: rows x N float32 at most this


def normalize(X: np.ndarray) -> np.ndarray:
    """Rows of ``X`` (N x D) scaled to unit L2 norm, float32 (all-zero rows stay zero)."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return X / norms


POWER = 0.25
"""Exponent of the signed power normalisation before the duplicate cosine (sign(x)|x|^0.25,
the "power normalisation" of image retrieval): it lifts the many small activations that a
re-encoded or resized copy keeps and a different object does not. On Fashion-MNIST Lite0
features (bench/results/audit.md), letting the same 11 distinct pairs through, it finds 0.93
of 2x-upscaled JPEG-q90 copies instead of 0.84 on plain features, 0.87 of 4x-upscaled
JPEG-q75 copies instead of 0.62, and 0.95 of JPEG-q90 re-encodings instead of 0.93."""


def duplicate_view(X: np.ndarray) -> np.ndarray:
    """Unit rows of sign(X) |X|^POWER (N x D float32): the space of the duplicate cosine."""
    X = np.asarray(X, dtype=np.float32)
    return normalize(np.sign(X) * np.abs(X) ** POWER)


@dataclass
class Scan:
    """What one pass found. ``pairs`` (P x 2 int64, i < j) have duplicate cosine similarity
    ``pair_sims`` (P, float32) >= the threshold (in ``duplicate_view``); ``knn_all`` (N,) is
    the mean cosine distance (1 - similarity) of each row to its k nearest reference rows
    (itself excluded), ``knn_class`` (N,) the same among reference rows of its own label (NaN:
    unlabeled, or no other reference row of that label)."""

    pairs: np.ndarray
    pair_sims: np.ndarray
    knn_all: np.ndarray
    knn_class: np.ndarray


def _mean_topk_distance(S: np.ndarray, k: int) -> np.ndarray:
    """Mean of (1 - the k largest similarities) of each row of ``S`` (-inf entries ignored
    when a row has fewer than k finite ones; NaN when it has none)."""
    if S.shape[1] == 0:
        return np.full(S.shape[0], np.nan, dtype=np.float32)
    k = min(k, S.shape[1])
    top = np.partition(S, S.shape[1] - k, axis=1)[:, S.shape[1] - k:]
    finite = np.isfinite(top)
    d = np.where(finite, 1.0 - top, 0.0).sum(axis=1)
    n = finite.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, d / np.maximum(n, 1), np.nan).astype(np.float32)


def scan(Xn: np.ndarray, Xd: np.ndarray, labels: np.ndarray, reference: np.ndarray, *,
         threshold: float, k: int, tick: Callable[[int], Any] | None = None,
         block_bytes: int = BLOCK_BYTES) -> Scan:
    """One blockwise pass: pairs whose rows of ``Xd`` (N x D unit rows, duplicate_view) have
    cosine >= ``threshold``; kNN distances in ``Xn`` (N x D unit rows, normalize) to the rows
    where ``reference`` (N bool; e.g. the training split) is True.

    ``labels`` (N int, -1 unlabeled) define the per-class kNN distance. ``tick(n)`` is called
    after each block of n rows (progress)."""
    n = len(Xn)
    block = max(1, min(n, block_bytes // max(4 * n, 1)))
    ref_idx = np.flatnonzero(reference)
    classes = np.unique(labels[labels >= 0])
    ref_of = {int(c): ref_idx[labels[ref_idx] == c] for c in classes}
    pairs: list[np.ndarray] = []
    sims: list[np.ndarray] = []
    knn_all = np.full(n, np.nan, dtype=np.float32)
    knn_class = np.full(n, np.nan, dtype=np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        rows = np.arange(start, stop)
        D = Xd[start:stop] @ Xd.T  # (b, N) duplicate cosine similarities
        D[rows - start, rows] = -np.inf  # never your own duplicate
        # pairs i < j above the threshold (each pair once)
        hit_i, hit_j = np.nonzero(D >= threshold)
        keep = hit_j > hit_i + start
        if keep.any():
            pairs.append(np.stack([hit_i[keep] + start, hit_j[keep]], axis=1))
            sims.append(D[hit_i[keep], hit_j[keep]].astype(np.float32))
        del D
        S = Xn[start:stop] @ Xn.T  # (b, N) cosine similarities
        S[rows - start, rows] = -np.inf  # never your own neighbour
        knn_all[start:stop] = _mean_topk_distance(S[:, ref_idx], k)
        block_labels = labels[start:stop]
        for c, members in ref_of.items():
            mine = np.flatnonzero(block_labels == c)
            if len(mine):
                knn_class[start + mine] = _mean_topk_distance(S[np.ix_(mine, members)], k)
        if tick is not None:
            tick(stop - start)
    return Scan(pairs=np.concatenate(pairs) if pairs else np.empty((0, 2), dtype=np.int64),
                pair_sims=np.concatenate(sims) if sims else np.empty(0, dtype=np.float32),
                knn_all=knn_all, knn_class=knn_class)
