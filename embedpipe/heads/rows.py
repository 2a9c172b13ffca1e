"""Which rows of a store train a head, their targets, and the scores of a prediction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..store.read import FeatureStore

TRAIN_SPLIT = "train"


class EvaluateError(UserError):
    """Data that cannot be evaluated as asked; one line naming the store and the fix."""


@dataclass
class Rows:
    """The labeled rows of a store, split into the training rows and held-out splits."""

    train: np.ndarray  # row indices
    heldout: dict[str, np.ndarray]  # split name -> row indices (labeled, not train)

    def describe(self) -> str:
        parts = [f"{len(self.train)} train"] + [f"{len(v)} {k}" for k, v in self.heldout.items()]
        return ", ".join(parts)


def select_rows(store: FeatureStore) -> Rows:
    """Training rows: the labeled rows of the ``train`` split, or every labeled row when the
    store has no split named train. Other labeled splits are held out (val, test, ...)."""
    labeled = store.labels >= 0
    if not labeled.any():
        raise EvaluateError(f"{store.path}: no labeled rows; extract a class-folder layout or a "
                            "manifest with a label column")
    splits = np.asarray(store.splits, dtype=object)
    has_train = bool((splits[labeled] == TRAIN_SPLIT).any())
    if not has_train:
        return Rows(np.flatnonzero(labeled), {})
    train = np.flatnonzero(labeled & (splits == TRAIN_SPLIT))
    heldout = {}
    for name in sorted({s for s in splits[labeled] if s != TRAIN_SPLIT}):
        heldout[name or "(no split)"] = np.flatnonzero(labeled & (splits == name))
    return Rows(train, heldout)


def targets(store: FeatureStore, rows: np.ndarray) -> np.ndarray:
    """Class names (str) of ``rows``: heads are fitted on names, so they carry them."""
    names = np.asarray(store.classes, dtype=object)
    return names[store.labels[rows]].astype(str)


def min_class(y: np.ndarray) -> tuple[str, int]:
    values, counts = np.unique(y, return_counts=True)
    i = int(np.argmin(counts))
    return str(values[i]), int(counts[i])


# -- cross-validation (`embedpipe cv`) ------------------------------------------------------

METRICS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
           "f1_macro": "macro-F1"}


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}
