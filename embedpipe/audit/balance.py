"""Per-class counts per split and the imbalance ratio."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def balance(labels: np.ndarray, splits: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """{"splits": [names], "classes": [names], "counts": {split: {class: n}}, "unlabeled",
    "unlabeled_by_split", "imbalance": largest / smallest class count over all splits (None
    without labels), "empty_classes": classes with no row}."""
    split_names = sorted({str(s) for s in splits}, key=lambda s: (s != "train", s))
    counts: dict[str, dict[str, int]] = {}
    for sp in split_names:
        mask = (splits == sp) & (labels >= 0)
        n = np.bincount(labels[mask], minlength=len(classes))
        counts[sp] = {c: int(k) for c, k in zip(classes, n) if k}
    total = np.bincount(labels[labels >= 0], minlength=len(classes))
    present = total[total > 0]
    unl = labels < 0
    return {"splits": split_names, "classes": list(classes), "counts": counts,
            "unlabeled": int(unl.sum()),
            "unlabeled_by_split": {sp: int((unl & (splits == sp)).sum()) for sp in split_names},
            "imbalance": round(float(present.max() / present.min()), 3) if len(present) else None,
            "empty_classes": [c for c, k in zip(classes, total) if k == 0]}
