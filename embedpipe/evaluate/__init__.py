"""Evaluation of heads on a store (torch-free): ``cv`` (cross-validation, and ``compare`` of
heads on shared folds) and ``report`` (text, JSON and plots of the results).

The defaults of ``cv``/``compare`` live here, so that the command line can show them without
importing scikit-learn; ``run_cv`` and ``run_compare`` load on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Heads ``cv`` evaluates when none are named.
DEFAULT_CV_HEADS = ("logreg", "svm", "knn", "ridge", "centroid")
#: Heads ``compare`` evaluates when none are named.
DEFAULT_COMPARE_HEADS = ("logreg", "svm", "knn")
DEFAULT_FOLDS = 5
DEFAULT_REPEATS = 1
DEFAULT_METRIC = "accuracy"
DEFAULT_TOP_ERRORS = 10

__all__ = ["run_cv", "run_compare"]


def __getattr__(name: str) -> Any:
    if name in ("run_cv", "run_compare"):
        return getattr(importlib.import_module(f"{__name__}.cv"), name)
    if name in ("cv", "report"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
