"""`embedpipe fit`: train one head on a store's training rows and write its head file (no torch).

Training rows are those of the ``train`` split, or every labeled row when the store has no
train split (evaluate.select_rows). Heads without native probabilities (svm, linear-svm, ridge)
are wrapped in temperature scaling fitted on cross-validated decision scores, so `predict`
reports calibrated confidences; the wrapped head predicts the same classes as the bare one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import _io, checks
from ..store.read import open_stores
from . import artifacts, fewshot
from . import registry as heads
from .fit import _fit_errors, _Quiet, convergence_note, fit_adapted, fit_configuration
from .rows import TRAIN_SPLIT, EvaluateError, min_class, select_rows, targets

CALIBRATION_FOLDS = 5
CALIBRATION_FRACTION = 0.1  # of a streamed head's training rows


@dataclass
class FitResult:
    path: Path
    head: str
    params: dict[str, Any]
    rows: int
    classes: list[str]
    calibration: str
    seconds: float
    train_accuracy: float

    def line(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items())) or "defaults"
        return (f"fitted {self.head} ({params}) on {self.rows} rows, {len(self.classes)} "
                f"classes in {self.seconds:.1f} s; training accuracy {self.train_accuracy:.3f}; "
                f"probabilities: {self.calibration} → {self.path}")



def _calibrated(estimator: Any, X: np.ndarray, y: np.ndarray, name: str = "",
                notes: list[str] | None = None) -> tuple[Any, str, str]:
    """``estimator`` wrapped in temperature scaling on up to CALIBRATION_FOLDS stratified
    folds, as many as the smallest class allows (fewshot.calibration_folds); with too few
    images per class for 2 folds, ``estimator`` itself, fitted, uncalibrated. Returns the
    head, how it was calibrated (text for the manifest) and the kind of its probabilities
    (artifacts.PROBABILITIES)."""
    from sklearn.calibration import CalibratedClassifierCV

    cls, smallest = min_class(y)
    k = fewshot.calibration_folds(estimator, y, CALIBRATION_FOLDS)
    if k < 2:
        return (fit_adapted(estimator, X, y, name, notes),
                f"none (class {cls!r} has {smallest} image(s), too few to calibrate: "
                "confidence is a softmax of scores)", "scores")
    # cv as a number (stratified, unshuffled folds): a splitter object would be stored in the
    # head file as a type that skops does not trust.
    cal = CalibratedClassifierCV(estimator, method="temperature", ensemble=False, cv=k)
    return fit_adapted(cal, X, y, name, notes), f"temperature scaling ({k}-fold)", "calibrated"


def fit(store_path: str | Path | Sequence[str | Path], head: str, out: str | Path, *,
        params: dict[str, Any] | None = None, class_weight: str | None = None,
        search: bool = False, seed: int = 0, jobs: int | None = None,
        chunk_rows: int | None = None, progress: bool = False,
        say: Callable[[str], None] = lambda m: None) -> FitResult:
    """Fit ``head`` on the training rows and save it. Streaming heads (sgd, logreg-sgd) read
    the store ``chunk_rows`` rows at a time (stream.py); the others load the training rows."""
    from . import stream

    t0 = time.perf_counter()
    _io.refuse_inputs(out, _paths(store_path))  # before any work: -o STORE would destroy it
    spec = heads.get(head)
    heads.build(head, params, class_weight=class_weight, seed=seed)  # bad options fail first
    if chunk_rows is not None:
        stream.check_chunk_rows(chunk_rows)
    if spec.streaming:
        return _fit_streaming(store_path, head, out, params=params, class_weight=class_weight,
                              search=search, seed=seed,
                              chunk_rows=chunk_rows or stream.DEFAULT_CHUNK_ROWS,
                              progress=progress, say=say, t0=t0)
    store = open_stores(store_path)
    for note in store.notes:
        say(note)
    rows = select_rows(store)
    X, y = store.features[rows.train], targets(store, rows.train)
    classes, counts = np.unique(y, return_counts=True)
    fewshot.check_classes(y, str(store.path))
    checks.refuse_nonfinite(X, [store.paths[i] for i in rows.train], str(store.path))
    say(f"fitting {head} on {len(y)} rows ({rows.describe()}), {len(classes)} classes"
        + (", searching its grid" if search else ""))
    notes: list[str] = []
    with _Quiet() as quiet, _fit_errors(head, params or {}, str(store.path)):
        if spec.native_proba:
            estimator, chosen = fit_configuration(X, y, head, params, class_weight=class_weight,
                                                  search=search, seed=seed, jobs=jobs,
                                                  notes=notes)
            calibration, probabilities = "native", "native"
        else:  # the search (if any) on the bare head, then the chosen one calibrated
            chosen = (fit_configuration(X, y, head, params, class_weight=class_weight,
                                        search=True, seed=seed, jobs=jobs, notes=notes)[1]
                      if search else dict(params or {}))
            base = heads.build(head, chosen, class_weight=class_weight, seed=seed)
            estimator, calibration, probabilities = _calibrated(base, X, y, head, notes)
    for n in dict.fromkeys(notes):
        say(f"note: {n}")
    if quiet.convergence:
        say(convergence_note(head, quiet.convergence))
    train_acc = float((estimator.predict(X) == y).mean())
    manifest = artifacts.new_manifest(
        head=head, params=chosen, class_weight=class_weight, search=search, seed=seed,
        calibration=calibration, probabilities=probabilities,
        classes=[str(c) for c in estimator.classes_],
        store_identity=store.identity,
        training=_training(store, rows, classes, counts, train_acc),
    )
    path = artifacts.save(out, estimator, manifest, check_rows=X[_check_sample(len(y))],
                          inputs=_paths(store_path))
    return FitResult(path, head, chosen, len(y), [str(c) for c in classes], calibration,
                     time.perf_counter() - t0, train_acc)


def _check_sample(n: int, size: int = 512) -> np.ndarray:
    """Training rows (positions) on which a head's compact form must predict like the head
    before it is saved (artifacts.save): up to ``size``, spread over all of them."""
    return np.unique(np.linspace(0, n - 1, min(n, size)).astype(np.int64))


def _training(store: Any, rows: Any, classes: np.ndarray, counts: np.ndarray,
              train_acc: float, **extra: Any) -> dict[str, Any]:
    """The head manifest's record of what it was trained on."""
    return {"store": str(store.path), "rows": int(counts.sum()),
            "split": "train" if (store.splits[rows.train] == TRAIN_SPLIT).all()
            else "all labeled rows",
            "per_class": {str(c): int(n) for c, n in zip(classes, counts)},
            "train_accuracy": train_acc, **extra}


def _paths(store_path: str | Path | Sequence[str | Path]) -> list[str | Path]:
    return [store_path] if isinstance(store_path, (str, Path)) else list(store_path)


def default_head_path(store: str | Path | Sequence[str | Path], head: str,
                      cache_dir: Path) -> Path:
    stem = "+".join(Path(p).stem for p in _paths(store))
    return cache_dir / f"{stem}__{head}{artifacts.SUFFIX}"


def _calibration_rows(y: np.ndarray, chunk_rows: int, seed: int) -> np.ndarray:
    """Positions of a stratified sample of the training rows held out to calibrate a streamed
    head: about 10% of each class (at least 2 of every class with 4 or more rows, never more
    than half of a class, so the head keeps as many to train on), at most about
    ``chunk_rows`` rows in all, so it fits in one chunk's memory."""
    rng = np.random.default_rng(seed)
    frac = min(CALIBRATION_FRACTION, chunk_rows / max(1, len(y)))
    out = []
    for c in np.unique(y):
        pos = np.flatnonzero(y == c)
        if len(pos) < 4:
            continue
        k = min(len(pos) // 2, max(2, int(round(frac * len(pos)))))
        out.append(rng.choice(pos, size=k, replace=False))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def _fit_streaming(store_path: str | Path | Sequence[str | Path], head: str,
                   out: str | Path, *,
                   params: dict[str, Any] | None, class_weight: str | None, search: bool,
                   seed: int, chunk_rows: int, progress: bool, say: Callable[[str], None],
                   t0: float) -> FitResult:
    from ..progress import Progress
    from . import stream

    spec = heads.get(head)
    store = open_stores(store_path, features=False)  # labels, paths, splits: no features
    for note in store.notes:
        say(note)
    rows = select_rows(store)
    y = targets(store, rows.train)
    classes, counts = np.unique(y, return_counts=True)
    fewshot.check_classes(y, str(store.path))
    cal = _calibration_rows(y, chunk_rows, seed) if not spec.native_proba else np.zeros(0, int)
    _, smallest = min_class(y[cal]) if len(cal) else ("", 0)
    k = min(CALIBRATION_FOLDS, smallest)
    if k < 2 or len(np.unique(y[cal])) < len(classes):
        # a class of fewer than 4 rows has none held out: temperature scaling fitted without
        # it cannot score it (scikit-learn's IndexError), so no calibration at all
        cal = np.zeros(0, dtype=np.int64)
    fit_pos = np.setdiff1d(np.arange(len(y)), cal)
    n_fit = len(fit_pos)
    say(f"fitting {head} on {n_fit} rows ({rows.describe()}), {len(classes)} classes, "
        f"streamed in chunks of {chunk_rows} rows"
        + (f", {len(cal)} rows held out to calibrate" if len(cal) else "")
        + (", searching its grid" if search else ""))
    total = stream.work(head, params, n_fit, search=search, seed=seed) + len(cal) + len(y)
    with Progress(total, f"fit {head}", enabled=progress, unit="row") as bar:
        estimator, chosen = stream.fit_configuration(
            store, rows.train[fit_pos], y[fit_pos], head, params, class_weight=class_weight,
            search=search, seed=seed, chunk_rows=chunk_rows, tick=bar.update, note=bar.note)
        calibration, probabilities = "native", "native"
        if not spec.native_proba:
            if len(cal):
                from sklearn.calibration import CalibratedClassifierCV
                from sklearn.frozen import FrozenEstimator

                bar.note("calibrating")
                Xc = stream.read_rows(store, rows.train[cal], chunk_rows)
                bar.update(len(cal))
                # the fitted pipeline is frozen: the folds only split the calibration rows
                estimator = CalibratedClassifierCV(FrozenEstimator(estimator),
                                                   method="temperature", cv=k).fit(Xc, y[cal])
                probabilities = "calibrated"
                calibration = (f"temperature scaling on {len(cal)} held-out training rows "
                               "(not trained on)")
            else:
                probabilities = "scores"
                calibration = "none (too few rows per class: confidence is a softmax of scores)"
        bar.note("training accuracy")
        pred, _, _ = stream.predict_rows(estimator, store, rows.train, chunk_rows=chunk_rows,
                                         tick=bar.update)
    train_acc = float((pred == y).mean())
    manifest = artifacts.new_manifest(
        head=head, params=chosen, class_weight=class_weight, search=search, seed=seed,
        calibration=calibration, probabilities=probabilities,
        classes=[str(c) for c in estimator.classes_],
        store_identity=store.identity,
        training=_training(store, rows, classes, counts, train_acc,
                           streamed={"chunk_rows": chunk_rows, "epochs": _epochs(estimator),
                                     "fitted_rows": int(n_fit),
                                     "calibration_rows": int(len(cal))}),
    )
    check = stream.read_rows(store, rows.train[_check_sample(len(y))], chunk_rows)
    path = artifacts.save(out, estimator, manifest, check_rows=check,
                          inputs=_paths(store_path))
    return FitResult(path, head, chosen, int(n_fit), [str(c) for c in classes], calibration,
                     time.perf_counter() - t0, train_acc)


def _epochs(estimator: Any) -> int:
    """max_iter of the SGD step inside a (calibrated) streamed head."""
    for k, v in estimator.get_params().items():
        if k.endswith("clf__max_iter"):
            return int(v)
    return 0
