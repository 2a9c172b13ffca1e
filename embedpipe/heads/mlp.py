"""The mlp head's network: scikit-learn's ``MLPClassifier``, trained in float64.

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
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.neural_network import MLPClassifier as _SklearnMLPClassifier
from sklearn.utils.metaestimators import available_if


def _float64(X: Any) -> Any:
    """``X`` as float64 when it is a float32 (or float16) array or sparse matrix; else as is
    (scikit-learn's own validation converts lists and integer arrays to float64)."""
    dtype = getattr(X, "dtype", None)
    if dtype is not None and dtype.kind == "f" and dtype.itemsize < 8:
        return X.astype(np.float64)
    return X


class MLPClassifier(_SklearnMLPClassifier):
    """scikit-learn's ``MLPClassifier`` whose weights are float64 whatever the input's float
    dtype: ``fit`` and ``partial_fit`` cast float32 rows ((N, D), a copy of 8·N·D bytes) to
    float64 first. Parameters, attributes, errors and predictions are scikit-learn's; predict
    on float32 rows computes in float64 (numpy's promotion)."""

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> "MLPClassifier":
        return super().fit(_float64(X), y, sample_weight=sample_weight)

    @available_if(lambda est: est._check_solver())
    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None,
                    classes: Any = None) -> "MLPClassifier":
        return super().partial_fit(_float64(X), y, sample_weight=sample_weight, classes=classes)

    def sklearn_copy(self) -> _SklearnMLPClassifier:
        """A scikit-learn ``MLPClassifier`` with this one's parameters and fitted state (shared
        arrays, not copied): for tools that look estimators up by exact type (skl2onnx)."""
        plain = _SklearnMLPClassifier(**self.get_params())
        vars(plain).update(vars(self))
        return plain
