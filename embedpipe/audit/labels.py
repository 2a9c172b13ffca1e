"""Likely label errors: out-of-fold predicted probabilities from cross-validation (the folds
and heads of ``embedpipe cv``), ranked by confident learning.

With the optional ``cleanlab`` library installed (``pip install 'embedpipe[audit]'``) the
issues are ``cleanlab.filter.find_label_issues(labels, pred_probs,
return_indices_ranked_by="self_confidence")``: confident learning (Northcutt et al., 2021)
counts a row as mislabeled when another class's out-of-fold probability reaches that class's
threshold (the mean probability the class gets on the rows labeled with it), pruning by the
estimated noise rates. Without cleanlab, the same per-class thresholds are applied directly:
a row is an issue when its predicted class differs from its label and its probability
reaches the predicted class's threshold while its own label's probability is below the own
class's threshold; issues are ranked the same way, by self-confidence (the out-of-fold
probability of the given label, lowest first).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np


def out_of_fold_probabilities(X: np.ndarray, y: np.ndarray, n_classes: int, *, head: str,
                              folds: int, seed: int,
                              tick: Callable[[int], Any] | None = None
                              ) -> tuple[np.ndarray, int]:
    """(P, folds used): P (N x n_classes float64) holds, for each row of ``X`` (N x D), the
    probabilities a ``head`` fitted on the other folds gives it; ``y`` (N int, 0..n_classes-1).
    The folds are ``embedpipe cv``'s (StratifiedKFold, shuffled, seeded), lowered to the size
    of the smallest class (at least 2). Probabilities of heads without native ones come from
    the calibration ``embedpipe`` uses for them (see heads.class_scores)."""
    from .. import heads
    from ..evaluate.cv import make_folds
    from ..heads.fit import blas_threads

    counts = np.bincount(y, minlength=n_classes)
    folds = int(max(2, min(folds, counts[counts > 0].min())))
    splitter, _ = make_folds(folds, 1, seed)
    P = np.zeros((len(y), n_classes), dtype=np.float64)
    for train, test in splitter.split(np.zeros((len(y), 1)), y):
        est = heads.build(head, seed=seed)
        # cv's thread rule (heads.fit.blas_threads): one BLAS thread on small folds; without
        # it 400 rows took 40 s instead of 0.6 s on a busy 2-core machine (same results)
        with warnings.catch_warnings(), blas_threads(len(train)):
            warnings.simplefilter("ignore")  # convergence notes: the probabilities still rank
            est.fit(X[train], y[train])
            scores, _ = heads.class_scores(est, X[test], use_proba=True)
        cols = np.asarray(est.classes_).astype(np.int64)
        P[np.ix_(test, cols)] = scores
        if tick is not None:
            tick(1)
    return P, folds


def _self_confidence_issues(y: np.ndarray, P: np.ndarray) -> np.ndarray:
    n_classes = P.shape[1]
    thresholds = np.array([P[y == c, c].mean() if (y == c).any() else 1.0
                           for c in range(n_classes)])
    pred = P.argmax(axis=1)
    own = P[np.arange(len(y)), y]
    issue = (pred != y) & (P[np.arange(len(y)), pred] >= thresholds[pred]) & \
        (own < thresholds[y])
    idx = np.flatnonzero(issue)
    return idx[np.argsort(own[idx], kind="stable")]


def cleanlab_version() -> str | None:
    try:
        import cleanlab
    except ImportError:
        return None
    return str(cleanlab.__version__)


def find_issues(y: np.ndarray, P: np.ndarray) -> tuple[np.ndarray, str]:
    """(row positions of likely label errors, most likely first; the method's name) for labels
    ``y`` (N int, every class in 0..K-1 present) and out-of-fold probabilities ``P`` (N x K)."""
    if cleanlab_version() is not None:
        from cleanlab.filter import find_label_issues

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            idx = find_label_issues(labels=y, pred_probs=P,
                                    return_indices_ranked_by="self_confidence")
        return np.asarray(idx, dtype=np.int64), f"cleanlab {cleanlab_version()} " \
            "find_label_issues (confident learning, ranked by self-confidence)"
    return _self_confidence_issues(y, P), ("per-class confident-learning thresholds, ranked "
                                           "by self-confidence (cleanlab not installed)")
