"""Outliers: rows far from their k nearest reference (training) rows in cosine distance,
overall and within their own class (see neighbors.scan for the distances)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

K_NEIGHBOURS = 5  # kNN distance = mean cosine distance to this many nearest reference rows
TOP_OVERALL = 500  # rows kept in the overall ranking (audit.json)
TOP_PER_CLASS = 20  # rows kept per class
FLAG_TOP = 20  # at least this many rows may be flagged (see audit.OUTLIER_IQR)


def ranked(knn_all: np.ndarray, knn_class: np.ndarray, *, paths: Sequence[str],
           splits: np.ndarray, label_names: Sequence[str | None], classes: Sequence[str],
           labels: np.ndarray) -> dict[str, Any]:
    """{"overall": [rows by kNN distance, largest first], "per_class": {class: [rows by
    own-class kNN distance]}}; each row {"row", "path", "split", "label", "distance",
    "class_distance" (None when it has none)}. NaN distances are left out."""
    def item(i: int) -> dict[str, Any]:
        cd = knn_class[i]
        return {"row": int(i), "path": paths[i], "split": str(splits[i]),
                "label": label_names[i], "distance": round(float(knn_all[i]), 4),
                "class_distance": None if np.isnan(cd) else round(float(cd), 4)}

    valid = np.flatnonzero(~np.isnan(knn_all))
    order = valid[np.argsort(-knn_all[valid], kind="stable")][:TOP_OVERALL]
    per_class = {}
    for c, name in enumerate(classes):
        mine = np.flatnonzero((labels == c) & ~np.isnan(knn_class))
        if len(mine):
            top = mine[np.argsort(-knn_class[mine], kind="stable")][:TOP_PER_CLASS]
            per_class[name] = [item(i) for i in top]
    return {"overall": [item(i) for i in order], "per_class": per_class}
