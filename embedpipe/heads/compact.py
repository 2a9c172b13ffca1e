"""A fitted head's inference as a few numpy operations, so that `predict --store` can classify
without importing scikit-learn.

Importing scikit-learn (it imports scipy.stats, and pandas when installed) and skops (which
walks every scikit-learn module to list its trusted types) is most of what `predict --store`
spends starting (bench/predict.py measures it: bench/results/predict.md).
Most heads are a short chain of array operations at prediction time, so `fit` also writes that
chain into the head file (`artifacts.save`): JSON naming the operations and plain ``.npy``
arrays, read back with ``allow_pickle=False``. Nothing in it can run code.

Covered (``export`` returns None for anything else, which then goes through scikit-learn):
  * steps: ``SignedSqrt`` (sqrt), ``Normalizer`` (l2), ``StandardScaler``, ``PCA``, ``LinearDiscriminantAnalysis``
    (eigen or svd solver: its transform, in float64 as scikit-learn computes it),
    ``"passthrough"``;
  * final estimators: ``LogisticRegression``, ``SGDClassifier``, ``RidgeClassifier``,
    ``LinearSVC`` (linear decision functions), ``MLPClassifier``; ``SVC`` (any of libsvm's
    kernels: its support vectors, dual coefficients and intercepts, one-vs-one decision values
    turned one-vs-rest as scikit-learn does; its kernel rows come from one matrix product per
    block of rows, where libsvm takes one dot product per pair: 6-9x less CPU time for the
    same values, bench/results/svm_predict.md); ``NearestCentroid`` (euclidean: its
    discriminant scores); ``KNeighborsClassifier`` (brute force, euclidean or cosine distance,
    uniform or distance weights, on float64 rows such as its default discriminant space: its
    predict_proba; the training rows it keeps are in the file anyway);
  * probabilities: native (softmax, logistic, one-vs-rest logistic, kNN's neighbour shares)
    or temperature scaling (``CalibratedClassifierCV(method="temperature")`` with one
    calibrated copy: ``ensemble=False`` on k folds, or one held-out split on many rows, how
    `fit` calibrates heads without native probabilities);
  * soft-voting ensembles (``VotingClassifier(voting="soft")``, weighted or not) whose members
    are all covered: what `fit --head auto` and `--head a+b` write.
Arrays the skops pipeline already holds byte for byte (an SVC's support vectors, a kNN's
training rows) are referenced, not written twice (``spec["members"]``, see array_member).

``artifacts.save`` writes the compact form only after checking it against the estimator on
the training rows it was given (same classes, probabilities within 1e-5), so a change in how
scikit-learn computes any of these shows up as a head without a compact form, not as wrong
predictions. Needs numpy only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

VERSION = 1
# Members of the head file (a zip) beside skops's own files.
MEMBER_DIR = "embedpipe/"
HEAD_MEMBER = "embedpipe/head.json"  # format, format_version and manifest
SPEC_MEMBER = "embedpipe/compact.json"
ARRAY_PREFIX = "embedpipe/compact/"


def class_scores(estimator: Any, X: np.ndarray, *,
                 use_proba: bool = True) -> tuple[np.ndarray, bool]:
    """Per-class scores aligned with ``estimator.classes_``: probabilities where the estimator
    has them and ``use_proba`` (True), else a softmax of its decision function (False: a
    ranking, not calibrated). Pass ``use_proba=Head.native_proba`` for a bare head.

    The decision values are divided by their standard deviation over ``X`` before the softmax:
    their scale is arbitrary (NearestCentroid's would saturate every row at 1.0), and one
    shared temperature keeps the order of rows by margin.

    A head holding an SVC scores ``X`` through its compact form when that saves time (see
    fast_form): the same scores within 1e-5, 6-9x less CPU."""
    return _class_scores(fast_form(estimator, X), X, use_proba)


def _class_scores(estimator: Any, X: np.ndarray, use_proba: bool) -> tuple[np.ndarray, bool]:
    """class_scores of ``estimator`` as it is (fast_form already chosen)."""
    if use_proba and hasattr(estimator, "predict_proba"):
        try:
            p = estimator.predict_proba(X)
        except AttributeError:  # e.g. a pipeline whose final step has no predict_proba
            pass
        else:
            return normalised(p), True
    return softmax_of_decision(estimator.decision_function(X)), False


def normalised(proba: Any) -> np.ndarray:
    """Probabilities (N×K) as float64 rows that sum to 1 within float64 rounding. A head fitted
    on float32 features computes them in float32 (logreg, logreg-sgd; ridge's temperature
    scaling of float32 decision values): its rows summed to 1 only within 2.4e-7, which
    scikit-learn's log_loss warns about (it checks 1.5e-8 for float64). A row of zeros stays
    zeros."""
    p = np.asarray(proba, dtype=np.float64)
    total = p.sum(axis=1, keepdims=True)
    return np.divide(p, total, out=p.copy(), where=total > 0)


def decision_values(estimator: Any, X: np.ndarray) -> np.ndarray:
    """``estimator.decision_function(X)`` as float64 (N, or N×K columns in ``classes_``
    order), a head holding an SVC scored through its compact form when that saves time
    (fast_form; within 1e-5 of the SVC's own)."""
    return np.asarray(fast_form(estimator, X).decision_function(X), dtype=np.float64)


def softmax_of_decision(decision: Any) -> np.ndarray:
    """The per-class scores class_scores gives a head without probabilities (N×K, rows sum to
    1) from its decision values (N for two classes: the score of classes_[1]; or N×K)."""
    d = np.asarray(decision, dtype=np.float64)
    if d.ndim == 1:  # binary: one score for classes_[1]
        d = np.stack([-d, d], axis=1)
    d = d - d.max(axis=1, keepdims=True)
    d = d / max(float(d.std()), 1e-12)
    e = np.exp(d)
    return e / e.sum(axis=1, keepdims=True)


def predict_scored(estimator: Any, X: np.ndarray, *, use_proba: bool = True
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Predicted class (str) of each row of ``X``, its per-class scores and the score of the
    predicted class (see class_scores), and whether the scores are probabilities.

    The predict of a CalibratedClassifierCV and of a soft vote is the argmax of their
    probabilities, so it is taken from the scores instead of scoring ``X`` twice (an RBF SVM's
    kernel rows are most of its prediction time); any other estimator predicts itself. A head
    holding an SVC predicts many rows through its compact form (fast_form)."""
    fast = fast_form(estimator, X)
    scores, calibrated = _class_scores(fast, X, use_proba)
    classes = np.asarray(estimator.classes_).astype(str)
    if calibrated and _argmax_of_proba(estimator):
        best = np.argmax(scores, axis=1)
    else:
        col = {c: i for i, c in enumerate(classes)}
        best = np.array([col[p] for p in np.asarray(fast.predict(X)).astype(str)],
                        dtype=np.int64)
    return classes[best], scores, scores[np.arange(len(best)), best], calibrated


def _argmax_of_proba(estimator: Any) -> bool:
    """Whether ``estimator.predict`` is the argmax of its ``predict_proba`` (ties to the first
    class, as np.argmax): a CalibratedClassifierCV, or a soft VotingClassifier at the end of
    a pipeline (scikit-learn's own predict for both)."""
    if _type(estimator) == "Pipeline":
        estimator = estimator.steps[-1][1]
    return _type(estimator) == "CalibratedClassifierCV" or (
        _type(estimator) == "VotingClassifier" and estimator.voting == "soft")


#: From this many kernel values (rows scored x support vectors), class_scores and
#: predict_scored score a head holding an SVC through its compact form: libsvm computes each
#: kernel value as its own sum, the compact form one matrix product per block of rows, 6.2x
#: (10k training rows) to 9.1x (60k) less CPU for the same probabilities within 5e-14
#: (bench/results/svm_predict.md). Making and checking the form costs about 0.08 CPU-s (a
#: 200-row svm head, measured), what libsvm spends on about 150,000 kernel values; below
#: this threshold (about a second of libsvm's time) the head scores as it is.
FAST_ENTRIES = 2_000_000
FAST_CHECK_ROWS = 16  # rows of X, spread evenly, on which the compact form must agree first


def fast_form(estimator: Any, X: Any) -> Any:
    """``estimator``'s compact form (``load(*export(estimator))``) when it holds an SVC whose
    kernel values for ``X`` number at least FAST_ENTRIES and the form agrees with the
    estimator on FAST_CHECK_ROWS rows of ``X`` (same classes, scores within 1e-5:
    ``agrees``); else ``estimator`` itself. The form is made afresh on every call from the
    estimator's arrays (an SVC's support vectors are not copied), so a head refitted since
    is never scored by an older form."""
    if not isinstance(X, np.ndarray):  # lists and the like: scikit-learn converts them
        return estimator
    n = len(X)
    if n * _support_vectors(estimator) < FAST_ENTRIES:
        return estimator
    exported = export(estimator)
    if exported is None:
        return estimator
    form = load(*exported)
    check = X[np.unique(np.linspace(0, n - 1, FAST_CHECK_ROWS).astype(int))]
    return form if agrees(estimator, form, check) else estimator


def _support_vectors(estimator: Any) -> int:
    """The support vectors of every fitted SVC inside ``estimator`` (see walk)."""
    total = [0]

    def count(obj: Any) -> None:
        if _type(obj) == "SVC":
            total[0] += len(getattr(obj, "support_vectors_", ()))

    walk(estimator, count)
    return total[0]


def holds(estimator: Any, kind: str) -> bool:
    """Whether a scikit-learn object of type name ``kind`` is inside ``estimator`` (a pipeline
    step, an ensemble member, a calibrated copy; see walk)."""
    found: list[bool] = []
    walk(estimator, lambda obj: found.append(True) if type(obj).__name__ == kind else None)
    return bool(found)


def walk(estimator: Any, visit: Any) -> Any:
    """Call ``visit`` on ``estimator`` and on every object inside it, once each: scikit-learn
    objects' attributes, lists, tuples and dicts (pipeline steps, ensemble members,
    calibrated copies), found by module name: no scikit-learn import. Returns ``estimator``."""
    seen: set[int] = set()
    todo = [estimator]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        visit(obj)
        if isinstance(obj, (list, tuple)):
            todo.extend(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif type(obj).__module__.startswith("sklearn"):
            todo.extend(getattr(obj, "__dict__", {}).values())  # some have __slots__ only
    return estimator


# -- from a fitted scikit-learn estimator ------------------------------------------------------

def _type(obj: Any) -> str:
    return type(obj).__name__


class _Builder:
    def __init__(self) -> None:
        self.ops: list[dict[str, Any]] = []
        self.arrays: dict[str, np.ndarray] = {}

    def array(self, a: Any) -> str:
        name = str(len(self.arrays))
        arr = np.asarray(a)
        if arr.dtype.kind not in "fiub":
            raise _Unsupported(f"array of dtype {arr.dtype}")
        self.arrays[name] = np.ascontiguousarray(arr)
        return name

    def op(self, kind: str, **args: Any) -> None:
        self.ops.append({"op": kind, **args})


class _Unsupported(Exception):
    pass


def _step(b: _Builder, step: Any) -> None:
    kind = _type(step)
    if step is None or step == "passthrough":
        return
    if kind == "SignedSqrt":
        b.op("sqrt")
    elif kind == "Normalizer":
        if step.norm != "l2":
            raise _Unsupported(f"Normalizer(norm={step.norm})")
        b.op("l2")
    elif kind == "StandardScaler":
        if getattr(step, "mean_", None) is not None and step.with_mean:
            b.op("sub", a=b.array(step.mean_))
        if getattr(step, "scale_", None) is not None and step.with_std:
            b.op("div", a=b.array(step.scale_))
    elif kind == "PCA":
        b.op("matmul", w=b.array(step.components_.T))  # centred after the projection, as
        b.op("sub", a=b.array(np.reshape(step.mean_, (1, -1)) @ step.components_.T))  # sklearn
        if step.whiten:
            b.op("div", a=b.array(np.sqrt(step.explained_variance_)))
    elif kind == "LinearDiscriminantAnalysis":  # its transform, as scikit-learn computes it
        w = np.asarray(step.scalings_, np.float64)[:, :step._max_components]
        if step.solver == "svd":
            b.op("project", w=b.array(w), c=b.array(np.asarray(step.xbar_, np.float64)))
        elif step.solver == "eigen":
            b.op("project", w=b.array(w))
        else:
            raise _Unsupported(f"LinearDiscriminantAnalysis(solver={step.solver!r})")
    else:
        raise _Unsupported(kind)


def _decision(b: _Builder, est: Any) -> None:
    """Ops for the final estimator's raw output: its decision function (one column for two
    classes), or the MLP's output before its softmax or logistic."""
    kind = _type(est)
    if kind in ("LogisticRegression", "SGDClassifier", "RidgeClassifier", "LinearSVC"):
        b.op("matmul", w=b.array(np.atleast_2d(est.coef_).T))  # binary ridge: 1-D
        b.op("add", a=b.array(np.atleast_1d(est.intercept_)))
        return
    if kind == "MLPClassifier":
        if est.out_activation_ not in ("softmax", "logistic"):
            raise _Unsupported(f"MLP output {est.out_activation_}")
        last = len(est.coefs_) - 1
        for i, (w, c) in enumerate(zip(est.coefs_, est.intercepts_)):
            b.op("matmul", w=b.array(w))
            b.op("add", a=b.array(c))
            if i < last:
                if est.activation not in _ACTIVATIONS:
                    raise _Unsupported(f"MLP activation {est.activation}")
                b.op("act", f=est.activation)
        return
    if kind == "SVC":
        _svc(b, est)
        return
    if kind == "KNeighborsClassifier":
        metric = "euclidean" if (est.effective_metric_ == "euclidean" or (
            est.effective_metric_ == "minkowski" and est.effective_metric_params_.get("p") == 2)) \
            else est.effective_metric_
        # float64 rows only (the default knn's discriminant space): on float32 rows
        # scikit-learn's distances carry float32 rounding that float64 would not reproduce
        # (cosine to a query of norm 1e-6: every distance 1 +- 6e-7, probabilities 0.5 apart)
        if metric not in ("euclidean", "cosine") or est.weights not in ("uniform", "distance") \
                or est.outputs_2d_ or np.asarray(est._fit_X).dtype != np.float64:
            raise _Unsupported(f"KNeighborsClassifier(metric={metric!r}, "
                               f"weights={est.weights!r})")
        if duplicates_across_classes(np.asarray(est._fit_X), np.asarray(est._y), metric):
            raise _Unsupported("identical training rows under different classes")
        b.op("knn", x=b.array(est._fit_X), y=b.array(np.asarray(est._y, np.int64)),
             k=int(est.n_neighbors), weights=est.weights, metric=metric)
        return
    if kind == "NearestCentroid":  # its discriminant scores (ESL eq. 18.2, as scikit-learn)
        if est.metric != "euclidean":
            raise _Unsupported(f"NearestCentroid(metric={est.metric!r})")
        std = np.asarray(est.within_class_std_dev_, np.float64)
        scale = np.where(std != 0, std, 1.0)
        b.op("centroid", c=b.array(np.asarray(est.centroids_, np.float64) / scale),
             w=b.array(scale), a=b.array(2.0 * np.log(np.asarray(est.class_prior_, np.float64))))
        return
    raise _Unsupported(kind)


def duplicates_across_classes(rows: np.ndarray, y: np.ndarray, metric: str) -> bool:
    """Whether some training rows of a kNN are the same point (for cosine: the same direction)
    under different classes. A query then finds them all at one distance, and which of them
    fill its last neighbour places is up to scikit-learn's partial sort, which the compact
    form cannot reproduce (e.g. blank images in several class folders: their probabilities
    were 0.1 apart, found by helper-30's attack)."""
    if metric == "cosine":
        rows = _unit(rows)
    _, point = np.unique(rows, axis=0, return_inverse=True)
    pairs = np.unique(np.stack([point.ravel(), y.ravel()], axis=1), axis=0)
    return len(pairs) > len(np.unique(pairs[:, 0]))


_KERNELS = ("linear", "poly", "rbf", "sigmoid")
_OUTPUTS = {"MLPClassifier": "mlp", "SVC": "svc", "NearestCentroid": "centroid",
            "KNeighborsClassifier": "knn"}
_OUTPUT_KINDS = ("linear", "mlp", "svc", "centroid", "knn", "vote")


def _svc(b: _Builder, est: Any) -> None:
    """The "svc" operation: scikit-learn's ``SVC.decision_function`` from the fitted support
    vectors (libsvm's model, as scikit-learn exposes it)."""
    if est.kernel not in _KERNELS or (len(est.classes_) > 2
                                      and est.decision_function_shape != "ovr"):
        raise _Unsupported(f"SVC(kernel={est.kernel!r}, "
                           f"decision_function_shape={est.decision_function_shape!r})")
    b.op("svc", kernel=est.kernel, gamma=float(est._gamma), coef0=float(est.coef0),
         degree=int(est.degree), break_ties=bool(est.break_ties),
         sv=b.array(np.asarray(est.support_vectors_, np.float64)),
         coef=b.array(np.asarray(est.dual_coef_, np.float64)),
         b=b.array(np.asarray(est.intercept_, np.float64)),
         nsv=b.array(np.asarray(est.n_support_, np.int64)))


def _pipeline(b: _Builder, est: Any) -> Any:
    """Ops of a Pipeline's steps before the final one (or of nothing); the final estimator."""
    if _type(est) == "FrozenEstimator":
        est = est.estimator
    if _type(est) == "Pipeline":
        for _, step in est.steps[:-1]:
            _step(b, step)
        est = est.steps[-1][1]
    return est


def export(estimator: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """(spec, arrays) of a fitted head, or None when it has no compact form."""
    b = _Builder()
    try:
        out: dict[str, Any] = {"version": VERSION,
                               "classes": [_plain(c) for c in estimator.classes_]}
        final = _pipeline(b, estimator) if _type(estimator) == "Pipeline" else None
        if _type(final) == "VotingClassifier":
            out.update(_vote(b, final))
        else:
            b = _Builder()  # not a vote: the head's own steps, from the start
            out.update(_single(b, estimator))
    except (_Unsupported, AttributeError, IndexError, TypeError):
        return None
    return out, b.arrays


def _single(b: _Builder, estimator: Any) -> dict[str, Any]:
    """The spec (ops, output, proba, beta) of one head: a pipeline or a temperature-scaled
    one (CalibratedClassifierCV with one calibrated copy)."""
    out: dict[str, Any] = {}
    if _type(estimator) == "CalibratedClassifierCV":
        cals = estimator.calibrated_classifiers_
        if estimator.method != "temperature" or len(cals) != 1:
            raise _Unsupported(f"calibration {estimator.method} x{len(cals)}")
        final = _pipeline(b, cals[0].estimator)
        if _type(final) == "MLPClassifier":  # scikit-learn calibrates predict_proba's output
            raise _Unsupported("calibrated MLP")
        _decision(b, final)
        out["proba"] = "temperature"
        out["beta"] = float(np.asarray(cals[0].calibrators[0].beta_))
    else:
        final = _pipeline(b, estimator)
        _decision(b, final)
        out["proba"] = _native_proba(final)
    out["output"] = _OUTPUTS.get(_type(final), "linear")
    out["ops"] = b.ops
    return out


def _vote(b: _Builder, vote: Any) -> dict[str, Any]:
    """The spec of a soft-voting ensemble (the steps before it are in ``b.ops``): each
    member's spec, and the weighted mean of their probabilities (VotingClassifier's
    predict_proba); every member must have probabilities."""
    if vote.voting != "soft":
        raise _Unsupported(f"voting={vote.voting!r}")
    outer, members = b.ops, []
    for est in vote.estimators_:
        b.ops = []
        members.append(_single(b, est))
        if members[-1]["proba"] is None:
            raise _Unsupported("a member without probabilities")
    weights = None if vote.weights is None else [float(w) for w in vote.weights]
    return {"ops": outer, "proba": "vote", "output": "vote",
            "vote": {"weights": weights, "members": members}}


def _native_proba(final: Any) -> str | None:
    """How the estimator turns its raw output into probabilities: "softmax" (the logistic of
    the one column for two classes), "ovr-logistic" (one-vs-rest logistics, normalised), or
    None (ridge, linear svm, SGD without log loss: a decision function only)."""
    kind = _type(final)
    if kind in ("LogisticRegression", "MLPClassifier"):
        return "softmax"
    if kind == "NearestCentroid":
        raise _Unsupported("NearestCentroid's own probabilities")  # fit calibrates it
    if kind == "KNeighborsClassifier":
        return "given"  # the raw output is its predict_proba
    if kind == "SGDClassifier" and final.loss == "log_loss":
        return "ovr-logistic"
    return None


def _plain(c: Any) -> Any:
    return c.item() if hasattr(c, "item") else c


# -- the compact head ---------------------------------------------------------------------------

def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0, out=x)


def _logistic(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp overflows to inf: 0, as scipy's expit
        return 1 / (1 + np.exp(-x))


_ACTIVATIONS = {"relu": _relu, "tanh": np.tanh, "logistic": _logistic, "identity": lambda x: x}

# The most kernel or distance entries (rows x support vectors or kept rows, float64)
# computed at once: 64 MB.
BLOCK_ENTRIES = 8_000_000


def _kernel(x: np.ndarray, sv: np.ndarray, sv_sq: np.ndarray, op: dict[str, Any]) -> np.ndarray:
    """libsvm's kernel between the rows ``x`` and the support vectors ``sv`` (float64)."""
    dot = x @ sv.T
    kind, gamma = op["kernel"], op["gamma"]
    if kind == "linear":
        return dot
    if kind == "rbf":  # ||x - sv||^2 from the product: within 1e-12 of libsvm's own sums
        d2 = np.einsum("ij,ij->i", x, x)[:, None] + sv_sq[None, :] - 2.0 * dot
        return np.exp(-gamma * np.maximum(d2, 0.0, out=d2), out=d2)
    z = gamma * dot + op["coef0"]
    return z ** op["degree"] if kind == "poly" else np.tanh(z)


def _ovo(x: np.ndarray, op: dict[str, Any], arrays: dict[str, np.ndarray]) -> np.ndarray:
    """libsvm's one-vs-one decision values, shape (rows, k(k-1)/2), float64: column p is the
    pair (i, j), i < j, in scikit-learn's order, positive when class i wins; for two classes
    scikit-learn's one column (positive when ``classes_[1]`` wins)."""
    sv, coef, b = arrays[op["sv"]], arrays[op["coef"]], arrays[op["b"]]
    start = np.concatenate([[0], np.cumsum(arrays[op["nsv"]])])
    k = len(start) - 1
    sv_sq = np.einsum("ij,ij->i", sv, sv)
    x = np.asarray(x, dtype=np.float64)  # as scikit-learn's SVC: float64 whatever came in
    out = np.empty((len(x), len(b)))
    step = max(1, BLOCK_ENTRIES // max(len(sv), 1))
    for lo in range(0, len(x), step):
        kern = _kernel(x[lo:lo + step], sv, sv_sq, op)
        if k == 2:  # scikit-learn's binary sign: positive for classes_[1]
            out[lo:lo + step, 0] = kern @ coef[0] + b[0]
            continue
        p = 0
        for i in range(k):
            for j in range(i + 1, k):
                si, sj = slice(start[i], start[i + 1]), slice(start[j], start[j + 1])
                out[lo:lo + step, p] = kern[:, si] @ coef[j - 1, si] + \
                    kern[:, sj] @ coef[i, sj] + b[p]
                p += 1
    return out


def _centroid_scores(x: np.ndarray, centroids: np.ndarray, scale: np.ndarray,
                     bias: np.ndarray) -> np.ndarray:
    """NearestCentroid's discriminant scores, float64: minus the squared euclidean distance
    to each class mean, both divided by the within-class standard deviation, plus twice the
    log prior; for two classes scikit-learn's one column (class 1 minus class 0)."""
    x = np.asarray(x, np.float64) / scale
    d2 = np.einsum("ij,ij->i", x, x)[:, None] + np.einsum("ij,ij->i", centroids, centroids)[
        None, :] - 2.0 * (x @ centroids.T)
    scores = bias[None, :] - np.maximum(d2, 0.0)
    return scores[:, 1:] - scores[:, :1] if scores.shape[1] == 2 else scores


def _unit(a: np.ndarray) -> np.ndarray:
    """The rows of ``a`` divided by their euclidean norms (rows of norm 0 as they are)."""
    n = np.sqrt(np.einsum("ij,ij->i", a, a))
    # as scikit-learn's normalize (_handle_zeros_in_scale): a row whose norm is under 10 eps
    # of its dtype (1.2e-6 in float32) stays as it is
    return a / np.where(n < 10 * np.finfo(n.dtype).eps, 1.0, n)[:, None]


def signed_sqrt(x: np.ndarray) -> np.ndarray:
    """``sign(x) * sqrt(|x|)`` of a float array (any shape), in its dtype: a new array (the
    ``sqrt`` step, heads/transforms.py's SignedSqrt, and its compact op)."""
    return np.copysign(np.sqrt(np.abs(x)), x)


def _knn_proba(x: np.ndarray, op: dict[str, Any], arrays: dict[str, np.ndarray],
               n_classes: int) -> np.ndarray:
    """KNeighborsClassifier.predict_proba by brute force, float64: the ``k`` nearest training
    rows (euclidean or cosine distance; ties in distance to the lower row index), each voting
    for its class with weight 1 (uniform) or 1/distance (a row at distance 0 takes all the
    weight, with any others at 0), normalised per row."""
    fit_x, fit_y, k = arrays[op["x"]].astype(np.float64), arrays[op["y"]], int(op["k"])
    x = np.asarray(x, np.float64)
    if op["metric"] == "cosine":
        x, fit_x = _unit(x), _unit(fit_x)
    else:
        fit_sq = np.einsum("ij,ij->i", fit_x, fit_x)
    out = np.zeros((len(x), n_classes))
    step = max(1, BLOCK_ENTRIES // max(len(fit_x), fit_x.shape[1], 1))
    for lo in range(0, len(x), step):
        q = x[lo:lo + step]
        if op["metric"] == "cosine":
            d = np.clip(1.0 - q @ fit_x.T, 0.0, 2.0)
        else:
            d = np.einsum("ij,ij->i", q, q)[:, None] + fit_sq[None, :] - 2.0 * (q @ fit_x.T)
            d = np.sqrt(np.maximum(d, 0.0, out=d), out=d)
        near = np.argpartition(d, min(k, d.shape[1]) - 1, axis=1)[:, :k]
        rows = np.arange(len(q))[:, None]
        if op["metric"] == "euclidean":  # the chosen neighbours' distances from differences,
            # and 0 below the product form's resolution (1e-8 of the rows' norms), where
            # scikit-learn's squared distances round to 0: a query equal to a training row up
            # to rounding then gets all the weight, the other classes exactly 0 (the product
            # form left ~1e-8, and the classes' order in top-k differed)
            qq = np.einsum("ij,ij->i", q, q)
            for i in range(near.shape[1]):
                diff = q - fit_x[near[:, i]]
                exact = np.sqrt(np.einsum("ij,ij->i", diff, diff))
                exact[exact <= 1e-8 * np.sqrt(qq + fit_sq[near[:, i]])] = 0.0
                d[rows[:, 0], near[:, i]] = exact
        order = np.lexsort((near, d[rows, near]), axis=1)
        near = near[rows, order]
        dist = d[rows, near]
        if op["weights"] == "distance":
            with np.errstate(divide="ignore"):
                w = 1.0 / dist
            inf = np.isinf(w)
            hit = inf.any(axis=1)
            w[hit] = inf[hit]
        else:
            w = np.ones_like(dist)
        proba = out[lo:lo + step]
        for i in range(near.shape[1]):  # one neighbour per row at a time: no repeated index
            proba[rows[:, 0], fit_y[near[:, i]]] += w[:, i]
        proba /= proba.sum(axis=1, keepdims=True)
    return out


def _votes(ovo: np.ndarray, k: int, *, libsvm: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(votes, summed confidences) per class from one-vs-one decision values, as
    scikit-learn's ``_ovr_decision_function`` counts them: a pair whose value is exactly 0
    votes for its first class; with ``libsvm``, as libsvm's predict counts them: for its
    second."""
    votes = np.zeros((len(ovo), k))
    conf = np.zeros((len(ovo), k))
    p = 0
    for i in range(k):
        for j in range(i + 1, k):
            conf[:, i] += ovo[:, p]
            conf[:, j] -= ovo[:, p]
            second = ovo[:, p] <= 0 if libsvm else ovo[:, p] < 0
            votes[~second, i] += 1
            votes[second, j] += 1
            p += 1
    return votes, conf


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class CompactHead:
    """Classifies like the estimator it was exported from: ``classes_``, ``predict`` and
    ``decision_function`` (see ``load`` for ``predict_proba``)."""

    def __init__(self, spec: dict[str, Any], arrays: dict[str, np.ndarray]):
        if spec.get("version") != VERSION:
            raise ValueError(f"compact version {spec.get('version')} (this reads {VERSION})")
        _check(spec, arrays)  # fail at load, not at the first chunk
        self.spec, self.arrays = spec, arrays
        self.classes_ = np.asarray(spec["classes"])
        # a soft vote's members (VotingClassifier fits them on the classes' indices)
        self._members = [_CompactProba({**m, "version": VERSION,
                                        "classes": list(range(len(self.classes_)))}, arrays)
                         for m in spec.get("vote", {}).get("members", [])]

    def _raw(self, X: np.ndarray, ovo: bool = False) -> np.ndarray:
        """The final estimator's raw output; for an SVC its one-vs-rest decision function, or
        with ``ovo`` its one-vs-one decision values."""
        x = np.array(X, dtype=X.dtype if X.dtype in (np.float32, np.float64) else np.float64)
        for op in self.spec["ops"]:
            kind = op["op"]
            if kind == "svc":
                x = _ovo(x, op, self.arrays)
                if not ovo and x.shape[1] > 1:
                    votes, conf = _votes(x, len(self.classes_))
                    x = votes + conf / (3 * (np.abs(conf) + 1))  # scikit-learn's transform
            elif kind == "project":  # float64 as scikit-learn's LDA transform (float64 arrays)
                x = np.asarray(x, np.float64)
                if "c" in op:
                    x = x - self.arrays[op["c"]]
                x = x @ self.arrays[op["w"]]
            elif kind == "knn":
                x = _knn_proba(x, op, self.arrays, len(self.classes_))
            elif kind == "centroid":
                x = _centroid_scores(x, self.arrays[op["c"]], self.arrays[op["w"]],
                                     self.arrays[op["a"]])
            elif kind == "sqrt":
                x = signed_sqrt(x)
            elif kind == "l2":
                x = _unit(x)
            elif kind == "sub":  # scikit-learn casts its arrays to the features' dtype
                x -= self._cast(op["a"], x)
            elif kind == "div":
                x /= self._cast(op["a"], x)
            elif kind == "add":
                x = x + self._cast(op["a"], x)
            elif kind == "matmul":
                x = x @ self._cast(op["w"], x)
            else:
                x = _ACTIVATIONS[op["f"]](x)
        return x

    def _cast(self, name: str, x: np.ndarray) -> np.ndarray:
        return self.arrays[name].astype(x.dtype, copy=False)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        if self._members:
            raise AttributeError("a soft vote has no decision function")  # as scikit-learn
        d = self._raw(X)
        return d[:, 0] if d.shape[1] == 1 else d

    def _probabilities(self, X: np.ndarray) -> np.ndarray:
        kind, d = self.spec["proba"], self._raw(X)
        if kind == "given":  # the raw output is the probabilities (kNN)
            return d
        if kind == "vote":  # VotingClassifier(voting="soft").predict_proba
            return np.average([m._probabilities(d) for m in self._members], axis=0,
                              weights=self.spec["vote"]["weights"])
        if kind == "temperature":
            logits = np.asarray(d, dtype=np.float64)
            if logits.shape[1] == 1:
                logits = np.hstack([-logits, logits])
            elif (np.all((logits >= 0) & (logits <= 1))
                  and np.all(np.isclose(logits.sum(axis=1), 1.0))):
                logits = np.log(logits + 1e-12)  # as scikit-learn: scores that look like
                # probabilities are taken for probabilities
            return _softmax(self.spec["beta"] * logits)
        if kind == "softmax" and d.shape[1] > 1:
            return _softmax(d)
        p = _logistic(d)
        if p.shape[1] == 1:
            return np.hstack([1 - p, p])
        total = p.sum(axis=1, keepdims=True)  # one-vs-rest, normalised
        zero = total[:, 0] == 0
        if zero.any():  # every class underflowed to 0: uniform, as scikit-learn
            p[zero], total[zero] = 1, p.shape[1]
        return p / total

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self.spec["proba"] in ("temperature", "vote", "given") or \
                self.spec["output"] == "mlp":
            scores = self._probabilities(X)
        elif self.spec["output"] == "svc":
            return self.classes_[self._svc_predict(X)]
        else:
            scores = self._raw(X)
            if scores.shape[1] == 1:
                return self.classes_[(scores[:, 0] > 0).astype(int)]
        return self.classes_[np.argmax(scores, axis=1)]

    def _svc_predict(self, X: np.ndarray) -> np.ndarray:
        """SVC.predict's class indices: with ``break_ties`` (more than two classes) the argmax
        of the one-vs-rest decision function, as scikit-learn; else libsvm's own vote, in
        which a pair whose decision value is not above 0 (exactly 0 included) votes for its
        second class, and equal votes go to the first class. For two classes: libsvm's sign,
        classes_[1] from a decision value of 0 up (scikit-learn's is libsvm's negated)."""
        op = next(o for o in self.spec["ops"] if o["op"] == "svc")
        k = len(self.classes_)
        if k > 2 and op.get("break_ties"):
            return np.argmax(self._raw(X), axis=1)
        ovo = self._raw(X, ovo=True)
        if ovo.shape[1] == 1:
            return (ovo[:, 0] >= 0).astype(int)
        return np.argmax(_votes(ovo, k, libsvm=True)[0], axis=1)


class _CompactProba(CompactHead):
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self._probabilities(X)


_PROBAS = (None, "temperature", "softmax", "ovr-logistic", "vote", "given")
_OPS = ("sqrt", "l2", "sub", "div", "add", "matmul", "act", "svc", "project", "centroid", "knn")
_ARRAY_KEYS = ("a", "w", "c", "sv", "coef", "b", "nsv", "x", "y")


def _specs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """``spec`` and, for a soft vote, its members' specs."""
    return [spec, *spec.get("vote", {}).get("members", [])]


def array_names(spec: dict[str, Any]) -> set[str]:
    """The names of the arrays the operations of ``spec`` (and its members') read."""
    return {op[k] for one in _specs(spec) for op in one["ops"] for k in _ARRAY_KEYS if k in op}


def _check(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """ValueError unless every operation, array, output and probability kind of ``spec`` is
    one this version computes (a newer embedpipe's file then goes through scikit-learn)."""
    for one in _specs(spec):
        for op in one["ops"]:
            if op["op"] not in _OPS or (
                    op["op"] == "act" and op.get("f") not in _ACTIVATIONS) or (
                    op["op"] == "svc" and op.get("kernel") not in _KERNELS) or (
                    op["op"] == "knn" and (op.get("metric") not in ("euclidean", "cosine")
                                           or op.get("weights") not in ("uniform", "distance")
                                           or int(op.get("k", 0)) < 1)):
                raise ValueError(f"unknown operation {op}")
        member = one is not spec
        if (one.get("proba") not in _PROBAS or one.get("output") not in _OUTPUT_KINDS
                or (one.get("proba") == "vote") != (one.get("output") == "vote")
                or (member and one.get("proba") in (None, "vote"))):
            raise ValueError(f"unknown output {one.get('output')}/{one.get('proba')}")
    if spec.get("proba") == "vote":
        weights = spec["vote"].get("weights")
        if not spec["vote"]["members"] or (
                weights is not None and len(weights) != len(spec["vote"]["members"])):
            raise ValueError("a vote's members and weights do not match")
    for name in array_names(spec):
        if name not in arrays:
            raise ValueError(f"missing array {name}")


def array_member(spec: dict[str, Any], name: str) -> str:
    """The head file's member holding array ``name``: its own ``.npy`` under ARRAY_PREFIX, or
    the member of the skops pipeline holding the same bytes (``spec["members"]``: an SVC's
    support vectors are written once, not twice)."""
    return spec.get("members", {}).get(name, f"{ARRAY_PREFIX}{name}.npy")


def load(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> CompactHead:
    """The compact head of ``spec``; it has ``predict_proba`` when the estimator had it."""
    return (CompactHead if spec.get("proba") is None else _CompactProba)(spec, arrays)


def scores_training_rows_apart(estimator: Any) -> bool:
    """Whether ``estimator`` holds a kNN, whose scores on its own training rows (their own
    nearest neighbours, at a distance of 0 or of a rounding error) are ill-conditioned: the
    classes of training rows are then checked too (``agrees``' ``classes_only``). Other heads
    score a training row as any other, which the midpoints between them already check."""
    return holds(estimator, "KNeighborsClassifier")


def agrees(estimator: Any, compact: CompactHead, X: np.ndarray,
           classes_only: np.ndarray | None = None) -> bool:
    """Whether ``compact`` predicts like ``estimator`` on ``X``: same classes, and the same
    probabilities and decision values (those the estimator has) within 1e-5; on the rows of
    ``classes_only`` (when given), the same classes only. Those are a head's training rows:
    a distance-weighted kNN scores each from its distance to itself, 0 in one form and a
    rounding error in the other (whose weight, 1/d, then decides the score's last digits:
    2.7e-6 apart after pca=2 on an AVX2 CPU, 0 on AVX-512), so only rows between training
    rows tell two forms' scores apart."""
    rows = X if classes_only is None else np.concatenate([X, classes_only])
    if len(X) == 0:
        return False
    proba = None
    if _argmax_of_proba(estimator):  # its predict is the argmax of these: one pass, not two
        proba = np.asarray(estimator.predict_proba(rows), dtype=np.float64)
        predicted = np.asarray(estimator.classes_)[np.argmax(proba, axis=1)]
    else:
        predicted = np.asarray(estimator.predict(rows))
    if not np.array_equal(predicted, compact.predict(rows)):
        return False
    for name in ("predict_proba", "decision_function"):
        if not hasattr(estimator, name):
            if name == "predict_proba" and hasattr(compact, name):
                return False
            continue
        try:
            want = (proba[:len(X)] if name == "predict_proba" and proba is not None
                    else np.asarray(getattr(estimator, name)(X), dtype=np.float64))
        except AttributeError:  # a pipeline whose final step lacks it
            continue
        if not hasattr(compact, name):
            return False
        got = np.asarray(getattr(compact, name)(X), dtype=np.float64)
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-6,
                                                              equal_nan=True):
            return False
    return True


def strip(path: str | Path, out: str | Path) -> Path:
    """A copy of head file ``path`` without its compact form: it then predicts through
    scikit-learn (bench/predict.py and the tests compare the two)."""
    import zipfile

    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            if not info.filename.startswith(MEMBER_DIR):
                dst.writestr(info, src.read(info.filename))
    return Path(out)
