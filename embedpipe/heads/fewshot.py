"""Few-shot and one-class data: what each head can do with 1, 2 or 3 images per class.

One place decides it, for every command that fits a head (``fit``, ``cv``, ``compare``, the
inner ``--search``, ensembles, calibration): ``adapt(estimator, y)`` is called on an unfitted
estimator just before it is fitted on targets ``y``, lowers the settings that the data cannot
support and returns a note for each, or raises FewShotError (one line) when the head cannot be
fitted on such data at all. What it changes (scikit-learn would otherwise raise deep inside):

* ``KNeighborsClassifier``: ``n_neighbors`` is lowered to the number of training rows, and
  so are a ``--search`` grid's values (``adapt_grid``).
* ``MLPClassifier``: ``early_stopping`` is turned off when its stratified validation split
  (``validation_fraction`` of the rows) cannot hold one image of every class, with the
  training part keeping one too.
* ``CalibratedClassifierCV`` with ``cv=k`` folds (temperature scaling of svm, linear-svm,
  ridge, centroid, also inside ensembles): ``k`` is lowered to what the smallest class allows
  (``calibration_folds``); when no 2-fold split is possible the head is refused
  (an ensemble member needs probabilities), or, for a single head in ``fit``, the caller fits
  it uncalibrated (train.py).
* ``NearestCentroid`` scores rows by distances scaled by the pooled within-class standard
  deviation, which is zero (NaN scores) when every class has a single image: refused.
* The ``lda`` preprocessing step (knn's and centroid's default from 5 rows per class,
  ``--param prep=l2+lda``): scikit-learn's eigen solver cannot invert the within-class
  covariance of classes with fewer than ``LDA_MIN_FIT_ROWS`` images (it raises a LinAlgError),
  so there the step is turned off (the rows go on L2-normalised). Inside calibration this
  changes the base pipeline itself, so the folds and the final fit stay the same pipeline.

And ``check_classes(y, where)`` is the one refusal of training rows holding a single class.

At the other end, ``adapt`` also decides how a ``CalibratedClassifierCV`` calibrates on many
rows (every class with at least ``HOLDOUT_MIN_CLASS``): above ``HOLDOUT_ABOVE`` it is fitted
once, on all but a stratified sample of ``HOLDOUT_ROWS`` rows, and the temperature on that
sample (``holdout``), instead of k+1 fits (k folds and the final one). Above ``REFIT_ABOVE``
rows calibration.fit (every in-memory fit) fits the head on a stratified 4/5 of them, the
temperature on the other fifth, and the head on all rows: 2 fits (``refit_split``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import UserError


class FewShotError(UserError):
    """A head that cannot be fitted on so few images per class; one line with the fix."""


def counts(y: np.ndarray) -> tuple[str, int, int, int]:
    """(smallest class, its count, number of classes, rows) of targets ``y``."""
    values, n = np.unique(np.asarray(y), return_counts=True)
    if not len(values):
        return "", 0, 0, 0
    i = int(np.argmin(n))
    return str(values[i]), int(n[i]), len(values), int(n.sum())


def check_classes(y: np.ndarray, where: str, what: str = "training rows") -> None:
    """Refuse (FewShotError) targets of fewer than two classes: no classifier is defined."""
    cls, _, n_classes, n = counts(y)
    if n_classes < 2:
        held = f"hold one class ({cls!r})" if n_classes else "are empty"
        raise FewShotError(f"{where}: the {n} {what} {held}; a head needs at least two "
                           "classes: add images of other classes")


def needs_two_per_fold(estimator: Any) -> bool:
    """Whether ``estimator`` (or the pipeline ending in it) is a NearestCentroid."""
    last = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    return type(last).__name__ == "NearestCentroid"


def calibration_folds(estimator: Any, y: np.ndarray, wanted: int) -> int:
    """The most stratified folds (<= ``wanted``) for CV-calibrating ``estimator`` on ``y``:
    every class must have an image in each fold, and a NearestCentroid needs two images of
    every class in each training part. Below 2 no calibration is possible."""
    _, smallest, _, _ = counts(y)
    k = min(wanted, smallest)
    if needs_two_per_fold(estimator):
        while k >= 2 and smallest - math.ceil(smallest / k) < 2:
            k -= 1
    return k


# Calibration on a held-out sample instead of k-fold CV. k-fold temperature scaling fits the head
# k+1 times (5 folds of 4/5 of the rows, then all of them): on 60,000 Fashion-MNIST rows the
# calibrated RBF svm took 1,063 CPU-seconds, 275 held out (bench/results/calibration.md), and
# auto's vote with a calibrated svm 20 minutes. One held-out split fits it once, on all but HOLDOUT_ROWS rows (3% of 60,000, at most
# 10% at the threshold), and a temperature is one number, well estimated from 2,000 rows
# (bench/calibration.py measures accuracy, log loss and ECE of both side by side).
HOLDOUT_ABOVE = 20_000
HOLDOUT_ROWS = 2_000
HOLDOUT_MIN_CLASS = 20  # every class keeps rows on both sides of the stratified split


# Between REFIT_ABOVE and HOLDOUT_ABOVE rows the k folds still cost k+1 fits (an RBF svm on
# 10,000 Fashion-MNIST rows: 61 of its 67 s, bench/results/auto_refit.md) for one number. The
# head is fitted on a stratified (REFIT_FOLDS-1)/REFIT_FOLDS of the rows (what each of 5 folds
# trains on), the temperature on its decision values for the rest, then the head on all rows:
# 2 fits, the same final head (and so the same predicted classes), a temperature from 1/5 of
# the rows instead of all of them (bench/calibration_refit.py measures both side by side).
# Below REFIT_ABOVE rows the k folds take seconds and every row's value counts.
REFIT_ABOVE = 5_000
REFIT_FOLDS = 5
# the fitted attribute of a CalibratedClassifierCV fitted that way: the rows held out (its
# ``cv`` stays k folds, which scikit-learn's refit of a clone takes)
REFIT_HELD_OUT = "embedpipe_held_out_rows_"


def refit_split(y: np.ndarray, seed: int = 0) -> Any:
    """The one split by which calibration.fit holds a fifth of the rows out to fit a
    CalibratedClassifierCV's temperature on targets ``y``, then refits the head on all of them
    (calibration.held_out_then_refitted), or None to keep its folds: above REFIT_ABOVE and up
    to HOLDOUT_ABOVE rows with at least HOLDOUT_MIN_CLASS rows in every class, a
    ``StratifiedShuffleSplit`` holding out ceil(N / REFIT_FOLDS) rows. The CalibratedClassifierCV
    keeps its k folds as its setting (scikit-learn's own fit, which cannot do this, takes
    them)."""
    from sklearn.model_selection import StratifiedShuffleSplit

    _, smallest, _, n = counts(y)
    if not REFIT_ABOVE < n <= HOLDOUT_ABOVE or smallest < HOLDOUT_MIN_CLASS:
        return None
    return StratifiedShuffleSplit(n_splits=1, test_size=math.ceil(n / REFIT_FOLDS),
                                  random_state=seed)


def holdout(y: np.ndarray, seed: int = 0) -> Any:
    """The cross-validator a CalibratedClassifierCV on targets ``y`` uses in place of k folds,
    or None to keep its folds: above HOLDOUT_ABOVE rows with at least HOLDOUT_MIN_CLASS rows in
    every class, a ``StratifiedShuffleSplit`` of one split holding out HOLDOUT_ROWS rows
    (recomputed from the rows it is fitted on, so clones inside a grid search or a fold split
    their own rows). Used with ``ensemble=True``: the head fitted on the rest, the temperature
    on the held-out rows."""
    from sklearn.model_selection import StratifiedShuffleSplit

    _, smallest, _, n = counts(y)
    if n <= HOLDOUT_ABOVE or smallest < HOLDOUT_MIN_CLASS:
        return None
    return StratifiedShuffleSplit(n_splits=1, test_size=HOLDOUT_ROWS, random_state=seed)


def calibration_text(estimator: Any) -> str:
    """How a CalibratedClassifierCV ``estimator`` calibrates (as configured, after ``adapt``):
    'temperature scaling (K-fold)', 'temperature scaling on N held-out training rows, then the
    head refitted on all rows' (calibration.fit, above REFIT_ABOVE rows) or 'temperature
    scaling on N held-out training rows (not trained on)' (holdout), the manifest's
    ``calibration`` words."""
    cv = estimator.cv
    held = getattr(estimator, REFIT_HELD_OUT, None)
    if held is not None:
        return (f"temperature scaling on {held:,} held-out training rows, then the head "
                "refitted on all rows")
    if isinstance(cv, int):
        return f"temperature scaling ({cv}-fold)"
    return (f"temperature scaling on {cv.test_size:,} held-out training rows (not trained "
            "on)")


def _mlp_split_ok(y: np.ndarray, fraction: float) -> bool:
    _, smallest, n_classes, n = counts(y)
    n_val = math.ceil(fraction * n)
    return smallest >= 2 and n_val >= max(2, n_classes) and n - n_val >= n_classes


def adapt(estimator: Any, y: np.ndarray, name: str = "", part: str = "") -> list[str]:
    """Lower, in place, the settings of unfitted ``estimator`` (a head's Pipeline, an
    ensemble, a calibrated head) that targets ``y`` cannot support; return one note per change.
    ``part``: what ``y`` is when it is not the user's training rows (e.g. "a cross-validation
    fold's training part"), so that a note's counts are not read as the class's size.
    Raises FewShotError when the head cannot be fitted on ``y`` (see the module docstring)."""
    notes: list[str] = []
    _adapt(estimator, np.asarray(y), name or type(estimator).__name__, notes,
           where=f" in {part}" if part else "")
    return notes


LDA_MIN_FIT_ROWS = 3  # 2 per class failed on every draw of Lite0 features tried, 3 on none


def _adapt(est: Any, y: np.ndarray, name: str, notes: list[str], prefix: str = "",
           where: str = "") -> None:
    """adapt's walk; ``prefix`` ('knn:' inside an ensemble) leads a parameter a note names, as
    --param takes it; ``where`` (" in ...": adapt's ``part``) follows the counts a note
    quotes."""
    kind = type(est).__name__
    cls, smallest, n_classes, n = counts(y)
    if hasattr(est, "steps"):  # Pipeline: the last step is the classifier
        lda = [step for step, obj in est.steps[:-1]
               if type(obj).__name__ == "LinearDiscriminantAnalysis"]
        if lda and smallest < LDA_MIN_FIT_ROWS:
            notes.append(f"{name}: lda step off (the steps before it stay): class {cls!r} has "
                         f"{smallest} training image(s){where}, the linear discriminants need "
                         f"{LDA_MIN_FIT_ROWS} of every class")
            est.set_params(**{step: "passthrough" for step in lda})
        _adapt(est.steps[-1][1], y, name, notes, prefix, where)
    elif kind == "VotingClassifier":
        for member, sub in est.estimators:
            _adapt(sub, y, f"{name} member {member}" if name else member, notes,
                   f"{member}:", where)
    elif kind == "CalibratedClassifierCV":
        base = est.estimator
        own = isinstance(est.cv, int) and type(base).__name__ != "FrozenEstimator"
        split = holdout(y) if own else None
        if split is not None:
            est.set_params(cv=split, ensemble=True)  # fitted once, on all but the held-out rows
            _adapt(base, y, name, notes, prefix, where)
        elif own:  # k folds; on many rows calibration.fit holds a fifth out instead
            # (refit_split), whose training part is larger than a fold's
            k = calibration_folds(base, y, est.cv)
            if k < 2:
                need = 3 if needs_two_per_fold(base) else 2
                raise FewShotError(
                    f"{name}: its probabilities come from temperature scaling fitted by "
                    f"cross-validation, which needs {need} images of every class; class "
                    f"{cls!r} has {smallest}: add images, or use members with native "
                    "probabilities (logreg, knn, mlp, logreg-sgd)")
            if k != est.cv:
                notes.append(f"{name}: calibrated on {k} folds instead of {est.cv} (class "
                             f"{cls!r} has {smallest} images{where})")
                est.set_params(cv=k)
            _adapt(base, fold_part(y, k), name, notes, prefix,  # each fold's training part
                   " in a calibration fold's training part")
    elif kind == "KNeighborsClassifier":
        if est.n_neighbors > n >= 1:
            notes.append(f"{name}: {prefix}n_neighbors lowered from {est.n_neighbors} to {n} "
                         f"(only {n} training rows{where})")
            est.set_params(n_neighbors=n)
    elif kind == "MLPClassifier":
        if est.early_stopping and not _mlp_split_ok(y, est.validation_fraction):
            notes.append(f"{name}: early stopping off ({prefix}early_stopping=false): a "
                         f"{est.validation_fraction:.0%} "
                         f"validation split of {n} rows{where} cannot hold every one of the "
                         f"{n_classes} classes (trains for max_iter={est.max_iter} epochs)")
            est.set_params(early_stopping=False)
    elif kind == "NearestCentroid":
        if 0 < smallest < 2 and n == n_classes:
            raise FewShotError(f"{name}: nearest-centroid scores are distances scaled by the "
                               "within-class spread, which is undefined with one image per "
                               f"class (class {cls!r} has {smallest}); add images, or use knn "
                               "or logreg")


def adapt_grid(grid: dict[str, list[Any]], y: np.ndarray, name: str = "") -> list[str]:
    """Lower, in place, the values of a search grid (pipeline names: registry.param_grid) that
    no fit on targets ``y`` (the training part of a search's fold: ``fold_part``) can take, as
    ``adapt`` lowers the head's own setting: ``n_neighbors`` above the training rows becomes
    their number (once). Returns one note per change; without it scikit-learn fails those grid
    points and the search picks among the rest, never the value adapt chose."""
    _, _, _, n = counts(y)
    values = grid.get("clf__n_neighbors")
    if not values or n < 1 or max(values) <= n:
        return []
    high = [v for v in values if v > n]
    grid["clf__n_neighbors"] = list(dict.fromkeys(min(v, n) for v in values))
    return [f"{name}: the search grid's n_neighbors {', '.join(map(str, high))} lowered to {n} "
            f"(the search's folds train on {n} rows)"]


def fold_part(y: np.ndarray, k: int) -> np.ndarray:
    """Targets of the smallest training part of a stratified ``k``-fold split of ``y``."""
    values, n = np.unique(y, return_counts=True)
    return np.repeat(values, n - np.ceil(n / k).astype(int))
