"""A fitted head's inference as a few numpy operations, so that `predict --store` can classify
without importing scikit-learn.

Importing scikit-learn (it imports scipy.stats, and pandas when installed) and skops (which
walks every scikit-learn module to list its trusted types) is most of what `predict --store`
spends starting (bench/predict.py measures it: bench/results/predict.md).
Most heads are a short chain of array operations at prediction time, so `fit` also writes that
chain into the head file (`artifacts.save`): JSON naming the operations and plain ``.npy``
arrays, read back with ``allow_pickle=False``. Nothing in it can run code.

Covered (``export`` returns None for anything else, which then goes through scikit-learn):
  * steps: ``Normalizer`` (l2), ``StandardScaler``, ``PCA``, ``"passthrough"``;
  * final estimators: ``LogisticRegression``, ``SGDClassifier``, ``RidgeClassifier``,
    ``LinearSVC`` (linear decision functions) and ``MLPClassifier``;
  * probabilities: native (softmax, logistic, one-vs-rest logistic) or temperature scaling
    (``CalibratedClassifierCV(method="temperature")`` with one calibrated copy: ``ensemble=False``
    on k folds, or one held-out split on many rows, how `fit` calibrates heads without native
    probabilities).
SVC, kNN, nearest centroid and ensembles have no compact form.

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
    shared temperature keeps the order of rows by margin."""
    if use_proba and hasattr(estimator, "predict_proba"):
        try:
            return estimator.predict_proba(X), True
        except AttributeError:  # e.g. a pipeline whose final step has no predict_proba
            pass
    d = np.asarray(estimator.decision_function(X), dtype=np.float64)
    if d.ndim == 1:  # binary: one score for classes_[1]
        d = np.stack([-d, d], axis=1)
    d = d - d.max(axis=1, keepdims=True)
    d = d / max(float(d.std()), 1e-12)
    e = np.exp(d)
    return e / e.sum(axis=1, keepdims=True), False


def predict_scored(estimator: Any, X: np.ndarray, *, use_proba: bool = True
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Predicted class (str) of each row of ``X``, its per-class scores and the score of the
    predicted class (see class_scores), and whether the scores are probabilities.

    A CalibratedClassifierCV's predict is the argmax of its probabilities, so it is taken from
    the scores instead of scoring ``X`` twice (an RBF SVM's kernel rows are most of its
    prediction time); any other estimator predicts itself."""
    scores, calibrated = class_scores(estimator, X, use_proba=use_proba)
    classes = np.asarray(estimator.classes_).astype(str)
    if calibrated and type(estimator).__name__ == "CalibratedClassifierCV":
        best = np.argmax(scores, axis=1)
    else:
        col = {c: i for i, c in enumerate(classes)}
        best = np.array([col[p] for p in np.asarray(estimator.predict(X)).astype(str)],
                        dtype=np.int64)
    return classes[best], scores, scores[np.arange(len(best)), best], calibrated


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
    if kind == "Normalizer":
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
    raise _Unsupported(kind)


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
        if _type(estimator) == "CalibratedClassifierCV":
            cals = estimator.calibrated_classifiers_
            if estimator.method != "temperature" or len(cals) != 1:
                return None
            final = _pipeline(b, cals[0].estimator)
            if _type(final) == "MLPClassifier":
                return None  # scikit-learn would calibrate predict_proba's output instead
            _decision(b, final)
            out["proba"] = "temperature"
            out["beta"] = float(np.asarray(cals[0].calibrators[0].beta_))
        else:
            final = _pipeline(b, estimator)
            _decision(b, final)
            out["proba"] = _native_proba(final)
        out["output"] = "mlp" if _type(final) == "MLPClassifier" else "linear"
    except (_Unsupported, AttributeError, IndexError):
        return None
    out["ops"] = b.ops
    return out, b.arrays


def _native_proba(final: Any) -> str | None:
    """How the estimator turns its raw output into probabilities: "softmax" (the logistic of
    the one column for two classes), "ovr-logistic" (one-vs-rest logistics, normalised), or
    None (ridge, linear svm, SGD without log loss: a decision function only)."""
    kind = _type(final)
    if kind in ("LogisticRegression", "MLPClassifier"):
        return "softmax"
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


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class CompactHead:
    """Classifies like the estimator it was exported from: ``classes_``, ``predict`` and
    ``decision_function`` (see ``load`` for ``predict_proba``)."""

    def __init__(self, spec: dict[str, Any], arrays: dict[str, np.ndarray]):
        if spec.get("version") != VERSION:
            raise ValueError(f"compact version {spec.get('version')} (this reads {VERSION})")
        for op in spec["ops"]:  # fail at load, not at the first chunk
            if op["op"] not in ("l2", "sub", "div", "add", "matmul", "act") or (
                    op["op"] == "act" and op.get("f") not in _ACTIVATIONS):
                raise ValueError(f"unknown operation {op}")
            for key in ("a", "w"):
                if key in op and op[key] not in arrays:
                    raise ValueError(f"missing array {op[key]}")
        if spec.get("proba") not in _PROBAS or spec.get("output") not in ("linear", "mlp"):
            raise ValueError(f"unknown output {spec.get('output')}/{spec.get('proba')}")
        self.spec, self.arrays = spec, arrays
        self.classes_ = np.asarray(spec["classes"])

    def _raw(self, X: np.ndarray) -> np.ndarray:
        x = np.array(X, dtype=X.dtype if X.dtype in (np.float32, np.float64) else np.float64)
        for op in self.spec["ops"]:
            kind = op["op"]
            if kind == "l2":
                norms = np.sqrt(np.einsum("ij,ij->i", x, x))
                norms[norms == 0.0] = 1.0
                x /= norms[:, None]
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
        d = self._raw(X)
        return d[:, 0] if d.shape[1] == 1 else d

    def _probabilities(self, X: np.ndarray) -> np.ndarray:
        kind, d = self.spec["proba"], self._raw(X)
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
        if self.spec["proba"] == "temperature" or self.spec["output"] == "mlp":
            scores = self._probabilities(X)
        else:
            scores = self._raw(X)
            if scores.shape[1] == 1:
                return self.classes_[(scores[:, 0] > 0).astype(int)]
        return self.classes_[np.argmax(scores, axis=1)]


class _CompactProba(CompactHead):
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self._probabilities(X)


_PROBAS = (None, "temperature", "softmax", "ovr-logistic")


def load(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> CompactHead:
    """The compact head of ``spec``; it has ``predict_proba`` when the estimator had it."""
    return (CompactHead if spec.get("proba") is None else _CompactProba)(spec, arrays)


def agrees(estimator: Any, compact: CompactHead, X: np.ndarray) -> bool:
    """Whether ``compact`` predicts like ``estimator`` on ``X``: same classes, and the same
    probabilities and decision values (those the estimator has) within 1e-5."""
    if len(X) == 0 or not np.array_equal(np.asarray(estimator.predict(X)), compact.predict(X)):
        return False
    for name in ("predict_proba", "decision_function"):
        if not hasattr(estimator, name):
            if name == "predict_proba" and hasattr(compact, name):
                return False
            continue
        try:
            want = np.asarray(getattr(estimator, name)(X), dtype=np.float64)
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
