"""The mlp head's network: scikit-learn's ``MLPClassifier``, trained in float64 when the fit
is long enough for float32 weights to turn subnormal.

scikit-learn trains an MLP in the dtype of its input, and our rows are float32. After about
1,500 Adam steps, the weights that only the L2 penalty moves (those of input channels that are
always 0 in ReLU-pooled features, and of hidden units that never fire) have decayed below
float32's normal range: ~11% of the weights are subnormal, and every matrix product with them
runs on the CPU's slow subnormal path. An epoch then costs 8-14x more CPU (Fashion-MNIST 10k
rows: 0.23 -> 3.1-3.4 s; 60k rows: 1.4 -> 12-24 s), which made mlp fits on large stores take
10-16 CPU-minutes. In float64 the same weights stay normal: the network takes the same steps
and scores the same (bench/results/mlp_subnormal.md; bench/results/mlp_float64.md measures the
fits as ``fit`` runs them).

The class has scikit-learn's name on purpose: everything that reads an estimator's kind by its
type name (compact forms, parameter rules, the few-shot adaptations) and every ``isinstance``
check treats it as scikit-learn's MLP, and ``heads`` shows the name users know. Head files
name it by its full name, ``embedpipe.heads.mlp.MLPClassifier``, which the head-file loader
trusts (``artifacts.TRUSTED_EXTRA``); it adds no state to scikit-learn's.

float64 costs 1.45-2x the CPU of float32 (1.45-1.7x measured with BLAS's 2 threads, ~2x with
one thread on 700 rows), so a fit that cannot reach the subnormal
onset stays in float32: one of at most FLOAT32_MAX_STEPS Adam steps (batches per epoch x
``max_iter``, an upper bound known before the fit). Fashion-MNIST Lite0 features, the head as
``fit`` builds it (bench/results/mlp_float64.md): 500 rows (at most 900 steps) float32; 2,000
rows 2x, 4,000 rows 4.7x and 60,000 rows 5.5x less CPU in float64 (9-17% of the float32
weights subnormal by the end); 10,000 rows, where early stopping ended at 28-30 epochs just
before the onset, 1.7x more CPU in float64: the price of not betting on where early stopping
ends.
"""

from __future__ import annotations

from typing import Any

import math

import numpy as np
from sklearn.neural_network import MLPClassifier as _SklearnMLPClassifier
from sklearn.utils.metaestimators import available_if


def _float64(X: Any) -> Any:
    """``X`` as float64 when its values are float32 (or float16): an array, a scipy sparse
    matrix, or anything numpy makes an array of (a DataFrame, a CPU tensor, lists). Anything
    else as is (scikit-learn's own validation converts or refuses it; integer rows become
    float64 there)."""
    if hasattr(X, "tocsr"):  # scipy sparse
        kind = getattr(X, "dtype", None)
        return X.astype(np.float64) if kind is not None and kind.kind == "f" and kind.itemsize < 8 else X
    if not isinstance(X, np.ndarray):
        try:
            X = np.asarray(X)
        except Exception:  # noqa: BLE001 - e.g. a GPU tensor: scikit-learn names the problem
            return X
    if X.dtype.kind == "f" and X.dtype.itemsize < 8:
        return X.astype(np.float64)
    return X


# Adam steps within which no float32 weight turned subnormal in any fit measured: the onset
# came at about 1,500 steps (bench/results/mlp_subnormal.md: 10,000 rows, epoch 31 of 50
# batches; bench/results/mlp_float64.md: 9-17% subnormal after 2,210-3,000 steps)
FLOAT32_MAX_STEPS = 1000


class MLPClassifier(_SklearnMLPClassifier):
    """scikit-learn's ``MLPClassifier`` whose weights are float64 whatever the input's float
    dtype, unless the fit is too short for float32 weights to turn subnormal: ``fit`` casts
    float32 rows ((N, D), a copy of 8·N·D bytes) to float64 first when ``max_steps(N)`` exceeds
    FLOAT32_MAX_STEPS; ``partial_fit`` (an unknown number of calls) always does, so a network it
    starts is float64 (one a short float32 ``fit`` started keeps its float32 weights under
    ``partial_fit`` or a warm-started ``fit``: scikit-learn updates them in place). Parameters,
    attributes, errors and predictions are scikit-learn's; predict on float32 rows with float64
    weights computes in float64 (numpy's promotion). Pickles and head files leave out the
    optimizer's state (``__getstate__``)."""

    def max_steps(self, rows: int) -> int:
        """The most optimizer steps ``fit`` on ``rows`` rows can take: batches per epoch (of
        the rows left after early stopping's validation split, in batches of ``batch_size``,
        "auto" = min(200, rows), as scikit-learn splits them) times ``max_iter``. lbfgs (no
        batches): a large number, as its iterations are not bounded the same way."""
        unbounded = 1 << 62
        if self.solver == "lbfgs":
            return unbounded
        try:
            if self.early_stopping:
                rows -= math.ceil(rows * self.validation_fraction)
            rows = max(rows, 1)
            batch = (min(200, rows) if self.batch_size == "auto"
                     else min(max(int(self.batch_size), 1), rows))
            return math.ceil(rows / batch) * int(self.max_iter)
        except (TypeError, ValueError):  # a bad value: scikit-learn's fit names it
            return unbounded

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> "MLPClassifier":
        rows = X.shape[0] if hasattr(X, "shape") else len(X)  # sparse matrices have no len
        if self.max_steps(rows) > FLOAT32_MAX_STEPS:
            X = _float64(X)
        return super().fit(X, y, sample_weight=sample_weight)

    @available_if(lambda est: est._check_solver())
    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None,
                    classes: Any = None) -> "MLPClassifier":
        return super().partial_fit(_float64(X), y, sample_weight=sample_weight, classes=classes)

    def __getstate__(self) -> dict[str, Any]:
        """scikit-learn's state without what only a running fit reads: the optimizer's moments
        (Adam keeps two arrays the size of the weights) and, when they differ, the weights at
        the best training loss (a fit without early stopping ends with ``coefs_``; with early
        stopping they are the same arrays). Head files and pickles are ~1/4 the size; a
        ``partial_fit`` or warm-started ``fit`` of an unpickled network starts a new optimizer
        (as scikit-learn does for a new fit)."""
        # a copy: for a class outside sklearn.*, BaseEstimator.__getstate__ returns the live
        # __dict__ (object.__getstate__), and popping from it would strip the fitted network
        state = dict(super().__getstate__())
        state.pop("_optimizer", None)
        for best, final in (("_best_coefs", "coefs_"), ("_best_intercepts", "intercepts_")):
            if best in state and final in state:
                state[best] = state[final]
        return state

    def sklearn_copy(self) -> _SklearnMLPClassifier:
        """A scikit-learn ``MLPClassifier`` with this one's parameters and fitted state (shared
        arrays, not copied): for tools that look estimators up by exact type (skl2onnx)."""
        plain = _SklearnMLPClassifier(**self.get_params())
        vars(plain).update(vars(self))
        return plain
