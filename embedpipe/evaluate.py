"""Choosing rows, fitting one head configuration, cross-validation and reports (no torch)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from . import heads
from .compact import predict_scored
from .errors import UserError
from .store import FeatureStore

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


def fit_configuration(X: np.ndarray, y: np.ndarray, head: str, params: dict[str, Any] | None,
                      *, class_weight: str | None = None, search: bool = False,
                      inner_folds: int = 3, scoring: str = "accuracy", seed: int = 0,
                      jobs: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Fit ``head`` on (X, y). With ``search``, pick its grid's best parameters by stratified
    ``inner_folds``-fold CV on (X, y) only, then refit on all of it. Returns the fitted
    estimator and the parameters used (short names: the user's plus the ones searched)."""
    pipe = heads.build(head, params, class_weight=class_weight, seed=seed)
    chosen = dict(params or {})
    grid = heads.param_grid(head, params, seed=seed) if search else {}
    if not grid:
        return pipe.fit(X, y), chosen
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    cls, n = min_class(y)
    k = min(inner_folds, n)
    if k < 2:
        raise EvaluateError(f"--search: class {cls!r} has {n} training image(s); the inner "
                            "search needs at least 2 per class: add images or drop --search")
    gs = GridSearchCV(pipe, grid, scoring=scoring, refit=True, n_jobs=jobs,
                      cv=StratifiedKFold(k, shuffle=True, random_state=seed))
    gs.fit(X, y)
    chosen.update(heads.short_params(gs.best_params_))
    return gs.best_estimator_, chosen


# -- cross-validation (`embedpipe cv`) ------------------------------------------------------

METRICS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
           "f1_macro": "macro-F1"}
DEFAULT_CV_HEADS = ("logreg", "svm", "knn", "ridge", "centroid")
INNER_FOLDS = 3
PLOTS_HINT = "pip install 'embedpipe[plots]'"


def resolve_params(head_names: list[str], items: list[str] | None, *,
                   seed: int = 0) -> dict[str, dict[str, Any]]:
    """``--param`` items → parameters per head. ``NAME=VALUE`` goes to every head in
    ``head_names`` that has parameter NAME (an error when none has it); ``HEAD:NAME=VALUE`` to
    that head only, overriding the former. Values are validated by building each head."""
    out: dict[str, dict[str, Any]] = {h: {} for h in head_names}
    specific: list[tuple[str, str, Any]] = []
    for item in items or []:
        ((key, value),) = heads.parse_params([item]).items()
        head, sep, name = key.partition(":")
        if sep:
            heads.get(head.strip())
            if head.strip() not in out:
                raise heads.HeadError(f"--param {item}: {head.strip()} is not among the heads "
                                      f"being evaluated ({', '.join(head_names)}); add --head "
                                      f"{head.strip()} or drop the '{head.strip()}:' prefix")
            specific.append((head.strip(), name.strip(), value))
            continue
        takers = [h for h in head_names if _has_param(h, key, seed)]
        if not takers:
            raise heads.HeadError(f"--param {item}: none of the heads {', '.join(head_names)} "
                                  f"has a parameter {key}; see `embedpipe heads` for each "
                                  "head's parameters")
        for h in takers:
            out[h][key] = value
    for head, name, value in specific:
        heads.pipeline_params(heads.get(head), {name: value}, seed)  # names the valid ones
        out[head][name] = value
    for h in head_names:
        heads.build(h, out[h], seed=seed)  # bad values fail here, before any work
    return out


def _has_param(head: str, name: str, seed: int) -> bool:
    return name == "pca" or name in heads.get(head).make(seed).get_params()


def make_folds(folds: int, repeats: int, seed: int) -> tuple[Any, str]:
    """The splitter used by ``cv`` and a description that reproduces it."""
    from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedKFold

    if repeats == 1:
        return (StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed),
                f"StratifiedKFold(n_splits={folds}, shuffle=True, random_state={seed})")
    return (RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed),
            f"RepeatedStratifiedKFold(n_splits={folds}, n_repeats={repeats}, "
            f"random_state={seed})")


def _outer_splits(y: np.ndarray, folds: int, repeats: int, seed: int, notes: list[str],
                  warn: Any, rows: str) -> tuple[int, list[Any], str]:
    """The outer folds on ``y``, lowered (with a warning added to ``notes``) to the size of the
    smallest class: (folds, [(train, test), ...], how to reproduce them)."""
    cls, n = min_class(y)
    if n < folds:
        notes.append(f"class {cls!r} has only {n} {rows} images: using {n} folds "
                     f"instead of {folds}")
        warn(f"warning: {notes[-1]}")
        folds = n
    splitter, text = make_folds(folds, repeats, seed)
    return folds, list(splitter.split(np.zeros((len(y), 1)), y)), text


def check_outputs(json_path: Any = None, plots_dir: Any = None) -> None:
    """Fail early (before any fitting) when the report or plots could not be written."""
    from pathlib import Path

    if plots_dir is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise EvaluateError(f"--plots {plots_dir}: matplotlib is not installed; "
                                f"{PLOTS_HINT} (or leave out --plots)") from None
        if Path(plots_dir).exists() and not Path(plots_dir).is_dir():
            raise EvaluateError(f"--plots {plots_dir}: exists and is not a folder; pass a "
                                "folder to write the PNGs into")
    if json_path is not None and Path(json_path).is_dir():
        raise EvaluateError(f"--json {json_path}: is a folder; pass a file name such as "
                            f"{Path(json_path) / 'cv.json'}")


def _check_options(folds: int, repeats: int, metric: str, jobs: int, top_errors: int) -> None:
    if metric not in METRICS:
        raise EvaluateError(f"--metric {metric}: pass one of {', '.join(METRICS)}")
    if folds < 2:
        raise EvaluateError(f"--folds {folds}: cross-validation needs at least 2 folds; "
                            "pass --folds 5 (the default) or another number >= 2")
    if repeats < 1:
        raise EvaluateError(f"--repeats {repeats}: pass 1 (the default) or more")
    if jobs == 0:
        raise EvaluateError("--jobs 0: pass a number of worker processes >= 1, or -1 for one "
                            "per CPU core")
    if top_errors < 0:
        raise EvaluateError(f"--top-errors {top_errors}: pass 0 or more")


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}


class _Quiet:
    """Silence scikit-learn's warnings (ConvergenceWarning, UserWarning, ...); with ``count``,
    record them to count the convergence warnings (else ignore them, a filter scikit-learn
    passes on to its own worker processes)."""

    def __init__(self, count: bool = True):
        self._count = count

    def __enter__(self) -> "_Quiet":
        import warnings

        self._cm = warnings.catch_warnings(record=self._count)
        caught = self._cm.__enter__()
        self._caught = caught if caught is not None else []
        warnings.simplefilter("always" if self._count else "ignore")
        return self

    @property
    def convergence(self) -> int:
        from sklearn.exceptions import ConvergenceWarning

        return sum(issubclass(w.category, ConvergenceWarning) for w in self._caught)

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)


@contextlib.contextmanager
def _fit_errors(head: str, params: dict[str, Any], where: str) -> Iterator[None]:
    """A fit that fails on a --param value (e.g. pca larger than the fold) is a user error."""
    try:
        yield
    except (ValueError, TypeError) as e:
        if not params:
            raise
        given = " ".join(f"{k}={v}" for k, v in params.items())
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EvaluateError(f"{where}: {head} with {given} failed to fit ({first}); fix that "
                            "--param value") from None


def _fit(X: np.ndarray, y: np.ndarray, head: str, params: dict[str, Any],
         class_weight: str | None, search: bool, metric: str, seed: int, where: str,
         jobs: int | None = None) -> tuple[Any, dict[str, Any]]:
    with _fit_errors(head, params, where):
        if search:
            return fit_configuration(X, y, head, params, class_weight=class_weight, search=True,
                                     inner_folds=INNER_FOLDS, scoring=metric, seed=seed,
                                     jobs=jobs)
        return (heads.build(head, params, class_weight=class_weight, seed=seed).fit(X, y),
                dict(params))


def _fit_stream(store: Any, rows: np.ndarray, y: np.ndarray, head: str, params: dict[str, Any],
                class_weight: str | None, search: bool, metric: str, seed: int, where: str,
                chunk_rows: int, note: Any = None,
                tick: Any = None) -> tuple[Any, dict[str, Any]]:
    """A streaming head (stream.py) fitted on store rows ``rows`` read in chunks."""
    from . import stream

    with _fit_errors(head, params, where):
        return stream.fit_configuration(store, rows, y, head, params,
                                        class_weight=class_weight, search=search,
                                        inner_folds=INNER_FOLDS, scoring=metric, seed=seed,
                                        chunk_rows=chunk_rows, note=note or stream._nothing,
                                        tick=tick or stream._nothing)


def _cv_task(X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, head: str,
             params: dict[str, Any], class_weight: str | None, search: bool, metric: str,
             seed: int, where: str) -> dict[str, Any]:
    """Fit one head on the outer training part (searching its grid there only, if asked) and
    score it on the outer test fold."""
    import time

    with _Quiet() as quiet:
        t0 = time.perf_counter()
        est, chosen = _fit(X[train], y[train], head, params, class_weight, search, metric, seed,
                           where)
        seconds = time.perf_counter() - t0
        pred, _, conf, calibrated = predict_scored(est, X[test],
                                                   use_proba=heads.get(head).native_proba)
    return {"scores": _scores(y[test], pred), "fit_seconds": seconds, "params": chosen,
            "pred": pred, "confidence": conf, "calibrated": bool(calibrated),
            "convergence_warnings": quiet.convergence}


def _cv_stream_task(store: Any, rows: np.ndarray, y: np.ndarray, train: np.ndarray,
                    test: np.ndarray, head: str, params: dict[str, Any],
                    class_weight: str | None, search: bool, metric: str, seed: int, where: str,
                    chunk_rows: int, note: Any = None) -> dict[str, Any]:
    """_cv_task for a streaming head: the fold's training rows (store rows ``rows[train]``)
    are streamed from the store, its test rows predicted chunk by chunk."""
    import time

    from . import stream

    with _Quiet() as quiet:
        t0 = time.perf_counter()
        est, chosen = _fit_stream(store, rows[train], y[train], head, params, class_weight,
                                  search, metric, seed, where, chunk_rows, note)
        seconds = time.perf_counter() - t0
        pred, conf, calibrated = stream.predict_rows(est, store, rows[test],
                                                     chunk_rows=chunk_rows,
                                                     use_proba=heads.get(head).native_proba)
    return {"scores": _scores(y[test], pred), "fit_seconds": seconds, "params": chosen,
            "pred": pred, "confidence": conf, "calibrated": bool(calibrated),
            "convergence_warnings": quiet.convergence}


def _tasks_note(bar: Any, jobs: int, what: str) -> Any:
    """A progress note for a streamed fit run in this process (jobs == 1), else None."""
    if jobs != 1:
        return None
    return lambda m: bar.note(f"{what}: {m}")


def _versions() -> dict[str, str]:
    import platform

    import joblib
    import scipy
    import sklearn

    from . import __version__

    return {"embedpipe": __version__, "sklearn": sklearn.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "joblib": joblib.__version__,
            "python": platform.python_version()}


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    return v


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix

    return {"labels": labels,
            "matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist()}


def run_cv(store_path: Any, head_names: list[str] | None = None, *, folds: int = 5,
           repeats: int = 1, search: bool = False, metric: str = "accuracy",
           params: list[str] | None = None, class_weight: str | None = None, jobs: int = 1,
           seed: int = 0, top_errors: int = 10, progress: bool = True,
           warn: Any = None, chunk_rows: int | None = None) -> dict[str, Any]:
    """Cross-validate heads on the train rows of a store; returns a JSON-ready report.

    Folds are computed once, on the training rows in store order, and shared by every head:
    ``StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)`` when ``repeats`` is 1,
    else ``RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)``.
    With ``search``, each head's grid is searched (``fit_configuration``, 3 inner folds) on the
    outer training part only. The best head (by ``metric``) is also refit on all training rows
    and scored on each held-out split. ``warn`` receives one-line warnings (default: stderr).

    Streaming heads (sgd, logreg-sgd) read each fold's rows from the store ``chunk_rows`` at
    a time; the features are loaded into memory only when another head needs them.
    """
    from joblib import Parallel, delayed

    from . import stream
    from .progress import Progress, printer
    from .store import open_stores

    warn = warn or printer(True)
    say = printer(progress)
    _check_options(folds, repeats, metric, jobs, top_errors)
    chunk_rows = stream.check_chunk_rows(stream.DEFAULT_CHUNK_ROWS if chunk_rows is None
                                         else chunk_rows)
    names = list(dict.fromkeys(head_names or DEFAULT_CV_HEADS))
    for h in names:
        heads.get(h)
    per_params = resolve_params(names, params, seed=seed)
    cw = _class_weights(names, class_weight, warn)
    streamed = {h for h in names if heads.get(h).streaming}

    store = open_stores(store_path, features=bool(set(names) - streamed))
    where = str(store.path)
    for note in store.notes:
        warn(note)
    rows = select_rows(store)
    X = store.features[rows.train] if store.features_loaded else store.features
    if X.dtype != np.float32 and X.dtype != np.float64:
        X = X.astype(np.float32)
    y = targets(store, rows.train)
    present = set(y.tolist())
    labels = [c for c in store.classes if c in present]
    if len(labels) < 2:
        raise EvaluateError(f"{where}: the {len(y)} training rows all belong to class "
                            f"{labels[0]!r}; cross-validation needs at least 2 classes")
    cls, n = min_class(y)
    if n < 2:
        raise EvaluateError(f"{where}: class {cls!r} has a single training image; "
                            "cross-validation needs at least 2 per class: add images of it, or "
                            "move its folder out of the data and run `embedpipe extract DATA "
                            f"-o {where} --prune`")
    notes: list[str] = []
    asked = folds
    folds, splits, splitter_text = _outer_splits(y, folds, repeats, seed, notes, warn,
                                                 "training")
    if search:
        for i, (tr, _) in enumerate(splits):
            c, m = min_class(y[tr])
            if m < 2:
                raise EvaluateError(f"{where}: --search: class {c!r} keeps only {m} "
                                    "image(s) in the training part of an outer fold, and the "
                                    "inner search needs 2 per class; add images of it or "
                                    "drop --search")

    tasks = [(h, i) for h in names for i in range(len(splits))]
    say(f"cv: {len(names)} head(s) x {len(splits)} folds = {len(tasks)} fits on {len(y)} "
        f"train rows ({'nested search, ' if search else ''}{jobs} job(s))")
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with Progress(len(tasks), "cv", enabled=progress, unit="fit") as bar:
        gen = Parallel(n_jobs=jobs, return_as="generator")(
            delayed(_cv_stream_task)(store, rows.train, y, splits[i][0], splits[i][1], h,
                                     per_params[h], cw[h], search, metric, seed, where,
                                     chunk_rows, _tasks_note(bar, jobs, f"{h} fold {i + 1}"))
            if h in streamed else
            delayed(_cv_task)(X, y, splits[i][0], splits[i][1], h, per_params[h], cw[h],
                              search, metric, seed, where) for h, i in tasks)
        for key, res in zip(tasks, gen):
            results[key] = res
            bar.update(1)

    table = []
    for h in names:
        fold_rows = []
        for i in range(len(splits)):
            r = results[(h, i)]
            fold_rows.append({"repeat": i // folds, "fold": i % folds, **r["scores"],
                              "fit_seconds": r["fit_seconds"],
                              **({"params": r["params"]} if search else {})})
        entry: dict[str, Any] = {"head": h, "params": per_params[h], "class_weight": cw[h]}
        for m in METRICS:
            v = np.array([f[m] for f in fold_rows])
            entry[m] = {"mean": float(v.mean()), "std": float(v.std())}
        entry["fit_seconds"] = float(np.mean([f["fit_seconds"] for f in fold_rows]))
        conv = [results[(h, i)]["convergence_warnings"] for i in range(len(splits))]
        entry["convergence_warnings"] = int(sum(conv))
        entry["folds_with_convergence_warnings"] = int(sum(c > 0 for c in conv))
        entry["folds"] = fold_rows
        table.append(entry)
    table.sort(key=lambda e: -e[metric]["mean"])  # stable: ties keep the given head order
    best = table[0]["head"]

    # out-of-fold predictions of the best head, first repeat (every row predicted once)
    oof = np.empty(len(y), dtype=object)
    conf = np.zeros(len(y))
    fold_of = np.zeros(len(y), dtype=int)
    calibrated = True
    for i in range(folds):
        test = splits[i][1]
        r = results[(best, i)]
        oof[test], conf[test], fold_of[test] = r["pred"], r["confidence"], i
        calibrated &= r["calibrated"]
    oof = oof.astype(str)
    from sklearn.metrics import precision_recall_fscore_support

    p, rc, f1, sup = precision_recall_fscore_support(y, oof, labels=labels, zero_division=0)
    wrong = np.flatnonzero(oof != y)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:top_errors]
    best_report = {
        "head": best,
        "out_of_fold": _scores(y, oof),
        "per_class": [{"class": c, "precision": float(a), "recall": float(b), "f1": float(d),
                       "support": int(s)} for c, a, b, d, s in zip(labels, p, rc, f1, sup)],
        "confusion_matrix": _confusion(y, oof, labels),
        "confidence": ("the head's predict_proba of the predicted class" if calibrated else
                       "softmax of the head's decision function: uncalibrated, a ranking "
                       "rather than a probability"),
        "top_errors": [{"path": store.paths[rows.train[j]], "true": str(y[j]),
                        "predicted": str(oof[j]), "confidence": float(conf[j]),
                        "fold": int(fold_of[j])} for j in wrong],
    }

    heldout: dict[str, Any] = {}
    if rows.heldout:
        say(f"cv: refitting {best} on all {len(y)} train rows to score "
            f"{', '.join(rows.heldout)}")
        with _Quiet(count=False):
            if best in streamed:
                with Progress(stream.work(best, per_params[best], len(y), search=search,
                                          inner_folds=INNER_FOLDS, seed=seed),
                              f"cv: refit {best}", enabled=progress, unit="row") as bar:
                    est, chosen = _fit_stream(store, rows.train, y, best, per_params[best],
                                              cw[best], search, metric, seed, where,
                                              chunk_rows, bar.note, bar.update)
            else:
                est, chosen = _fit(X, y, best, per_params[best], cw[best], search, metric,
                                   seed, where, jobs=jobs)
            for split, idx in rows.heldout.items():
                yh = targets(store, idx)
                if best in streamed:
                    pred, _, _ = stream.predict_rows(est, store, idx, chunk_rows=chunk_rows)
                else:
                    Xh = store.features[idx]
                    pred = np.asarray(est.predict(Xh.astype(X.dtype, copy=False))).astype(str)
                seen = set(yh.tolist()) | present
                heldout[split] = {
                    "rows": int(len(idx)), **_scores(yh, pred),
                    "classes_not_in_train": sorted(set(yh.tolist()) - present),
                    "confusion_matrix": _confusion(
                        yh, pred, [c for c in store.classes if c in seen]),
                }
        heldout = {"head": best, "params": chosen, "class_weight": cw[best],
                   "searched": search, "splits": heldout}

    counts = dict(zip(*np.unique(y, return_counts=True)))
    report = {
        "store": {"path": where, "model": store.meta.get("model"),
                  "weights": store.meta.get("weights_source"),
                  "feature_dim": store.dim, "dtype": str(store.features.dtype),
                  "rows": len(store), "train_rows": int(len(y)),
                  "heldout_rows": {k: int(len(v)) for k, v in rows.heldout.items()},
                  "classes": {c: int(counts[c]) for c in labels}},
        "folds": folds, "folds_requested": asked, "repeats": repeats, "seed": seed,
        "splitter": splitter_text, "metric": metric, "search": search,
        "inner_folds": INNER_FOLDS if search else None,
        "chance": {"majority_accuracy": float(max(counts.values()) / len(y)),
                   "balanced_accuracy": 1.0 / len(labels)},
        "warnings": notes, "heads": table, "best": best_report, "heldout": heldout,
        "versions": _versions(),
    }
    return _jsonable(report)


def _class_weights(names: list[str], class_weight: str | None,
                   warn: Any) -> dict[str, str | None]:
    if class_weight is None:
        return {h: None for h in names}
    able = [h for h in names if heads.get(h).class_weight]
    if not able or class_weight != "balanced":
        heads.build(names[0], class_weight=class_weight)  # raises the one-line HeadError
    skipped = [h for h in names if h not in able]
    if skipped:
        warn(f"warning: --class-weight {class_weight} is not applied to {', '.join(skipped)} "
             "(they take no class weights)")
    return {h: class_weight if h in able else None for h in names}


def write_report(report: dict[str, Any], path: Any) -> None:
    import json
    from pathlib import Path

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(path)
    except OSError as e:
        raise EvaluateError(f"--json {path}: cannot write ({e.strerror or e}); pass a writable "
                            "path") from None


def _fmt_params(params: dict[str, Any]) -> str:
    def v(x: Any) -> str:
        if isinstance(x, (list, tuple)):
            return ",".join(str(i) for i in x)
        return f"{x:g}" if isinstance(x, float) else str(x)
    return " ".join(f"{k}={v(x)}" for k, x in params.items())


def _fmt_matrix(cm: dict[str, Any], indent: str = "  ") -> list[str]:
    labels, mat = cm["labels"], cm["matrix"]
    if len(labels) > 30:
        return [indent + f"({len(labels)} classes: too wide for a terminal; see --json or "
                "--plots)"]
    w = max([len(str(x)) for row in mat for x in row] + [len(str(len(labels) - 1)), 1])
    nw = max(len(c) for c in labels) + len(str(len(labels))) + 1
    head = indent + " " * nw + " " + " ".join(f"{j:>{w}}" for j in range(len(labels)))
    lines = [indent + "rows: true class, columns: predicted class (by number)", head]
    for i, (c, row) in enumerate(zip(labels, mat)):
        lines.append(indent + f"{f'{i} {c}':<{nw}} " + " ".join(f"{x:>{w}}" for x in row))
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    st, metric = report["store"], report["metric"]
    held = ", ".join(f"{n} {k}" for k, n in st["heldout_rows"].items())
    out = [f"store    {st['path']}  ({st['model']}, {st['feature_dim']}-d, {st['rows']} rows)",
           f"data     {st['train_rows']} train rows in {len(st['classes'])} classes"
           + (f"; held out: {held}" if held else ""),
           f"folds    {report['splitter']} on the train rows in store order"
           + (f"; grid search with {report['inner_folds']} inner folds on each outer training "
              "part" if report["search"] else ""),
           f"chance   accuracy {report['chance']['majority_accuracy']:.3f} (majority class), "
           f"balanced accuracy {report['chance']['balanced_accuracy']:.3f}"]
    out += [f"warning  {w}" for w in report["warnings"]]
    out.append("")
    out.append(f"heads, best first by {METRICS[metric]} (mean ± std over "
               f"{report['folds'] * report['repeats']} folds):")
    hw = max(4, *(len(e["head"]) for e in report["heads"])) + 2
    out.append(f"  {'head':<{hw}}{'accuracy':<16}{'bal. accuracy':<16}{'macro-F1':<16}"
               f"{'fit s':>7}  params")
    for e in report["heads"]:
        cells = "".join(f"{e[m]['mean']:.3f} ± {e[m]['std']:.3f}".ljust(16) for m in METRICS)
        extra = _fmt_params(e["params"])
        if report["search"]:
            extra = (extra + "; " if extra else "") + "rest searched, per fold below"
        extra = extra or "defaults"
        if e["class_weight"]:
            extra += f" class_weight={e['class_weight']}"
        out.append(f"  {e['head']:<{hw}}{cells}{e['fit_seconds']:>7.2f}  {extra}")
        if report["search"]:
            chosen = [_fmt_params({k: v for k, v in f["params"].items()
                                   if k not in e["params"]}) or "-" for f in e["folds"]]
            out.append(f"  {'':<{hw}}chosen per fold: " + " | ".join(chosen))
        if e["convergence_warnings"]:
            out.append(f"  {'':<{hw}}{e['convergence_warnings']} ConvergenceWarning(s) in "
                       f"{e['folds_with_convergence_warnings']} of {len(e['folds'])} folds: the "
                       "solver stopped before converging; try a larger --param "
                       f"{e['head']}:max_iter=N")
    b = report["best"]
    out += ["", f"best head: {b['head']}; out-of-fold predictions of the first repeat (each "
            "train row predicted once): " + ", ".join(
                f"{METRICS[m]} {b['out_of_fold'][m]:.3f}" for m in METRICS)]
    cw = max(len(r["class"]) for r in b["per_class"]) + 2
    out.append(f"  {'class':<{cw}}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}")
    for r in b["per_class"]:
        out.append(f"  {r['class']:<{cw}}{r['precision']:>10.3f}{r['recall']:>8.3f}"
                   f"{r['f1']:>8.3f}{r['support']:>9d}")
    out += ["", f"confusion matrix of {b['head']} (out-of-fold):"]
    out += _fmt_matrix(b["confusion_matrix"])
    if b["top_errors"]:
        out += ["", f"most confidently misclassified files by {b['head']} (confidence: "
                f"{b['confidence']}):"]
        for t in b["top_errors"]:
            out.append(f"  {t['confidence']:.3f}  {t['path']}  true {t['true']}, "
                       f"predicted {t['predicted']}")
    h = report["heldout"]
    if h:
        how = "grid-searched on" if h["searched"] else "refit on"
        params = _fmt_params(h["params"])
        out += ["", f"held-out splits: {h['head']} {how} all {st['train_rows']} train rows"
                + (f" ({params})" if params else "")]
        for split, s in h["splits"].items():
            out.append(f"  {split}: {s['rows']} rows, " + ", ".join(
                f"{METRICS[m]} {s[m]:.3f}" for m in METRICS))
            if s["classes_not_in_train"]:
                out.append(f"    classes not in train (always wrong): "
                           f"{', '.join(s['classes_not_in_train'])}")
            out += _fmt_matrix(s["confusion_matrix"], indent="    ")
    v = report["versions"]
    out += ["", f"seed {report['seed']}; scikit-learn {v['sklearn']}, numpy {v['numpy']}, "
            f"embedpipe {v['embedpipe']}"]
    return "\n".join(out)


def write_plots(report: dict[str, Any], out_dir: Any) -> list[Any]:
    """``confusion_matrix.png`` (best head, out-of-fold) and ``scores.png`` (the metric per
    head, mean ± std over folds, with each fold's score) in ``out_dir``; needs matplotlib."""
    from pathlib import Path

    check_outputs(plots_dir=out_dir)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvaluateError(f"--plots {out_dir}: cannot create it ({e.strerror or e}); pass a "
                            "writable folder") from None
    written = []

    b = report["best"]
    labels, mat = b["confusion_matrix"]["labels"], np.array(b["confusion_matrix"]["matrix"])
    size = max(5.0, 0.55 * len(labels) + 2.5)
    fig = Figure(figsize=(size, size * 0.9))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    norm = mat / np.maximum(mat.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if len(labels) <= 40:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if mat[i, j]:
                    ax.text(j, i, str(mat[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(f"{b['head']}: out-of-fold confusion matrix "
                 f"({report['store']['train_rows']} train rows)")
    fig.tight_layout()
    written.append(out_dir / "confusion_matrix.png")
    fig.savefig(written[-1], dpi=120)

    metric = report["metric"]
    rows = report["heads"]
    fig = Figure(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    means = [e[metric]["mean"] for e in rows]
    stds = [e[metric]["std"] for e in rows]
    ax.bar(x, means, yerr=stds, capsize=6, color="#4c72b0", alpha=0.8)
    for i, e in enumerate(rows):
        vals = [f[metric] for f in e["folds"]]
        ax.scatter(np.full(len(vals), i) + np.linspace(-0.2, 0.2, len(vals)), vals, s=10,
                   color="black", zorder=3)
    chance = report["chance"]["majority_accuracy" if metric == "accuracy"
                              else "balanced_accuracy"]
    ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, [e["head"] for e in rows])
    ax.set_ylabel(f"{METRICS[metric]} (mean ± std, dots: folds)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{Path(report['store']['path']).name}: {report['folds']}-fold CV"
                 + (f" x {report['repeats']} repeats" if report["repeats"] > 1 else "")
                 + f", seed {report['seed']}" + (", nested search" if report["search"] else ""),
                 fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    written.append(out_dir / "scores.png")
    fig.savefig(written[-1], dpi=120)
    return written


# -- comparing stores (`embedpipe compare`) -------------------------------------------------

def _aligned_rows(stores: list[Any]) -> tuple[list[str], np.ndarray, list[np.ndarray], list[str]]:
    """The train rows every store has (by path, same class), sorted by path: (paths, y, row
    indices per store, notes about rows left out)."""
    per_store = []
    for s in stores:
        rows = select_rows(s)
        names = targets(s, rows.train)
        per_store.append({s.paths[i]: (int(i), str(c)) for i, c in zip(rows.train, names)})
    common = sorted(set.intersection(*(set(m) for m in per_store)))
    notes = []
    for s, m in zip(stores, per_store):
        extra = len(m) - len(common)
        if extra:
            notes.append(f"{extra} train rows of {s.path} are not in every store and are left out")
    for p in common:
        labels = {m[p][1] for m in per_store}
        if len(labels) > 1:
            raise EvaluateError(f"{p}: labeled {' vs '.join(sorted(labels))} in the stores "
                                f"being compared; compare stores of the same labeled data")
    if not common:
        raise EvaluateError(f"{', '.join(str(s.path) for s in stores)}: no train rows in "
                            "common (paths differ); compare stores extracted from the same data")
    y = np.array([per_store[0][p][1] for p in common])
    idx = [np.array([m[p][0] for p in common], dtype=np.int64) for m in per_store]
    return common, y, idx, notes


def run_compare(store_paths: list[Any], head_names: list[str] | None = None, *,
                folds: int = 5, repeats: int = 1, search: bool = False,
                metric: str = "accuracy", params: list[str] | None = None,
                class_weight: str | None = None, jobs: int = 1, seed: int = 0,
                progress: bool = True, warn: Any = None,
                chunk_rows: int | None = None) -> dict[str, Any]:
    """Cross-validate the same heads on the same folds over several stores of the same images
    (e.g. two backbones, or base vs fine-tuned weights). Rows are matched by path: the train
    rows all stores share, sorted by path, are split once (``make_folds``) and every
    (store, head, fold) is fitted and scored on exactly those rows. With two stores the report
    also has the paired per-fold difference (second − first)."""
    from joblib import Parallel, delayed

    from . import stream
    from .progress import Progress, printer
    from .store import open_store

    warn = warn or printer(True)
    say = printer(progress)
    if len(store_paths) < 2:
        raise EvaluateError("compare needs at least two stores; pass STORE_A STORE_B [...]")
    _check_options(folds, repeats, metric, jobs, 0)
    chunk_rows = stream.check_chunk_rows(stream.DEFAULT_CHUNK_ROWS if chunk_rows is None
                                         else chunk_rows)
    names = list(dict.fromkeys(head_names or ("logreg", "svm", "knn")))
    per_params = resolve_params(names, params, seed=seed)
    cw = _class_weights(names, class_weight, warn)
    streamed = {h for h in names if heads.get(h).streaming}
    stores = [open_store(p, features=bool(set(names) - streamed)) for p in store_paths]
    paths, y, idx, notes = _aligned_rows(stores)
    for n in notes:
        warn(f"warning: {n}")
    cls, n = min_class(y)
    if n < 2:
        raise EvaluateError(f"class {cls!r} has a single train image common to the stores; "
                            "cross-validation needs at least 2 per class")
    folds, splits, splitter_text = _outer_splits(y, folds, repeats, seed, notes, warn,
                                                 "common train")
    Xs = [s.features[i] if s.features_loaded else s.features for s, i in zip(stores, idx)]
    tasks = [(k, h, f) for k in range(len(stores)) for h in names for f in range(len(splits))]
    say(f"compare: {len(stores)} stores x {len(names)} head(s) x {len(splits)} folds = "
        f"{len(tasks)} fits on {len(y)} common train rows")
    results = {}
    with Progress(len(tasks), "compare", enabled=progress, unit="fit") as bar:
        gen = Parallel(n_jobs=jobs, return_as="generator")(
            delayed(_cv_stream_task)(stores[k], idx[k], y, splits[f][0], splits[f][1], h,
                                     per_params[h], cw[h], search, metric, seed,
                                     str(stores[k].path), chunk_rows,
                                     _tasks_note(bar, jobs, f"[{chr(65 + k)}] {h} fold {f + 1}"))
            if h in streamed else
            delayed(_cv_task)(Xs[k], y, splits[f][0], splits[f][1], h, per_params[h], cw[h],
                              search, metric, seed, str(stores[k].path)) for k, h, f in tasks)
        for key, res in zip(tasks, gen):
            results[key] = res
            bar.update(1)
    table = []
    for h in names:
        row: dict[str, Any] = {"head": h, "params": per_params[h], "stores": []}
        for k in range(len(stores)):
            scores = [results[(k, h, f)]["scores"] for f in range(len(splits))]
            row["stores"].append({m: {"mean": float(np.mean([s[m] for s in scores])),
                                      "std": float(np.std([s[m] for s in scores])),
                                      "folds": [s[m] for s in scores]} for m in METRICS})
        if len(stores) == 2:
            a = np.array(row["stores"][0][metric]["folds"])
            b = np.array(row["stores"][1][metric]["folds"])
            d = b - a
            row["difference"] = {"metric": metric, "mean": float(d.mean()),
                                 "std": float(d.std()), "second_better": int((d > 0).sum()),
                                 "first_better": int((d < 0).sum()), "folds": d.tolist()}
        table.append(row)
    report = {
        "stores": [{"path": str(s.path), "model": s.meta.get("model"),
                    "weights": s.meta.get("weights_source"),
                    "weights_sha256": s.meta.get("weights_sha256"),
                    "feature_dim": s.dim, "precision": s.meta.get("precision")}
                   for s in stores],
        "rows": int(len(y)), "classes": sorted(set(y.tolist())), "folds": folds,
        "repeats": repeats, "seed": seed, "splitter": splitter_text, "metric": metric,
        "search": search, "warnings": notes, "heads": table, "versions": _versions(),
    }
    return _jsonable(report)


def format_compare(report: dict[str, Any]) -> str:
    metric = report["metric"]
    out = [f"{report['rows']} train rows common to all stores, {len(report['classes'])} "
           f"classes; {report['splitter']} on them sorted by path"
           + ("; nested grid search" if report["search"] else "")]
    out += [f"warning  {w}" for w in report["warnings"]]
    for k, s in enumerate(report["stores"]):
        out.append(f"  [{chr(65 + k)}] {s['path']}: {s['model']}, {s['weights']}, "
                   f"{s['feature_dim']}-d, {s['precision']}")
    out.append("")
    out.append(f"{METRICS[metric]}, mean ± std over {report['folds'] * report['repeats']} "
               "folds (same folds for every cell):")
    letters = [chr(65 + k) for k in range(len(report["stores"]))]
    hw = max(4, *(len(r["head"]) for r in report["heads"])) + 2
    head = f"  {'head':<{hw}}" + "".join(f"{'[' + x + ']':<16}" for x in letters)
    two = len(letters) == 2
    if two:
        head += "B − A (paired)       folds B>A / A>B"
    out.append(head)
    for r in report["heads"]:
        line = f"  {r['head']:<{hw}}" + "".join(
            f"{s[metric]['mean']:.3f} ± {s[metric]['std']:.3f}".ljust(16) for s in r["stores"])
        if two:
            d = r["difference"]
            line += (f"{d['mean']:+.3f} ± {d['std']:.3f}".ljust(21)
                     + f"{d['second_better']} / {d['first_better']}")
        out.append(line)
    return "\n".join(out)
