"""Open-set rejection: label ``unknown`` the rows a head should not decide. Torch-free.

Two scores per row:

- **confidence**: the head's score of its predicted class (compact.predict_scored: calibrated
  probability for native/calibrated heads);
- **distance**: cosine distance (1 - cosine similarity, in [0, 2]) from the row to the nearest
  *class centroid* of the training rows (the mean of each class's L2-normalised training
  features, normalised again). The centroids are the head file's compact summary of the
  training embeddings: C x D float32, kept in the manifest (``open_set.centroids``, base64).

A rule rejects a row when its confidence is below ``min_confidence`` or its distance is above
``max_distance`` (either may be absent). ``fit --reject-rate R`` chooses both on out-of-fold
rows (k-fold over the training rows: the same head configuration refitted on k-1 folds, the
centroids of those folds), so that a fraction R of known, correctly-distributed rows is
rejected (the false-reject rate), and records them in the manifest (``open_set.auto``);
`predict --reject auto` applies them, `predict --reject T` rejects confidence below T only.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import UserError

UNKNOWN = "unknown"
DEFAULT_RATE = 0.05
OOF_FOLDS = 5


class RejectError(UserError):
    """A rejection option that cannot be used; one line naming it and the fix."""


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def centroids(X: np.ndarray, y: np.ndarray, classes: list[str]) -> np.ndarray:
    """(C, D) float32: per class of ``classes`` (in order), the mean of its L2-normalised rows
    of ``X``, L2-normalised."""
    Xn = _normalise(X)
    y = np.asarray(y).astype(str)
    return _normalise(np.stack([Xn[y == c].mean(axis=0) for c in classes]))


def distance(X: np.ndarray, cents: np.ndarray) -> np.ndarray:
    """(n,) float32: cosine distance of each row of ``X`` (n, D) to its nearest centroid."""
    if not len(X):
        return np.zeros(0, dtype=np.float32)
    return (1.0 - (_normalise(X) @ cents.T).max(axis=1)).astype(np.float32)


def pack(cents: np.ndarray) -> dict[str, Any]:
    """The centroids as a manifest entry (JSON: base64 of float32, with the shape)."""
    a = np.ascontiguousarray(cents, dtype="<f4")
    return {"shape": list(a.shape), "dtype": "float32",
            "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def unpack(entry: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(entry["base64"]), dtype="<f4").reshape(entry["shape"])


def choose(conf: np.ndarray, dist: np.ndarray, rate: float) -> dict[str, float]:
    """Thresholds that reject a fraction ``rate`` of the rows (out-of-fold scores of known
    rows): the same quantile q of each score (confidence from below, distance from above),
    q found by bisection so that the union rejects ``rate`` of the rows. Returns
    ``{"min_confidence", "max_distance", "quantile", "false_reject"}`` (false_reject: the
    fraction of these rows the pair rejects)."""
    def rejected(q: float) -> tuple[float, float, float]:
        c = float(np.quantile(conf, q))
        d = float(np.quantile(dist, 1.0 - q))
        return float(((conf < c) | (dist > d)).mean()), c, d

    lo, hi = 0.0, rate
    for _ in range(40):
        mid = (lo + hi) / 2
        r, _, _ = rejected(mid)
        if r > rate:
            hi = mid
        else:
            lo = mid
    r, c, d = rejected(lo)
    return {"min_confidence": c, "max_distance": d, "quantile": lo, "false_reject": r}


def out_of_fold(X: np.ndarray, y: np.ndarray, classes: list[str],
                fit_head: Callable[[np.ndarray, np.ndarray], Any], use_proba: bool,
                folds: int = OOF_FOLDS, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Out-of-fold (confidence, distance) of every training row: stratified ``folds``-fold
    (lowered to the smallest class's count), the head refitted on the other folds by
    ``fit_head(X, y)``, the centroids of the other folds. Returns (conf, dist, folds used).

    Raises RejectError when a class has fewer than 2 rows."""
    from sklearn.model_selection import StratifiedKFold

    from .compact import predict_scored

    y = np.asarray(y).astype(str)
    smallest = int(min(np.sum(y == c) for c in classes))
    k = min(folds, smallest)
    if k < 2:
        raise RejectError(f"--reject-rate: a class has {smallest} training image; choosing "
                          "thresholds on out-of-fold rows needs at least 2 per class: add "
                          "images or leave --reject-rate out")
    conf = np.zeros(len(y), dtype=np.float64)
    dist = np.zeros(len(y), dtype=np.float32)
    for train, held in StratifiedKFold(k, shuffle=True, random_state=seed).split(X, y):
        est = fit_head(X[train], y[train])
        _, _, c, _ = predict_scored(est, X[held], use_proba=use_proba)
        conf[held] = c
        dist[held] = distance(X[held], centroids(X[train], y[train], classes))
    return conf, dist, k


@dataclass
class Rule:
    """Reject a row when confidence < min_confidence or distance > max_distance."""

    min_confidence: float | None
    max_distance: float | None
    cents: np.ndarray | None
    source: str  # "auto (5% false-reject on out-of-fold rows)" or "confidence < T"

    def mask(self, confidence: np.ndarray, X: np.ndarray) -> np.ndarray:
        """(n,) bool: the rows to label unknown."""
        out = np.zeros(len(confidence), dtype=bool)
        if self.min_confidence is not None:
            out |= np.asarray(confidence) < self.min_confidence
        if self.max_distance is not None and self.cents is not None:
            out |= distance(X, self.cents) > self.max_distance
        return out

    def record(self) -> dict[str, Any]:
        return {"min_confidence": self.min_confidence, "max_distance": self.max_distance,
                "source": self.source}


def summary(X: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """The manifest's ``open_set`` entry written by every fit: the class centroids."""
    return {"centroids": pack(centroids(X, y, classes)), "distance": "cosine to nearest "
            "class centroid of the L2-normalised training features"}


def rule_for(manifest: dict[str, Any], reject: str | None, where: str) -> Rule | None:
    """The rule `--reject` asks for with this head (None: no rejection).

    ``auto``: the thresholds `fit --reject-rate` chose (RejectError when the head has none);
    a number T in (0, 1]: reject when confidence < T (and, if the head has auto thresholds,
    nothing else); ``none``: no rejection."""
    if reject is None or reject.strip().lower() in ("", "none", "off"):
        return None
    open_set = manifest.get("open_set") or {}
    text = reject.strip().lower()
    if text == "auto":
        auto = open_set.get("auto")
        if not auto:
            raise RejectError(f"--reject auto: {where} has no rejection thresholds; refit it "
                              "with `embedpipe fit ... --reject-rate 0.05` (or pass --reject "
                              "with a confidence such as 0.5)")
        return Rule(auto["min_confidence"], auto["max_distance"],
                    unpack(open_set["centroids"]) if "centroids" in open_set else None,
                    f"auto ({auto['rate']:.0%} false-reject on out-of-fold rows)")
    try:
        t = float(text)
    except ValueError:
        raise RejectError(f"--reject {reject}: pass auto, none or a confidence in (0, 1] such "
                          "as 0.5") from None
    if not 0 < t <= 1:
        raise RejectError(f"--reject {reject}: a confidence threshold must be in (0, 1]; pass "
                          "e.g. 0.5, or auto")
    return Rule(t, None, None, f"confidence < {t:g}")
