"""Export a head file and its backbone as ONE ONNX graph (image in, class probabilities out).

The graph (``embedpipe export HEAD -o model.onnx``):

* input ``image``: float32, shape N x 3 x H x W (H, W from the head's data config, e.g. 224),
  RGB, values in [0, 1]: the image decoded to RGB, its shorter side resized to
  ``floor(H / crop_pct)`` with the recorded interpolation, centre-cropped to H x W, divided
  by 255 (what torchvision's ``ToTensor`` gives). The backbone's mean/std normalisation is
  *inside* the graph; :func:`preprocess` does the rest with Pillow and numpy only.
* output ``probabilities``: float32, N x C, in the order of the sidecar's ``classes``; equal to
  the head's ``predict_proba`` (calibrated heads included: their temperature softmax is part
  of the graph).
* output ``label``: int64, N: the index into ``classes`` of the most probable class.

Linear heads (logreg, ridge, linear-svm, centroid, sgd, logreg-sgd) and the preprocessing steps (l2, scale, PCA)
are written as plain ONNX ops here, exactly (ridge, linear-svm, svm, centroid and sgd with the
temperature-scaled probabilities `fit` gives them: one it left uncalibrated, on too few images
per class, is refused by refuse_uncalibrated); knn is written as ops in float64 (_knn); svm and
mlp classifiers are converted with skl2onnx. A soft vote is its members' graphs averaged with
its weights. Every exported head is checked against the fitted estimator on sample features
before it is written; a head that does not match is refused with one line. A JSON sidecar
``<out>.json`` (``svm.onnx`` → ``svm.onnx.json``, see sidecar_path) beside the model records the class names, the input spec, the head's
provenance and versions. ``--int8`` quantizes the backbone with onnxruntime's tools: static
QDQ quantization calibrated on images by default, or dynamic quantization (see quantize()).
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import _io
from .data import MAX_ASPECT
from .env import HEADS, versions
from .errors import UserError, first_line
from .heads import artifacts

FORMAT = "embedpipe-onnx"
FORMAT_VERSION = 1
DEFAULT_OPSET = 17
ML_OPSET = 3
INPUT = "image"
FEATURES = "features"
PROBS = "probabilities"
LABEL = "label"
UNKNOWN_OUT = "unknown"  # with --reject: bool N, and label -1 where it is true
HEAD_ATOL = 1e-4  # |ONNX head - estimator.predict_proba| allowed when checking an export


class ExportError(UserError):
    """A head that cannot be exported, or a backbone that does not match it; one line."""


@dataclass
class ExportResult:
    onnx: Path
    sidecar: Path
    head: str
    int8: bool
    size: int
    int8_mode: str = ""
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        kind = f"int8 {self.int8_mode}" if self.int8 else "fp32"
        return (f"exported {self.head} head + backbone → {self.onnx} ({kind}, "
                f"{self.size / 1e6:.1f} MB); sidecar {self.sidecar}")


# -- the head as ONNX ops ---------------------------------------------------------------------

class _Graph:
    """A tiny builder: nodes and initializers with unique names under ``head/``."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.n = 0
        self.ml = False

    def name(self, what: str) -> str:
        self.n += 1
        return f"head/{what}_{self.n}"

    def const(self, value: Any, what: str = "c", dtype: Any = None) -> str:
        """An initializer: integers as int64, other numbers as float32 (or ``dtype``)."""
        from onnx import numpy_helper

        name = self.name(what)
        arr = np.asarray(value)
        arr = arr.astype(dtype or (np.int64 if arr.dtype.kind in "iu" else np.float32))
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], what: str | None = None,
           out: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = out or self.name(what or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out],
                                           name=self.name(op_type), **attrs))
        return out


def _steps(estimator: Any) -> tuple[Any, Any, float | None]:
    """(pipeline, final classifier, temperature beta or None) of a head's estimator."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.pipeline import Pipeline

    beta = None
    if isinstance(estimator, CalibratedClassifierCV):
        cals = getattr(estimator, "calibrated_classifiers_", [])
        if estimator.method != "temperature" or len(cals) != 1:
            raise ExportError(f"calibration {estimator.method!r} with {len(cals)} calibrated "
                              "copies is not exportable; refit the head with `embedpipe fit`")
        beta = float(np.asarray(cals[0].calibrators[0].beta_))
        estimator = cals[0].estimator
    from sklearn.frozen import FrozenEstimator

    if isinstance(estimator, FrozenEstimator):  # a streamed head calibrated after its fit
        estimator = estimator.estimator
    if not isinstance(estimator, Pipeline):
        raise ExportError(f"estimator {type(estimator).__name__} is not a head pipeline (not a "
                          "head file of `embedpipe fit`): refit the head with `embedpipe fit`")
    return estimator, estimator.steps[-1][1], beta


def _transform(g: _Graph, step: Any, x: str) -> str:
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.preprocessing import Normalizer, StandardScaler

    from .heads.transforms import SignedSqrt

    if step is None or step == "passthrough":
        return x
    if isinstance(step, SignedSqrt):  # sign(x) * sqrt(|x|)
        root = g.op("Sqrt", [g.op("Abs", [x], "abs")], "sqrt_abs")
        return g.op("Mul", [g.op("Sign", [x], "sign"), root], "signed_sqrt")
    if isinstance(step, Normalizer) and step.norm == "l2":
        # x / ||x||, as scikit-learn's normalize: a row whose norm is under 10 eps of float32
        # (1.2e-6) stays as it is (ONNX's LpNormalization would divide by it)
        norm = g.op("Sqrt", [g.op("ReduceSum", [g.op("Mul", [x, x], "l2_sq"),
                                                 g.const(np.array([1], np.int64), "l2_axis")],
                                   "l2_sqsum", keepdims=1)], "l2_norm")
        tiny = g.op("Less", [norm, g.const(np.float32(10 * np.finfo(np.float32).eps),
                                           "l2_tiny")], "l2_is_tiny")
        safe = g.op("Where", [tiny, g.const(np.float32(1.0), "l2_one"), norm], "l2_norm_safe")
        return g.op("Div", [x, safe], "l2")
    if isinstance(step, StandardScaler):
        if step.mean_ is not None and step.with_mean:
            x = g.op("Sub", [x, g.const(step.mean_, "mean")], "centred")
        if step.scale_ is not None and step.with_std:
            x = g.op("Div", [x, g.const(step.scale_, "scale")], "scaled")
        return x
    if isinstance(step, LinearDiscriminantAnalysis) and step.solver in ("eigen", "svd"):
        # scikit-learn's transform: X @ scalings (eigen) or (X - xbar) @ scalings (svd), first
        # _max_components columns
        if step.solver == "svd":
            x = g.op("Sub", [x, g.const(step.xbar_, "lda_xbar")], "lda_centred")
        scalings = np.asarray(step.scalings_)[:, :step._max_components]
        return g.op("MatMul", [x, g.const(scalings, "lda_scalings")], "lda")
    if isinstance(step, PCA):
        x = g.op("Sub", [x, g.const(step.mean_, "pca_mean")], "pca_centred")
        x = g.op("MatMul", [x, g.const(step.components_.T, "pca_components")], "pca")
        if step.whiten:
            x = g.op("Div", [x, g.const(np.sqrt(step.explained_variance_), "pca_sd")],
                     "pca_white")
        return x
    from .heads.registry import PREP_CHOICES

    raise ExportError(f"pipeline step {type(step).__name__} is not exportable (sqrt, l2, scale, "
                      "lda and pca are): refit the head with `embedpipe fit`, its --param prep one "
                      f"of {', '.join(PREP_CHOICES)}")


def _linear(g: _Graph, x: str, coef: np.ndarray, intercept: Any) -> str:
    """x @ coef.T + intercept: N x K decision scores (K = 1 for a binary head, whose
    scikit-learn ``coef_`` may be 1-D, e.g. RidgeClassifier's)."""
    coef = np.atleast_2d(np.asarray(coef, dtype=np.float64))
    z = g.op("MatMul", [x, g.const(coef.T, "coef")], "xw")
    return g.op("Add", [z, g.const(np.ravel(intercept), "intercept")], "decision")


def _n_scores(coef: np.ndarray) -> int:
    """How many decision scores a linear classifier gives: 1 (binary) or one per class."""
    return np.atleast_2d(coef).shape[0]


def _softmax(g: _Graph, scores: str, n_out: int, beta: float = 1.0) -> str:
    """Probabilities from decision scores: softmax(beta * d); binary (one score): (-d, d)."""
    if n_out == 1:
        neg = g.op("Neg", [scores], "neg")
        scores = g.op("Concat", [neg, scores], "pair", axis=1)
    if beta != 1.0:
        scores = g.op("Mul", [scores, g.const(np.float32(beta), "beta")], "tempered")
    return g.op("Softmax", [scores], "proba", axis=1)


def _knn(g: _Graph, clf: Any, x: str, head_name: str) -> str:
    """k-nearest-neighbour probabilities as ONNX ops, in float64 as scikit-learn computes them:
    euclidean (||x||² − 2 x·t + ||t||², clipped at 0) or cosine (1 − cos, clipped to [0, 2])
    distances to the stored training rows t, TopK smallest k, each neighbour's vote 1 (uniform)
    or 1/distance (distance; a row with a zero distance counts only its zero-distance
    neighbours, as KNeighborsClassifier._get_weights), summed per class and normalised.
    skl2onnx's converter computes in float32, which moved the default head's probabilities by
    up to ~3e-2 (1/distance amplifies rounding), so it is not used for knn. One difference
    stays: training rows at exactly the same distance across the k-th place (duplicate images
    in several classes) are taken lowest index first here, in scikit-learn's partition order
    there, so such a query's probabilities can differ."""
    from onnx import TensorProto

    metric, weights = clf.effective_metric_, clf.weights
    if metric not in ("euclidean", "cosine") or weights not in ("uniform", "distance"):
        raise ExportError(f"the {head_name} head uses metric={metric!r}, weights={weights!r}; "
                          "knn is exportable with euclidean or cosine distances and uniform or "
                          "distance weights: refit it with those --param values")
    fit_x = np.asarray(clf._fit_X, dtype=np.float64)
    n_classes = len(clf.classes_)

    def dconst(value: Any, what: str) -> str:  # float64, as scikit-learn computes
        return g.const(value, what, dtype=np.float64)

    xd = g.op("Cast", [x], "x64", to=TensorProto.DOUBLE)
    axis1 = g.const(np.array([1], dtype=np.int64), "axis1")
    axis2 = g.const(np.array([2], dtype=np.int64), "axis2")
    zero = dconst(0.0, "zero")
    sq = g.op("ReduceSum", [g.op("Mul", [xd, xd], "sq"), axis1], "sqsum", keepdims=1)
    if metric == "cosine":
        xn = g.op("Div", [xd, g.op("Max", [g.op("Sqrt", [sq], "norm"), dconst(1e-300, "eps")],
                                   "norm_safe")], "xn")
        tn = fit_x / np.maximum(np.linalg.norm(fit_x, axis=1, keepdims=True), 1e-300)
        sim = g.op("MatMul", [xn, dconst(np.ascontiguousarray(tn.T), "train_t")], "cos")
        dist = g.op("Clip", [g.op("Sub", [dconst(1.0, "one"), sim], "d"), zero,
                             dconst(2.0, "two")], "dist")
    else:
        cross = g.op("MatMul", [xd, dconst(np.ascontiguousarray(-2.0 * fit_x.T), "train_t")],
                     "cross")
        d2 = g.op("Add", [g.op("Add", [sq, cross], "d2a"),
                          dconst((fit_x ** 2).sum(axis=1)[None, :], "train_sq")], "d2")
        dist = g.op("Sqrt", [g.op("Max", [d2, zero], "d2pos")], "dist")
    k = g.const(np.array([clf.n_neighbors], dtype=np.int64), "k")
    near = g.name("near_dist")
    idx = g.name("near_idx")
    from onnx import helper

    g.nodes.append(helper.make_node("TopK", [dist, k], [near, idx], name=g.name("TopK"),
                                    axis=1, largest=0, sorted=1))
    labels = g.op("Gather", [g.const(np.asarray(clf._y, dtype=np.int64), "train_y"), idx],
                  "near_y")
    onehot = g.op("Cast", [g.op("Equal", [
        g.op("Unsqueeze", [labels, axis2], "y3"),
        g.const(np.arange(n_classes, dtype=np.int64).reshape(1, 1, -1), "classes")], "is_k")],
        "onehot", to=TensorProto.DOUBLE)
    if weights == "uniform":
        votes = onehot
    else:
        at0 = g.op("Cast", [g.op("Equal", [near, zero], "at0")], "at0d", to=TensorProto.DOUBLE)
        any_zero = g.op("Greater", [g.op("ReduceSum", [at0, axis1], "n0", keepdims=1), zero],
                        "any0")
        inv = g.op("Div", [dconst(1.0, "one_w"), g.op("Max", [near, dconst(1e-300, "tiny")],
                                                       "near_safe")], "inv")
        w = g.op("Where", [any_zero, at0, inv], "w")
        votes = g.op("Mul", [onehot, g.op("Unsqueeze", [w, axis2], "w3")], "votes")
    score = g.op("ReduceSum", [votes, axis1], "score", keepdims=0)
    total = g.op("ReduceSum", [score, axis1], "total", keepdims=1)
    total = g.op("Where", [g.op("Equal", [total, zero], "t0"), dconst(1.0, "one_t"), total],
                 "total_safe")
    return g.op("Cast", [g.op("Div", [score, total], "p64")], "proba", to=TensorProto.FLOAT)


def _skl2onnx(g: _Graph, clf: Any, x: str, dim: int, opset: int, raw: bool) -> str:
    """Convert one fitted classifier with skl2onnx and inline its graph; returns the name of
    its score output (probabilities, or raw decision scores when ``raw``)."""
    from onnx import compose, helper
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    opts: dict[str, Any] = {"zipmap": False}
    if raw:
        opts["raw_scores"] = True
    try:
        with warnings.catch_warnings():  # e.g. SVC's deprecated probA_ read by the converter
            warnings.simplefilter("ignore")
            m = convert_sklearn(clf, initial_types=[("X", FloatTensorType([None, dim]))],
                                target_opset={"": opset, "ai.onnx.ml": ML_OPSET},
                                options={id(clf): opts})
    except Exception as e:  # noqa: BLE001 - skl2onnx raises many kinds; one line for all
        text = first_line(e, 160)
        raise ExportError(f"skl2onnx cannot convert {type(clf).__name__}: {text}") from None
    m = compose.add_prefix(m, g.name("clf") + "/")
    inp, outs = m.graph.input[0].name, [o.name for o in m.graph.output]
    g.nodes.append(helper.make_node("Identity", [x], [inp], name=g.name("Identity")))
    g.nodes.extend(m.graph.node)
    g.inits.extend(m.graph.initializer)
    g.ml = g.ml or any(o.domain == "ai.onnx.ml" for o in m.opset_import)
    return outs[1]  # (label, probabilities/scores)


def _probs(g: _Graph, estimator: Any, x: str, dim: int, opset: int, head_name: str) -> str:
    """Add ``estimator``'s predict_proba (a head pipeline, maybe calibrated, or a soft vote of
    such pipelines) on the tensor ``x`` (N x dim) to ``g``; returns the name of its N x C
    probabilities. Raises ExportError naming what cannot be exported."""
    from sklearn.ensemble import VotingClassifier
    from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
    from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC, LinearSVC

    pipe, clf, beta = _steps(estimator)
    n_classes = len(estimator.classes_)
    for _, step in pipe.steps[:-1]:
        x = _transform(g, step, x)
    width = (pipe[:-1].transform(np.zeros((1, dim), np.float32)).shape[1]
             if len(pipe.steps) > 1 else dim)
    if isinstance(clf, LogisticRegression):
        if beta is not None:
            raise ExportError(f"the {head_name} head is a calibrated logreg, which is not "
                              "exportable: refit it with `embedpipe fit --head logreg` (native "
                              "probabilities)")
        z = _linear(g, x, clf.coef_, clf.intercept_)
        if clf.coef_.shape[0] == 1:  # binary: sigmoid of one score
            p1 = g.op("Sigmoid", [z], "p1")
            p0 = g.op("Sub", [g.const(np.float32(1.0), "one"), p1], "p0")
            probs = g.op("Concat", [p0, p1], "proba", axis=1)
        else:
            probs = g.op("Softmax", [z], "proba", axis=1)
    elif isinstance(clf, (RidgeClassifier, LinearSVC, SGDClassifier)) and beta is not None:
        z = _linear(g, x, clf.coef_, clf.intercept_)
        probs = _softmax(g, z, _n_scores(clf.coef_), beta)
    elif isinstance(clf, SGDClassifier) and clf.loss == "log_loss" and beta is None:
        # scikit-learn's one-vs-rest probabilities: sigmoid of each score, normalised
        p = g.op("Sigmoid", [_linear(g, x, clf.coef_, clf.intercept_)], "sigmoid")
        if clf.coef_.shape[0] == 1:
            p0 = g.op("Sub", [g.const(np.float32(1.0), "one"), p], "p0")
            probs = g.op("Concat", [p0, p], "proba", axis=1)
        else:
            total = g.op("ReduceSum", [p, g.const(np.array([1], dtype=np.int64), "axis")],
                         "total", keepdims=1)
            probs = g.op("Div", [p, total], "proba")
    elif isinstance(clf, NearestCentroid) and beta is not None:
        if clf.metric != "euclidean":
            raise ExportError(f"the {head_name} head measures {clf.metric} distances to the "
                              "class centroids; only euclidean ones are exportable: refit it "
                              "without --param metric (euclidean is its default)")
        # score_k = -||(x - c_k)/s||^2 + 2 log prior_k (sklearn's discriminant); the ||x/s||^2
        # term is the same for every class and cancels in the softmax: linear in x. Two
        # classes: decision_function is score_1 - score_0, which the calibration pairs as
        # (-d, d), as for any binary score
        s = np.asarray(clf.within_class_std_dev_, dtype=np.float64).copy()
        s[s == 0] = 1.0
        c = np.asarray(clf.centroids_, dtype=np.float64) / s
        coef = 2.0 * c / s
        intercept = -(c ** 2).sum(axis=1) + 2.0 * np.log(clf.class_prior_)
        if n_classes == 2:
            coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
        probs = _softmax(g, _linear(g, x, coef, intercept), _n_scores(coef), beta)
    elif isinstance(clf, SVC) and beta is not None:
        # skl2onnx's raw scores: one per class; two classes: (-d, d) already, as the
        # calibration pairs decision_function's d
        scores = _skl2onnx(g, clf, x, width, opset, raw=True)
        probs = _softmax(g, scores, n_classes, beta)
    elif isinstance(clf, KNeighborsClassifier) and beta is None:
        probs = _knn(g, clf, x, head_name)
    elif isinstance(clf, MLPClassifier) and beta is None:
        # skl2onnx looks converters up by exact type: ours (heads/mlp.py) as scikit-learn's
        plain = clf.sklearn_copy() if hasattr(clf, "sklearn_copy") else clf
        probs = _skl2onnx(g, plain, x, width, opset, raw=False)
    elif isinstance(clf, VotingClassifier) and clf.voting == "soft" and beta is None:
        # predict_proba = the members' probabilities averaged with the vote's weights
        # (np.average in scikit-learn's VotingClassifier); every member sees x after the steps
        # before the vote and has classes 0..C-1 (the vote fitted them on encoded labels)
        kept = [(i, name, est) for i, (name, est) in enumerate(clf.named_estimators_.items())
                if est != "drop"]
        w = np.array([1.0 if clf.weights is None else clf.weights[i] for i, _, _ in kept])
        w = w / w.sum()
        parts = [g.op("Mul", [_probs(g, est, x, width, opset, f"{head_name} ({name} member)"),
                              g.const(np.float32(wi), "vote_weight")], "weighted")
                 for (_, name, est), wi in zip(kept, w)]
        probs = parts[0] if len(parts) == 1 else g.op("Sum", parts, "vote")
    else:
        kind = type(clf).__name__ + (" (calibrated)" if beta is not None else "")
        if beta is None and isinstance(clf, _score_classifiers()):
            kind = type(clf).__name__ + ", uncalibrated scores"
        raise ExportError(f"the {head_name} head ({kind}) cannot be exported to ONNX; "
                          f"exportable heads: {', '.join(_native_heads())}, and, when `fit` "
                          "calibrated their probabilities, ridge, linear-svm, svm, sgd, centroid")
    return probs


def head_graph(estimator: Any, dim: int, opset: int = DEFAULT_OPSET,
               head_name: str = "head", rule: Any = None) -> Any:
    """The fitted head as an ONNX model: ``features`` (N x dim) → ``probabilities``, ``label``.

    With ``rule`` (heads.reject.Rule, from `export --reject`), also ``unknown`` (bool, N):
    max probability < rule.min_confidence, or cosine distance from the features to the nearest
    training class centroid > rule.max_distance; ``label`` is -1 for those rows."""
    from onnx import TensorProto, helper

    n_classes = len(estimator.classes_)
    g = _Graph()
    probs = _probs(g, estimator, FEATURES, dim, opset, head_name)
    g.op("Identity", [probs], out=PROBS)
    outputs = [helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, ["N", n_classes]),
               helper.make_tensor_value_info(LABEL, TensorProto.INT64, ["N"])]
    if rule is None:
        g.op("ArgMax", [PROBS], out=LABEL, axis=1, keepdims=0)
    else:
        best = g.op("ArgMax", [PROBS], "best", axis=1, keepdims=0)
        flags = []

        def reduce(op: str, x: str, what: str, keepdims: int) -> str:
            if opset >= 18:  # axes became an input in opset 18
                return g.op(op, [x, g.const(np.array([1], dtype=np.int64), "axis1")], what,
                            keepdims=keepdims)
            return g.op(op, [x], what, axes=[1], keepdims=keepdims)

        if rule.min_confidence is not None:
            conf = reduce("ReduceMax", PROBS, "conf", 0)
            flags.append(g.op("Less", [conf, g.const(np.float32(rule.min_confidence), "tc")],
                              "low_conf"))
        if rule.max_distance is not None and rule.cents is not None:
            sq = reduce("ReduceSumSquare", FEATURES, "sq", 1)
            norm = g.op("Max", [g.op("Sqrt", [sq], "norm0"), g.const(np.float32(1e-12), "eps")],
                        "norm")
            xn = g.op("Div", [FEATURES, norm], "xn")
            sims = g.op("MatMul", [xn, g.const(np.ascontiguousarray(
                rule.cents.T, dtype=np.float32), "cents_t")], "sims")
            near = reduce("ReduceMax", sims, "near", 0)
            dist = g.op("Sub", [g.const(np.float32(1.0), "one_d"), near], "dist")
            flags.append(g.op("Greater", [dist, g.const(np.float32(rule.max_distance), "td")],
                              "far"))
        unknown = flags[0] if len(flags) == 1 else g.op("Or", flags, "either")
        g.op("Identity", [unknown], out=UNKNOWN_OUT)
        g.op("Where", [UNKNOWN_OUT, g.const(np.int64(-1), "minus_one"), best], out=LABEL)
        outputs.append(helper.make_tensor_value_info(UNKNOWN_OUT, TensorProto.BOOL, ["N"]))
    graph = helper.make_graph(
        g.nodes, "embedpipe_head",
        [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", dim])],
        outputs, g.inits)
    imports = [helper.make_opsetid("", opset)]
    if g.ml:
        imports.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    return helper.make_model(graph, opset_imports=imports, producer_name="embedpipe")


def _score_classifiers() -> tuple[type, ...]:
    from sklearn.linear_model import RidgeClassifier, SGDClassifier
    from sklearn.neighbors import NearestCentroid
    from sklearn.svm import SVC, LinearSVC

    return NearestCentroid, SVC, LinearSVC, RidgeClassifier, SGDClassifier


def _native_heads() -> list[str]:
    """Heads exportable whatever their training rows: those with native probabilities."""
    from .heads.registry import HEADS

    return [h.name for h in HEADS.values() if h.native_proba]


def refuse_uncalibrated(head: artifacts.HeadFile) -> None:
    """A head whose probabilities are a plain softmax of scores (`fit` could not calibrate it:
    too few images per class) has no probabilities to export: one line naming the file, why,
    and the heads that `fit` makes exportable from the same training rows."""
    if artifacts.probability_kind(head.manifest) != "scores":
        return
    from .heads import registry, train

    name = str(head.manifest.get("head", "head"))
    per_class = [int(n) for n in ((head.manifest.get("training") or {})
                                  .get("per_class") or {}).values()]
    why = re.search(r"none \((.*?)(?::|\)$)", str(head.manifest.get("calibration", "")))
    able = _native_heads() + [
        h.name for h in registry.HEADS.values()
        if not h.native_proba and per_class and train.calibrates(h.name, per_class)]
    need = next((n for n in range(2, 100) if name in registry.HEADS and len(per_class) > 1
                 and train.calibrates(name, [n] * len(per_class))), None)
    more = f" (at least {need} of every class)" if need else ""
    rows = f" on these training rows ({min(per_class)} in the smallest class)" if per_class else ""
    raise ExportError(f"{head.path}: the {name} head has uncalibrated scores, not probabilities "
                      f"(`fit` could not calibrate them: {why.group(1) if why else 'too few images'}"
                      f"), so it cannot be exported; add images{more} and refit it, or fit and "
                      f"export one of {', '.join(able)}{rows}")


def _session(model: Any) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def sample_features(estimator: Any, dim: int, n: int = 64, seed: int = 0) -> np.ndarray:
    """Features to check an exported head on: around the training data where the head keeps
    its statistics (the scaler's mean/std, knn's stored rows), else standard normal."""
    pipe, clf, _ = _steps(estimator)
    rng = np.random.default_rng(seed)
    fit_x = getattr(clf, "_fit_X", None)
    scaler = dict(pipe.steps).get("scale")
    if fit_x is not None and len(pipe.steps) == 1:
        X = fit_x[rng.integers(0, len(fit_x), n)] * (1 + 0.05 * rng.standard_normal((n, dim)))
    elif scaler is not None and getattr(scaler, "mean_", None) is not None:
        X = scaler.mean_ + scaler.scale_ * rng.standard_normal((n, dim))
        if "sqrt" in dict(pipe.steps):  # the scaler saw signed square roots: undo it
            X = np.copysign(X * X, X)
    else:
        X = np.abs(rng.standard_normal((n, dim)))
    return X.astype(np.float32)


def check_head(model: Any, estimator: Any, X: np.ndarray, head_name: str,
               rule: Any = None) -> float:
    """Max |ONNX probabilities - estimator.predict_proba| on X; refuses a mismatch. With
    ``rule`` (--reject), its ``unknown`` output must equal rule.mask on X too (rows within
    1e-5 of a threshold excepted) and ``label`` be -1 exactly there."""
    if rule is None:
        probs, label = _session(model).run([PROBS, LABEL], {FEATURES: X})
    else:
        probs, label, unknown = _session(model).run([PROBS, LABEL, UNKNOWN_OUT], {FEATURES: X})
    want = estimator.predict_proba(X)
    err = float(np.abs(probs - want).max())
    if rule is None:
        same = float((label == want.argmax(axis=1)).mean())
    else:
        from .heads.reject import distance

        expect = rule.mask(want.max(axis=1), X)
        near = np.zeros(len(X), dtype=bool)
        if rule.min_confidence is not None:
            near |= np.abs(want.max(axis=1) - rule.min_confidence) < 1e-5
        if rule.max_distance is not None and rule.cents is not None:
            near |= np.abs(distance(X, rule.cents) - rule.max_distance) < 1e-5
        ok = (unknown == expect) | near
        ok &= np.where(unknown, label == -1, label == want.argmax(axis=1))
        same = float(ok.mean())
    if err > HEAD_ATOL or same < 1.0:
        raise ExportError(f"the {head_name} head does not convert exactly to ONNX (max "
                          f"|Δp| {err:.2g}, top-1 agreement {same:.0%}); not exported: fit and "
                          "export another head, e.g. logreg")
    return err


# -- the backbone -----------------------------------------------------------------------------

def _backbone(head: artifacts.HeadFile, opts: Any) -> Any:
    """The head's backbone, rebuilt with ``opts`` (extract.options.options_for_identity of
    the head's identity) and checked to give the head's features (provenance: model, weights
    sha256, preprocessing, pool, feature dim)."""
    from .backbones import build_backbone
    from .provenance import identity_of

    bb = build_backbone(opts)
    _, ident = identity_of(bb, opts, opts.precision)
    artifacts.check_compatible(head, ident, f"the backbone rebuilt for {head.path}",
                               fix="pass --weights PATH to the weights file the head was "
                                   f"fitted with (sha256 {str(head.identity['weights_sha256'])[:12]}…)")
    return bb


def backbone_graph(bb: Any, opset: int = DEFAULT_OPSET) -> Any:
    """The backbone with its mean/std normalisation in front: ``image`` in [0,1] →
    ``features``, dynamic batch axis (TorchScript exporter: a plain, fixed-shape graph)."""
    import onnx
    import torch

    mean = torch.tensor(bb.data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(bb.data_config["std"], dtype=torch.float32).view(1, 3, 1, 1)

    class Normalised(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = bb.model
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model((x - self.mean) / self.std)

    net = Normalised().eval()
    x = torch.zeros(2, *bb.data_config["input_size"])
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript exporter"
        torch.onnx.export(net, (x,), buf, dynamo=False, opset_version=opset,
                          input_names=[INPUT], output_names=[FEATURES],
                          dynamic_axes={INPUT: {0: "N"}, FEATURES: {0: "N"}},
                          do_constant_folding=True)
    return onnx.load_model_from_string(buf.getvalue())


# -- preprocessing without torch (the sidecar's contract) -------------------------------------

_PIL_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1, "box": 4,
                 "hamming": 5}


def input_spec(data_config: dict[str, Any]) -> dict[str, Any]:
    _, h, w = data_config["input_size"]
    scale = math.floor(h / data_config["crop_pct"])
    return {
        "name": INPUT, "shape": ["N", 3, h, w], "dtype": "float32", "layout": "NCHW, RGB",
        "value_range": [0.0, 1.0],
        "preprocessing": [
            "decode to RGB (EXIF orientation applied; alpha composited on white)",
            f"centre-crop the longer side to at most {MAX_ASPECT} x the shorter side "
            "(left = (width - new width) // 2; same for top)",
            f"resize the shorter side to {scale} px ({data_config['interpolation']}, Pillow), "
            "the other side in proportion (int(scale * long / short))",
            f"centre-crop to {h} x {w} (top = round((height - {h}) / 2), same for left)",
            "divide by 255 → float32 in [0, 1], channels first",
        ],
        "normalisation": {"mean": data_config["mean"], "std": data_config["std"],
                          "in_graph": True},
        "crop_mode": data_config["crop_mode"], "crop_pct": data_config["crop_pct"],
        "interpolation": data_config["interpolation"],
    }


def preprocess(img: Any, spec: dict[str, Any]) -> np.ndarray:
    """A PIL RGB image → the model input (3 x H x W float32 in [0, 1]) as the sidecar's
    ``input`` says; Pillow and numpy only (equal to timm's eval transform without Normalize)."""
    from PIL import Image

    from .data import limit_aspect

    _, _, h, w = spec["shape"]
    if spec.get("crop_mode", "center") != "center" or h != w:
        raise ExportError("preprocess() handles square centre crops only")
    img = limit_aspect(img)
    scale = math.floor(h / spec["crop_pct"])
    iw, ih = img.size
    if iw <= ih:
        size = (scale, int(scale * ih / iw))
    else:
        size = (int(scale * iw / ih), scale)
    if size != img.size:
        img = img.resize(size, _PIL_RESAMPLE.get(spec["interpolation"], Image.BICUBIC))
    top, left = int(round((size[1] - h) / 2.0)), int(round((size[0] - w) / 2.0))
    img = img.crop((left, top, left + w, top + h))
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0


# -- the whole export -------------------------------------------------------------------------


INT8_MODES = ("static", "dynamic")
DEFAULT_CALIB_COUNT = 64  # calibration images of static int8 (--calib-count)


def calibration_paths(head: artifacts.HeadFile, calib: Sequence[str | Path] | None,
                      count: int = DEFAULT_CALIB_COUNT,
                      note: Callable[[str], None] | None = None) -> list[Path]:
    """The image files static quantization calibrates on: ``count`` of those under ``calib``
    (image files, folders, CSV manifests, or feature stores: a store's images where its
    extraction read them), or by default of the training images of the store the head was
    fitted on (recorded in the head as given to `fit`: looked for from the working directory,
    then beside the head), spread evenly (as calibration_images picks them), each one decoded
    whole (data.load_image, as calibration_images will: a truncated JPEG or PNG has a valid
    header and fails only in its pixel data), so ``export`` calls it before any work. Picked
    files that do not decode are left out with one ``note`` naming them (and why), when at
    least half of the picked ones decode (_decodable). Raises ExportError naming the path and
    the fix for: a --calib file that is one of embedpipe's own files but no image (a head, a
    features file, weights, an ONNX export), a store of imported features (no images), a
    store that cannot be read, no images found, and picked files fewer than half of which
    decode (a text file given as --calib, a folder of truncated images)."""
    fix = ("pass --calib FOLDER (a few dozen typical images) or --calib STORE.h5, run export "
           "in the folder where `fit` ran, or pass --int8-mode dynamic (no calibration)")
    if calib:
        from .predict import gather_images

        stores = [Path(c) for c in calib if _is_store(Path(c))]
        for c in calib:
            if Path(c) not in stores and Path(c).is_file():
                _refuse_non_image(Path(c), fix)
        paths = [p for st in stores for p in _store_images(st, None, fix)]
        rest = [c for c in calib if Path(c) not in stores]
        if rest:
            paths += [r.path for r in gather_images(list(rest)).items]
        if not paths:
            raise ExportError(f"--calib {' '.join(map(str, calib))}: no images found; {fix}")
        return _decodable(_spread(paths, count), fix, note)
    train = head.manifest.get("training", {}) or {}
    if not train.get("store"):
        raise ExportError(f"{head.path}: --int8 (static) calibrates on the head's training "
                          f"images, but the head records no training store; {fix}")
    where = Path(str(train["store"]))
    tried = list(dict.fromkeys([where.absolute()] if where.is_absolute() else
                               [where.absolute(), (head.path.parent / where).absolute()]))
    found = next((c for c in tried if c.is_file()), None)
    if found is None:
        raise ExportError(f"--int8 (static) calibrates on the training images of the head's "
                          f"store {where}, which is not at {' nor '.join(map(str, tried))}; "
                          f"{fix}")
    split = train.get("split")
    return _decodable(_spread(_store_images(found, None if split is None else str(split),
                                            fix), count), fix, note)


def _spread(paths: Sequence[Path], count: int) -> list[Path]:
    """``count`` of ``paths`` spread evenly (first and last included); all when fewer."""
    return [paths[int(i)] for i in np.linspace(0, len(paths) - 1, min(count, len(paths)))]


def _decodable(paths: list[Path], fix: str,
               note: Callable[[str], None] | None = None) -> list[Path]:
    """``paths`` that decode whole (data.load_image: header and pixel data, as
    calibration_images decodes them; the images are not kept). When some do not, ``note``
    gets one line naming them and why, if at least half of ``paths`` decode; else ExportError
    naming the first that does not, its reason and the fix (calibration ranges from a few of
    the images asked for would not be the ranges of the images the model will see)."""
    from .data import DecodeError, load_image

    good: list[Path] = []
    bad: list[tuple[Path, str]] = []
    for p in paths:
        try:
            load_image(p).close()
            good.append(p)
        except DecodeError as e:  # not an image, truncated, unreadable
            bad.append((p, first_line(e, 120)))
    if not bad:
        return good
    first, why = bad[0]
    if 2 * len(good) < len(paths):
        what = ("none" if not good else f"only {len(good)}") + f" of the {len(paths)}"
        raise ExportError(f"--calib: {what} calibration images decode (e.g. {first}: {why}); "
                          f"replace or remove the damaged images, or {fix}")
    if note:
        shown = "; ".join(f"{p} ({w})" for p, w in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        note(f"note: calibrating int8 ranges on {len(good)} of the {len(paths)} picked images: "
             f"{len(bad)} do not decode and are skipped: {shown}{more}")
    return good


def _refuse_non_image(path: Path, fix: str) -> None:
    """ExportError for a file named by --calib (not a store) that is no image: one of
    embedpipe's own files (artifacts.file_kind: what it is and what to pass instead), or a
    file whose image header Pillow cannot read (a text file, a damaged image). A .csv is a
    manifest (gather_images reads it)."""
    found = artifacts.file_kind(path)
    if found is None:
        if path.suffix.lower() == ".csv":
            return
        from PIL import Image

        try:
            with Image.open(path):
                return
        except Exception as e:  # noqa: BLE001 - whatever Pillow raises: not an image
            raise ExportError(f"--calib {path}: not an image ({first_line(e, 120)}); "
                              f"{fix}") from None
    if found[1] == "store":
        return
    what, kind = found
    hint = ("it holds features, not the images they came from" if kind == "features"
            else "it holds no images")
    raise ExportError(f"--calib {path} is {what}, not a calibration image; {hint}: pass "
                      "--calib IMAGE_FOLDER (a few dozen typical images) or a store extracted "
                      "from images (`embedpipe extract`), or --int8-mode dynamic (no "
                      "calibration)")


def _is_store(path: Path) -> bool:
    if not path.is_file():
        return False
    found = artifacts.file_kind(path)
    return path.suffix.lower() in (".h5", ".hdf5") or (found is not None and found[1] == "store")


def _store_images(store: Path, split: str | None, fix: str) -> list[Path]:
    """The image files behind ``store``'s rows (of ``split`` when the store has it, else all:
    e.g. "all labeled rows"), where its first extraction read them and where they still are.
    ExportError for a store that cannot be read, one of imported features (no images), and
    one whose images are all gone."""
    from .data import fs_name
    from .features_io import IMPORTED
    from .store import StoreError
    from .store.read import open_store

    try:
        st = open_store(store, features=False)
        src = Path(st.runs[0]["source"])
    except StoreError as e:
        why = str(e).removeprefix(f"{store}: ").split("; ")[0]
        raise ExportError(f"--int8 (static): cannot list the calibration images of {store}: "
                          f"{why}; {fix}") from None
    except (IndexError, KeyError) as e:
        raise ExportError(f"--int8 (static): cannot list the calibration images of {store} "
                          f"(its run records name no source: {first_line(e, 80)}); {fix}") from None
    if str(st.meta.get("weights_source", "")).startswith(IMPORTED):
        raise ExportError(f"--int8 (static): {store} is a store of imported features (from "
                          f"{src.name}, by `embedpipe import-features`): it holds no images "
                          "to calibrate on; pass --calib IMAGE_FOLDER (a few dozen typical "
                          "images) or a store extracted from images (`embedpipe extract`), or "
                          "--int8-mode dynamic (no calibration)")
    use_split = split in set(st.splits)
    paths = [src / fs_name(p) for p, sp in zip(st.paths, st.splits)
             if not use_split or sp == split]
    here = [p for p in paths if p.is_file()]
    if not here:
        raise ExportError(f"--int8 (static): the images of {store} are not in {src} (where "
                          f"its extraction read them; none of {len(paths)} found); {fix}")
    return here


def calibration_images(paths: Sequence[Path], spec: dict[str, Any],
                       count: int = 64) -> np.ndarray:
    """Model inputs for static quantization: ``count`` of ``paths`` (calibration_paths),
    spread evenly, decoded and preprocessed as the sidecar says; N x 3 x H x W float32."""
    from .data import DecodeError, load_image

    pick = _spread(paths, count)
    out = []
    for p in pick:
        try:
            out.append(preprocess(load_image(p), spec))
        except DecodeError:
            continue
    if not out:
        raise ExportError(f"--calib: none of the {len(pick)} calibration images could be read "
                          f"(e.g. {pick[0]}); pass --calib FOLDER with readable images")
    return np.stack(out)


def quantize(src: Path, dst: Path, mode: str = "static",
             calib: np.ndarray | None = None, pre: Path | None = None) -> str:
    """int8 copy of ``src`` at ``dst``; returns a description for the sidecar.

    static (default): QDQ, per-channel weights and activation ranges from calibration
    images (MinMax), for the backbone's Conv/MatMul/Gemm; the head (nodes ``head/*``) stays
    fp32. Weights and activations are both uint8 (U8U8): on CPUs without VNNI (this one:
    AVX2 only) int8 weights with uint8 activations saturate in the int16 accumulation
    (onnxruntime's quantization docs) and cost accuracy (bench/export.py measures the top-1
    agreement: bench/results/export.md). dynamic: onnxruntime's quantize_dynamic of the
    backbone's supported ops (Conv → ConvInteger too; the head stays fp32 as in static): no
    calibration, but on conv nets much worse (bench/export.py).
    """
    import logging

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    logging.getLogger().setLevel(logging.ERROR)  # its "run pre-processing first" advice
    if mode == "dynamic":  # the head stays fp32 here too (knn's probabilities moved by 0.27)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8,
                         nodes_to_exclude=_head_nodes(src))
        return ("int8 dynamic (onnxruntime quantize_dynamic, the backbone's supported ops, "
                "uint8 weights; head in fp32)")
    if mode != "static":
        raise ExportError(f"--int8-mode {mode}: pass one of {', '.join(INT8_MODES)}")
    assert calib is not None

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= len(calib):
                return None
            self.i += 8
            return {INPUT: calib[self.i - 8:self.i]}

    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = pre or dst.with_name(f".{dst.name}.pre.tmp")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QUInt8, op_types_to_quantize=["Conv", "MatMul",
                                                                           "Gemm"],
                        nodes_to_exclude=_head_nodes(pre),
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        pre.unlink(missing_ok=True)
    return (f"int8 static (QDQ, per-channel uint8 weights, uint8 activations, MinMax over "
            f"{len(calib)} calibration images; head in fp32)")


def _head_nodes(model_path: Path) -> list[str]:
    """Names of the head's nodes (``head/*``, _Graph) in an ONNX file: kept fp32 by quantize."""
    import onnx

    return [n.name for n in onnx.load(str(model_path)).graph.node if n.name.startswith("head/")]


def sidecar_path(out: str | Path) -> Path:
    """The JSON sidecar of the ONNX file ``out``: its full name plus ``.json`` (``svm.onnx`` →
    ``svm.onnx.json``), so it can never be ``out`` itself, whatever ``out`` is called."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def check_int8_options(int8: bool, int8_mode: str | None, calib: Sequence[Any] | None,
                       calib_count: int | None) -> str:
    """The int8 mode to use (static when not given); ExportError for an option that means
    nothing with the others: --int8-mode without --int8, --calib or --calib-count without
    --int8 or with --int8-mode dynamic (which uses no calibration images)."""
    given = [flag for flag, v in (("--calib", calib), ("--calib-count", calib_count))
             if v is not None and v != []]
    if not int8:
        for flag in (["--int8-mode"] if int8_mode is not None else []) + given:
            raise ExportError(f"{flag} only applies to int8 quantization: add --int8 (or "
                              f"leave {flag} out for an fp32 export)")
        return ""
    mode = int8_mode or "static"
    if mode not in INT8_MODES:
        raise ExportError(f"--int8-mode {mode}: pass one of {', '.join(INT8_MODES)}")
    if mode == "dynamic" and given:
        raise ExportError(f"{given[0]} is for --int8-mode static; dynamic quantization uses no "
                          f"calibration images: leave {given[0]} out (or drop --int8-mode "
                          "dynamic)")
    if calib_count is not None and calib_count < 1:
        raise ExportError(f"--calib-count {calib_count}: pass 1 or more (default "
                          f"{DEFAULT_CALIB_COUNT}; a few dozen typical images)")
    return mode


def export(head_path: str | Path, out: str | Path, *, int8: bool = False,
           int8_mode: str | None = None, calib: Sequence[str | Path] | None = None,
           calib_count: int | None = None, opset: int = DEFAULT_OPSET,
           weights: str | None = None, reject: str | None = None,
           say: Callable[[str], None] | None = None,
           notice: Callable[[str], None] | None = None) -> ExportResult:
    """Write ``out`` (ONNX: backbone + head) and its sidecar (sidecar_path), each through a
    temporary file renamed into place once complete and checked, so an older export survives
    any failure. ``out`` or the sidecar being the head or the weights file is refused first
    (OutputError); a full or read-only disk ends in one line. ``reject`` (as `predict
    --reject`) adds the output ``unknown`` and label -1 for it. ``say``: progress lines;
    ``notice``: the backbone's notes (which entry of a finetune checkpoint), default ``say``.
    ``int8_mode``: static (the default with ``int8``) or dynamic; ``calib`` (calibration_paths) and ``calib_count``
    (default 64) only with static int8 (check_int8_options).

    Everything that can be refused from the arguments and the head file (options, the head's
    backbone: stacked or imported features, a missing weights file; calibration images not
    found) is refused before any work or output; ExportError (a UserError) with one line."""
    import onnx
    from onnx import compose

    out = Path(out)
    sidecar = sidecar_path(out)
    for what, path in (("--out", out), ("--out (its sidecar)", sidecar)):
        _io.check_output(path, [head_path, weights if weights not in ("bundled", "hub")
                                else None], flag=what, kind="an ONNX model",
                         example="model.onnx")
    if not 13 <= opset <= 20:
        raise ExportError(f"--opset {opset}: pass 13 to 20 (default {DEFAULT_OPSET})")
    int8_mode = check_int8_options(int8, int8_mode, calib, calib_count)
    from .extract.options import options_for_identity
    from .heads.reject import rule_for

    head = artifacts.load(head_path)
    refuse_uncalibrated(head)
    rule = rule_for(head.manifest, reject, str(head.path))
    # the backbone the head needs, from its manifest alone: a head on stacked stores or on
    # imported features (no backbone), or whose weights file moved, is refused here, before
    # the head's graph is built and checked (it once was after "ONNX equals ...")
    opts = options_for_identity(head.identity, weights=weights, what=str(head.path))
    calib_paths = (calibration_paths(head, calib, calib_count or DEFAULT_CALIB_COUNT,
                                     note=notice or say)
                   if int8 and int8_mode == "static" else None)
    name = str(head.manifest.get("head", "head"))
    dim = int(head.identity["feature_dim"])
    try:  # refuse unexportable heads before torch, naming the head file
        hg = head_graph(head.estimator, dim, opset, name, rule)
        err = check_head(hg, head.estimator, sample_features(head.estimator, dim), name, rule)
    except ExportError as e:
        from .heads.registry import ENSEMBLE_SEP

        vote = ENSEMBLE_SEP in name
        raise ExportError(f"{head.path}: {e}" + (
            "; a soft vote (`fit --head auto` on up to 5,000 rows, or `--head a+b`) exports "
            "when each member does: fit a vote of exportable heads, or one head, e.g. "
            "`embedpipe fit STORE --head logreg`" if vote else "")) from None
    if say:
        from .heads.compact import holds

        say(f"head {name}: ONNX equals predict_proba within {err:.1g} on 64 sample feature "
            "rows" + (
                " (on its own training rows a knn can differ more: their distance to "
                "themselves is a rounding error, which its distance weights enlarge)"
                if holds(head.estimator, "KNeighborsClassifier") else ""))
    notes = precision_notes(head.identity)
    if say:
        for note in notes:
            say(f"note: {note}")
    bb = _backbone(head, opts)
    tell = notice or say
    if tell:
        for note in bb.notes:  # e.g. which entry of a finetune checkpoint it used
            tell(note)
    bg = backbone_graph(bb, opset)
    hg.ir_version = bg.ir_version
    for imp in bg.opset_import:
        if imp.domain not in ("", "ai.onnx") and imp.domain not in {
                i.domain for i in hg.opset_import}:
            hg.opset_import.append(imp)
    for imp in hg.opset_import:
        if imp.domain not in {i.domain for i in bg.opset_import}:
            bg.opset_import.append(imp)
    model = compose.merge_models(bg, hg, io_map=[(FEATURES, FEATURES)],
                                 producer_name="embedpipe", producer_version=versions(*HEADS, "torch", "timm", "onnx", "onnxruntime", "skl2onnx")[
                                     "embedpipe"])
    seen: dict[str, int] = {}
    for imp in model.opset_import:  # merge_models may list a domain twice
        seen[imp.domain] = max(seen.get(imp.domain, 0), imp.version)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in seen.items())
    model.doc_string = (f"embedpipe {name} head on {bb.name}: {INPUT} (N x 3 x H x W float RGB "
                        f"in [0,1]) → {PROBS} (N x C), {LABEL} (N, class index)")
    onnx.checker.check_model(model)
    with _io.atomic_output(out) as tmp:  # renamed into place last, after the sidecar
        fp32_path = tmp if not int8 else _io.tmp_path(out, "fp32")
        try:
            onnx.save_model(model, str(fp32_path))
            precision = "fp32"
            if int8:
                images = (calibration_images(calib_paths, input_spec(bb.data_config),
                                             calib_count or DEFAULT_CALIB_COUNT)
                          if calib_paths is not None else None)
                if say and images is not None:
                    say(f"calibrating int8 ranges on {len(images)} images")
                precision = quantize(fp32_path, tmp, int8_mode, images,
                                     pre=_io.tmp_path(out, "pre"))
        finally:
            if int8:
                fp32_path.unlink(missing_ok=True)
        side = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "onnx": out.name, "precision": precision, "int8": int8,
            "opset": opset,
            "classes": head.classes,
            "input": input_spec(bb.data_config),
            "outputs": {PROBS: {"shape": ["N", len(head.classes)], "dtype": "float32",
                                "meaning": "class probabilities in the order of "
                                           "`classes` (the head's predict_proba)"},
                        LABEL: {"shape": ["N"], "dtype": "int64",
                                "meaning": "index into `classes` of the most probable class"
                                           + ("; -1 where `unknown`" if rule else "")},
                        **({UNKNOWN_OUT: {"shape": ["N"], "dtype": "bool",
                                          "meaning": "the head should not decide (--reject "
                                                     f"{rule.source})"}} if rule else {})},
            "reject": None if rule is None else rule.record(),
            "notes": notes,
            "head": name, "head_file": str(Path(head_path)),
            "manifest": head.manifest,
            "backbone": {"model": bb.name, "weights_source": bb.weights.describe(),
                         "weights_sha256": bb.weights.sha256, "pool": bb.pool,
                         "feature_dim": bb.feature_dim, "data_config": bb.data_config},
            "versions": versions(*HEADS, "torch", "timm", "onnx", "onnxruntime",
                                 "skl2onnx"),
        }
        _io.write_text(sidecar, json.dumps(side, indent=2, default=str) + "\n",
                       flag="--out (its sidecar)")
        size = tmp.stat().st_size
    return ExportResult(out, sidecar, name, int8, size, int8_mode, notes)


def precision_notes(identity: dict[str, Any]) -> list[str]:
    """Why the exported graph's probabilities may differ from `predict --store`: the head was
    fitted on (and the store holds) features computed in ``identity['precision']``; the graph's
    backbone computes fp32. Empty for fp32 stores (there they agree within ~1e-5)."""
    precision = str(identity.get("precision") or "")
    if not precision or precision.startswith("fp32"):
        return []
    return [f"the head's store holds {precision} features and the ONNX backbone computes fp32, "
            "so its probabilities can differ from `predict` on the store by a few hundredths "
            "(knn with distance weights most, up to 0.4 for an image that is in the store); "
            "for features the graph reproduces, extract with --precision fp32 and refit"]
