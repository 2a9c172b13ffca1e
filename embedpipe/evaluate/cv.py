"""Cross-validation of heads on a store (``embedpipe cv``) and comparison of heads or stores on
shared folds (``embedpipe compare``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import checks
from ..heads import fewshot
from ..heads import registry as heads
from ..env import versions
from ..errors import located, naming
from . import (DEFAULT_COMPARE_HEADS, DEFAULT_CV_HEADS, DEFAULT_FOLDS, DEFAULT_METRIC,
               DEFAULT_REPEATS, DEFAULT_TOP_ERRORS)
from ..heads.source import Labeled, _nothing
from ..heads.fit import INNER_FOLDS, _Quiet, blas_threads, fit_checked, resolve_params
from ..heads.rows import METRICS, EvaluateError, min_class, scores, select_rows, targets
from ..store.read import finetuned_note



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


def _check_search(names: list[str], y: np.ndarray, splits: list[Any], where: str) -> None:
    """--search, before any fit: every head has a grid (an ensemble has none:
    registry.check_searchable) and every outer fold's training part keeps 2 rows of each class
    for the inner folds; else one EvaluateError/HeadError line naming ``where``."""
    for h in names:
        heads.check_searchable(h)
    for tr, _ in splits:
        c, m = min_class(y[tr])
        if m < 2:
            raise EvaluateError(f"{where}: --search: class {c!r} keeps only {m} image(s) in "
                                "the training part of an outer fold, and the inner search "
                                "needs 2 per class; add images of it or drop --search")


def _check_heads(names: list[str], search: bool, chunk_rows: int | None) -> int:
    """cv's and compare's checks of the heads ``names`` before the store is read: each is
    known (registry.get), has a grid of its own with ``search`` (auto and ensembles have
    none: registry.check_searchable), and ``--chunk-rows`` is checked
    (stream.check_chunk_rows) and refused when none of them is a streaming head, the only ones
    that read the store in chunks (the others load the rows into memory). Returns the chunk
    rows (the default when None); HeadError naming the fix."""
    from ..heads import stream

    for h in names:
        heads.get(h)
        if search:
            heads.check_searchable(h)
    if chunk_rows is None:
        return stream.DEFAULT_CHUNK_ROWS
    stream.check_chunk_rows(chunk_rows)
    if not any(heads.get(h).streaming for h in names):
        raise heads.HeadError(f"--chunk-rows {chunk_rows}: only the streaming heads "
                              f"({heads.streaming_names()}) read the store in chunks, and none is evaluated "
                              f"({', '.join(names)} load{'s' if len(names) == 1 else ''} "
                              "the rows into memory); leave "
                              "--chunk-rows out, or add --head sgd")
    return chunk_rows


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


def _cv_task(source: Labeled, train: np.ndarray, test: np.ndarray, head: str,
             params: dict[str, Any], class_weight: str | None, search: bool, metric: str,
             seed: int, where: str, note: Any = None) -> dict[str, Any]:
    """Fit one head on the outer training part of ``source`` (searching its grid there only,
    if asked) and score it on the outer test fold; the rows are in memory or streamed."""
    import time

    with _Quiet() as quiet:
        t0 = time.perf_counter()
        notes: list[str] = []
        try:
            fold = source.take(train, "a cross-validation fold's training part")
            est, chosen = fit_checked(fold, head, params, class_weight, search, metric, seed,
                                      where, note=note or _nothing, notes=notes)
        except fewshot.FewShotError as e:
            raise located(e, where, "cross-validation fits on the training part of each fold, "
                          "fewer images than the store has") from None
        seconds = time.perf_counter() - t0
        pred, conf, calibrated = source.take(test).predict(
            est, use_proba=heads.get(head).native_proba)
    effective = chosen if head == heads.AUTO.name else heads.effective_params(head, est)
    return {"scores": scores(source.y[test], pred), "fit_seconds": seconds, "params": chosen,
            "effective_params": effective, "pred": pred, "confidence": conf,
            "calibrated": bool(calibrated), "convergence_warnings": quiet.convergence,
            "notes": notes}


def _run_tasks(tasks: list[Any], label: str, progress: bool, jobs: int, rows: int,
               args: Any) -> dict[Any, dict[str, Any]]:
    """Run _cv_task for every key of ``tasks`` (``args(key, bar)`` gives its arguments) on
    ``jobs`` joblib workers, with one progress bar of fits; the results by key. ``rows``: the
    training rows (for registry.lda_cache)."""
    from joblib import Parallel, delayed

    from ..progress import Progress

    results: dict[Any, dict[str, Any]] = {}
    # in this process (jobs=1), heads with an lda step fit it once per fold, not once per head
    with Progress(len(tasks), label, enabled=progress, unit="fit") as bar, \
            heads.lda_cache(rows), blas_threads(rows):
        gen = Parallel(n_jobs=jobs, return_as="generator")(
            delayed(_cv_task)(*args(key, bar)) for key in tasks)
        for key, res in zip(tasks, gen):
            results[key] = res
            bar.update(1)
    return results


def _effective(fits: list[dict[str, Any]], head: str, search: bool,
               fixed: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The parameters as fitted (registry.effective_params) that every fit in ``fits`` (one
    head's results over folds, and stores) shares, and per fit the ones it does not share
    (what fewshot.adapt lowered on a fold's fewer rows) or that ``search`` chose (its grid's:
    per fit even where every fit chose the same). A grid parameter the user ``fixed`` (the
    head's --param values, short names) was not searched (registry.param_grid leaves it out):
    it is shared like any setting, not listed as chosen."""
    searched = set(heads.get(head).searched()) - set(fixed) if search else set()
    got = [f["effective_params"] for f in fits]
    # the search chose a setting left off (None, which effective_params leaves out: centroid's
    # shrink_threshold): named all the same, as the grid's value chosen in that fold
    got = [{**g, **{k: None for k, v in f.get("params", {}).items()
                    if k in searched and v is None and k not in g}}
           for f, g in zip(fits, got)]
    common = {k: v for k, v in got[0].items()
              if k not in searched and all(repr(g.get(k)) == repr(v) for g in got)}
    return common, [{k: v for k, v in g.items() if k not in common} for g in got]


def _fewshot_notes(results: dict[Any, dict[str, Any]], warn: Any, notes: list[str]) -> None:
    """The few-shot notes (fewshot.adapt) of every fit, each said once with its fit count."""
    seen: dict[str, int] = {}
    for r in results.values():
        for n in r.get("notes", ()):
            seen[n] = seen.get(n, 0) + 1
    for n, times in seen.items():
        notes.append(f"{n} ({times} fit{'s' if times > 1 else ''})")
        warn(f"note: {notes[-1]}")


def _check_for_data(per_params: dict[str, dict[str, Any]], y: np.ndarray, dim: int,
                    seed: int, where: str) -> None:
    """Refuse, before any fit, the --param settings that no fit on these training rows could
    take (registry.check_for_data: liblinear's two classes), in one line naming ``where`` and
    each parameter as HEAD:NAME, as --param takes it here."""
    for h, p in per_params.items():
        with naming(where):
            heads.check_for_data(h, p, y, dim, seed, qualified=True)


def _unused_notes(per_params: dict[str, dict[str, Any]], y: np.ndarray, dim: int, seed: int,
                  warn: Any, notes: list[str]) -> None:
    """cv's and compare's notes for the --param values a head ignores (registry.unused_notes,
    the parameters named HEAD:NAME as --param takes them here), said now and kept in
    ``notes``."""
    found = [n for h, p in per_params.items()
             for n in heads.unused_notes(h, p, y, dim, seed, qualified=True)]
    for n in dict.fromkeys(found):  # knn:p on knn and on svm+knn's member: one note
        notes.append(n)
        warn(f"note: {n}")


def _tasks_note(bar: Any, jobs: int, what: str) -> Any:
    """A progress note for a streamed fit run in this process (jobs == 1), else None."""
    if jobs != 1:
        return None
    return lambda m: bar.note(f"{what}: {m}")



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


def run_cv(store_path: Any, head_names: list[str] | None = None, *,
           folds: int = DEFAULT_FOLDS, repeats: int = DEFAULT_REPEATS, search: bool = False,
           metric: str = DEFAULT_METRIC,
           params: list[str] | None = None, class_weight: str | None = None, jobs: int = 1,
           seed: int = 0, top_errors: int = DEFAULT_TOP_ERRORS, progress: bool = True,
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

    from ..heads import stream
    from ..progress import Progress, printer
    from ..store.read import open_stores

    warn = warn or printer(True)
    say = printer(progress)
    _check_options(folds, repeats, metric, jobs, top_errors)
    names = list(dict.fromkeys(head_names or DEFAULT_CV_HEADS))
    chunk_rows = _check_heads(names, search, chunk_rows)
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
    if store.features_loaded:
        checks.refuse_unusable(X, [store.paths[i] for i in rows.train], where, store)
    # the held-out rows cv scores after its folds: refused now, before any fit
    for idx in rows.heldout.values():
        if store.features_loaded:
            checks.refuse_unusable(store.features[idx], [store.paths[i] for i in idx], where,
                                   store)
        else:
            checks.refuse_unusable_stored(store, idx, chunk_rows)  # resolved by _check_heads
    # the training rows in memory (for the in-memory heads), or streamed from the store
    sources = {False: Labeled(None, rows.train, y, X),
               True: Labeled(store, rows.train, y, None, chunk_rows)}
    present = set(y.tolist())
    labels = [c for c in store.classes if c in present]
    fewshot.check_classes(y, where)
    cls, n = min_class(y)
    if n < 2:
        raise EvaluateError(f"{where}: class {cls!r} has a single training image; "
                            "cross-validation needs at least 2 per class: add images of it, or "
                            "move its folder out of the data and run `embedpipe extract DATA "
                            f"-o {where} --prune`")
    notes: list[str] = []
    # rows the backbone was fine-tuned on: every fold's score over them overrates it
    tuned: dict[str, Any] = {"heldout": {}}
    for split, idx in [(None, rows.train), *rows.heldout.items()]:
        k, n = finetuned_note(store, idx, "cross-validated rows" if split is None
                              else f"rows of the held-out split {split!r}")
        if split is None:
            tuned["cross_validated"] = k
        else:
            tuned["heldout"][split] = k
        if n:
            notes.append(n)
            warn(f"note: {n}")
    asked = folds
    folds, splits, splitter_text = _outer_splits(y, folds, repeats, seed, notes, warn,
                                                 "training")
    if search:
        _check_search(names, y, splits, where)
    _check_for_data(per_params, y, store.dim, seed, where)
    _unused_notes(per_params, y, store.dim, seed, warn, notes)

    tasks = [(h, i) for h in names for i in range(len(splits))]
    say(f"cv: {len(names)} head(s) x {len(splits)} folds = {len(tasks)} fits on {len(y)} "
        f"train rows ({'nested search, ' if search else ''}{jobs} job(s))")
    results = _run_tasks(tasks, "cv", progress, jobs, len(y), lambda key, bar: (
        sources[key[0] in streamed], splits[key[1]][0], splits[key[1]][1], key[0],
        per_params[key[0]], cw[key[0]], search, metric, seed, where,
        _tasks_note(bar, jobs, f"{key[0]} fold {key[1] + 1}") if key[0] in streamed else None))
    _fewshot_notes(results, warn, notes)

    table = []
    for h in names:
        fold_rows = []
        for i in range(len(splits)):
            r = results[(h, i)]
            fold_rows.append({"repeat": i // folds, "fold": i % folds, **r["scores"],
                              "fit_seconds": r["fit_seconds"],
                              **({"params": r["params"]} if search else {})})
        common, per_fold = _effective([results[(h, i)] for i in range(len(splits))], h, search,
                                     per_params[h])
        for f, differs in zip(fold_rows, per_fold):
            f["effective_params"] = differs
        entry: dict[str, Any] = {"head": h, "params": per_params[h], "class_weight": cw[h],
                                 "effective_params": common}
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
        "out_of_fold": scores(y, oof),
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
            on_disk = best in streamed
            work = (stream.work(best, per_params[best], len(y), search=search,
                                inner_folds=INNER_FOLDS, seed=seed) if on_disk else 0)
            with Progress(work, f"cv: refit {best}", enabled=progress and on_disk,
                          unit="row") as bar:
                est, chosen = fit_checked(sources[on_disk], best, per_params[best], cw[best],
                                          search, metric, seed, where,
                                          jobs=None if on_disk else jobs, tick=bar.update,
                                          note=bar.note)
            for split, idx in rows.heldout.items():
                yh = targets(store, idx)
                held = Labeled(store, idx, yh, None if on_disk else
                               store.features[idx].astype(X.dtype, copy=False), chunk_rows)
                pred, _, _ = held.predict(est, use_proba=heads.get(best).native_proba)
                seen = set(yh.tolist()) | present
                heldout[split] = {
                    "rows": int(len(idx)), **scores(yh, pred),
                    "classes_not_in_train": sorted(set(yh.tolist()) - present),
                    "confusion_matrix": _confusion(
                        yh, pred, [c for c in store.classes if c in seen]),
                }
        heldout = {"head": best, "params": chosen, "class_weight": cw[best],
                   "effective_params": (chosen if best == heads.AUTO.name
                                        else heads.effective_params(best, est)),
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
        # how many scored rows are images the backbone was fine-tuned on (finetuned_note)
        "finetuned_rows": tuned,
        "versions": versions("sklearn", "scipy", "joblib"),
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
        if len({m[p][1] for m in per_store}) > 1:
            each = ", ".join(f"{m[p][1]} in {s.path}" for s, m in zip(stores, per_store))
            raise EvaluateError(f"{p}: labeled {each}; compare stores of the same labeled data "
                                "(extract each from the same folders)")
    if not common:
        raise EvaluateError(f"{', '.join(str(s.path) for s in stores)}: no train rows in "
                            "common (paths differ); compare stores extracted from the same data")
    y = np.array([per_store[0][p][1] for p in common])
    idx = [np.array([m[p][0] for p in common], dtype=np.int64) for m in per_store]
    return common, y, idx, notes


def _letter(k: int) -> str:
    """The table's name of the ``k``-th store (0-based): [A], [B], ..."""
    return f"[{chr(65 + k)}]"


def _refuse_same_file(store_paths: list[Any]) -> None:
    """compare scores one store against another: the same file given twice (another spelling
    of its path, a symlink or a hard link: _io.same_file) would print identical columns.
    Raises EvaluateError naming the file and both of its places."""
    from .. import _io

    for j, b in enumerate(store_paths):
        for i, a in enumerate(store_paths[:j]):
            if _io.same_file(a, b):
                twice = (f"the same store is given twice ({_letter(i)} and {_letter(j)})"
                         if str(a) == str(b) else
                         f"{_letter(j)} is the same store file as {_letter(i)} {a}")
                raise EvaluateError(
                    f"{b}: {twice}; compare scores stores of the same images against each other "
                    "(other backbones, weights or precisions): pass each store once, or score "
                    f"heads on one store with `embedpipe cv {a}`")


def _same_features(stores: list[Any], idx: list[np.ndarray]) -> list[str]:
    """A note for each pair of (different) store files whose compared rows (``idx``: each
    store's) hold the same features (store.read.same_feature_pairs: the same images, made the
    same way): their columns can differ only by float rounding, e.g. a copy of a store."""
    from ..store.read import same_feature_pairs

    return [f"{_letter(i)} {stores[i].path} and {_letter(j)} {stores[j].path} hold features of "
            "the same images made the same way (backbone, weights, preprocessing, precision): "
            "they score alike up to float rounding; compare stores that differ in one of these"
            for i, j in same_feature_pairs(stores, idx)]


def run_compare(store_paths: list[Any], head_names: list[str] | None = None, *,
                folds: int = DEFAULT_FOLDS, repeats: int = DEFAULT_REPEATS,
                search: bool = False, metric: str = DEFAULT_METRIC, params: list[str] | None = None,
                class_weight: str | None = None, jobs: int = 1, seed: int = 0,
                progress: bool = True, warn: Any = None,
                chunk_rows: int | None = None) -> dict[str, Any]:
    """Cross-validate the same heads on the same folds over several stores of the same images
    (e.g. two backbones, or base vs fine-tuned weights). Rows are matched by path: the train
    rows all stores share, sorted by path, are split once (``make_folds``) and every
    (store, head, fold) is fitted and scored on exactly those rows. With two stores the report
    also has the paired per-fold difference (second − first)."""

    from ..progress import printer
    from ..store.read import open_store

    warn = warn or printer(True)
    say = printer(progress)
    if len(store_paths) < 2:
        raise EvaluateError("compare needs at least two stores; pass STORE_A STORE_B [...]")
    _check_options(folds, repeats, metric, jobs, 0)
    names = list(dict.fromkeys(head_names or DEFAULT_COMPARE_HEADS))
    chunk_rows = _check_heads(names, search, chunk_rows)
    _refuse_same_file(store_paths)
    per_params = resolve_params(names, params, seed=seed)
    cw = _class_weights(names, class_weight, warn)
    streamed = {h for h in names if heads.get(h).streaming}
    stores = [open_store(p, features=bool(set(names) - streamed)) for p in store_paths]
    paths, y, idx, notes = _aligned_rows(stores)
    for n in notes:
        warn(f"warning: {n}")
    for n in _same_features(stores, idx):
        notes.append(n)
        warn(f"note: {n}")
    tuned = []  # per store: the common rows its backbone was fine-tuned on (finetuned_note)
    for s, i in zip(stores, idx):
        k, n = finetuned_note(s, i, "common cross-validated rows")
        tuned.append(k)
        if n:
            notes.append(n)
            warn(f"note: {n}")
    fewshot.check_classes(y, ", ".join(str(s.path) for s in stores), "common train rows")
    cls, n = min_class(y)
    if n < 2:
        raise EvaluateError(f"{', '.join(str(s.path) for s in stores)}: class {cls!r} has a "
                            "single train image common to the stores; cross-validation needs "
                            "at least 2 per class: add images of it to every store, or move its "
                            "folder out of the data and extract again with --prune")
    folds, splits, splitter_text = _outer_splits(y, folds, repeats, seed, notes, warn,
                                                 "common train")
    if search:  # as cv: refused before any fit
        _check_search(names, y, splits, ", ".join(str(s.path) for s in stores))
    _check_for_data(per_params, y, stores[0].dim, seed, ", ".join(str(s.path) for s in stores))
    _unused_notes(per_params, y, stores[0].dim, seed, warn, notes)  # rules read rows, not dim
    for s, i in zip(stores, idx):
        if s.features_loaded:
            checks.refuse_unusable(s.features[i], [s.paths[j] for j in i], str(s.path), s)
    # each store's common train rows: in memory (in-memory heads) or streamed (streaming heads)
    sources = [{False: Labeled(None, i, y, s.features[i] if s.features_loaded else None),
                True: Labeled(s, i, y, None, chunk_rows)} for s, i in zip(stores, idx)]
    tasks = [(k, h, f) for k in range(len(stores)) for h in names for f in range(len(splits))]
    say(f"compare: {len(stores)} stores x {len(names)} head(s) x {len(splits)} folds = "
        f"{len(tasks)} fits on {len(y)} common train rows")
    results = _run_tasks(tasks, "compare", progress, jobs, len(y), lambda key, bar: (
        sources[key[0]][key[1] in streamed], splits[key[2]][0], splits[key[2]][1], key[1],
        per_params[key[1]], cw[key[1]], search, metric, seed, str(stores[key[0]].path),
        _tasks_note(bar, jobs, f"[{chr(65 + key[0])}] {key[1]} fold {key[2] + 1}")
        if key[1] in streamed else None))
    _fewshot_notes(results, warn, notes)
    table = []
    for h in names:
        common, per_fit = _effective([results[key] for key in tasks if key[1] == h], h, search,
                                    per_params[h])
        row: dict[str, Any] = {"head": h, "params": per_params[h], "stores": [],
                               "effective_params": common,
                               "varies": sorted({k for d in per_fit for k in d})}
        for k in range(len(stores)):
            scores = [results[(k, h, f)]["scores"] for f in range(len(splits))]
            row["stores"].append({m: {"mean": float(np.mean([s[m] for s in scores])),
                                      "std": float(np.std([s[m] for s in scores])),
                                      "folds": [s[m] for s in scores]} for m in METRICS})
            # per fold, the parameters not in effective_params (what varies), as cv's folds
            row["stores"][-1]["effective_params"] = per_fit[k * len(splits):
                                                            (k + 1) * len(splits)]
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
                    "feature_dim": s.dim, "precision": s.meta.get("precision"),
                    "finetuned_rows": k}
                   for s, k in zip(stores, tuned)],
        "rows": int(len(y)), "classes": sorted(set(y.tolist())), "folds": folds,
        "repeats": repeats, "seed": seed, "splitter": splitter_text, "metric": metric,
        "search": search, "warnings": notes, "heads": table, "versions": versions("sklearn", "scipy", "joblib"),
    }
    return _jsonable(report)
