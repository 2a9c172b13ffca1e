"""``--head auto``: choose the head, its parameters and its preprocessing by cross-validation on
the training rows, within a time budget (no torch).

How it chooses (``select``):

1. Candidates (``candidates``): a fixed list of (head, parameters) configurations — first
   every in-memory head's data-dependent defaults (``defaults``: ``registry.data_params``),
   cheapest first, then the alternatives that measured best on the bench sets
   (bench/results/accuracy.md), e.g. logistic regression on L2-normalised features with weak
   regularisation.
2. Each candidate is scored by stratified k-fold CV on the training rows (k = 5, or the size of
   the smallest class; 3 above 5,000 rows), folds from ``evaluate.cv.make_folds`` and shared by
   all candidates. Its out-of-fold class scores are kept. Above SELECT_ROWS (10,000) rows they
   are scored on a stratified sample of that many (``score_sample``) and the choice is fitted
   on all rows: a whole large store does not fit the budget. Above PARALLEL_ROWS rows the
   folds run several at once, in worker processes (``score_workers``: one per usable core),
   with the same results as one after another.
3. Budget: before a candidate starts, if the seconds spent plus its expected cost (a fold of
   the last candidate of the same head, else the mean fold so far, times the rounds its folds
   take on the workers) exceed ``budget``, it and the rest are skipped and a note says so; the
   same before each of its folds (expected: its folds done, else as before), so a candidate is
   dropped rather than finished past the budget. The first candidate always runs, so a tiny
   budget still yields a valid head.
4. Ensembles. Up to 5,000 rows: the soft vote (mean temperature-scaled probabilities) of every
   head's defaults (7 heads), scored on the same folds. Above: soft voting over the best
   configuration of each head, members added
   greedily (best first) only while the out-of-fold metric strictly improves (above 5,000
   rows, by more than one standard error of the paired difference: a member's fit is costly
   there), so such an ensemble is in the table only if it beats its best member on the same
   folds.
5. The choice: up to 5,000 rows the vote, whatever its CV rank (on a few hundred rows the CV
   ranking is mostly noise, and over repeated splits the vote of the defaults scored higher
   than the best CV row and than a vote of the heads ranked best by CV: see MIN_VOTERS);
   above, or when fewer than MIN_VOTERS heads' defaults could be scored within the budget (or
   calibrated to vote: a note says so; there is no vote then, as an unselected vote of
   whichever 2 or 3 defaults there are did not help), the best row of the table (ties: the
   earlier, cheaper candidate), which may be a greedy ensemble of step 4, whose members each
   joined because they raised the CV score (the note then says so). It is
   refitted on all training rows; ``fit`` saves it like any head, with the table in the
   manifest (``auto``). A head without probabilities (the choice, or a vote member) is
   temperature-scaled on the out-of-fold decision values its CV here gave
   (``calibration.calibrated_from_oof``), so the final fit fits it once instead of k+1
   times; where the CV did not cover every row (``score_sample``) it is calibrated as `fit`
   calibrates it (k folds, or on many rows a held-out part: calibration.py).

Several stores (``fit A.h5 B.h5 --head auto``) are stacked side by side first, as for any head,
so the candidates are scored on the stacked features.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Set
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import first_line, naming
from . import calibration as calibrations  # (``calibration`` is the manifest's words here)
from . import registry as heads
from .rows import EvaluateError, min_class

AUTO = "auto"
# seconds of selection: small stores finish well inside it (natural set, 170 rows: 8 s); 60 s
# cut 10k Fashion-MNIST rows before the RBF SVM (3 folds of about 6 CPU-s each after logreg's)
DEFAULT_BUDGET = 120.0
MAX_FOLDS = 5
LARGE_ROWS = 5000  # above this, 3 folds
# Above this many training rows the candidates are scored on a stratified sample of about this
# many (every class keeps at least SAMPLE_MIN_PER_CLASS rows, or all it has), and the choice is
# then fitted on all rows. 10,000 rows score all 13 candidates within the default budget on 2
# cores (112 s, bench/results/accuracy-10k.md); on 60,000 Fashion-MNIST rows the budget cut the
# whole-store search after its first candidate, logreg (test 0.900), where svm's defaults
# score 0.918 (bench/results/accuracy-60k.md). The ranking holds across sizes there: svm is
# the best head at 10k (0.892) and at 60k, logreg below it at both.
SELECT_ROWS = 10_000
SAMPLE_MIN_PER_CLASS = 50
MAX_ENSEMBLE = 3
# Up to LARGE_ROWS rows auto's choice is the soft vote of every head's defaults (``defaults``),
# whatever its own CV rank; with fewer than MIN_VOTERS of them scored (the budget) there is no
# vote. Mean test accuracy over 20 random splits of the natural set and 10 draws of
# Fashion-MNIST at 10 and 50 per class (bench/results/auto_policy.md, power-normalised
# defaults): the vote of the defaults 0.887 / 0.772 / 0.833 against 0.882 / 0.771 / 0.828 for
# choosing the best CV row, and 0.882 / 0.771 / 0.832 for the vote of the 4 heads best by CV
# (the policy before: it left out centroid and knn, the best heads on the natural set, whose
# inner CV on 136 rows ranks them low); confirmed on fresh splits (auto_policy-fresh.md). On a
# few hundred rows the candidates' CV scores differ by less than their noise, so choosing
# members by CV adds noise, not skill. A vote of 2 or 3 heads did not beat the best CV row.
MIN_VOTERS = 4
# The out-of-fold decision values kept for the final fit's calibration (Selection.decisions)
# take N×K float64 values per configuration without probabilities: 6 MB in all at 10,000 rows
# of 10 classes, 480 MB at 1,000 classes. Past this many bytes the rest are not kept (their
# heads, if chosen, are calibrated by their own folds, as before).
DECISIONS_MAX_BYTES = 256 * 2**20


class BudgetError(EvaluateError):
    """A bad --budget value."""


def check_budget(budget: Any) -> float:
    try:
        b = float(budget)
    except (TypeError, ValueError):
        b = float("nan")
    if not np.isfinite(b) or b <= 0:
        raise BudgetError(f"--budget {budget}: pass the seconds auto may spend choosing, a "
                          f"number > 0 (default {DEFAULT_BUDGET:g})")
    return b


# the in-memory heads whose defaults auto scores first and votes on few rows, cheapest first on
# a few hundred rows (so a small --budget still scores enough of them to vote: knn and centroid
# fit an LDA, once per fold for both, and mlp is the slowest); the streamed sgd heads are for
# stores larger than memory
VOTE_ORDER = ("logreg", "ridge", "linear-svm", "svm", "knn", "centroid", "mlp")


def defaults(n_per_class: int, dim: int) -> list[tuple[str, dict[str, Any]]]:
    """Every in-memory head's defaults for this data (``registry.data_params``), in the order
    auto scores them: (head name, short parameters); on large stores (SMALL_DATA_ROWS or more
    rows in the smallest class) the RBF SVM, the strongest head there, second (10k
    Fashion-MNIST rows: 0.892 vs logreg's 0.878)."""
    order = list(VOTE_ORDER)
    if n_per_class >= heads.SMALL_DATA_ROWS:
        order.remove("svm")
        order.insert(1, "svm")
    return [(h, heads.data_params(h, n_per_class, dim)) for h in order]


def candidates(n_per_class: int, dim: int) -> list[tuple[str, dict[str, Any]]]:
    """The configurations auto scores, in order: (head name, short parameters). First every
    head's defaults for this data (``defaults``), then the alternatives."""
    # the heads' defaults power-normalise (prep=sqrt+...); a configuration without it for the
    # heads where it helps least (bench/results/power_norm.md: svm -0.2 points on 10k
    # Fashion-MNIST rows, logreg the least of the linear heads on the natural set)
    out = defaults(n_per_class, dim) + [
        ("logreg", {"prep": "sqrt+l2", "C": 100.0}),
        ("logreg", {"prep": "l2", "C": 10.0}),
        ("logreg", {"prep": "scale", "C": 1.0}),
        ("ridge", {"prep": "sqrt+l2", "alpha": 1.0}),
        ("knn", {"n_neighbors": 10, "metric": "cosine", "weights": "distance"}),
        ("svm", {"prep": "l2", "C": 10.0}),
    ]
    seen: set[str] = set()
    unique = []
    for h, p in out:  # the same pipeline twice (e.g. C=10 given and C=10 by default) once
        own = heads.get(h).make(0).get_params()
        key = describe(h, {k: v for k, v in p.items() if not (k in own and own[k] == v)})
        if key not in seen:
            seen.add(key)
            unique.append((h, p))
    return unique


def describe(head: str, params: dict[str, Any]) -> str:
    """'logreg prep=l2 C=10.0' (the head's own preprocessing when prep is not given)."""
    prep = params.get("prep") or "+".join(heads.get(head).steps) or "none"
    rest = " ".join(f"{k}={v}" for k, v in sorted(params.items()) if k != "prep")
    return f"{head} prep={prep}" + (f" {rest}" if rest else "")


@dataclass
class Selection:
    """The outcome of ``select``: the table of candidates (best first) and notes."""
    table: list[dict[str, Any]]
    folds: int  # 0: no CV (a class of 1 row): the first candidate, unscored
    metric: str
    budget: float
    seconds: float
    notes: list[str] = field(default_factory=list)
    chosen: int = 0  # the row of ``table`` chosen (the best CV row, or the vote on few rows)
    # the out-of-fold decision values (N, or N×K in np.unique(y) order, float64) of the scored
    # configurations without probabilities, by name (``describe``), where the CV covered every
    # row (no score_sample) with the pipeline the final fit fits: the choice's (or its vote
    # members') temperature scaling is fitted on them (calibration.calibrated_from_oof); not
    # in ``record``
    decisions: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def choice(self) -> dict[str, Any]:
        return self.table[self.chosen]

    def record(self) -> dict[str, Any]:
        """JSON-ready: what the manifest (``auto``) and the cv report keep."""
        keep = ("name", "head", "params", "members", "mean", "std", "fit_seconds")
        return {"choice": self.choice["name"], "head": self.choice["head"],
                "params": self.choice["params"], "members": self.choice.get("members", []),
                "metric": self.metric, "folds": self.folds, "budget_s": self.budget,
                "seconds": round(self.seconds, 2), "notes": self.notes,
                "candidates": [{k: r[k] for k in keep if k in r} for r in self.table]}

    def lines(self) -> list[str]:
        """The table as text, best first; without CV (folds 0: a class of 1 row) one line that
        says so and what was fitted."""
        if not self.folds:
            return [f"auto: {n}" for n in self.notes]
        n = sum(not r.get("members") for r in self.table)  # the vote or ensembles: below
        combined = len(self.table) - n
        out = [f"auto: {n} candidate{'s' if n != 1 else ''}"
               + (f" and {combined} combination{'s' if combined != 1 else ''} of them"
                  if combined else "")
               + f" scored by {self.folds}-fold CV ({self.metric}) in {self.seconds:.1f} s "
               f"(budget {self.budget:g} s)"]
        for i, r in enumerate(self.table):
            mark = "→" if i == self.chosen else " "
            out.append(f"  {mark} {r['mean']:.3f} ± {r['std']:.3f}  {r['fit_seconds']:6.2f} s  "
                       f"{r['name']}")
        out += [f"  note: {n}" for n in self.notes]
        out.append(f"auto chose {self.choice['name']}")
        return out


def _temperature(scores: np.ndarray, y_idx: np.ndarray) -> float:
    """The temperature T minimising the log-loss of softmax(log(scores) / T) on these rows (a
    grid over 0.05–20; the same idea as scikit-learn's method="temperature")."""
    logits = np.log(np.clip(scores, 1e-12, 1.0))
    best, best_t = np.inf, 1.0
    for t in np.geomspace(0.05, 20, 41):
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss = -logp[np.arange(len(y_idx)), y_idx].mean()
        if loss < best:
            best, best_t = loss, t
    return float(best_t)


def _calibrate(scores: np.ndarray, t: float) -> np.ndarray:
    z = np.log(np.clip(scores, 1e-12, 1.0)) / t
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def select(X: np.ndarray, y: np.ndarray, *, budget: float = DEFAULT_BUDGET, seed: int = 0,
           metric: str = "accuracy", say: Callable[[str], None] = lambda m: None) -> Selection:
    """Score the candidates and their ensembles on (X, y) (N×D float, N labels) by stratified
    CV; returns the table, best first (see the module docstring)."""
    from .fit import blas_threads

    budget = check_budget(budget)
    # one BLAS thread on small stores (fit.blas_threads); knn and centroid share each fold's
    # lda fit (registry.lda_cache)
    with blas_threads(len(y)), heads.lda_cache(len(y)):
        return _select(X, y, budget, seed, metric, say)


def _select(X: np.ndarray, y: np.ndarray, budget: float, seed: int, metric: str,
            say: Callable[[str], None]) -> Selection:
    from ..evaluate.cv import make_folds
    from .rows import scores as _scores

    t_start = time.perf_counter()
    _, smallest = min_class(y)
    cands = candidates(smallest, X.shape[1])  # the defaults of the data the choice is fitted on
    default_names = [describe(h, p) for h, p in defaults(smallest, X.shape[1])]
    notes: list[str] = []
    sample = score_sample(y, seed)
    if sample is not None:
        notes.append(f"{len(y)} rows: candidates scored on a stratified sample of "
                     f"{len(sample)} of them (seed {seed}); the choice is fitted on all "
                     f"{len(y)}")
        X, y = X[sample], y[sample]
        _, smallest = min_class(y)
    classes = np.unique(y)
    y_idx = np.searchsorted(classes, y)
    k = min(MAX_FOLDS if len(y) <= LARGE_ROWS else 3, smallest)
    if k < 2:  # no CV: the first candidate (the strongest measured), scored by nothing
        head, params = cands[0]
        cls, _ = min_class(y)
        notes.append(f"class {cls!r} has {smallest} training image, too few to cross-validate "
                     f"(auto needs 2 per class), so it fitted {describe(head, params)} without "
                     "choosing; add images of that class (or drop it) for auto to choose by "
                     "CV, or pass a named --head")
        row = {"name": describe(head, params), "head": head, "params": params,
               "fit_seconds": 0.0}  # no mean or std: nothing was scored
        return Selection([row], 0, metric, budget, time.perf_counter() - t_start, notes)
    splitter, _ = make_folds(k, 1, seed)
    splits = list(splitter.split(np.zeros((len(y), 1)), y))
    scored, cut_note = _score_candidates(cands, X, y, classes, splits, budget, seed, t_start,
                                         say)
    rows: list[dict[str, Any]] = []
    decisions: dict[str, np.ndarray] = {}  # by candidate name (see calibration.calibrated_from_oof)
    failed: set[str] = set()
    for c in scored:
        if c.error is not None:
            notes.append(f"{c.name} failed to fit on these rows ({c.error}); left out")
            failed.add(c.name)
            continue
        rows.append(_row(c.name, c.head, c.params, c.oof, y, classes, splits, metric, _scores,
                         c.seconds / k))
        if (c.decision is not None and sample is None and c.reusable
                and np.isfinite(c.decision).all() and c.decision.nbytes + sum(
                    d.nbytes for d in decisions.values()) <= DECISIONS_MAX_BYTES):
            decisions[c.name] = c.decision
    if cut_note:
        notes.append(cut_note)
    singles = sorted(rows, key=lambda r: -r["mean"])
    voters, left_out = (_voters(singles, X, y, default_names, failed) if len(y) <= LARGE_ROWS
                        else ([], {}))
    vote = (_vote_row(_with_calibrated(voters, y_idx), y, classes, splits, metric, _scores)
            if len(voters) >= MIN_VOTERS else None)
    table = singles + ([vote] if vote else
                       _ensembles(singles, X, y, y_idx, classes, splits, metric, _scores))
    table.sort(key=lambda r: -r["mean"])  # stable: ties keep singles and cheap-first order
    for r in table:
        r.pop("oof", None)
        r.pop("calibrated", None)
    chosen = table.index(vote) if vote else 0
    if vote:
        notes.append(f"{len(y)} rows: the choice is the soft vote of every head's defaults "
                     f"({len(voters)} heads), not the best inner-CV score (on few rows that "
                     "ranking is mostly noise; bench/results/auto_policy.md)"
                     + "".join(f"; {n} is not in it: {why}" for n, why in left_out.items()))
    elif len(y) <= LARGE_ROWS:
        notes.append(_no_vote_note(len(y), len(voters), table[0]))
    return Selection(table, k, metric, budget, time.perf_counter() - t_start, notes,
                     chosen=chosen, decisions=decisions)


@dataclass
class _Scored:
    """One candidate's cross-validation (``_score_candidates``): its out-of-fold class scores
    (N×C float64, columns in np.unique(y) order), its raw out-of-fold decision values for a
    head without probabilities, and the seconds its folds took in all (each fold timed where
    it was fitted: this process or a worker); or ``error``, the first line of why a fold
    failed to fit ("" for a candidate the budget cut)."""
    name: str
    head: str
    params: dict[str, Any]
    oof: np.ndarray
    decision: np.ndarray | None = None
    reusable: bool = True  # False: the folds' pipeline or classes differ from the final fit's
    seconds: float = 0.0
    folds_done: int = 0
    error: str | None = None


#: Up to this many training rows auto scores its folds one after another in this process: a
#: fold fits in well under a second there (natural set, 170 rows: 13 candidates in 8 s), and
#: starting worker processes (each imports scikit-learn) takes a few.
PARALLEL_ROWS = 1000
MAX_WORKERS = 8


def _cores() -> int:
    """The cores auto's fits may use: the usable cores (env.usable_cores: the affinity mask
    and a container's CPU quota, rounded up), at most OMP_NUM_THREADS where that is set (the
    usual way to cap a process's threads; joblib sets it in its worker processes, e.g. `cv
    --jobs N`'s, to cores // N)."""
    import os

    from ..env import usable_cores

    cap = os.environ.get("OMP_NUM_THREADS", "").strip()
    return min(usable_cores(), int(cap)) if cap.isdigit() and int(cap) > 0 else usable_cores()


def score_workers(rows: int) -> int:
    """How many folds auto fits at once on ``rows`` training rows: 1 up to PARALLEL_ROWS,
    else one per core it may use (_cores), at most MAX_WORKERS. Each is a worker process
    (_Workers) with worker_blas_threads BLAS/OpenMP threads."""
    return 1 if rows <= PARALLEL_ROWS else min(MAX_WORKERS, _cores())


def worker_blas_threads(rows: int, workers: int) -> int:
    """BLAS/OpenMP threads of each of ``workers`` worker processes fitting folds of ``rows``
    rows: 1 up to fit.ONE_BLAS_THREAD_ROWS (the rule of fit.blas_threads), else the cores
    auto may use shared out (at least 1), so that the workers' threads add up to them."""
    from .fit import ONE_BLAS_THREAD_ROWS

    return 1 if rows <= ONE_BLAS_THREAD_ROWS else max(1, _cores() // workers)


def _fit_fold(X: np.ndarray, head: str, params: dict[str, Any], seed: int, y: np.ndarray,
              tr: np.ndarray, te: np.ndarray, classes: np.ndarray, native: bool
              ) -> tuple[bool, np.ndarray, np.ndarray, np.ndarray | None, float]:
    """One fold of one candidate, as `fit` would fit it on the fold's training rows: (whether
    fewshot.adapt changed the pipeline, the fitted classes' columns in ``classes``, the
    held-out rows' class scores, their raw decision values (None for a head with native
    probabilities), seconds)."""
    from . import fewshot
    from .compact import class_scores, decision_values, softmax_of_decision

    t0 = time.perf_counter()
    est = heads.build(head, params, seed=seed)
    adapted = bool(fewshot.adapt(est, y[tr], head))  # as `fit` would on these rows
    est.fit(X[tr], y[tr])
    cols = np.searchsorted(classes, np.asarray(est.classes_))
    if native:
        s, _ = class_scores(est, X[te])
        d = None
    else:
        d = decision_values(est, X[te])
        s = softmax_of_decision(d)
    return adapted, cols, s, d, time.perf_counter() - t0


class _Workers:
    """Where the folds are fitted (``submit``, then ``next_done`` for each): ``n`` = 1 runs
    each task in this thread when it is submitted; ``n`` > 1, in ``n`` worker processes
    (loky, joblib's reusable executor, as scikit-learn's n_jobs uses), not threads: libsvm
    holds the GIL while it fits and predicts (two SVC fits in two threads took as long as one
    after the other, measured), and C's rand(), which liblinear draws from while libsvm and
    liblinear reseed it, is one per process. The rows go to the workers once, as a .npy file
    they map read-only (registry.scratch_dir: removed at the end, or by a later run if this
    process is killed); each task carries the row indices of its fold."""

    def __init__(self, n: int, X: np.ndarray, blas: int):
        import queue

        self.done: Any = queue.Queue()
        self._X = X
        self._executor: Any = None
        self._stack = contextlib.ExitStack()
        if n > 1:  # without a temporary directory for the rows: one fold at a time
            d = self._stack.enter_context(heads.scratch_dir("auto", X.nbytes + (64 << 20)))
            if d is not None:
                from joblib.externals.loky import get_reusable_executor

                self._path = str(Path(d) / "rows.npy")
                np.save(self._path, np.ascontiguousarray(X))
                self._blas = blas
                self._lda = heads.lda_cache_location()
                self._executor = get_reusable_executor(max_workers=n)

    def submit(self, key: Any, fn: Any, *args: Any) -> None:
        if self._executor is None:
            try:
                out: tuple[Any, Any, BaseException | None] = (key, fn(self._X, *args), None)
            except Exception as e:  # handed to the caller, which decides
                out = (key, None, e)
            self.done.put(out)
            return
        fut = self._executor.submit(_in_worker, self._path, self._blas, self._lda, fn, args)
        fut.add_done_callback(lambda f: self.done.put(
            (key, None, f.exception()) if f.exception() is not None else
            (key, f.result(), None)))

    def next_done(self) -> tuple[Any, Any, BaseException | None]:
        import queue

        while True:  # a timeout, so that Ctrl-C reaches this thread while it waits
            try:
                return self.done.get(timeout=0.2)
            except queue.Empty:
                continue

    def close(self, failed: bool) -> None:
        """Remove the rows' file; after a failure or Ctrl-C, stop the fits still running."""
        if self._executor is not None and failed:
            self._executor.shutdown(wait=True, kill_workers=True)
        self._stack.close()


_WORKER_ROWS: dict[str, np.ndarray] = {}  # in a worker process: the rows' file, mapped once


def _in_worker(path: str, blas: int, lda: str | None, fn: Any, args: tuple) -> Any:
    """A task in a worker process: ``fn(rows, *args)`` with the rows mapped from ``path``,
    ``blas`` BLAS/OpenMP threads, scikit-learn's warnings silenced (as in the caller), and the
    caller's lda cache (its directory) in use."""
    import warnings

    from threadpoolctl import threadpool_limits

    if path not in _WORKER_ROWS:
        _WORKER_ROWS.clear()
        _WORKER_ROWS[path] = np.load(path, mmap_mode="r")
    with warnings.catch_warnings(), threadpool_limits(blas), heads.using_lda_cache(lda):
        warnings.simplefilter("ignore")
        return fn(_WORKER_ROWS[path], *args)


def _score_candidates(cands: list[tuple[str, dict[str, Any]]], X: np.ndarray, y: np.ndarray,
                      classes: np.ndarray, splits: list[Any], budget: float, seed: int,
                      t_start: float, say: Callable[[str], None]
                      ) -> tuple[list[_Scored], str | None]:
    """Cross-validate ``cands`` in order on ``splits`` within ``budget`` seconds from
    ``t_start`` (module docstring, step 3), ``score_workers`` folds at a time: the candidates
    scored or failed, in their order (not those the budget cut), and the budget's note or
    None. Expected seconds: a fold of the same head's last candidate (or of this candidate's
    folds done), else the mean fold so far; a candidate starts only when its folds are
    expected to end within the budget on the workers, a fold only when it is expected to end
    within it, and a candidate that loses a fold to the budget is dropped, with the rest."""
    from concurrent.futures import BrokenExecutor

    from . import fewshot
    from .fit import _Quiet

    k = len(splits)
    workers = score_workers(len(y))
    state: list[_Scored] = []
    fold_s: dict[str, float] = {}  # head -> seconds of a fold of its last candidate
    all_folds: list[float] = []
    in_flight = 0
    note: str | None = None
    stop = False
    tasks = ((i, f) for i in range(len(cands)) for f in range(k))
    pool = _Workers(workers, X, worker_blas_threads(len(y), workers))
    failed = True

    def expected(i: int) -> float:
        c = state[i] if i < len(state) else None
        if c is not None and c.folds_done:
            return c.seconds / c.folds_done
        head = cands[i][0]
        return fold_s.get(head, float(np.mean(all_folds)) if all_folds else 0.0)

    try:
        with _Quiet(count=False):
            while True:
                while not stop and in_flight < workers:
                    nxt = next(tasks, None)
                    if nxt is None:
                        stop = True
                        break
                    i, f = nxt
                    head, params = cands[i]
                    name = describe(head, params)
                    if f == 0:
                        spent = time.perf_counter() - t_start
                        if i > 0 and spent + expected(i) * -(-k // workers) > budget:
                            left = [describe(h, p) for h, p in cands[i:]]
                            # the first candidate is always scored: say so where it alone
                            # overran the budget
                            over = (f"; the first alone took {spent:.3g} s, more than the "
                                    "budget (auto always scores one)" if i == 1
                                    and spent > budget else f" ({spent:.1f} s spent)")
                            note = (f"the budget ({budget:g} s) cut the search after {i} of "
                                    f"{len(cands)} candidates{over}; not scored: "
                                    f"{', '.join(left)}; pass a larger --budget to score them")
                            stop = True
                            break
                        state.append(_Scored(name, head, params,
                                             np.zeros((len(y), len(classes)))))
                        say(f"auto: scoring {name}")
                    c = state[i]
                    if c.error is not None:
                        continue  # a fold failed: its other folds are not fitted
                    if i > 0 and time.perf_counter() - t_start + expected(i) > budget:
                        left = [describe(h, p) for h, p in cands[i:]]
                        note = (f"the budget ({budget:g} s) cut the search during candidate "
                                f"{i + 1} of {len(cands)}; not scored: {', '.join(left)}; "
                                "pass a larger --budget to score them")
                        c.error = ""  # over budget inside this candidate: dropped
                        stop = True
                        break
                    if len(y) > LARGE_ROWS and f:  # a fold takes many seconds here: show it
                        say(f"auto: scoring {name}, fold {f + 1}/{k}")
                    tr, te = splits[f]
                    pool.submit((i, f), _fit_fold, head, params, seed, y, tr, te, classes,
                                heads.get(head).native_proba)
                    in_flight += 1
                if not in_flight:
                    break
                (i, f), out, err = pool.next_done()
                in_flight -= 1
                c = state[i]
                if err is not None:
                    if isinstance(err, BrokenExecutor):  # killed: out of memory, say
                        raise EvaluateError(
                            f"auto: a worker process died while it fitted {c.name} "
                            f"({first_line(err, 160)}); the system may have run out of "
                            "memory: rerun with OMP_NUM_THREADS=1 (one fold at a time, in "
                            "this process)") from err
                    if not isinstance(err, (ValueError, np.linalg.LinAlgError,
                                            fewshot.FewShotError)):
                        raise err  # a bug, not too few rows
                    if c.error is None:
                        c.error = first_line(err, 240)
                    continue
                adapted, cols, s, d, seconds = out
                c.seconds += seconds
                c.folds_done += 1
                all_folds.append(seconds)
                fold_s[c.head] = c.seconds / c.folds_done
                if adapted:
                    c.reusable = False  # not the pipeline the final fit is
                _, te = splits[f]
                if d is not None:
                    if c.decision is None:
                        c.decision = np.zeros((len(y),) + d.shape[1:])
                    if d.ndim == 1 or len(cols) == len(classes):
                        c.decision[te] = d
                    else:  # a class missing from a fold's training part
                        c.reusable = False
                c.oof[np.ix_(te, cols)] = s
        failed = False
    finally:
        pool.close(failed)
    # scored (every fold) or failed; a candidate the budget cut (error "") is left out
    return [c for c in state if c.error or (c.error is None and c.folds_done == k)], note


def _no_vote_note(rows: int, voters: int, best: dict[str, Any]) -> str:
    """The note for a store of up to LARGE_ROWS rows where fewer than MIN_VOTERS heads'
    defaults could be scored and voted: there is no vote, the choice is the table's best row
    (``best``), and when that row is a greedy ensemble (``_ensembles``) the note says so and
    why it is there."""
    whose = "heads'" if voters != 1 else "head's"
    text = (f"{rows} rows: only {voters} {whose} defaults could be "
            "scored and voted, so there "
            f"is no vote of every head's defaults (it takes at least {MIN_VOTERS}: on the "
            "benches a vote of whichever 2 or 3 heads' defaults there are did not beat the "
            "best CV row, bench/results/auto_policy.md); the choice is the best row of the "
            "table")
    if best.get("members"):
        text += (f", here a greedy soft-voting ensemble of {len(best['members'])} heads: unlike "
                 "that vote, its members were added one at a time, each only because it "
                 "raised the CV score on the same folds")
    return text


def score_sample(y: np.ndarray, seed: int = 0) -> np.ndarray | None:
    """The rows (sorted indices into ``y``, N labels) auto scores its candidates on: None (all
    rows) up to SELECT_ROWS rows; above, each class's share of SELECT_ROWS rows (at least
    SAMPLE_MIN_PER_CLASS, or all of a class that has fewer), drawn without replacement with
    numpy's generator seeded ``seed``; None too when that is every row."""
    if len(y) <= SELECT_ROWS:
        return None
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    take = np.minimum(counts, np.maximum(SAMPLE_MIN_PER_CLASS,
                                         np.round(counts * SELECT_ROWS / len(y)).astype(int)))
    if take.sum() >= len(y):  # small classes kept whole add up to every row
        return None
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), t, replace=False)
                                   for c, t in zip(classes, take)]))


def _row(name: str, head: str, params: dict[str, Any], oof: np.ndarray, y: np.ndarray,
         classes: np.ndarray, splits: list[Any], metric: str, scores: Any,
         fit_seconds: float) -> dict[str, Any]:
    pred = classes[np.argmax(oof, axis=1)]
    per_fold = [scores(y[te], pred[te])[metric] for _, te in splits]
    return {"name": name, "head": head, "params": dict(params),
            "mean": float(np.mean(per_fold)), "std": float(np.std(per_fold)),
            "fit_seconds": float(fit_seconds), "oof": oof}


def _best_of_each_head(singles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The best row of each head, in the order of ``singles`` (best first)."""
    best_of: dict[str, dict[str, Any]] = {}
    for r in singles:
        best_of.setdefault(r["head"], r)
    return list(best_of.values())


def _vote_row(members: list[dict[str, Any]], y: np.ndarray, classes: np.ndarray,
              splits: list[Any], metric: str, scores: Any) -> dict[str, Any]:
    """The table row of the soft vote of ``members`` (rows with their temperature-scaled
    out-of-fold scores in ``calibrated``): its out-of-fold metric and its members."""
    mean = np.mean([m["calibrated"] for m in members], axis=0)
    row = _row(" + ".join(m["name"] for m in members), heads.ENSEMBLE_SEP.join(
        m["head"] for m in members), {}, mean, y, classes, splits, metric, scores,
        sum(m["fit_seconds"] for m in members))
    row["members"] = [{"head": m["head"], "params": m["params"]} for m in members]
    return row


def _with_calibrated(rows: list[dict[str, Any]], y_idx: np.ndarray) -> list[dict[str, Any]]:
    """``rows`` with their out-of-fold scores temperature-scaled in ``calibrated``."""
    for r in rows:
        r["calibrated"] = _calibrate(r["oof"], _temperature(r["oof"], y_idx))
    return rows


def _voters(singles: list[dict[str, Any]], X: np.ndarray, y: np.ndarray,
            default_names: Sequence[str], failed: Set[str] = frozenset()
            ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The members of the soft vote (mean temperature-scaled probabilities) and, by name, the
    defaults left out of it and why (not scored: the budget, or a failed fit): the rows of
    ``singles`` (best inner-CV score first) that are a head's defaults (``default_names``,
    ``describe`` of ``defaults``) and can vote on rows ``X`` (N×D), labels ``y``
    (``_cannot_vote``: a member without probabilities must be calibrated; knn not where the
    same image is under two classes, or the default head of `fit` could not be exported).

    Fewer than the heads when some were not scored (the budget) or cannot vote; with fewer
    than MIN_VOTERS there is no vote."""
    out, left = [], {}
    for r in singles:
        if r["name"] not in default_names:
            continue
        why = _cannot_vote(r, X, y)
        if why:
            left[r["name"]] = why
        else:
            out.append(r)
    scored = {r["name"] for r in singles}
    for n in default_names:
        if n not in scored:
            left[n] = ("it failed to fit on these rows (see above)" if n in failed
                       else "not scored (the budget)")
    order = {n: i for i, n in enumerate(default_names)}  # one order whatever the CV ranks:
    return sorted(out, key=lambda r: order[r["name"]]), left  # cv's folds name one vote alike


def _cannot_vote(row: dict[str, Any], X: np.ndarray, y: np.ndarray) -> str:
    """Why the configuration of table row ``row`` cannot be a member of a soft vote fitted on
    rows ``X`` (N×D), labels ``y`` ('' when it can):

    - a member without probabilities must be calibrated (enough rows in every class for
      heads.ENSEMBLE_CALIBRATION_FOLDS folds);
    - knn is left out when some training rows are the same point under two classes (the same
      image in two class folders): its neighbours tie there, so the head would have no exact
      numpy-only or ONNX form (compact.duplicates_across_classes)."""
    from . import fewshot
    from .compact import duplicates_across_classes

    head, params = row["head"], row["params"]
    est = heads.build(head, params)
    if not heads.get(head).native_proba and fewshot.calibration_folds(
            est, y, heads.ENSEMBLE_CALIBRATION_FOLDS) < 2:
        cls, n = min_class(y)
        # a nearest-centroid head needs 2 rows of every class in each calibration fold's
        # training part, so 3 of every class in all; the others calibrate from 2 (2 folds)
        need = 3 if fewshot.needs_two_per_fold(est) else 2
        return (f"its calibration for the vote needs {need} training rows of every class, "
                f"and class {cls!r} has {n}")
    if head == "knn" and duplicates_across_classes(X, y, "euclidean"):
        return ("some training rows are the same image under two classes (its neighbours "
                "would tie there, so the head would have no exact numpy-only or ONNX form); "
                "`embedpipe audit` lists them")
    return ""


def _ensembles(singles: list[dict[str, Any]], X: np.ndarray, y: np.ndarray, y_idx: np.ndarray,
               classes: np.ndarray, splits: list[Any], metric: str,
               scores: Any) -> list[dict[str, Any]]:
    """Greedy forward selection over the best configuration of each head: a member joins only
    if the soft vote's out-of-fold metric strictly improves, and above LARGE_ROWS rows only by
    more than one standard error of the paired difference (``paired_se``): there a member's
    final fit costs its head's fit again plus 3 for its calibration, and on 60k Fashion-MNIST
    rows a vote that had joined on a tie (0.894 both) took 16 minutes against svm's 3.5 and
    scored 0.912 against its 0.919 (bench/results/accuracy-60k.md). Returns the ensembles
    found (one row per accepted step; empty when no member helps). Only configurations that
    can vote on these rows (``_cannot_vote``) are in the pool: a member the final fit cannot
    calibrate would fail it after the whole selection."""
    pool = [r for r in _best_of_each_head(singles) if not _cannot_vote(r, X, y)]
    if len(pool) < 2:
        return []
    _with_calibrated(pool, y_idx)
    chosen = [pool[0]]
    score, best_oof = pool[0]["mean"], pool[0]["oof"]
    out = []
    for cand in pool[1:]:
        if len(chosen) >= MAX_ENSEMBLE:
            break
        trial = chosen + [cand]
        row = _vote_row(trial, y, classes, splits, metric, scores)
        floor = (paired_se(best_oof, row["oof"], y, classes, metric) if len(y) > LARGE_ROWS
                 else 0.0)
        if row["mean"] > score + floor:
            chosen, score, best_oof = trial, row["mean"], row["oof"]
            out.append(row)
    return out


def paired_se(a: np.ndarray, b: np.ndarray, y: np.ndarray, classes: np.ndarray,
              metric: str) -> float:
    """One standard error of the difference in ``metric`` between two sets of class scores
    ``a`` and ``b`` (N×K, columns in ``classes`` order) on the same N rows ``y``: sqrt of the
    sum of w_i² d_i², d_i = (b right) − (a right) on row i and w_i the row's weight in the
    metric, 1/N for accuracy and 1/(K·N_class) for the class-balanced ones (balanced accuracy;
    f1_macro, not a sum over rows, takes the same weights as an approximation). The normal
    approximation of a paired (McNemar-style) comparison: rows that both get right, or both
    wrong, add nothing."""
    d = ((classes[np.argmax(b, axis=1)] == y).astype(float)
         - (classes[np.argmax(a, axis=1)] == y).astype(float))
    if metric == "accuracy":
        w = np.full(len(y), 1.0 / len(y))
    else:
        _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
        w = 1.0 / (len(counts) * counts[inverse])
    return float(np.sqrt(np.sum((w * d) ** 2)))


def build_choice(choice: dict[str, Any], seed: int = 0) -> Any:
    """An unfitted estimator for a row of the table: the head's pipeline, or for an ensemble a
    soft-voting ``VotingClassifier`` of the members' pipelines (members without native
    probabilities calibrated by temperature scaling on 3-fold CV, as registry ensembles),
    inside a Pipeline like a registry ensemble's."""
    if not choice.get("members"):
        return heads.build(choice["head"], choice["params"], seed=seed)
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import VotingClassifier
    from sklearn.pipeline import Pipeline

    members = []
    for m in choice["members"]:
        est: Any = heads.build(m["head"], m["params"], seed=seed)
        if not heads.get(m["head"]).native_proba:
            est = CalibratedClassifierCV(est, method="temperature", ensemble=False,
                                         cv=heads.ENSEMBLE_CALIBRATION_FOLDS)
        members.append((m["head"], est))
    return Pipeline([("pca", "passthrough"), ("clf", VotingClassifier(members, voting="soft"))])


def fit_auto(X: np.ndarray, y: np.ndarray, *, budget: float = DEFAULT_BUDGET, seed: int = 0,
             metric: str = "accuracy",
             say: Callable[[str], None] = lambda m: None) -> tuple[Any, dict[str, Any], Selection]:
    """Select (``select``) and refit the choice on all of (X, y): (fitted estimator, the
    parameters to record — ``budget`` and ``choice`` —, the selection)."""
    sel = select(X, y, budget=budget, seed=seed, metric=metric, say=say)
    est, _, _ = _refit(sel.choice, X, y, seed, say, calibrate_single=False,
                       decisions=sel.decisions, folds=sel.folds)
    return est, {"budget": budget, "choice": sel.choice["name"]}, sel


def _calibrated_specs(est: Any, choice: dict[str, Any]) -> list[tuple[Any, str]]:
    """The unfitted ``CalibratedClassifierCV`` objects of ``est`` (build_choice's estimator,
    or a single head wrapped for calibration) with the ``describe`` name of the configuration
    each calibrates: the estimator itself, or a vote's members."""
    if type(est).__name__ == "CalibratedClassifierCV":
        return [(est, choice["name"])]
    if not choice.get("members"):
        return []
    vote = est.steps[-1][1]
    return [(sub, describe(m["head"], m["params"]))
            for (_, sub), m in zip(vote.estimators, choice["members"])
            if type(sub).__name__ == "CalibratedClassifierCV"]


def _reused(est: Any, choice: dict[str, Any], decisions: dict[str, np.ndarray],
            folds: int) -> dict[int, np.ndarray]:
    """Before fewshot.adapt: each calibration of ``est`` whose configuration's out-of-fold
    decision values are in ``decisions`` set to auto's ``folds`` (the manifest's words and
    the adapt notes then name the folds that gave them). Returns them by id()."""
    out = {}
    for spec, name in _calibrated_specs(est, choice):
        if name in decisions and isinstance(spec.cv, int):
            spec.set_params(cv=folds)
            out[id(spec)] = decisions[name]
    return out


def _given(reused: dict[int, np.ndarray], folds: int) -> Any:
    """calibration.fit's ``given``: a calibration marked by ``_reused`` gets its out-of-fold
    decision values unless fewshot.adapt lowered its folds (then they are not the pipeline's),
    before any other way of fitting it (a held-out fifth on many rows: one fit, not two)."""

    def given(spec: Any) -> np.ndarray | None:
        d = reused.get(id(spec))
        return d if d is not None and spec.cv == folds else None

    return given


def _refit(choice: dict[str, Any], X: np.ndarray, y: np.ndarray, seed: int,
           say: Callable[[str], None], *, calibrate_single: bool,
           decisions: dict[str, np.ndarray] | None = None, folds: int = 0
           ) -> tuple[Any, str, str]:
    """Fit ``choice`` (a row of the table) on all of (X, y), its settings lowered to what the
    rows support first (fewshot.adapt, a note for each). With ``calibrate_single``, a single
    head without native probabilities is temperature-scaled on k-fold decision scores, as
    `fit` does. A head (or vote member) whose out-of-fold decision values are in
    ``decisions`` (``Selection.decisions``, from ``folds``-fold CV on these rows) is
    temperature-scaled on those instead of on a cross-validation of its own
    (calibration.calibrated_from_oof). Returns (fitted estimator, calibration, probabilities): the
    manifest's words."""
    from . import fewshot
    from .fit import _Quiet, blas_threads
    from .train import CALIBRATION_FOLDS

    members = bool(choice.get("members"))
    # built and fitted inside lda_cache: a vote's members with the same lda step (knn and
    # centroid) fit it once per calibration fold and once on all rows, not once each
    with heads.lda_cache(len(y)):
        est = build_choice(choice, seed)
        calibration, probabilities = "native", "native"
        if not members and calibrate_single and not heads.get(choice["head"]).native_proba:
            from sklearn.calibration import CalibratedClassifierCV

            k = fewshot.calibration_folds(est, y, CALIBRATION_FOLDS)
            if k >= 2:
                est = CalibratedClassifierCV(est, method="temperature", ensemble=False, cv=k)
                calibration, probabilities = "", "calibrated"  # its words once fitted
            else:
                calibration, probabilities = ("none (too few images of a class to "
                                              "calibrate)", "scores")
        reused = _reused(est, choice, decisions or {}, folds)
        with _Quiet(count=False), blas_threads(len(y)):
            for note in fewshot.adapt(est, y, "the vote" if members else choice["head"]):
                say(f"note: {note}")
            est = calibrations.fit(est, X, y, _given(reused, folds))
    if members:  # the folds of its members' calibration as fitted (fewshot.adapt may lower them)
        calibration, probabilities = heads.vote_calibration(est), "vote"
    elif probabilities == "calibrated":  # k folds, or a held-out sample on many rows
        calibration = fewshot.calibration_text(est)
    return heads.uncached(est), calibration, probabilities


def fit(store_path: str | Path | Sequence[str | Path], out: str | Path, *,
        params: dict[str, Any] | None = None, class_weight: str | None = None, seed: int = 0,
        metric: str = "accuracy", say: Callable[[str], None] = lambda m: None) -> Any:
    """``embedpipe fit --head auto``: select on the store's training rows, refit the choice on
    all of them (a single head without native probabilities is calibrated like ``fit`` does),
    and save it with the candidate table in the manifest's ``auto``. Returns a FitResult whose
    ``head`` reads 'auto → HEAD' (the chosen head, a+b+... for a vote)."""
    from ..store.read import finetuned_note, open_stores, refuse_duplicates
    from . import artifacts
    from .compact import predict_scored
    from .rows import select_rows, targets
    from .. import checks
    from . import fewshot
    from .train import FitResult, _check_sample, _paths, _training, accuracy_rows

    t0 = time.perf_counter()
    unknown = sorted(set(params or {}) - {"budget"})
    if unknown:
        raise heads.HeadError(f"--param {unknown[0]}: --head auto chooses the parameters "
                              "itself; pass a named head to set them (or --budget SECONDS)")
    if class_weight is not None:
        raise heads.HeadError(f"--class-weight {class_weight}: --head auto does not take class "
                              "weights; pass a named head that does (see `embedpipe heads`)")
    budget = check_budget((params or {}).get("budget", DEFAULT_BUDGET))
    store = open_stores(store_path)
    refuse_duplicates(store)
    for note in store.notes:
        say(note)
    rows = select_rows(store)
    X, y = store.features[rows.train], targets(store, rows.train)
    classes, counts = np.unique(y, return_counts=True)
    fewshot.check_classes(y, str(store.path))  # the same refusals as any other head's fit
    checks.refuse_unusable(X, [store.paths[i] for i in rows.train], str(store.path), store)
    say(f"auto: choosing a head for {len(y)} rows ({rows.describe()}), {len(classes)} classes, "
        f"{X.shape[1]}-d, budget {budget:g} s")
    with naming(str(store.path)):
        sel = select(X, y, budget=budget, seed=seed, metric=metric, say=say)
        for line in sel.lines():
            say(line)
        seen = finetuned_note(store, rows.train, "rows of this cross-validation table (and "
                              "of the training accuracy)")[1]
        choice = sel.choice
        est, calibration, probabilities = _refit(choice, X, y, seed, say,
                                                 calibrate_single=True,
                                                 decisions=sel.decisions, folds=sel.folds)
    sub = accuracy_rows(len(y))  # predicting every row can cost more than the fit
    pick = slice(None) if sub is None else sub
    pred = predict_scored(est, X[pick])[0]  # an SVC through its compact form (fast_form)
    train_acc = float((pred == np.asarray(y[pick]).astype(str)).mean())
    effective = heads.effective_params(choice["head"], est)
    manifest = artifacts.new_manifest(
        head=choice["head"], params=choice["params"], effective_params=effective,
        class_weight=None, search=False,
        seed=seed, calibration=calibration, probabilities=probabilities,
        classes=[str(c) for c in est.classes_], store_identity=store.identity,
        training=_training(store, rows, classes, counts, train_acc, sub),
        auto=sel.record())
    path = artifacts.save(out, est, manifest, check_rows=X[_check_sample(len(y))],
                          inputs=_paths(store_path),
                          fitted_rows=[store.hashes[i] for i in rows.train])
    return FitResult(path, f"auto → {choice['head']}", dict(choice["params"]), len(y),
                     [str(c) for c in classes], calibration, time.perf_counter() - t0,
                     train_acc, effective, 0 if sub is None else len(sub),
                     f"note: {seen}" if seen else None)
