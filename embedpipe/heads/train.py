"""`embedpipe fit`: train one head on a store's training rows and write its head file (no torch).

Training rows are those of the ``train`` split, or every labeled row when the store has no
train split (evaluate.select_rows). Heads without native probabilities (svm, linear-svm, ridge,
centroid) are wrapped in temperature scaling fitted on decision scores of rows the head was not
fitted on (cross-validated, or a held-out part on many rows: calibration.py), so `predict`
reports calibrated confidences; the wrapped head predicts the same classes as the bare one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import _io, checks
from ..errors import naming
from ..store.read import finetuned_note, open_stores, refuse_duplicates
from . import artifacts, fewshot, stream
from . import registry as heads
from .fit import (_as_fitted, _fit_errors, _Quiet, blas_threads, convergence_note,
                  fit_configuration)
from .source import Labeled
from .rows import TRAIN_SPLIT, min_class, select_rows, targets

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
    effective: dict[str, Any]  # registry.effective_params: every key parameter as fitted
    accuracy_rows: int = 0  # the training rows train_accuracy was measured on (0: all)
    # store.read.finetuned_note over the training rows (the backbone was fine-tuned on some of
    # them: the CV table and training accuracy overrate it), "note: ..."; said whatever -q says
    finetuned: str | None = None

    def line(self) -> str:
        params = heads.format_params(self.effective)
        on = f" ({self.accuracy_rows:,} of the rows)" if self.accuracy_rows else ""
        return (f"fitted {self.head} ({params}) on {self.rows} rows, {len(self.classes)} "
                f"classes in {self.seconds:.1f} s; training accuracy {self.train_accuracy:.3f}"
                f"{on}; probabilities: {self.calibration} → {self.path}")



def _calibration_split(source: Labeled, spec: Any,
                       seed: int) -> tuple[Labeled, Labeled, int]:
    """The rows a head is fitted on, the rows held out to calibrate it, and the calibration
    folds over them. In memory nothing is held out: calibration cross-validates on all rows
    (its folds are chosen by _calibrated). Streamed, a stratified sample is held out
    (_calibration_rows) so that the head is fitted once, on the rest, with k =
    min(CALIBRATION_FOLDS, smallest held-out class); k < 2, or a class with no row held out
    (fewer than 3 rows: temperature scaling could not score it), means no calibration."""
    none = source.take(np.zeros(0, dtype=np.int64))
    if spec.native_proba or not source.streamed:
        return source, none, 0
    cal, k = _streamed_calibration(source.y, source.chunk_rows, seed)
    if k < 2:
        return source, none, 0
    return source.take(np.setdiff1d(np.arange(len(source)), cal)), source.take(cal), k


def _streamed_calibration(y: np.ndarray, chunk_rows: int, seed: int) -> tuple[np.ndarray, int]:
    """The positions held out to calibrate a streamed head with targets ``y``
    (_calibration_rows) and the folds over them; k < 2: no calibration is possible."""
    cal = _calibration_rows(y, chunk_rows, seed)
    k = min(CALIBRATION_FOLDS, min_class(y[cal])[1]) if len(cal) else 0
    if len(np.unique(y[cal])) < len(np.unique(y)):
        k = 0
    return cal, k


def calibrates(head: str, per_class: Sequence[int], seed: int = 0) -> bool:
    """Whether `fit` gives ``head`` (one without native probabilities) temperature-calibrated
    probabilities on training rows of ``per_class`` images in each class: as _calibrated
    (in memory, fewshot.calibration_folds) and _calibration_split (streamed) decide."""
    spec = heads.get(head)
    y = np.repeat(np.arange(len(per_class)).astype(str), per_class)
    if spec.native_proba or len(per_class) < 2:
        return False
    if spec.streaming:
        return _streamed_calibration(y, stream.DEFAULT_CHUNK_ROWS, seed)[1] >= 2
    return fewshot.calibration_folds(heads.build(head, seed=seed), y, CALIBRATION_FOLDS) >= 2


def _calibrated(fitted: Any, base: Any, fit_on: Labeled, held: Labeled, k: int,
                head: str = "", notes: list[str] | None = None) -> tuple[Any, str, str]:
    """The head with calibrated probabilities (temperature scaling), how (text for the
    manifest), and the kind of its probabilities (artifacts.PROBABILITIES).

    In memory ``base`` (the unfitted head) is wrapped and fitted in up to CALIBRATION_FOLDS
    stratified folds of ``fit_on``, as many as the smallest class allows
    (fewshot.calibration_folds); with too few images for 2 folds, ``base`` itself is fitted,
    uncalibrated; above fewshot.REFIT_ABOVE rows it is fitted on 4/5 of them, calibrated on the
    other fifth and refitted on all (fewshot.refit_split, calibration.fit), above
    fewshot.HOLDOUT_ABOVE fitted once and calibrated on a held-out sample (fewshot.holdout).
    Streamed, the ``fitted`` head is frozen and only the
    temperature is fitted on
    the ``held`` rows in ``k`` folds (none held out: ``fitted`` as it is, uncalibrated)."""
    from sklearn.calibration import CalibratedClassifierCV

    if not fit_on.streamed:
        cls, smallest = min_class(fit_on.y)
        k = fewshot.calibration_folds(base, fit_on.y, CALIBRATION_FOLDS)
        if k < 2:
            return (fit_on.fit(base, head, None, notes=notes),
                    f"none (class {cls!r} has {smallest} image(s), too few to calibrate: "
                    "confidence is a softmax of scores)", "scores")
        # cv as a number (stratified, unshuffled folds): a splitter object would be stored in
        # the head file as a type that skops does not trust.
        # (on many rows calibration.fit holds a fifth out and refits, and above
        # fewshot.HOLDOUT_ABOVE fewshot.adapt turns the folds into one held-out sample:
        # calibration_text says which was fitted)
        cal = CalibratedClassifierCV(base, method="temperature", ensemble=False, cv=k)
        fitted = fit_on.fit(cal, head, None, notes=notes)
        return fitted, fewshot.calibration_text(fitted), "calibrated"
    if k < 2:
        return fitted, "none (too few rows per class: confidence is a softmax of scores)", \
            "scores"
    from sklearn.frozen import FrozenEstimator

    # the fitted pipeline is frozen: the folds only split the calibration rows
    cal = CalibratedClassifierCV(FrozenEstimator(fitted), method="temperature", cv=k)
    return (cal.fit(held.features(), held.y),
            f"temperature scaling on {len(held)} held-out training rows (not trained on)",
            "calibrated")


def fit(store_path: str | Path | Sequence[str | Path], head: str, out: str | Path, *,
        params: dict[str, Any] | None = None, class_weight: str | None = None,
        search: bool = False, seed: int = 0, jobs: int | None = None,
        chunk_rows: int | None = None, progress: bool = False, reject_rate: float | None = None,
        say: Callable[[str], None] = lambda m: None) -> FitResult:
    """Fit ``head`` on the training rows and save it. Streaming heads (sgd, logreg-sgd) read
    the store ``chunk_rows`` rows at a time (stream.py); the others load the training rows.
    Both go through the one row source (source.Labeled) and fit_configuration.

    In-memory heads also record the class centroids of the training features (reject.py) in
    the manifest's ``open_set``; with ``reject_rate`` (e.g. 0.05) the head configuration is
    refitted on k-1 of 5 folds to choose `predict --reject auto`'s thresholds on out-of-fold
    rows (about 5x the fit time more). Raises reject.RejectError for a rate outside (0, 1) or
    a streaming head with a rate."""
    from ..progress import Progress
    from . import reject

    # before any work: -o STORE would destroy it, and a folder or an unwritable path would
    # fail only after the fit
    _io.check_output(out, _paths(store_path), kind="a head", example="head.skops")
    params = heads.own_params(head, params)  # logreg:C=2 on logreg is C=2, as in cv
    _refuse_moot(head, search, jobs, chunk_rows)
    if reject_rate is not None and not 0 < reject_rate < 1:
        raise reject.RejectError(f"--reject-rate {reject_rate}: pass a false-reject rate "
                                 "between 0 and 1, e.g. 0.05")
    if head == heads.AUTO.name:  # chooses by cross-validation, then saves like any head
        if reject_rate is not None:
            raise reject.RejectError("--reject-rate: not available with --head auto yet; pass "
                                     "the head auto chose (or any named head) with --head")
        from . import auto

        return auto.fit(store_path, out, params=params, class_weight=class_weight, seed=seed,
                        say=say)
    t0 = time.perf_counter()
    spec = heads.get(head)
    heads.build(head, params, class_weight=class_weight, seed=seed)  # bad options fail first
    if chunk_rows is not None:
        stream.check_chunk_rows(chunk_rows)
    chunk_rows = chunk_rows or stream.DEFAULT_CHUNK_ROWS
    if reject_rate is not None and spec.streaming:
        raise reject.RejectError(f"--reject-rate: not available for the streaming head {head}; "
                                 "use an in-memory head (logreg, svm, mlp, ...) or predict "
                                 "--reject with a confidence threshold")
    # a streaming head reads labels, paths and splits now, its features chunk by chunk later
    store = open_stores(store_path, features=not spec.streaming)
    refuse_duplicates(store)
    for note in store.notes:
        say(note)
    rows = select_rows(store)
    y = targets(store, rows.train)
    classes, counts = np.unique(y, return_counts=True)
    fewshot.check_classes(y, str(store.path))
    with naming(str(store.path)):  # settings refused for this many classes (liblinear: 2)
        heads.check_for_data(head, params, y, store.dim, seed)
    source = Labeled(store, rows.train, y,
                     None if spec.streaming else store.features[rows.train], chunk_rows)
    if not source.streamed:  # streamed: stream.fit_rows checks the chunks as it reads them
        checks.refuse_unusable(source.X, [store.paths[i] for i in rows.train], str(store.path),
                               store)
    fit_on, held, k = _calibration_split(source, spec, seed)
    if len(held):  # streamed: the hold-out (<= one chunk) is read after the fit; refuse its bad
        held.features()  # rows now, before any work (counted over all training rows)
    say(f"fitting {head} on {len(fit_on)} rows ({rows.describe()}), {len(classes)} classes"
        + (f", streamed in chunks of {chunk_rows} rows" if source.streamed else "")
        + (f", {len(held)} rows held out to calibrate" if len(held) else "")
        + (", searching its grid" if search else ""))
    # the data rules read the store's training rows (y), not what is left after the rows held
    # out to calibrate: a store of 500-555 rows per class fitted sgd by its small-store rule
    total = (stream.work(head, heads.with_data_defaults(head, params, y, store.dim),
                         len(fit_on), search=search, seed=seed) + len(held)
             + len(y) if source.streamed else 0)
    notes = heads.unused_notes(head, params, y, store.dim, seed)  # said with the rest
    with _Quiet() as quiet, blas_threads(len(y)), \
            _fit_errors(head, params or {}, str(store.path)), \
            Progress(total, f"fit {head}", unit="row", enabled=progress and source.streamed) as bar:
        estimator = None
        if spec.native_proba or source.streamed:
            estimator, chosen = fit_configuration(fit_on, head, params, class_weight=class_weight,
                                                  search=search, seed=seed, jobs=jobs,
                                                  tick=bar.update, note=bar.note, notes=notes,
                                                  rule_y=y)
        else:  # in memory: the search (if any) on the bare head, then the chosen one calibrated
            chosen = (fit_configuration(fit_on, head, params, class_weight=class_weight,
                                        search=True, seed=seed, jobs=jobs, notes=notes,
                                        rule_y=y)[1]
                      if search else heads.with_data_defaults(head, params, y, store.dim))
        calibration, probabilities = "native", "native"
        if spec.members:
            calibration, probabilities = heads.vote_calibration(estimator), "vote"
        elif not spec.native_proba:
            bar.note("calibrating")
            estimator, calibration, probabilities = _calibrated(
                estimator, heads.build(head, chosen, class_weight=class_weight, seed=seed),
                fit_on, held, k, head, notes)
            bar.update(len(held))
        bar.note("training accuracy")
        sub = None if source.streamed else accuracy_rows(len(y))  # streamed: linear, cheap
        pred, _, _ = (source if sub is None else source.take(sub)).predict(estimator,
                                                                           tick=bar.update)
    if not spec.native_proba:  # fit_configuration named the others as fitted; these, too
        chosen = _as_fitted(source, head, chosen, estimator, class_weight, seed, y)
    for n in dict.fromkeys(notes):
        say(f"note: {n}")
    seen = finetuned_note(store, rows.train, "training rows (of the training accuracy"
                          + (" and the search's cross-validation" if search else "") + ")")[1]
    if quiet.convergence:
        say(convergence_note(head, quiet.convergence))
    train_acc = float((pred == (y if sub is None else y[sub])).mean())
    class_names = [str(c) for c in estimator.classes_]
    open_set = None if source.X is None else reject.summary(source.X, y, class_names)
    if reject_rate is not None and open_set is not None:
        with naming(str(store.path)):
            open_set["auto"] = _reject_thresholds(source.X, y, class_names, head, chosen, spec,
                                                  class_weight, seed, probabilities,
                                                  reject_rate, say)
    streamed = ({"streamed": {"chunk_rows": chunk_rows, "epochs": _epochs(estimator),
                              "fitted_rows": int(len(fit_on)),
                              "calibration_rows": int(len(held))}} if source.streamed else {})
    effective = heads.effective_params(head, estimator)
    manifest = artifacts.new_manifest(
        head=head, params=chosen, effective_params=effective, class_weight=class_weight,
        search=search, seed=seed, calibration=calibration, probabilities=probabilities,
        classes=class_names,
        store_identity=store.identity,
        training=_training(store, rows, classes, counts, train_acc, sub, **streamed),
        **({"open_set": open_set} if open_set is not None else {}),
    )
    check = source.take(_check_sample(len(y))).features()
    path = artifacts.save(out, estimator, manifest, check_rows=check, inputs=_paths(store_path),
                          fitted_rows=[store.hashes[i] for i in rows.train])
    return FitResult(path, head, chosen, int(len(fit_on)), [str(c) for c in classes],
                     calibration, time.perf_counter() - t0, train_acc, effective,
                     0 if sub is None else len(sub), f"note: {seen}" if seen else None)


def _refuse_moot(head: str, search: bool, jobs: int | None, chunk_rows: int | None) -> None:
    """Refuse, before any work, an option that fitting ``head`` would ignore: ``--search`` on
    a head without a grid of its own (auto, an ensemble: registry.check_searchable), ``--jobs``
    where no grid search runs in parallel (without --search, on auto, or on a streaming head,
    whose search reads the store one fit at a time), ``--chunk-rows`` on a head that loads its
    rows into memory (every head but the streaming ones). Raises HeadError naming the option
    and the fix."""
    spec = heads.get(head)
    if search:
        heads.check_searchable(head)
    if jobs is not None:
        if head == heads.AUTO.name:
            raise heads.HeadError(f"--jobs {jobs}: --head auto scores its candidates one at a "
                                  "time and takes no --jobs; leave it out")
        if not search:
            raise heads.HeadError(f"--jobs {jobs}: sets the parallel fits of --search, and "
                                  "fit runs no search without it; add --search or leave --jobs "
                                  "out")
        if spec.streaming:
            raise heads.HeadError(f"--jobs {jobs}: the streaming head {head} searches its grid "
                                  "one fit at a time (each reads the store in chunks); leave "
                                  "--jobs out")
    if chunk_rows is not None and not spec.streaming:
        raise heads.HeadError(f"--chunk-rows {chunk_rows}: only the streaming heads "
                              f"({heads.streaming_names()}) read the store in chunks; --head {head} loads "
                              "its training rows into memory: leave --chunk-rows out, or pass "
                              "a streaming head")


def _reject_thresholds(X: np.ndarray, y: np.ndarray, class_names: list[str], head: str,
                       chosen: dict[str, Any], spec: Any, class_weight: str | None, seed: int,
                       probabilities: str, rate: float,
                       say: Callable[[str], None]) -> dict[str, Any]:
    """`fit --reject-rate`: the manifest's ``open_set.auto`` (reject.choose on out-of-fold
    scores of the same head configuration, calibrated as fit calibrates it)."""
    from . import reject

    data = heads.data_of(y, X.shape[1])  # an ensemble's members: their rules, as fit had

    def fit_fold(Xf: np.ndarray, yf: np.ndarray) -> Any:  # as fit fits and calibrates it
        base = heads.build(head, chosen, class_weight=class_weight, seed=seed, data=data)
        fold = Labeled.in_memory(Xf, yf)
        with _Quiet(count=False):
            if spec.native_proba:
                return fold.fit(base, head, chosen)
            return _calibrated(None, base, fold, fold.take(np.zeros(0, np.int64)), 0, head)[0]

    say(f"choosing rejection thresholds for a {rate:.0%} false-reject rate on out-of-fold rows")
    conf, dist, k = reject.out_of_fold(X, y, class_names, fit_fold,
                                       probabilities != "scores", seed=seed)
    auto = {"rate": rate, "folds": k, "oof_rows": int(len(y)), **reject.choose(conf, dist, rate)}
    say(f"--reject auto: confidence < {auto['min_confidence']:.4f} or centroid distance > "
        f"{auto['max_distance']:.4f} (rejects {auto['false_reject']:.1%} of out-of-fold rows)")
    return auto


# Training accuracy is a diagnostic (how far the head fits its own rows), and predicting every
# training row can cost more than the fit: an RBF svm (C=10) with a kNN in a vote on 60,000
# Fashion-MNIST rows spent most of `fit --head auto`'s 14 minutes after the choice predicting
# them (scikit-learn's SVC predicts against every support vector). Above this many rows it is
# measured on that many, spread evenly over the rows (one standard error at most 0.7 points).
TRAIN_ACCURACY_ROWS = 5_000


def accuracy_rows(n: int) -> np.ndarray | None:
    """Positions of the ``n`` training rows (in memory) that training accuracy is measured on:
    None (all of them) up to TRAIN_ACCURACY_ROWS, else that many spread evenly."""
    return None if n <= TRAIN_ACCURACY_ROWS else _check_sample(n, TRAIN_ACCURACY_ROWS)


def _check_sample(n: int, size: int = 512) -> np.ndarray:
    """Training rows (positions) on which a head's compact form must predict like the head
    before it is saved (artifacts.save): up to ``size``, spread over all of them."""
    return np.unique(np.linspace(0, n - 1, min(n, size)).astype(np.int64))


def _training(store: Any, rows: Any, classes: np.ndarray, counts: np.ndarray,
              train_acc: float, accuracy_on: np.ndarray | None = None,
              **extra: Any) -> dict[str, Any]:
    """The head manifest's record of what it was trained on (``accuracy_on``: the rows its
    training accuracy was measured on, accuracy_rows; None: all)."""
    # stacked stores: each file (resolved) and its creation id (store_id; None for a store
    # written before stores had one), so that predict can tell stores of one backbone apart,
    # renamed or not, and refuse them in another order (provenance.stack_order)
    stacked = ({"stores": [str(Path(p).resolve()) for p in store.meta["stores"]],
                "store_ids": list(store.meta.get("store_ids") or [None] * len(store.meta[
                    "stores"]))}
               if "stores" in store.meta else {})
    from ..store.schema import STORE_ID

    own = {} if stacked else {"store_id": store.meta.get(STORE_ID)}  # predict tells it again
    return {"store": str(store.path), **own, "rows": int(counts.sum()),
            "split": "train" if (store.splits[rows.train] == TRAIN_SPLIT).all()
            else "all labeled rows",
            "per_class": {str(c): int(n) for c, n in zip(classes, counts)},
            "train_accuracy": train_acc, **({} if accuracy_on is None else
                                            {"train_accuracy_rows": len(accuracy_on)}),
            "feature_runtimes": _runtimes(store), **stacked,
            **extra}


def _runtimes(store: Any) -> list[str]:
    """The inference runtimes (name and version) of the extract runs that wrote the store's
    rows, from its run records (runs before runtimes were recorded ran torch: not listed)."""
    seen = {f"{r['runtime'].get('name')} {r['runtime'].get('version')}"
            for r in getattr(store, "runs", None) or []
            if isinstance(r.get("runtime"), dict) and r.get("status") != "failed"}
    return sorted(seen)


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


def _epochs(estimator: Any) -> int:
    """max_iter of the SGD step inside a (calibrated) streamed head."""
    for k, v in estimator.get_params().items():
        if k.endswith("clf__max_iter"):
            return int(v)
    return 0
