"""Preprocessing steps of our own, for what scikit-learn has no transformer for.

``SignedSqrt``: power normalisation with exponent 1/2, ``sign(x) * sqrt(|x|)`` per feature (the
"signed square root" of Perronnin, Sánchez and Mensink 2010, "Improving the Fisher kernel for
large-scale image classification"; the "power transform" of few-shot transfer, e.g. Hu, Gripon
and Pateux 2021, PT-MAP). Pooled CNN features are sums of ReLU activations: a few channels
fire strongly and dominate distances and dot products; the square root evens them out before
the L2 normalisation. scikit-learn's ``PowerTransformer`` is another transform (a fitted
Yeo-Johnson per feature, then standardised), and ``FunctionTransformer`` would store a function
reference in the head file, which the safe loader does not rebuild.

The step is stateless, so it is saved as plain data (its ``n_features_in_``) and trusted by the
head-file loader by its full name (``artifacts.TRUSTED_EXTRA``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from .compact import signed_sqrt


class SignedSqrt(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Signed square root of every feature: (N, D) float32 or float64 → (N, D), same dtype.

    Stateless: ``fit`` records only the number of features (``n_features_in_``), so that
    ``transform`` refuses rows of another width as scikit-learn's steps do (ValueError).
    Non-finite values are refused (ValueError), as by the steps after it."""

    _parameter_constraints: dict[str, list[Any]] = {}  # no parameters (build validates steps)

    def fit(self, X: Any, y: Any = None) -> "SignedSqrt":
        validate_data(self, X, dtype=(np.float64, np.float32), reset=True)
        return self

    def transform(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "n_features_in_")
        X = validate_data(self, X, dtype=(np.float64, np.float32), reset=False)
        return signed_sqrt(X)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
