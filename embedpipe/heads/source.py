"""The rows a head is fitted or scored on, whether their features are in memory or streamed.

``Labeled`` is the one row source of ``fit``, ``cv``, ``compare``, the grid search and
calibration: the same code fits a head and predicts with it either way, and only this module
(through stream.py) knows the difference. In memory, ``X`` holds the rows' features and a fit is
scikit-learn's ``Pipeline.fit`` (its temperature scalings fitted by calibration.fit); streamed
(``X`` is None), the rows are read from the store
``chunk_rows`` at a time and the head (a streaming head: sgd, logreg-sgd) is fitted with
``partial_fit`` (stream.fit_rows), so memory is bounded by the chunk, not by the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..store.read import FeatureStore
from . import calibration, fewshot, stream
from .compact import predict_scored

Tick = Callable[[int], None]
Note = Callable[[str], None]


def _nothing(*_: Any) -> None:
    return None


@dataclass
class Labeled:
    """Labeled rows: ``rows`` (store row indices, int64, shape (n,)), ``y`` (their class names,
    str, shape (n,)), and ``X`` (their features, shape (n, D), float32/float64) when in memory,
    or None when streamed from ``store`` in chunks of ``chunk_rows`` rows. ``scope``: the rows
    these were taken from (``take``; None: these rows), over which a streamed fit, read or
    prediction that meets NaN, infinite or huge features counts and names them
    (checks.refuse_unusable_chunk): the user's training rows, not the part a calibration
    hold-out or a fold left. In memory, the command that makes ``X`` checks it
    (checks.refuse_unusable) before any fit."""

    store: FeatureStore | None
    rows: np.ndarray
    y: np.ndarray
    X: np.ndarray | None = None
    chunk_rows: int = stream.DEFAULT_CHUNK_ROWS
    scope: np.ndarray | None = None
    part: str = ""  # what these rows are when taken for a purpose (take), for notes

    @classmethod
    def in_memory(cls, X: np.ndarray, y: np.ndarray) -> "Labeled":
        """Rows given as arrays (no store): ``X`` (n, D) features, ``y`` (n,) class names."""
        return cls(None, np.arange(len(y), dtype=np.int64), np.asarray(y), X)

    @property
    def streamed(self) -> bool:
        return self.X is None

    def __len__(self) -> int:
        return len(self.y)

    def take(self, pos: np.ndarray, part: str = "") -> "Labeled":
        """The rows at positions ``pos`` (into these rows), in that order. ``part``: what they
        are (e.g. "a cross-validation fold's training part"), which the few-shot notes of a fit
        on them name (fewshot.adapt)."""
        pos = np.asarray(pos, dtype=np.int64)
        return Labeled(self.store, self.rows[pos], self.y[pos],
                       None if self.X is None else self.X[pos], self.chunk_rows,
                       self.rows if self.scope is None else self.scope, part)

    def features(self) -> np.ndarray:
        """The features of these rows in memory (streamed rows are read whole: for a few rows
        only, e.g. calibration)."""
        if self.X is not None:
            return self.X
        assert self.store is not None
        return stream.read_rows(self.store, self.rows, self.chunk_rows, self.scope)

    def fit(self, pipe: Any, head: str, params: dict[str, Any] | None, *,
            class_weight: str | None = None, seed: int = 0, tick: Tick = _nothing,
            note: Note = _nothing, notes: list[str] | None = None) -> Any:
        """Fit ``pipe`` (the head's unfitted Pipeline, from registry.build with the same
        ``head``, ``params``, ``class_weight`` and ``seed``) on these rows; streamed rows
        rebuild it streamable (stream.build) and fit it chunk by chunk. In memory, settings
        these rows cannot support are lowered first (fewshot.adapt, a note for each appended to
        ``notes``) or the head is refused (FewShotError)."""
        if self.X is not None:
            found = fewshot.adapt(pipe, self.y, head, self.part)
            if notes is not None:
                notes.extend(found)
            return calibration.fit(pipe, self.X, self.y)
        assert self.store is not None
        return stream.fit_rows(self.store, self.rows, self.y, head, params,
                               class_weight=class_weight, seed=seed,
                               chunk_rows=self.chunk_rows, tick=tick, note=note,
                               scope=self.scope)

    def predict(self, estimator: Any, *, use_proba: bool = True,
                tick: Tick = _nothing) -> tuple[np.ndarray, np.ndarray, bool]:
        """Predicted class (str, shape (n,)), its score (float, shape (n,)) and whether the
        scores are probabilities (compact.predict_scored), for these rows in their order."""
        if self.X is not None:
            pred, _, conf, calibrated = predict_scored(estimator, self.X, use_proba=use_proba)
            tick(len(self))
            return np.asarray(pred).astype(str), conf, bool(calibrated)
        assert self.store is not None
        return stream.predict_rows(estimator, self.store, self.rows,
                                   chunk_rows=self.chunk_rows, use_proba=use_proba, tick=tick,
                                   scope=self.scope)
