"""Fitting one head configuration on training rows: its parameters (``--param``), an optional
inner grid search, and fit failures turned into one-line errors."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

from ..errors import first_line, naming
from . import fewshot
from . import registry as heads
from .rows import EvaluateError, min_class, scores
from .source import Labeled, Note, Tick, _nothing


def fit_configuration(source: Labeled, head: str, params: dict[str, Any] | None, *,
                      class_weight: str | None = None, search: bool = False,
                      inner_folds: int = 3, scoring: str = "accuracy", seed: int = 0,
                      jobs: int | None = None, tick: Tick = _nothing, note: Note = _nothing,
                      notes: list[str] | None = None,
                      rule_y: Any = None) -> tuple[Any, dict[str, Any]]:
    """Fit ``head`` on the rows of ``source`` (in memory or streamed: source.Labeled). With
    ``search``, pick its grid's best parameters by stratified ``inner_folds``-fold CV on these
    rows only (``scoring``: a key of rows.METRICS), then refit on all of them. Returns the
    fitted estimator and the parameters used (short names: the user's plus the ones searched).

    In memory the search is scikit-learn's GridSearchCV (``jobs`` parallel fits); streamed, each
    candidate is fitted and scored fold by fold from the store, on the same folds. Settings that
    few images per class cannot support are lowered first (fewshot.adapt; a note for each goes
    to ``notes``), or the head is refused in one line (FewShotError). Raises EvaluateError when
    a class has fewer than 2 rows to search on. The head's data-dependent defaults
    (``registry.data_params``) fill the parameters the user did not set, and are recorded in the
    parameters returned (the grid is still searched over them), as is every setting that
    fewshot.adapt lowered (registry.fitted_params): they name what was fitted. ``rule_y``: the
    labels whose smallest class picks those rules (default: ``source.y``; `fit` passes the
    store's training labels, so that rows held out to calibrate do not move a store across a
    rule's threshold)."""
    user = dict(params or {})
    dim = source.X.shape[1] if source.X is not None else getattr(source.store, "dim", 0)
    rule_y = source.y if rule_y is None else rule_y
    params = heads.with_data_defaults(head, params, rule_y, dim)
    pipe = heads.build(head, params, class_weight=class_weight, seed=seed,
                       data=heads.data_of(rule_y, dim))  # an ensemble's members: their rules
    chosen = dict(params or {})
    grid = heads.param_grid(head, user, seed=seed, prep=params.get("prep")) if search else {}
    if not grid:
        est = source.fit(pipe, head, params, class_weight=class_weight, seed=seed, tick=tick,
                         note=note, notes=notes)
        return est, _as_fitted(source, head, chosen, est, class_weight, seed, rule_y)
    from sklearn.model_selection import GridSearchCV, ParameterGrid, StratifiedKFold

    cls, n = min_class(source.y)
    k = min(inner_folds, n)
    if k < 2:
        raise EvaluateError(f"--search: class {cls!r} has {n} training image(s); the inner "
                            "search needs at least 2 per class: add images or drop --search")
    folds = StratifiedKFold(k, shuffle=True, random_state=seed)
    if not source.streamed:
        # the candidates are fitted on the inner folds' training parts: adapt the head and its
        # grid to the smallest
        part = fewshot.fold_part(source.y, k)
        (notes if notes is not None else []).extend(
            fewshot.adapt(pipe, part, head, "an inner search fold's training part")
            + fewshot.adapt_grid(grid, part, head))
        with heads.lda_cache(len(source)):  # the lda step once per fold, not per grid point
            gs = GridSearchCV(heads.cached(pipe), grid, scoring=scoring, refit=True,
                              n_jobs=jobs, cv=folds)
            gs.fit(source.X, source.y)
        chosen.update(heads.short_params(gs.best_params_))
        best_est = heads.uncached(gs.best_estimator_)
        return best_est, _as_fitted(source, head, chosen, best_est, class_weight, seed,
                                   rule_y)
    splits = list(folds.split(np.zeros((len(source), 1)), source.y))
    cands = [heads.short_params(c) for c in ParameterGrid(grid)]
    best: tuple[float, dict[str, Any]] | None = None
    for c, cand in enumerate(cands):
        p = {**chosen, **cand}
        where = " ".join(f"{a}={b}" for a, b in cand.items())
        got = []
        for f, (tr, te) in enumerate(splits):
            est = source.take(tr).fit(
                heads.build(head, p, class_weight=class_weight, seed=seed), head, p,
                class_weight=class_weight, seed=seed, tick=tick,
                note=lambda m: note(f"search {c + 1}/{len(cands)} ({where}), "
                                    f"fold {f + 1}/{k}: {m}"))
            pred, _, _ = source.take(te).predict(est, tick=tick)
            got.append(scores(source.y[te], pred)[scoring])
        if best is None or float(np.mean(got)) > best[0]:
            best = (float(np.mean(got)), cand)
    assert best is not None
    chosen.update(best[1])
    return source.fit(heads.build(head, chosen, class_weight=class_weight, seed=seed), head,
                      chosen, class_weight=class_weight, seed=seed, tick=tick,
                      note=note, notes=notes), chosen


def _as_fitted(source: Labeled, head: str, params: dict[str, Any], estimator: Any,
               class_weight: str | None, seed: int, rule_y: Any) -> dict[str, Any]:
    """The parameters ``estimator`` was fitted with (registry.fitted_params: ``params`` with
    what fewshot.adapt lowered). A streamed fit is not adapted: ``params`` as they are."""
    if source.streamed:
        return params
    dim = source.X.shape[1] if source.X is not None else 0
    return heads.fitted_params(head, params, estimator, class_weight=class_weight, seed=seed,
                               data=heads.data_of(rule_y, dim))


INNER_FOLDS = 3


def resolve_params(head_names: list[str], items: list[str] | None, *,
                   seed: int = 0) -> dict[str, dict[str, Any]]:
    """``--param`` items → parameters per head. ``NAME=VALUE`` goes to every head in
    ``head_names`` that has parameter NAME (an ensemble has it when it or a member does: see
    registry.member_params; an error when none has it); ``HEAD:NAME=VALUE`` to that head, and
    to the member HEAD of every ensemble evaluated, overriding the former. Values are validated
    by building each head."""
    out: dict[str, dict[str, Any]] = {h: {} for h in head_names}
    specific: list[tuple[str, str, Any]] = []
    for item in items or []:
        ((key, value),) = heads.parse_params([item]).items()
        head, sep, name = key.partition(heads.MEMBER_SEP)
        head, name = head.strip(), name.strip()
        if sep:
            heads.get(head)
            within = [h for h in head_names if head in heads.get(h).members]
            if head not in out and not within:
                raise heads.HeadError(f"--param {item}: {head} is not among the heads "
                                      f"being evaluated ({', '.join(head_names)}) nor a member "
                                      f"of one; add --head {head} or drop the '{head}:' prefix")
            if head in out:
                specific.append((head, name, value))
            specific += [(h, f"{head}{heads.MEMBER_SEP}{name}", value) for h in within]
            continue
        takers = [h for h in head_names if _has_param(h, key, seed)]
        if not takers:
            raise heads.HeadError(f"--param {item}: none of the heads {', '.join(head_names)} "
                                  f"has a parameter {key}; see `embedpipe heads` for each "
                                  "head's parameters")
        for h in takers:
            out[h][key] = value
    for head, name, value in specific:
        if head != heads.AUTO.name:  # auto's are checked below
            heads.pipeline_params(heads.get(head), {name: value}, seed,  # names the valid
                                  f"{head}{heads.MEMBER_SEP}")  # ones
        out[head][name] = value
    for h in head_names:
        if h == heads.AUTO.name:
            from .auto import check_budget

            unknown = sorted(set(out[h]) - {"budget"})
            if unknown:
                raise heads.HeadError(f"--param {unknown[0]}: auto chooses the parameters "
                                      "itself; its only one is budget (seconds)")
            if "budget" in out[h]:
                check_budget(out[h]["budget"])
            continue
        # bad values fail here, before any work, named as --param takes them here (HEAD:NAME)
        heads.build(h, out[h], seed=seed, prefix=f"{h}{heads.MEMBER_SEP}")
    return out


def _has_param(head: str, name: str, seed: int) -> bool:
    if head == heads.AUTO.name:
        return name == "budget"
    spec = heads.get(head)
    if spec.members:  # its own (pca, weights...) or a member's (registry.member_params)
        if name in heads.ENSEMBLE_OWN or "__" in name:
            return name in heads.ENSEMBLE_OWN or name in spec.make(seed).get_params()
        return any(name in heads.param_names(heads.get(m)) for m in spec.members)
    return name in ("pca", "prep") or name in spec.make(seed).get_params()


def convergence_note(head: str, count: int, where: str = "", param: str = "") -> str:
    """The one line that summarises ``count`` ConvergenceWarnings of ``head`` (``where``: e.g.
    "in 2 of 5 folds"), for `fit` and `cv` alike, instead of scikit-learn's raw warnings."""
    names = ["max_iter"]
    if heads.ENSEMBLE_SEP in head:  # a member's (registry.member_params)
        names = [f"{m}{heads.MEMBER_SEP}max_iter" for m in head.split(heads.ENSEMBLE_SEP)
                 if "max_iter" in heads.get(m).make(0).get_params()] or names
    return (f"{count} ConvergenceWarning(s){' ' + where if where else ''}: the solver stopped "
            f"before converging; try a larger "
            + " or ".join(f"--param {param or ''}{n}=N" for n in names))


class _Quiet:
    """Silence scikit-learn's warnings (ConvergenceWarning, UserWarning, ...); with ``count``,
    record them to count the convergence warnings (else ignore them, a filter scikit-learn
    passes on to its own worker processes)."""

    def __init__(self, count: bool = True):
        self._count = count

    def __enter__(self) -> "_Quiet":
        import signal
        import threading
        import warnings

        self._cm = warnings.catch_warnings(record=self._count)
        caught = self._cm.__enter__()
        self._caught = caught if caught is not None else []
        warnings.simplefilter("always" if self._count else "ignore")
        # Ctrl-C raises errors.Interrupted, which no estimator swallows (see its docstring);
        # only the main thread may set a handler, and only over Python's default one
        self._sigint = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._sigint = signal.signal(signal.SIGINT, _interrupted)
        return self

    @property
    def convergence(self) -> int:
        from sklearn.exceptions import ConvergenceWarning

        return sum(issubclass(w.category, ConvergenceWarning) for w in self._caught)

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._sigint is not None:
            signal.signal(signal.SIGINT, self._sigint)
        self._cm.__exit__(*exc)


ONE_BLAS_THREAD_ROWS = 5000


def blas_threads(rows: int) -> Any:
    """A context: one BLAS thread for fits on up to ONE_BLAS_THREAD_ROWS rows, else the
    library's own count. Small fits gain little from more, and on a busy 2-core machine two
    threads spin-wait: logreg on 170 rows 0.6 s vs 56 s wall, centroid with its lda step on 20
    rows 3 s vs 80 s."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1 if rows <= ONE_BLAS_THREAD_ROWS else None, user_api="blas")


def _interrupted(signum: int, frame: Any) -> None:
    from ..errors import Interrupted

    raise Interrupted()


@contextlib.contextmanager
def _fit_errors(head: str, params: dict[str, Any], where: str) -> Iterator[None]:
    """A fit that fails on a --param value (e.g. pca larger than the fold) is a user error; a
    refusal of the head (fewshot, --search, streaming) names the store ``where`` first."""
    try:
        with naming(where):
            yield
    except np.linalg.LinAlgError as e:  # the data, not a --param: e.g. identical rows per class
        raise EvaluateError(f"{where}: {head} cannot be fitted on these rows: a linear-algebra "
                            f"step found a singular matrix ({first_line(e)}), as when every row "
                            "of a class is the same; check the features (`embedpipe audit "
                            "STORE` finds duplicates), or for knn and centroid leave out their "
                            "lda step with --param prep=l2") from None
    except (ValueError, TypeError) as e:
        if not params:
            raise
        given = " ".join(f"{k}={v}" for k, v in params.items())
        first = first_line(e)
        raise EvaluateError(f"{where}: {head} with {given} failed to fit ({first}); fix that "
                            "--param value") from None


def fit_checked(source: Labeled, head: str, params: dict[str, Any],
                class_weight: str | None, search: bool, metric: str, seed: int, where: str,
                jobs: int | None = None, tick: Tick = _nothing, note: Note = _nothing,
                notes: list[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """fit_configuration with cv's inner folds, a fit that fails on a --param value and any
    refusal of the head turned into one line naming ``where`` (_fit_errors, errors.naming).
    ``auto`` runs its own selection (heads/auto.py) on the in-memory rows; --search adds
    nothing to it."""
    if head == heads.AUTO.name:
        from .auto import DEFAULT_BUDGET, fit_auto

        with naming(where):
            est, chosen, sel = fit_auto(source.features(), source.y,
                                        budget=params.get("budget", DEFAULT_BUDGET), seed=seed,
                                        metric=metric)
        if not sel.folds and notes is not None:  # it could not choose: say so (cv's notes)
            notes.extend(f"auto: {n}" for n in sel.notes)
        return est, chosen
    with _fit_errors(head, params, where):
        return fit_configuration(source, head, params, class_weight=class_weight, search=search,
                                 inner_folds=INNER_FOLDS, scoring=metric, seed=seed, jobs=jobs,
                                 tick=tick, note=note, notes=notes)
