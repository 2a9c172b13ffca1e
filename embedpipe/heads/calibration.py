"""Fitting heads whose probabilities come from temperature scaling, in as few fits as the rows
allow.

svm, linear-svm, ridge and centroid have no probabilities of their own: ``fit`` wraps them (and
an ensemble its members) in scikit-learn's ``CalibratedClassifierCV(method="temperature")``,
whose one parameter, a temperature, is fitted on decision values the head gave rows it was not
fitted on. fewshot.adapt decides how those values are made, by the rows (fewshot's module
docstring) and ``refits`` below; the head file always holds a plain ``CalibratedClassifierCV``
with one calibrated copy of the head, so loading, compact forms and ONNX export do not depend
on which:

* **k-fold** (``cv=k``, ``ensemble=False``, up to fewshot.REFIT_ABOVE rows, or where a class is
  too small to hold rows out): scikit-learn's own fit, the k folds' out-of-fold values, then the
  head on all rows (k+1 fits).
* **held out, then refitted** (above fewshot.REFIT_ABOVE and up to fewshot.HOLDOUT_ABOVE rows,
  ``refits``): the head fitted on a stratified 4/5 of the rows (what each of 5 folds trains
  on), the temperature on its decision values for the other fifth, and the head refitted on
  all rows (2 fits). scikit-learn's fit does not do this (its ``cross_val_predict`` takes
  partitions only): ``fit`` below does, and every in-memory fit goes through it. The fitted
  head keeps its k folds as its setting (scikit-learn's refit of a clone of the saved head
  takes them) and the count of held-out rows in the fitted attribute
  ``fewshot.REFIT_HELD_OUT``, which the manifest's words name.
* **held out** (``cv`` a one-split splitter, ``ensemble=True``, above fewshot.HOLDOUT_ABOVE
  rows): scikit-learn's own fit, the head fitted once on all but the held-out rows.
* **from given out-of-fold values** (auto's final fit): the values its cross-validation already
  computed (calibrated_from_oof), the head fitted once.

The temperature is the same function of decision values in every case, so the predicted class
is the head's own.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from . import fewshot

# given(spec) -> the out-of-fold decision values over all rows to fit spec's temperature on,
# or None (auto's final fit passes them: auto._reused)
Given = Callable[[Any], "np.ndarray | None"]


def _is_calibration(est: Any) -> bool:
    return type(est).__name__ == "CalibratedClassifierCV"


def calibrated_from_oof(spec: Any, X: np.ndarray, y: np.ndarray, decision: np.ndarray,
                        rows: np.ndarray | None = None) -> Any:
    """``spec`` (an unfitted ``CalibratedClassifierCV(method="temperature", ensemble=False)``)
    fitted on (X, y) as its own ``fit`` would, except that the temperature is fitted on
    ``decision`` — the head's decision values (N, or N×K in np.unique(y) order) for rows it was
    not fitted on: out-of-fold values over all N rows, or, with ``rows`` (positions into y,
    int64), values for those rows only — instead of on a ``cross_val_predict`` of its own: the
    head is fitted once, on all rows, not k+1 times (at 10,000 Fashion-MNIST rows an svm's
    5-fold calibration took 67 of its 75 s, bench/results/auto_refit.md). Equal to ``spec.fit``
    with ``cv`` set to the folds that gave ``decision`` (tests/test_auto.py checks it), except
    that labels are always encoded 0..K-1 before the head is fitted (scikit-learn 1.9.1 encodes
    only strings, and its temperature scaling goes wrong on integer labels that are not
    0..K-1). Built as scikit-learn's fit builds it (``sklearn.calibration._fit_calibrator``);
    returns None where that is not available as used here, so that the caller fits ``spec``
    itself."""
    from sklearn.base import clone

    try:
        from sklearn.calibration import _fit_calibrator
    except ImportError:  # scikit-learn moved it: calibrate by its own CV instead
        return None
    out = clone(spec)
    classes = np.unique(y)
    y_fit = np.searchsorted(classes, y)
    base = clone(out.estimator).fit(X, y_fit)
    pred = decision.reshape(-1, 1) if decision.ndim == 1 else decision
    try:
        calibrated = _fit_calibrator(base, pred, y_fit if rows is None else y_fit[rows],
                                     classes, out.method, xp=np)
    except TypeError:  # its private signature changed: calibrate by its own CV instead
        return None
    out.calibrated_classifiers_ = [calibrated]
    out.classes_ = classes
    if hasattr(base, "n_features_in_"):
        out.n_features_in_ = base.n_features_in_
    return out


def refits(spec: Any, y: np.ndarray) -> bool:
    """Whether unfitted ``spec`` is fitted the held-out-then-refitted way on targets ``y``: a
    ``CalibratedClassifierCV`` of k folds (fewshot.adapt left them: not a held-out sample on
    many rows, nor a frozen head) on rows fewshot.refit_split holds a fifth of."""
    return (_is_calibration(spec) and isinstance(spec.cv, int) and spec.ensemble is False
            and type(spec.estimator).__name__ != "FrozenEstimator"
            and fewshot.refit_split(y) is not None)


def held_out_then_refitted(spec: Any, X: np.ndarray, y: np.ndarray) -> Any:
    """``spec`` (an unfitted ``CalibratedClassifierCV`` that ``refits`` on ``y``) fitted on
    (X, y): its head fitted on the training part of fewshot.refit_split's one stratified split,
    the temperature on that head's decision values for the held-out part, then the head
    refitted on all rows (calibrated_from_oof). 2 fits instead of k+1. The fitted estimator
    keeps ``spec``'s k folds as its setting (a clone refitted by scikit-learn takes them) and
    holds the count of held-out rows in the fitted attribute fewshot.REFIT_HELD_OUT, which the
    manifest's words name. Returns None where calibrated_from_oof cannot build it (the caller
    then fits k folds instead)."""
    from sklearn.base import clone

    from .compact import decision_values

    classes = np.unique(y)
    y_fit = np.searchsorted(classes, y)
    train, held = next(fewshot.refit_split(y).split(X, y_fit))
    part = clone(spec.estimator).fit(X[train], y_fit[train])
    decision = decision_values(part, X[held])
    out = calibrated_from_oof(spec, X, y, decision, rows=held)
    if out is not None:
        setattr(out, fewshot.REFIT_HELD_OUT, int(len(held)))
    return out


def _fitted(spec: Any, X: np.ndarray, y: np.ndarray, given: Given | None) -> Any:
    """``spec`` fitted by the cheapest way that applies (module docstring), or None: its own
    scikit-learn fit (k folds, or held out without a refit)."""
    d = given(spec) if given is not None else None
    if d is not None:
        return calibrated_from_oof(spec, X, y, d)
    if refits(spec, y):
        return held_out_then_refitted(spec, X, y)  # None: scikit-learn's internals moved
    return None


def fit(est: Any, X: np.ndarray, y: np.ndarray, given: Given | None = None) -> Any:
    """Fit ``est`` (a head's unfitted estimator after fewshot.adapt: a Pipeline, a
    ``CalibratedClassifierCV`` around one, or a Pipeline ending in a soft ``VotingClassifier``)
    on features ``X`` (N×D) and labels ``y`` (N,), as ``est.fit`` would, each temperature
    scaling in it fitted the cheapest way that applies (module docstring; ``given``: auto's
    out-of-fold values). A vote's members are fitted first and put in the vote frozen, so that
    the vote's own fit keeps them, then unwrapped: the fitted vote is the one ``est.fit`` makes.
    A vote behind a step of its own (``--param pca=N``) is fitted by scikit-learn, its members
    calibrated by their k folds."""
    from sklearn.frozen import FrozenEstimator

    if _is_calibration(est):
        out = _fitted(est, X, y, given)
        return out if out is not None else est.fit(X, y)
    vote = est.steps[-1][1] if hasattr(est, "steps") else None
    if type(vote).__name__ != "VotingClassifier" or any(
            step not in ("passthrough", None) for _, step in est.steps[:-1]):
        return est.fit(X, y)
    specs = list(vote.estimators)
    y_enc = np.searchsorted(np.unique(y), y)  # the labels the vote fits its members on
    fitted = [_fitted(sub, X, y_enc, given) for _, sub in specs]  # None: the vote fits it
    if all(f is None for f in fitted):
        return est.fit(X, y)
    vote.estimators = [(name, sub if f is None else FrozenEstimator(f))
                       for (name, sub), f in zip(specs, fitted)]
    try:
        est.fit(X, y)
    finally:
        vote.estimators = specs  # the unfitted members again, as a plain fit leaves them
    vote.estimators_ = [e.estimator if isinstance(e, FrozenEstimator) else e
                        for e in vote.estimators_]
    for name, e in list(vote.named_estimators_.items()):
        if isinstance(e, FrozenEstimator):
            vote.named_estimators_[name] = e.estimator
    return est
