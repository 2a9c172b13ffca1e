"""Registry of classification heads: scikit-learn pipelines for cached embeddings (no torch).

Every head is a ``Pipeline`` whose last step is named ``clf``, preceded by the preprocessing that
suits it (``l2``: row L2 normalisation, ``scale``: standardisation, ``lda``: projection onto the
linear discriminants) and a ``pca`` step that is
``"passthrough"`` unless asked for (``pca=128`` keeps 128 components, ``pca=0.95`` keeps 95% of
the variance). Parameters are named the short way on the command line (``C=10``,
``n_neighbors=3``, ``pca=64``) and translated to pipeline names (``clf__C``) here, so the CLI,
``fit``, ``cv`` and the search all speak one language.

Only scikit-learn's own classes are used, so a fitted head can be saved with skops and loaded
without trusting any code of ours or anybody else's (see artifacts.py).
"""

from __future__ import annotations

import ast
import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from ..errors import UserError, first_line
from .compact import class_scores  # noqa: F401 - part of this module's API
from .compact import walk
from .mlp import MLPClassifier
from .transforms import SignedSqrt

PREPROCESSING = {"sqrt": "signed square root of each feature (power normalisation)",
                 "l2": "L2-normalise each row", "scale": "standardise each feature",
                 "lda": "project onto the classes' linear discriminants (classes - 1 "
                        "dimensions; within-class covariance shrunk by Ledoit-Wolf)"}
# ``--param prep=...``: the preprocessing before the (optional) PCA, replacing the head's own
PREP_CHOICES = {"sqrt+l2": ("sqrt", "l2"), "sqrt+scale": ("sqrt", "scale"),
                "sqrt+l2+lda": ("sqrt", "l2", "lda"), "sqrt+l2+scale": ("sqrt", "l2", "scale"),
                "sqrt": ("sqrt",), "l2": ("l2",), "scale": ("scale",),
                "l2+scale": ("l2", "scale"), "l2+lda": ("l2", "lda"), "none": ()}
# The lda step needs a within-class covariance it can invert: with 2 rows per class scikit-learn's
# eigen solver fails even with shrinkage (measured on Fashion-MNIST Lite0 features; 3 and more
# fit). Cross-validation inside fit and auto trains on 4/5 of the rows, so the heads whose default
# is lda switch to their earlier preprocessing below this many rows in the smallest class.
LDA_MIN_ROWS = 5


# While a block of many fits on the same rows runs (auto's selection, a grid search, cv and
# compare over several heads), pipelines with an lda step cache their fitted preprocessing on
# disk (joblib.Memory, scikit-learn's Pipeline(memory=...)): the lda step costs about 0.4-0.6 s
# per fit at 1280-d whatever the rows (scipy's eigh of a 1280 x 1280 matrix), and every grid
# point and every knn/centroid candidate refitted it on the same fold rows.
_LDA_CACHE: ContextVar[Any] = ContextVar("embedpipe_lda_cache", default=None)
# Above this many rows the cache is off: each cached fit writes its steps' outputs (rows x dim
# float32 for the l2 step) and the fitted lda (dim x dim float64, 13 MB at 1280-d), and the
# fit itself is a smaller share of a large fold's work.
LDA_CACHE_MAX_ROWS = 5000
LDA_CACHE_MIN_FREE = 2 << 30  # bytes free in the temporary directory, else no cache


@contextmanager
def lda_cache(rows: int) -> Iterator[None]:
    """Within this block (for ``rows`` training rows), pipelines that ``build`` makes with an
    lda step cache the fit of their preprocessing steps in a temporary directory
    (``embedpipe-lda-PID-…`` in the system's temporary directory, scratch_dir), deleted at the
    end; keyed by the step's parameters and the exact rows (joblib hashes), so a cached fit is
    only reused on identical input. It is only a speed-up: with too little free space there
    (LDA_CACHE_MIN_FREE) or no directory to be had, the block runs without it. Nested blocks
    share the outer cache. Estimators fitted inside must go through ``uncached`` before they
    leave."""
    if _LDA_CACHE.get() is not None or rows > LDA_CACHE_MAX_ROWS:
        yield
        return
    with scratch_dir("lda", LDA_CACHE_MIN_FREE) as d, using_lda_cache(d):
        yield


def lda_cache_location() -> str | None:
    """The directory of the active lda_cache, None outside one (a worker process takes it to
    share the cache: using_lda_cache)."""
    memory = _LDA_CACHE.get()
    return None if memory is None else str(memory.location)


@contextmanager
def using_lda_cache(location: str | None) -> Iterator[None]:
    """Within this block, pipelines that ``build`` makes with an lda step cache in the
    directory ``location`` (an lda_cache's, e.g. the caller's, in a worker process); nothing
    for None."""
    if location is None:
        yield
        return
    from joblib import Memory

    token = _LDA_CACHE.set(Memory(location, verbose=0))
    try:
        yield
    finally:
        _LDA_CACHE.reset(token)


_SCRATCH_KINDS = ("lda", "auto")  # embedpipe-KIND-PID-... directories (scratch_dir)


@contextmanager
def scratch_dir(kind: str, min_free: int = 0) -> Iterator[str | None]:
    """A temporary directory ``embedpipe-KIND-PID-…`` in the system's temporary directory
    (``kind``: one of _SCRATCH_KINDS), removed at the end of the block; None when there is
    none to be had (no directory, or less than ``min_free`` bytes free there). Directories of
    every kind left by processes that are gone (killed by SIGTERM or SIGKILL) are removed
    first."""
    import os
    import shutil
    import tempfile

    try:
        root = tempfile.gettempdir()
        _remove_orphans(root)
        if min_free and shutil.disk_usage(root).free < min_free:
            raise OSError("too little free space")
        d = tempfile.mkdtemp(prefix=f"embedpipe-{kind}-{os.getpid()}-", dir=root)
    except OSError:
        yield None
        return
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _remove_orphans(root: str) -> None:
    """Remove ``embedpipe-KIND-PID-*`` directories (scratch_dir) in ``root`` whose process is
    gone."""
    import os
    import shutil

    for entry in os.scandir(root):
        kind = next((k for k in _SCRATCH_KINDS if entry.name.startswith(f"embedpipe-{k}-")),
                    None)
        if kind is None or not entry.is_dir(follow_symlinks=False):
            continue
        pid = entry.name[len(f"embedpipe-{kind}-"):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # gone: its directory is an orphan
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:  # alive (another user's process, say): leave it
            pass


def cached(pipe: Pipeline) -> Pipeline:
    """``pipe`` caching its preprocessing in the active lda_cache when it has an lda step
    (``build`` does this for the pipelines it makes). Returns the same object."""
    if "lda" in pipe.named_steps:
        pipe.memory = _LDA_CACHE.get()
    return pipe


def uncached(estimator: Any) -> Any:
    """``estimator`` with every Pipeline inside it (members of an ensemble, calibrated clones
    included) set to ``memory=None``: a fitted head never refers to lda_cache's temporary
    directory. Returns the same object."""
    return walk(estimator, _uncache)


def _uncache(obj: Any) -> None:
    """A Pipeline without its cache directory (see uncached); anything else as it is."""
    if isinstance(obj, Pipeline):
        obj.memory = None


def as_saved(estimator: Any) -> Any:
    """``estimator`` uncached, with every fitted array inside it that is neither C- nor
    Fortran-contiguous (a strided view, e.g. PCA's ``components_``, a slice of the SVD's Vt)
    replaced by a C-contiguous copy, which is the layout a head file gives it when loaded
    (np.save writes such arrays in C order). The values are unchanged; float32 BLAS products
    depend on the layout (a PCA transform differed by 1.4e-6, which a kNN's distance weights on
    its own rows amplified past 1e-5), so the head predicts in memory exactly as when loaded.
    An ``lda`` step (eigen solver) keeps only what its transform reads: ``scalings_`` cut to
    its first ``_max_components`` columns (D x (classes - 1), as transform cuts its output) and
    no ``covariance_`` (D x D, read by no method after fit). Together they were two D x D
    float64 arrays: 26.8 MB of a 26.8 MB knn or centroid head on 200 rows of 1280-d features,
    269 MB at 4096-d. Transforms agree within float64 rounding (the same products, fewer
    columns: up to 3e-14 apart on small batches). A kNN's stored rows were transformed before
    this, so its own training rows, at a distance of 0 or of a rounding error from themselves,
    may score differently in the last digits: artifacts._probe_rows records a head's
    predictions on rows between training rows. Returns the same object."""
    import numpy as np

    def slim(obj: Any) -> None:
        if (isinstance(obj, LinearDiscriminantAnalysis) and obj.solver == "eigen"
                and hasattr(obj, "scalings_")):
            obj.scalings_ = np.ascontiguousarray(obj.scalings_[:, :obj._max_components])
            vars(obj).pop("covariance_", None)

    def contiguous(v: Any) -> Any:
        if isinstance(v, np.ndarray) and not (v.flags.c_contiguous or v.flags.f_contiguous):
            return np.ascontiguousarray(v)
        return v

    def visit(obj: Any) -> None:
        _uncache(obj)
        slim(obj)
        if isinstance(obj, list):
            obj[:] = [contiguous(v) for v in obj]
        elif isinstance(obj, dict):
            obj.update({k: contiguous(v) for k, v in obj.items()})
        elif type(obj).__module__.startswith("sklearn") and hasattr(obj, "__dict__"):
            vars(obj).update({k: contiguous(v) for k, v in vars(obj).items()})

    return walk(estimator, visit)


def lda_step() -> LinearDiscriminantAnalysis:
    """The ``lda`` preprocessing step: scikit-learn's LDA as a transformer (eigen solver, the
    one with both shrinkage and ``transform``; ``shrinkage="auto"``: Ledoit-Wolf)."""
    return LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto")


# each PREPROCESSING step's unfitted transformer; a pipeline has them in its prep's order
STEP_FACTORIES: dict[str, Callable[[], Any]] = {"sqrt": SignedSqrt, "l2": Normalizer,
                                                "scale": StandardScaler, "lda": lda_step}
assert set(STEP_FACTORIES) == set(PREPROCESSING)


class HeadError(UserError):
    """An unknown head, parameter or value; one line naming it and the fix."""


@dataclass(frozen=True)
class Head:
    name: str
    summary: str
    steps: tuple[str, ...]  # preprocessing before the (optional) PCA, from PREPROCESSING
    make: Callable[[int], Any]  # seed -> unfitted final estimator with the head's defaults
    grid: dict[str, list[Any]] = field(default_factory=dict)  # short names -> values
    # grid entries that replace ``grid``'s where the classifier's rows come out of that step
    # ("l2", "scale" or "lda": the last preprocessing step, so l2+scale takes "scale"'s): a C
    # that suits L2-normalised rows is 100-1000x one that suits standardised ones
    prep_grid: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    class_weight: bool = False  # accepts class_weight="balanced"
    native_proba: bool = True  # False: probabilities come from calibration (see artifacts)
    members: tuple[str, ...] = ()  # a soft-voting ensemble of these heads
    # fitted out of core: `fit`/`cv` stream the features from the store in chunks and call
    # partial_fit (see stream.py); max_iter is the number of epochs
    streaming: bool = False

    def searched(self) -> list[str]:
        """The short names of the parameters its grids search (``grid`` and ``prep_grid``)."""
        return list(dict.fromkeys([*self.grid, *(k for g in self.prep_grid.values() for k in g)]))

    def defaults(self) -> dict[str, Any]:
        """The final estimator's parameters that differ from scikit-learn's own defaults."""
        est = self.make(0)
        base = type(est)().get_params()
        return {k: v for k, v in est.get_params().items()
                if k != "random_state" and repr(v) != repr(base.get(k))}


# Every in-memory head power-normalises first (the signed square root, heads/transforms.py):
# test accuracy with vs without it, each head as `fit` fits it (bench/results/power_norm.md):
# Fashion-MNIST 3/10/50 per class (5 draws) +0.2 to +1.2 points for every head, 10k rows +0.85
# to +1.35 for logreg, linear-svm, knn, centroid and ridge (svm -0.2, mlp -0.3), 60k rows +0.3
# to +0.7 (svm 0.918 -> 0.922); the natural set (20 splits) svm/knn/centroid +0.4 to +1.1,
# logreg/linear-svm/ridge/mlp -0.1 to -0.7. The streamed heads too (sqrt+scale; below 500 rows
# per class their rule, sqrt+l2, see DATA_RULES): Fashion-MNIST 10k rows sgd +0.72 ± 0.19,
# logreg-sgd +0.77 ± 0.31; 60k rows +0.32 ± 0.09, +0.04 ± 0.02 points (3 seeds, paired,
# bench/results/sgd_large.md). The comments below measured the steps after it, before it was
# added.
HEADS: dict[str, Head] = {h.name: h for h in (
    # logreg and linear-svm: L2-normalised rows at every size measured, against standardised
    # features (their earlier defaults), test accuracy on bundled-Lite0 features
    # (bench/results/accuracy.md, bench/results/linear_prep.md). logreg C=10: Fashion-MNIST
    # 10/class 0.751 vs 0.725, 100/class 0.851 vs 0.834, 1,000/class 0.879 vs 0.842,
    # 6,000/class 0.901 vs 0.885 (fit 21 vs 31 CPU s). linear-svm C=1: 10/class 0.758 vs 0.726,
    # 100/class 0.853 vs 0.830, 1,000/class 0.880 in 3 s vs 0.855 in 21 s (C=0.01),
    # 6,000/class 0.899 in 31 s vs 0.898 in 131 s; natural set 0.859 vs 0.803.
    Head("logreg", "multinomial logistic regression on power- and L2-normalised rows (the "
         "linear probe)",
         ("sqrt", "l2"), lambda seed: LogisticRegression(C=10.0, max_iter=2000, random_state=seed),
         {"C": [1.0, 10.0, 100.0]}, class_weight=True,
         prep_grid={"scale": {"C": [0.01, 0.1, 1.0, 10.0]}}),
    # svm: L2-normalised rows, C=3, at every size measured (bench/results/sgd_small.md: mean
    # test accuracy over 20 random splits of the natural set / 5 draws of Fashion-MNIST at 10
    # and 50 per class, and the 10k/2k split): C=3 0.886 / 0.751 / 0.826 / 0.892, C=10 0.886 /
    # 0.753 / 0.825 / 0.884, C=1 0.872 / 0.748 / 0.817 / 0.882; standardised rows with C=10
    # (the default before, chosen on 10k rows) 0.792 / 0.613 / 0.779 / 0.872
    Head("svm", "RBF-kernel support vector machine on power- and L2-normalised rows",
         ("sqrt", "l2"), lambda seed: SVC(C=3.0, gamma="scale", random_state=seed),
         {"C": [1.0, 3.0, 10.0], "gamma": ["scale", 0.5, 2.0]},
         class_weight=True, native_proba=False,
         # on L2-normalised rows squared distances are 0-4 and gamma="scale" is about 1.2
         # (1280-d Lite0); on standardised rows it is about 1/1280, so that grid's gamma is
         # 1000x smaller (Fashion-MNIST 50/class on L2 rows, C=10: 0.783 at gamma 0.0002 vs
         # 0.829 at 2, 0.828 at "scale", 0.821 at 0.5)
         prep_grid={"scale": {"gamma": ["scale", 0.0002, 0.002]}}),
    Head("linear-svm", "linear support vector machine (one-vs-rest) on power- and "
         "L2-normalised rows",
         ("sqrt", "l2"), lambda seed: LinearSVC(C=1.0, max_iter=5000, random_state=seed),
         {"C": [0.1, 1.0, 10.0]}, class_weight=True, native_proba=False,
         # standardised rows: accuracy falls and liblinear's time grows with C (Fashion-MNIST
         # 10k rows: C=0.001 0.872 in 13-19 s, 0.01 0.855 in 23-26 s, 0.1 0.827 in 78-147 s,
         # 1 in 485 s), so that grid stays at small C
         prep_grid={"scale": {"C": [0.0001, 0.001, 0.01, 0.1]}}),
    # knn and centroid in the linear-discriminant space of L2-normalised rows (LDA as the
    # metric): mean test accuracy, 20 random 170/71 splits of the natural set (bench/
    # accuracy.py) and 3 draws of Fashion-MNIST at 5/10/50 per class, one run at 1,000/class:
    # knn (k=10) 0.882 vs 0.871 (cosine k=5 on raw rows, the earlier default), 0.729 vs 0.713,
    # 0.749 vs 0.724, 0.824 vs 0.789, 0.865 vs 0.856; centroid 0.883 vs 0.854, 0.729 vs 0.689,
    # 0.748 vs 0.737, 0.827 vs 0.795, 0.864 vs 0.808 (L2 + standardised, earlier). Nearest class
    # mean there is LDA's own decision rule with equal priors.
    Head("knn", "k nearest neighbours (brute force) in the linear-discriminant space of "
         "power- and L2-normalised rows",
         ("sqrt", "l2", "lda"), lambda seed: KNeighborsClassifier(n_neighbors=10, metric="euclidean",
                                                          algorithm="brute", weights="distance"),
         {"n_neighbors": [1, 5, 10, 20], "metric": ["cosine", "euclidean"],
          "weights": ["uniform", "distance"]},
         # in the discriminant space distances are euclidean (the space whitens the
         # within-class spread), so its grid keeps the metric euclidean: 8 fits per fold, not
         # 16 (the lda step itself is fitted once per fold: lda_cache)
         prep_grid={"lda": {"metric": ["euclidean"]}}),
    Head("ridge", "ridge regression classifier on power-normalised, standardised features",
         ("sqrt", "scale"), lambda seed: RidgeClassifier(alpha=100.0),
         {"alpha": [1.0, 10.0, 100.0, 1000.0]}, class_weight=True, native_proba=False),
    # NearestCentroid.predict_proba saturates (1.0 for nearly every row, right or wrong), so
    # its confidences come from calibrating its decision function like the SVMs'.
    Head("centroid", "nearest class mean in the linear-discriminant space of power- and "
         "L2-normalised rows", ("sqrt", "l2", "lda"), lambda seed: NearestCentroid(),
         {"shrink_threshold": [None, 0.1, 0.3]}, native_proba=False),
    # L2-normalised rows, not standardised: Fashion-MNIST 10/class 0.754 vs 0.721 (3 draws),
    # 50/class 0.827 vs 0.813, 1,000/class 0.875 vs 0.861; natural set 0.877 vs 0.866
    Head("mlp", "small multi-layer perceptron (one hidden layer, early stopping) on "
         "power- and L2-normalised rows",
         ("sqrt", "l2"), lambda seed: MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3,
                                                early_stopping=True, max_iter=300,
                                                random_state=seed),
         {"alpha": [1e-4, 1e-3, 1e-2], "hidden_layer_sizes": [(256,), (512,)]}),
    # Out of core: averaged SGD, max_iter epochs over chunks streamed from the store (5 epochs
    # score like logreg on 10k Fashion-MNIST Lite0 features; see README "Stores larger than
    # memory").
    Head("sgd", "linear SVM (hinge loss) by stochastic gradient descent on power-normalised, "
         "standardised features, streamed from the store in chunks: for stores larger than "
         "memory",
         ("sqrt", "scale"), lambda seed: SGDClassifier(loss="hinge", alpha=1e-4, max_iter=5,
                                                       average=True, random_state=seed),
         {"alpha": [1e-5, 1e-4, 1e-3, 1e-2], "loss": ["hinge", "modified_huber"]},
         class_weight=True, native_proba=False, streaming=True),
    Head("logreg-sgd", "logistic regression by stochastic gradient descent on "
         "power-normalised, standardised features, streamed from the store in chunks: for "
         "stores larger than memory",
         ("sqrt", "scale"), lambda seed: SGDClassifier(loss="log_loss", alpha=1e-4,
                                                       max_iter=5, average=True,
                                                       random_state=seed),
         {"alpha": [1e-5, 1e-4, 1e-3, 1e-2]}, class_weight=True, streaming=True),
)}


ENSEMBLE_SEP = "+"
ENSEMBLE_CALIBRATION_FOLDS = 3


def _not_a_pipeline(seed: int) -> Any:
    raise HeadError("--head auto chooses a head by cross-validation (heads/auto.py); it has no "
                    "pipeline of its own: pass a named head to build one")


# not in HEADS (it is not one pipeline): `fit`/`cv --head auto` hand it to heads/auto.py
AUTO = Head("auto", "choose the head, its parameters and preprocessing by cross-validation on "
            "the training rows within --budget seconds: up to 5,000 rows the soft vote of every "
            "head's defaults, above it the best configuration (or a soft-voting ensemble when "
            "it beats its best member)", (), _not_a_pipeline)


# Defaults that depend on the data (rows per class of the smallest class, feature dimension):
# head -> [(applies(rows_per_class, dim), short params, the rule in words)], first match wins.
# Measured on bundled-Lite0 features, test accuracy (bench/results/accuracy.md): on Fashion-MNIST
# with 5/10/20/50/100 train rows per class (1,000 test rows) and the 8-class natural set
# (bench/natural.py), L2-normalised rows beat standardised ones for every head below at every
# size, by 1-2 points for the linear heads and up to 20 for the RBF SVM (5/class: 0.716 vs
# 0.520); an MLP without early stopping (which holds out 10% of few rows) by 1-19 points.
# For logreg and linear-svm L2-normalised rows also win on large stores, so it is their registry
# default (above); the other heads' registry defaults stay the choice for large stores (chosen
# on 10k rows, bench/results/heads.md).
SMALL_DATA_ROWS = 500


def _small(rows_per_class: int, dim: int) -> bool:
    return rows_per_class < SMALL_DATA_ROWS


LARGE_DATA_ROWS = 1000


def _large(rows_per_class: int, dim: int) -> bool:
    return rows_per_class >= LARGE_DATA_ROWS


def _too_few_for_lda(rows_per_class: int, dim: int) -> bool:
    return rows_per_class < LDA_MIN_ROWS


_SMALL = f"fewer than {SMALL_DATA_ROWS} training rows in the smallest class"
_LARGE = f"{LARGE_DATA_ROWS:,} or more training rows in every class"
_FEW = (f"fewer than {LDA_MIN_ROWS} training rows in the smallest class (too few for the "
        "lda step)")
DATA_RULES: dict[str, list[tuple[Callable[[int, int], bool], dict[str, Any], str]]] = {
    "knn": [(_too_few_for_lda, {"prep": "none", "metric": "cosine", "n_neighbors": 5},
             f"{_FEW}: cosine distance on the rows as they are, k=5"),
            # more neighbours once every class has many rows (bench/results/knn_k.md: Fashion-
            # MNIST, 10k test rows, k=10/20: 1,000/class 0.873/0.874, 2,000 0.880/0.882, 6,000
            # 0.886/0.888; from 50 to 500/class k=20 is within 0.2 points of k=10, 3 draws)
            (_large, {"n_neighbors": 20},
             f"{_LARGE}: k=20 (Fashion-MNIST 6,000/class 0.888 vs 0.886 at k=10, 2,000/class "
             "0.882 vs 0.880)")],
    "centroid": [(_too_few_for_lda, {"prep": "sqrt+l2+scale"},
                  f"{_FEW}: power- and L2-normalised, standardised rows (Fashion-MNIST 3 "
                  "per class, 5 draws: 0.691 vs 0.614 without the square root, "
                  "bench/results/power_norm.md)")],
    "ridge": [(_small, {"prep": "sqrt+l2", "alpha": 1.0},
               f"{_SMALL}: power- and L2-normalised rows, alpha=1 (L2 rows alone: Fashion-MNIST "
               "10/class 0.757 vs 0.707 standardised, 100/class 0.851 vs 0.824)")],
    # streamed heads on small stores: 5 epochs of averaged SGD over a few hundred standardised
    # rows undertrain; L2-normalised rows and 20 epochs (mean test accuracy, 20 random splits
    # of the natural set / 5 draws of Fashion-MNIST at 10 and 50 per class, bench/sgd_small.py)
    # (the square root in front, as the in-memory heads': natural set +0.00 / +0.00, Fashion-
    # MNIST 10/class +0.31 ± 0.26 / +0.96 ± 0.26, 50/class +0.27 ± 0.25 / +0.66 ± 0.15 points
    # for sgd / logreg-sgd, same splits, scratch run of 2026-12-01)
    "sgd": [(_small, {"prep": "sqrt+l2", "max_iter": 20},
             f"{_SMALL}: power- and L2-normalised rows, 20 epochs (L2 rows alone: natural set "
             "0.869 vs 0.849, Fashion-MNIST 10/class 0.734 vs 0.735, 50/class 0.823 vs "
             "0.798 against standardised rows and 5 epochs)")],
    "logreg-sgd": [(_small, {"prep": "sqrt+l2", "max_iter": 20},
                    f"{_SMALL}: power- and L2-normalised rows, 20 epochs (L2 rows alone: "
                    "natural set 0.875 vs 0.842, Fashion-MNIST 10/class 0.751 vs 0.736, "
                    "50/class 0.821 vs 0.794 against standardised rows and 5 epochs)")],
    "mlp": [(_small, {"early_stopping": False},
             f"{_SMALL}: no early stopping, which would hold out 10% of the few rows "
             "(Fashion-MNIST 10/class 0.718 vs 0.531, 100/class 0.844 vs 0.830; natural set "
             "0.845 vs 0.803)")],
}


def data_params(name: str, rows_per_class: int, dim: int) -> dict[str, Any]:
    """The parameters (short names) head ``name`` takes by default on data whose smallest class
    has ``rows_per_class`` training rows of ``dim`` features (DATA_RULES; {} when no rule)."""
    for applies, params, _ in DATA_RULES.get(name, []):
        if applies(rows_per_class, dim):
            return dict(params)
    return {}


def with_data_defaults(name: str, params: dict[str, Any] | None, y: Any,
                       dim: int) -> dict[str, Any]:
    """``params`` over the head's data-dependent defaults for labels ``y`` (N) and ``dim``: what
    a fit on that data uses; the user's parameters win.

    A rule that sets ``prep`` is one whole: its other parameters were chosen for that
    preprocessing (knn's cosine k=5 for unprocessed rows), so when the user's ``prep`` is
    another one, none of the rule applies and the head's registry defaults go with the
    user's preprocessing (knn ``prep=l2+lda``: euclidean, k=10)."""
    given = dict(params or {})
    if name == AUTO.name or ENSEMBLE_SEP in name or name not in DATA_RULES:
        return given
    return _over_rule(data_params(name, *data_of(y, dim)), given)


def without_sqrt(prep: Any) -> str:
    """A prep choice's name without the power normalisation in front: 'sqrt+l2' → 'l2',
    'sqrt' → 'none'."""
    steps = [s for s in str(prep).split("+") if s not in ("sqrt", "none")]
    return "+".join(steps) or "none"


def _over_rule(rule: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The user's parameters ``given`` over a data rule's (with_data_defaults: a rule that sets
    ``prep`` is dropped whole when ``given`` sets another prep). A prep that differs from the
    rule's only by the square root in front (``prep=l2`` against ridge's small-data
    ``sqrt+l2``, ``sqrt+l2`` against sgd's ``l2``) is the same rows for the rule's other
    parameters: they stay (ridge's alpha=1, sgd's 20 epochs), with the user's prep."""
    if ("prep" in rule and "prep" in given and given["prep"] != rule["prep"]
            and without_sqrt(given["prep"]) != without_sqrt(rule["prep"])):
        rule = {}
    return {**rule, **given}


def data_of(y: Any, dim: int) -> tuple[int, int]:
    """(training rows of the smallest class in labels ``y``, ``dim``): what DATA_RULES read."""
    import numpy as np

    _, counts = np.unique(np.asarray(y), return_counts=True)
    return (int(counts.min()) if len(counts) else 0, int(dim))


def streaming_names() -> str:
    """The streaming heads (they read the store in chunks), as a refusal names them: 'sgd or
    logreg-sgd'."""
    return " or ".join(h.name for h in HEADS.values() if h.streaming)


def get(name: str) -> Head:
    """A registered head, ``auto``, or the soft-voting ensemble ``a+b+…`` of registered heads."""
    if name == AUTO.name:
        return AUTO
    if ENSEMBLE_SEP in name:
        return _ensemble(name)
    try:
        return HEADS[name]
    except KeyError:
        raise HeadError(f"--head {name}: unknown head; pass one of {', '.join(HEADS)}, or "
                        "several joined by + for an ensemble (see `embedpipe heads`)") from None


def _ensemble(name: str) -> Head:
    names = [n.strip() for n in name.split(ENSEMBLE_SEP)]
    if len(names) < 2 or len(set(names)) != len(names) or not all(names):
        raise HeadError(f"--head {name}: an ensemble joins two or more different heads with +, "
                        "e.g. svm+logreg+knn")
    if AUTO.name in names:
        raise HeadError(f"--head {name}: auto already tries ensembles; pass --head auto alone")
    specs = [get(n) for n in names]
    return Head(ENSEMBLE_SEP.join(names),
                f"soft-voting ensemble of {', '.join(names)} (mean of their probabilities)",
                (), lambda seed: _voting(specs, seed, None),
                class_weight=any(h.class_weight for h in specs), members=tuple(names))


def _voting(specs: list[Head], seed: int, class_weight: str | None,
            data: tuple[int, int] | None = None,
            given: dict[str, dict[str, Any]] | None = None) -> Any:
    """Members with their defaults (with ``data``, (rows per class of the smallest class,
    feature dimension), their defaults for that data: DATA_RULES, as when fitted alone) under
    the parameters ``given`` to each (``{member: short params}``, member_params); those
    without native probabilities are calibrated by temperature scaling on
    ENSEMBLE_CALIBRATION_FOLDS-fold CV of the ensemble's training data, so every vote is a
    probability."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import VotingClassifier

    members = []
    for h in specs:
        own = (given or {}).get(h.name, {})
        params = _over_rule(data_params(h.name, *data), own) if data else own
        est: Any = build(h.name, params or None, member=True,
                         class_weight=class_weight if h.class_weight else None, seed=seed,
                         prefix=f"{h.name}{MEMBER_SEP}")
        if not h.native_proba:
            est = CalibratedClassifierCV(est, method="temperature", ensemble=False,
                                         cv=ENSEMBLE_CALIBRATION_FOLDS)
        members.append((h.name, est))
    return VotingClassifier(members, voting="soft")


def vote_calibration(estimator: Any) -> str:
    """What the probabilities of a soft-voting head (a Pipeline ending in a VotingClassifier:
    ``_voting``'s or auto's vote) are, for its manifest's ``calibration``: the weighted mean of
    its members' probabilities, each member's named as native (its own predict_proba) or
    temperature-scaled on k-fold CV or, on many rows, on a held-out sample (as fitted, after
    fewshot.adapt)."""
    from . import fewshot

    vote = _pipeline(estimator).steps[-1][1]
    members = []
    fitted = getattr(vote, "named_estimators_", {})
    for name, est in vote.estimators:
        cv = getattr(est, "cv", None)
        held = getattr(cv, "test_size", None)  # fewshot.holdout on many rows
        refit = getattr(fitted.get(name), fewshot.REFIT_HELD_OUT, None)  # calibration.fit
        then = ""
        if refit is not None:
            held, then = refit, " then refitted on all"
        members.append(f"{name} native" if cv is None
                       else f"{name} temperature-scaled on {held:,} held-out rows{then}"
                       if held is not None else f"{name} temperature-scaled ({cv}-fold CV)")
    weights = ("equal weights" if vote.weights is None
               else "weights " + ", ".join(f"{w:g}" for w in vote.weights))
    return f"soft vote ({weights}) of its members' probabilities: {', '.join(members)}"


MEMBER_SEP = ":"  # --param MEMBER:NAME=VALUE sets NAME on one member of an ensemble
# an ensemble's own parameters (a plain NAME=VALUE of these is not passed to its members): the
# PCA before the vote and the VotingClassifier's voting and weights (knn's own weights is
# knn:weights); scikit-learn paths (knn__clf__weights) are its own too
ENSEMBLE_OWN = ("pca", "voting", "weights")


def param_names(head: Head) -> list[str]:
    """The short parameter names a single head takes: pca, prep and its final estimator's."""
    return ["pca", "prep", *(k for k in head.make(0).get_params()
                             if k != "memory" and not k.endswith("__memory"))]


def _shown(names: list[str]) -> str:
    names = sorted(names, key=lambda n: (n.count("__"), n))
    return ", ".join(names[:16]) + (f" (and {len(names) - 16} more)" if len(names) > 16 else "")


def member_params(head: Head,
                  params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """An ensemble's ``--param`` items split into its own (ENSEMBLE_OWN and scikit-learn paths
    such as ``knn__clf__n_neighbors``) and each member's: ``MEMBER:NAME`` sets NAME on that
    member; a plain ``NAME`` goes to every member that takes it (``prep``, the preprocessing of
    each member's own pipeline, to all of them); ``MEMBER:NAME`` wins over a plain ``NAME``.
    Returns (own, {member: short params}). Raises HeadError naming the members when MEMBER is
    not one, the member's parameters when it has no NAME, and the ways to set one when no
    member has a plain NAME."""
    own: dict[str, Any] = {}
    per: dict[str, dict[str, Any]] = {m: {} for m in head.members}
    specific: list[tuple[str, str, Any]] = []
    for key, value in params.items():
        member, sep, name = key.partition(MEMBER_SEP)
        member, name = member.strip(), name.strip()
        if sep:
            if member not in head.members:
                raise HeadError(f"--param {key}: {member} is not a member of {head.name}; pass "
                                f"MEMBER{MEMBER_SEP}NAME=VALUE with MEMBER one of "
                                f"{', '.join(head.members)}")
            if name not in param_names(get(member)):
                raise HeadError(f"--param {key}: the member {member} has no parameter {name}; "
                                f"pass one of {_shown(param_names(get(member)))}")
            specific.append((member, name, value))
        elif key in ENSEMBLE_OWN or "__" in key:
            own[key] = value
        else:
            takers = [m for m in head.members if key in param_names(get(m))]
            if not takers:
                raise HeadError(f"--param {key}: no member of {head.name} has a parameter "
                                f"{key}; pass a member's parameter (see `embedpipe heads`), as "
                                f"MEMBER{MEMBER_SEP}NAME=VALUE for one member (e.g. "
                                f"{head.members[0]}{MEMBER_SEP}NAME=VALUE), or one of the "
                                f"ensemble's own: {', '.join(ENSEMBLE_OWN)}")
            for m in takers:
                per[m][key] = value
    for m, name, value in specific:
        per[m][name] = value
    return own, per


def own_params(name: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """``params`` for fitting head ``name`` alone, ``HEAD:NAME`` written as ``NAME`` where HEAD
    is ``name`` (cv takes ``--param HEAD:NAME=VALUE`` for one of several heads; ``fit`` takes
    it too). An ensemble keeps ``MEMBER:NAME`` for member_params. Raises HeadError when HEAD is
    another head: it is not the one being fitted."""
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        prefix, sep, rest = key.partition(MEMBER_SEP)
        prefix, rest = prefix.strip(), rest.strip()
        if not sep or (ENSEMBLE_SEP in name and prefix != name):
            out[key] = value
        elif prefix == name:
            out[rest] = value
        elif name == AUTO.name:
            raise HeadError(f"--param {key}={_text(value)}: {prefix} is not the head being "
                            f"fitted (auto, which chooses the parameters itself); pass --head "
                            f"{prefix} to fit {prefix} with {rest}={_text(value)}")
        else:
            raise HeadError(f"--param {key}={_text(value)}: {prefix} is not the head being "
                            f"fitted ({name}); pass --param {rest}={_text(value)} to set it on "
                            f"{name}, or --head {prefix} to fit {prefix}")
    return out


def parse_value(text: str) -> Any:
    """'10' → 10, '0.5' → 0.5, 'inf' → inf, 'none' → None, 'true' → True, '256,128' →
    (256, 128), else str."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low.lstrip("+-") in ("inf", "infinity", "nan"):  # scikit-learn's ranges name inf
        return float(low)
    if low in ("true", "false"):
        return low == "true"
    try:
        v = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()
    return tuple(v) if isinstance(v, list) else v


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["C=10", "pca=64"]`` → ``{"C": 10, "pca": 64}``. ``prep`` and ``MEMBER:prep`` keep
    their text, lowercased and unquoted (``prep=none`` is "no preprocessing", not "the head's
    own"; the API writes ``prep='l2'``)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise HeadError(f"--param {item}: write NAME=VALUE, e.g. --param C=10")
        key = key.strip()
        if key.rpartition(MEMBER_SEP)[2].strip() == "prep":
            text = value.strip()
            if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
                text = text[1:-1].strip()
            out[key] = text.lower()
        else:
            out[key] = parse_value(value)
    return out


def _pca(value: Any, seed: int, prefix: str = "") -> Any:
    if value in (None, 0, False, "none"):
        return "passthrough"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
            isinstance(value, float) and value >= 1):
        raise HeadError(f"--param {prefix}pca={value}: pass a number of components (e.g. 128) or a "
                        "variance fraction in (0, 1) (e.g. 0.95), or none")
    return PCA(n_components=value, random_state=seed)


def prep_steps(head: Head, value: Any = None, prefix: str = "") -> tuple[str, ...]:
    """The preprocessing steps (names from PREPROCESSING) for ``prep=value``, or the head's own
    when ``value`` is None; none for an ensemble, whose members each have their own (a ``prep``
    given to it goes to them: member_params). ``prefix`` ('knn:') leads the parameter's name in
    the HeadError raised for an unknown value."""
    if value is None or head.members:
        return head.steps
    try:
        return PREP_CHOICES[str(value)]
    except KeyError:
        raise HeadError(f"--param {prefix}prep={value}: pass {prefix}prep= one of "
                        f"{', '.join(PREP_CHOICES)}") from None


def pipeline_params(head: Head, params: dict[str, Any], seed: int,
                    prefix: str = "") -> dict[str, Any]:
    """Short parameter names → pipeline names, validated against the final estimator
    (``prep`` is taken by ``build``: it chooses the steps, not a parameter of one). ``prefix``
    ('knn:', as --param names a member's parameter) leads the names in a HeadError."""
    if head.members:  # its members' short parameters are set by build (member_params)
        params = member_params(head, params)[0]
    # an ensemble's members are Pipelines: their ``memory`` is lda_cache's, not a parameter
    valid = {k: v for k, v in head.make(seed).get_params().items()
             if k != "memory" and not k.endswith("__memory")}
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == "prep":
            continue
        if key == "pca":
            out["pca"] = _pca(value, seed, prefix)
        elif head.members and key in ("voting", "weights"):
            out[f"clf__{key}"] = _vote_setting(head, key, value)
        elif key in valid:
            out[f"clf__{key}"] = value
        else:
            raise HeadError(f"--param {prefix}{key}: {head.name} has no such parameter; pass "
                            f"one of {_shown(['pca', 'prep', *valid])}")
    return out


def _vote_setting(head: Head, key: str, value: Any) -> Any:
    """An ensemble's ``voting`` (soft only: every output of a head is a probability) or
    ``weights`` (one non-negative number per member, not all 0), checked; HeadError if not."""
    if key == "voting":
        if value != "soft":
            raise HeadError(f"--param voting={value}: {head.name} votes with its members' "
                            "probabilities (soft), which predict, reject and export need; "
                            "leave voting out")
        return value
    values = value if isinstance(value, (list, tuple)) else (value,)
    n = len(head.members)
    if (len(values) != n or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                    and math.isfinite(v) and v >= 0 for v in values)
            or not sum(values) > 0):
        given = ",".join(map(str, values))
        # not numbers: perhaps meant for a member's own weights (knn: uniform or distance)
        takers = [m for m in head.members if "weights" in param_names(get(m))]
        member = ("" if not takers or all(isinstance(v, (int, float)) for v in values) else
                  "; to set a member's own weights, pass " + " or ".join(
                      f"--param {m}{MEMBER_SEP}weights={given}" for m in takers))
        raise HeadError(f"--param weights={given}: the vote's weights: pass {n} non-negative "
                        f"numbers, not all 0, one per member of {head.name} in that order "
                        f"(e.g. weights={','.join(['1'] * n)}){member}")
    return [float(v) for v in values]


def build(name: str, params: dict[str, Any] | None = None, *, class_weight: str | None = None,
          seed: int = 0, data: tuple[int, int] | None = None, member: bool = False,
          prefix: str = "") -> Pipeline:
    """An unfitted pipeline for head ``name`` with its defaults, overridden by ``params``.
    ``data`` (rows per class of the smallest class, feature dimension; see ``data_of``) gives
    an ensemble's members their defaults for that data (DATA_RULES), as each has when fitted
    alone; a single head takes its data defaults through ``params`` (with_data_defaults).
    An ensemble's ``params`` may set its members' (``knn:weights``, or a plain name for every
    member that has it: member_params). ``member``: built as an ensemble's member, fitted in
    memory inside the vote even when it is a streaming head (refuse_conflicts). ``prefix`` leads
    every parameter a HeadError names, as --param takes it there: 'knn:' for an ensemble's
    member (build gives it to its members), 'logreg:' for one of cv's heads. Raises HeadError
    on an unknown name, a bad value or a combination scikit-learn would refuse."""
    head = get(name)
    prep = prep_steps(head, (params or {}).get("prep"), prefix)
    steps: list[tuple[str, Any]] = [(step, STEP_FACTORIES[step]()) for step in prep]
    if head.members:  # each member has its own preprocessing; class weights go to them
        if class_weight not in (None, "balanced"):
            raise HeadError(f"--class-weight {class_weight}: pass balanced (or leave it out)")
        final = _voting([get(m) for m in head.members], seed, class_weight, data,
                        member_params(head, params or {})[1])
        class_weight = None
    else:
        final = head.make(seed)
    steps += [("pca", "passthrough"), ("clf", final)]
    pipe = cached(Pipeline(steps))
    if class_weight is not None:
        if class_weight != "balanced":
            raise HeadError(f"--class-weight {class_weight}: pass balanced (or leave it out)")
        if not head.class_weight:
            able = ", ".join(h.name for h in HEADS.values() if h.class_weight)
            raise HeadError(f"--class-weight balanced: the {name} head does not take class "
                            f"weights; use one of {able}, or leave it out")
        pipe.set_params(clf__class_weight="balanced")
    algorithm = (params or {}).get("algorithm")
    if head.name == "knn" and algorithm not in (None, "brute"):
        # kd_tree/ball_tree (and auto, which may pick them) store a KDTree/BallTree, whose raw
        # index arrays skops does not trust (read without bounds checks, like its Tree): no
        # head file could hold them safely, so `predict` would refuse what `fit` wrote.
        raise HeadError(f"--param {prefix}algorithm={algorithm}: the knn head searches by "
                        "brute force only (a KDTree or BallTree cannot be saved in a safe head "
                        f"file); leave {prefix}algorithm out (brute)")
    try:
        pipe.set_params(**pipeline_params(head, params or {}, seed, prefix))
        for _, step in pipe.steps:  # bad values (C=abc, C=-1) fail now, not inside a fit
            check = getattr(step, "_validate_params", None)  # scikit-learn >= 1.2
            if check is not None:
                check()
    except (ValueError, TypeError) as e:
        raise HeadError(_bad_value(name, params or {}, first_line(e), prefix)) from None
    if not head.members:  # an ensemble's members were checked as they were built
        refuse_conflicts(head, pipe.steps[-1][1], params or {}, streamed=head.streaming and
                         not member, prefix=prefix)
    return pipe


def _bad_value(name: str, params: dict[str, Any], text: str, prefix: str) -> str:
    """The line for a --param value scikit-learn's parameter constraints refuse (``text``: its
    first line, "The 'C' parameter of SVC must be ... Got -1 instead."), naming the parameter
    as --param takes it (``prefix``: 'knn:' for a member) when the text names one given."""
    import re

    found = re.search(r"The '(\w+)' parameter", text)
    key = found.group(1) if found else None
    if key in params:
        return (f"--param {prefix}{key}={_text(params[key])}: {name}: {text} (see "
                "`embedpipe heads`)")
    return f"--param for {name}: {text} (see `embedpipe heads`)"


# Settings that scikit-learn refuses only inside ``fit``: combinations of parameters (its
# parameter constraints, which build checks first, take one parameter at a time). Found by
# sweeping every head's parameters one --param at a time over the values scikit-learn 1.9
# allows, then the pairs (and a few triples) that are combined in practice (logreg's
# penalty/solver/l1_ratio/dual/C, linear-svm's penalty/loss/dual, sgd's loss/penalty/
# learning_rate/l1_ratio, mlp's solver/learning_rate/early_stopping, knn's metric/algorithm/p,
# centroid's metric/shrink_threshold; tests/test_heads.py keeps both sweeps). By class name: a
# function of the estimator's get_params, the number of classes (None: not known yet) and
# ``q``, which writes a parameter's name as --param takes it ('logreg:solver' for an ensemble's
# member), giving (the parameters involved, why they cannot be fitted as set, with the fix),
# or None. refuse_conflicts turns one into a line naming the --param values, before any work.
_Reason = tuple[tuple[str, ...], str] | None
_Name = Callable[[str], str]


def _logreg_penalty(g: dict[str, Any]) -> str | None:
    """LogisticRegression's penalty as scikit-learn 1.8+ derives it: from ``l1_ratio`` (0: l2,
    1: l1, between: elasticnet) and ``C`` (inf: none), unless the deprecated ``penalty`` is
    set."""
    if g.get("penalty", "deprecated") != "deprecated":
        return g["penalty"]
    if g.get("C") == math.inf:
        return None
    ratio = g.get("l1_ratio")
    return "l2" if ratio in (0, None) else "l1" if ratio == 1 else "elasticnet"


def _logreg(g: dict[str, Any], classes: int | None, q: _Name) -> _Reason:
    solver, penalty = g.get("solver"), _logreg_penalty(g)
    if penalty == "elasticnet" and solver != "saga":
        return ("l1_ratio", "penalty", "solver"), (
            f"an elasticnet penalty (0 < l1_ratio < 1) is fitted by solver saga only, and the "
            f"solver is {solver}; add --param {q('solver')}=saga (or pass {q('l1_ratio')}=0, "
            "the l2 penalty)")
    if penalty == "elasticnet" and g.get("l1_ratio") is None:
        return ("penalty", "l1_ratio"), (
            f"the elasticnet penalty mixes l1 and l2 by l1_ratio, which is none; pass "
            f"{q('l1_ratio')}=0.5 (a number in (0, 1)) and leave {q('penalty')} out")
    if penalty == "l1" and solver not in ("saga", "liblinear"):
        return ("l1_ratio", "penalty", "solver"), (
            f"the l1 penalty (l1_ratio=1) is fitted by solver saga or liblinear only, and the "
            f"solver is {solver}; add --param {q('solver')}=saga")
    if g.get("dual") and solver != "liblinear":
        return ("dual", "solver"), (
            f"dual=True is solved by solver liblinear only (two classes), and the solver is "
            f"{solver}; leave {q('dual')} out (false)")
    if solver == "liblinear" and penalty is None:
        return ("solver", "C", "penalty"), (
            f"solver liblinear needs a penalty, and C=inf turns it off; pass a finite "
            f"{q('C')} (10: logreg's own), or leave {q('solver')} out (lbfgs)")
    if solver in ("sag", "saga") and penalty is None and g.get("l1_ratio") is None:
        return ("l1_ratio", "C", "solver"), (
            f"solver {solver} with C=inf (no penalty) still reads l1_ratio, which is none; "
            f"pass {q('l1_ratio')}=0 (logreg's own), or a finite {q('C')}")
    if solver == "liblinear" and classes is not None and classes > 2:
        return ("solver",), (
            f"solver liblinear fits two classes only, and the training rows have {classes}; "
            f"leave {q('solver')} out (lbfgs), or pass {q('solver')}=saga")
    return None


def _linear_svm(g: dict[str, Any], classes: int | None, q: _Name) -> _Reason:
    penalty, loss, dual = g.get("penalty"), g.get("loss"), g.get("dual")
    if penalty == "l1" and loss == "hinge":
        return ("penalty", "loss"), (
            f"liblinear has no l1 penalty with the hinge loss; pass {q('loss')}=squared_hinge "
            f"(the head's own) with {q('penalty')}=l1, or {q('penalty')}=l2 with "
            f"{q('loss')}=hinge")
    if penalty == "l1" and dual is True:
        return ("penalty", "dual"), (f"the l1 penalty is solved in the primal only; pass "
                                     f"{q('dual')}=false (or auto)")
    if loss == "hinge" and dual is False:
        return ("loss", "dual"), (f"the hinge loss is solved in the dual only; pass "
                                  f"{q('dual')}=true (or auto)")
    return None


def _svm(g: dict[str, Any], classes: int | None, q: _Name) -> _Reason:
    if g.get("kernel") == "precomputed":
        return ("kernel",), ("it is fitted on feature rows, not on a precomputed kernel "
                             f"matrix; pass {q('kernel')}=rbf (its own), linear, poly or sigmoid")
    return None


def _knn(g: dict[str, Any], classes: int | None, q: _Name) -> _Reason:
    from sklearn.neighbors import VALID_METRICS

    metric = g.get("metric")
    if metric == "precomputed":
        return ("metric",), ("it is fitted on feature rows, not on a precomputed distance "
                             f"matrix; pass {q('metric')}=euclidean (its own), cosine or "
                             "minkowski")
    if isinstance(metric, str) and metric not in VALID_METRICS["brute"]:
        return ("metric",), (
            f"its brute-force search has no metric {metric}; pass {q('metric')}=euclidean (its "
            "own), cosine, manhattan, minkowski or another of scikit-learn's "
            "VALID_METRICS['brute']")
    if metric == "minkowski" and g.get("p") is None:
        return ("p", "metric"), (
            f"the minkowski distance needs its power p, which is none; pass {q('p')}=2 "
            f"(euclidean) or {q('p')}=1 (manhattan)")
    return None


def _ridge(g: dict[str, Any], classes: int | None, q: _Name) -> _Reason:
    solver, positive = g.get("solver"), g.get("positive")
    if solver == "lbfgs" and not positive:
        return ("solver", "positive"), (
            f"solver lbfgs fits positive coefficients only (positive=True); add --param "
            f"{q('positive')}=true, or leave {q('solver')} out (auto)")
    if positive and solver not in ("auto", "lbfgs"):
        return ("positive", "solver"), (
            f"positive=True is fitted by solver lbfgs only, and the solver is {solver}; leave "
            f"{q('solver')} out (auto picks lbfgs)")
    return None


def _mlp(g: dict[str, Any], classes: int | None, q: _Name) -> _Reason:
    if g.get("early_stopping") and not g.get("validation_fraction"):
        return ("validation_fraction", "early_stopping"), (
            "early stopping holds out validation_fraction of the training rows, and 0 holds "
            f"out none; pass {q('validation_fraction')}= a fraction in (0, 1) such as 0.1 (the "
            f"default), or {q('early_stopping')}=false")
    return None


def _sgd(g: dict[str, Any], classes: int | None, q: _Name) -> _Reason:
    rate = g.get("learning_rate")
    if rate == "optimal" and not g.get("alpha"):
        return ("alpha", "learning_rate"), (
            "learning_rate=optimal takes its step size from alpha (1 / (alpha * t)), so alpha "
            f"must be above 0; pass {q('alpha')}=0.0001 (the head's own), or "
            f"{q('learning_rate')}=constant")
    if rate in ("pa1", "pa2") and g.get("loss") != "hinge":
        return ("learning_rate", "loss"), (
            f"learning_rate={rate} (passive-aggressive) works with loss=hinge only, and the "
            f"loss is {g.get('loss')}; leave {q('learning_rate')} out (optimal)")
    if g.get("penalty") == "elasticnet" and g.get("l1_ratio") is None:
        return ("penalty", "l1_ratio"), (
            "the elasticnet penalty mixes l1 and l2 by l1_ratio, which is none; pass "
            f"{q('l1_ratio')}=0.15 (scikit-learn's default) or another number in [0, 1]")
    return None


_CONFLICTS: dict[str, Callable[[dict[str, Any], int | None, _Name], _Reason]] = {
    "LogisticRegression": _logreg, "LinearSVC": _linear_svm, "SVC": _svm,
    "KNeighborsClassifier": _knn, "RidgeClassifier": _ridge, "MLPClassifier": _mlp,
    "SGDClassifier": _sgd,
}


def refuse_conflicts(head: Head, final: Any, params: dict[str, Any],
                     classes: int | None = None, *, streamed: bool = False,
                     prefix: str = "") -> None:
    """Raise HeadError when ``final`` (head ``head``'s unfitted final estimator, set from
    ``params``: short names) holds a combination of settings that scikit-learn would refuse
    inside ``fit`` (_CONFLICTS), or one it refuses for ``classes`` classes (liblinear: two);
    the line names the --param values involved, why, and the fix, every parameter led by
    ``prefix`` as --param takes it ('logreg:' for an ensemble's member or one of cv's heads).
    ``streamed``: the head is fitted chunk by chunk with partial_fit (a streaming head alone,
    not an ensemble's member), which refuses early stopping."""
    got = final.get_params(deep=False)
    why = _CONFLICTS.get(type(final).__name__)

    def q(key: str) -> str:
        return f"{prefix}{key}"

    found = why(got, classes, q) if why is not None else None
    if found is None and streamed and got.get("early_stopping"):
        found = ("early_stopping",), (
            "a streaming head is fitted chunk by chunk (partial_fit), which holds out no "
            f"validation rows; leave {q('early_stopping')} out (max_iter sets the epochs)")
    if found is None:
        return
    keys, reason = found
    named = [f"{q(k)}={_text(params.get(k, got.get(k)))}" for k in keys if k in params] or \
        [f"{q(k)}={_text(got.get(k))}" for k in keys[:1]]
    raise HeadError(f"--param {' '.join(named)}: {head.name}: {reason}")


def check_for_data(name: str, params: dict[str, Any] | None, y: Any, dim: int,
                   seed: int = 0, *, qualified: bool = False) -> None:
    """refuse_conflicts for head ``name`` fitted on labels ``y`` (N) of ``dim`` features, as
    fit builds it there (its data defaults applied; an ensemble: each member): the refusals
    that depend on the number of classes (liblinear's two). The parameters are named as
    --param takes them: ``MEMBER:NAME`` for an ensemble's member, and with ``qualified``
    ``HEAD:NAME`` for a single head too (cv and compare). Raises HeadError; nothing for
    auto."""
    import numpy as np

    if name == AUTO.name:
        return
    classes = len(np.unique(np.asarray(y)))
    for head, final, given, member in _finals(name, params or {}, y, dim, seed):
        refuse_conflicts(head, final, given, classes, streamed=head.streaming and not member,
                         prefix=f"{head.name}{MEMBER_SEP}" if member or qualified else "")


def _finals(name: str, params: dict[str, Any], y: Any, dim: int,
            seed: int) -> list[tuple[Head, Any, dict[str, Any], bool]]:
    """The final estimators of head ``name`` as fit builds it on labels ``y`` (N) of ``dim``
    features (its data defaults applied), each as (its head, the unfitted estimator, the
    parameters given to it from ``params``, whether it is an ensemble's member): one for a
    head, one per member for an ensemble (member_params splits ``params``)."""
    pipe = build(name, with_data_defaults(name, params, y, dim), seed=seed,
                 data=data_of(y, dim))
    final = pipe.steps[-1][1]
    head = get(name)
    if not head.members:
        return [(head, final, params, False)]
    given = member_params(head, params)[1]
    return [(get(member), _pipeline(est).steps[-1][1], given.get(member, {}), True)
            for member, est in final.estimators]


def check_searchable(name: str) -> None:
    """``--search`` needs a grid: an ensemble has none of its own (each member has its own,
    searched alone), and ``auto`` searches by itself (its candidates are heads, their
    parameters and preprocessing, scored by its own cross-validation). Raises HeadError with
    the ways to get a searched vote, or to search one head."""
    if name == AUTO.name:
        raise HeadError("--search: --head auto already searches (it chooses the head, its "
                        "parameters and preprocessing by its own cross-validation); drop "
                        "--search, or search one head's grid with --head svm --search")
    head = get(name)
    if head.members:
        first = head.members[0]
        raise HeadError(f"--search: {name} is an ensemble, which has no grid of its own; "
                        f"search each member alone (`embedpipe fit STORE --head {first} "
                        f"--search`) and pass what it chose as --param "
                        f"{first}{MEMBER_SEP}NAME=VALUE, "
                        "or use --head auto, which searches the heads and votes the best ones")


def param_grid(name: str, fixed: dict[str, Any] | None = None, *,
               seed: int = 0, prep: str | None = None) -> dict[str, list[Any]]:
    """The head's search grid in pipeline names, leaving out what the user fixed; with
    ``prep`` (the rows' preprocessing, a ``--param prep`` value; None: the head's own) the
    ``prep_grid`` entries of its last step."""
    head = get(name)
    steps = prep_steps(head, prep)
    grid = {**head.grid, **head.prep_grid.get(steps[-1] if steps else "none", {})}
    grid = {k: v for k, v in grid.items() if k not in (fixed or {})}
    out: dict[str, list[Any]] = {}
    for key, values in grid.items():
        if key == "pca":
            out["pca"] = [_pca(v, seed) for v in values]
        else:
            out[f"clf__{key}"] = list(values)
    return out


def short_params(params: dict[str, Any]) -> dict[str, Any]:
    """Pipeline names back to short ones for reports (``clf__C`` → ``C``; PCA → its size)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == "pca":
            out["pca"] = None if value == "passthrough" else value.n_components
        else:
            out[key.removeprefix("clf__")] = value
    return out


def fitted_params(name: str, params: dict[str, Any], estimator: Any, *,
                  class_weight: str | None = None, seed: int = 0,
                  data: tuple[int, int] | None = None) -> dict[str, Any]:
    """``params`` (short names) as head ``name`` was fitted from them into ``estimator`` (its
    Pipeline, calibrated or not, fitted in memory): every setting that differs from the
    pipeline ``build`` makes of ``params`` (what fewshot.adapt lowered for the data: the lda
    step off, n_neighbors, early stopping, an ensemble member's calibration folds) replaces or
    joins the requested values, so the fit summary and the head's manifest name what was
    fitted, not what was asked for. A top-level preprocessing step turned off becomes the
    ``prep`` of the steps left."""
    pipe = _pipeline(estimator)
    if pipe is None:
        return dict(params)
    built = build(name, params, class_weight=class_weight, seed=seed, data=data)
    want, got = built.get_params(), pipe.get_params()
    out = dict(params)
    prep = [step for step, obj in built.steps[:-1] if step in PREPROCESSING]
    kept = tuple(step for step in prep if got.get(step) != "passthrough")
    if kept != tuple(prep):
        out["prep"] = "+".join(kept) or "none"  # PREP_CHOICES' names
    for key, value in got.items():
        if (key.startswith("clf__") and _recordable(value) and not key.endswith("__ensemble")
                and repr(value) != repr(want.get(key))):  # ensemble: holdout's, as cv
            out[key.removeprefix("clf__")] = value
    return out


def _recordable(value: Any) -> bool:
    """A setting fitted_params may record: plain data that a manifest, a JSON report and
    ``--param`` can hold (numbers, text, booleans, None, and lists, tuples and dicts of them).
    Not an estimator, nor a splitter object such as the held-out sample a calibration uses on
    many rows (fewshot.holdout), which the manifest's ``calibration`` words describe instead
    (a ``cv --json`` report of such a vote raised 'not JSON serializable' after its run)."""
    import numbers

    if isinstance(value, (list, tuple)):
        return all(_recordable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _recordable(v) for k, v in value.items())
    return value is None or isinstance(value, (str, bool, numbers.Number))


def effective_params(name: str, estimator: Any) -> dict[str, Any]:
    """The key parameters (short names) of head ``name`` as they are set in ``estimator`` (its
    Pipeline, fitted or about to be: calibrated, frozen or streamable), whether they came from
    the user, the head's defaults, its data rules or fewshot.adapt: ``prep`` (the preprocessing
    steps left on, a PREP_CHOICES name), then the classifier's parameters that the head sets
    (Head.defaults) or searches (its grids), then any other parameter that differs from the
    head's own (``tol``...), and ``pca`` when on; a parameter the estimator does not use
    (_used) or leaves off (None, scikit-learn's default too: _off) is left out. For an
    ensemble: ``{member: its key parameters}``, preceded by ``pca`` when a PCA runs before the vote. What the fit summary,
    the head's manifest (``effective_params``) and the cv/compare reports show: what was
    fitted, defaults included."""
    pipe = _pipeline(estimator)
    head = get(name)
    if pipe is None:
        return {}
    final = pipe.steps[-1][1]
    pca = pipe.named_steps.get("pca", "passthrough")
    if head.members and hasattr(final, "estimators"):
        return {**({} if pca == "passthrough" else {"pca": pca.n_components}),
                **{member: effective_params(member, est) for member, est in final.estimators}}
    steps = tuple(step for step, obj in pipe.steps[:-1]
                  if step in PREPROCESSING and obj != "passthrough")
    out: dict[str, Any] = {"prep": next((k for k, v in PREP_CHOICES.items() if v == steps),
                                        "+".join(steps))}
    got = final.get_params(deep=False)
    own = head.make(0).get_params(deep=False)
    keys = [*head.defaults(), *head.searched()]
    keys += [k for k in got if k not in ("random_state", "class_weight") and _plain(got[k])
             and repr(got[k]) != repr(own.get(k))]
    base = type(final)().get_params(deep=False)
    out.update({k: got[k] for k in dict.fromkeys(keys)
                if k in got and _used(final, k, got) and not _off(k, got, base)})
    if isinstance(got.get("class_weight"), str):  # --class-weight, when the head takes it
        out["class_weight"] = got["class_weight"]  # (streaming heads hold it per class)
    if pca != "passthrough":
        out["pca"] = pca.n_components
    return out


# Parameters that the final estimator ignores unless another is set so (scikit-learn's docs:
# "only used when ..."): effective_params leaves them out otherwise, so that a report never
# shows a setting that does nothing (knn's p with the euclidean or cosine metric), and
# unused_notes names the ones the user gave. By class name: parameter -> (the parameter that
# governs it, whether it is used given the estimator's parameters, a value of the governing
# parameter that uses it: the fix the note names).
_Rule = tuple[str, Callable[[dict[str, Any]], bool], str]
_SVC_KERNEL: dict[str, _Rule] = {
    "gamma": ("kernel", lambda g: g.get("kernel") in ("rbf", "poly", "sigmoid"), "rbf"),
    "degree": ("kernel", lambda g: g.get("kernel") == "poly", "poly"),
    "coef0": ("kernel", lambda g: g.get("kernel") in ("poly", "sigmoid"), "poly")}
_USED_WHEN: dict[str, dict[str, _Rule]] = {
    "KNeighborsClassifier": {"p": ("metric", lambda g: g.get("metric") == "minkowski",
                                   "minkowski")},
    "SVC": _SVC_KERNEL,
    "MLPClassifier": {
        **{k: ("solver", lambda g: g.get("solver") == "sgd", "sgd")
           for k in ("momentum", "nesterovs_momentum", "learning_rate", "power_t")},
        **{k: ("solver", lambda g: g.get("solver") == "adam", "adam")
           for k in ("beta_1", "beta_2", "epsilon")},
        **{k: ("solver", lambda g: g.get("solver") in ("sgd", "adam"), "adam")
           for k in ("learning_rate_init", "shuffle", "n_iter_no_change", "batch_size")},
        "max_fun": ("solver", lambda g: g.get("solver") == "lbfgs", "lbfgs"),
        "validation_fraction": ("early_stopping", lambda g: bool(g.get("early_stopping")),
                                "true")},
    "SGDClassifier": {
        "epsilon": ("loss", lambda g: g.get("loss") in (
            "huber", "epsilon_insensitive", "squared_epsilon_insensitive"), "huber"),
        "power_t": ("learning_rate", lambda g: g.get("learning_rate") == "invscaling",
                    "invscaling"),
        "eta0": ("learning_rate", lambda g: g.get("learning_rate") != "optimal", "constant"),
        "l1_ratio": ("penalty", lambda g: g.get("penalty") == "elasticnet", "elasticnet"),
        "validation_fraction": ("early_stopping", lambda g: bool(g.get("early_stopping")),
                                "true")},
}


def _off(key: str, params: dict[str, Any], base: dict[str, Any]) -> bool:
    """Whether parameter ``key`` is None in ``params`` (an estimator's get_params) where
    scikit-learn's default (``base``: the class's own get_params) is None too: a setting left
    off (NearestCentroid's shrink_threshold, no shrinkage), which effective_params leaves out
    as it leaves out the unused ones (_used)."""
    return params.get(key) is None and key in base and base[key] is None


def _used(estimator: Any, key: str, params: dict[str, Any]) -> bool:
    """Whether ``estimator`` (``params``: its get_params) uses parameter ``key`` (_USED_WHEN)."""
    rule = _USED_WHEN.get(type(estimator).__name__, {}).get(key)
    return rule is None or rule[1](params)


def unused_notes(name: str, params: dict[str, Any] | None, y: Any, dim: int,
                 seed: int = 0, *, qualified: bool = False) -> list[str]:
    """One note per parameter the user gave (``params``, short names as ``--param`` takes them:
    an ensemble's ``MEMBER:NAME`` or plain names, member_params) that head ``name`` would ignore
    when fitted on labels ``y`` (N) of ``dim`` features (its data defaults applied, as fit
    applies them): scikit-learn uses it only when another parameter is set so (_USED_WHEN), and
    effective_params leaves it out of the reports. Each note names the parameter, the setting
    that makes it do nothing and the fix, e.g. 'p=1 does nothing with metric=euclidean; pass
    --param metric=minkowski to use it' ('knn:p=1 ...' for a member, and with ``qualified``
    for a single head too: cv and compare, where --param HEAD:NAME=VALUE picks the head).
    [] for auto."""
    if not params or name == AUTO.name:
        return []
    return [n for head, final, given, member in _finals(name, params, y, dim, seed)
            for n in _unused(final, given, f"{head.name}{MEMBER_SEP}"
                             if member or qualified else "")]


def _unused(final: Any, given: dict[str, Any], prefix: str) -> list[str]:
    """unused_notes for one final estimator and the parameters ``given`` to it; ``prefix``
    ('knn:' for an ensemble's member) leads every parameter named."""
    got = final.get_params(deep=False)
    rules = _USED_WHEN.get(type(final).__name__, {})
    out = []
    for key, value in given.items():
        if key not in rules or _used(final, key, got):
            continue
        governs, _, fix = rules[key]
        out.append(f"{prefix}{key}={_text(value)} does nothing with "
                   f"{prefix}{governs}={_text(got.get(governs))}; pass "
                   f"--param {prefix}{governs}={fix} to use it")
    return out


def format_params(params: dict[str, Any]) -> str:
    """``{"prep": "l2", "C": 3.0}`` → 'prep=l2 C=3'; an ensemble's ``{member: params}`` →
    'svm: prep=l2 C=3; logreg: ...', led by its own settings (``{"pca": 20, ...}`` →
    'pca=20; svm: ...'); '-' when empty."""
    members = {k: v for k, v in params.items() if isinstance(v, dict)}
    own = " ".join(f"{k}={_text(v)}" for k, v in params.items() if k not in members)
    if members:
        return "; ".join([own] * bool(own) + [f"{k}: {format_params(v)}"
                                               for k, v in members.items()])
    return own or "-"


def _text(x: Any) -> str:
    """A parameter value as the reports write it: 3.0 → '3', (256, 128) → '256,128'."""
    if isinstance(x, (list, tuple)):
        return ",".join(_text(i) for i in x)
    return f"{x:g}" if isinstance(x, float) else str(x)


def _pipeline(estimator: Any) -> Any:
    """The Pipeline inside ``estimator`` (calibrated, frozen: unwrapped), or None."""
    while estimator is not None and not hasattr(estimator, "steps"):
        estimator = getattr(estimator, "estimator", None)
    return estimator


def _plain(value: Any) -> bool:
    """A parameter value that is no estimator and holds none (numbers, text, tuples...)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return not hasattr(value, "get_params")


def _calibration_words(h: Head) -> str:
    """How `fit` calibrates head ``h`` (one without native probabilities), for `heads`."""
    from . import fewshot
    from .train import CALIBRATION_FOLDS, CALIBRATION_FRACTION

    if h.streaming:
        return (f"calibrated (temperature scaling on about {CALIBRATION_FRACTION:.0%} of the "
                "rows, held out)")
    return (f"calibrated (temperature scaling on {CALIBRATION_FOLDS}-fold CV; above "
            f"{fewshot.REFIT_ABOVE:,} rows on a held-out fifth, then refitted on all rows, 2 "
            f"fits instead of {CALIBRATION_FOLDS + 1}; above {fewshot.HOLDOUT_ABOVE:,} rows on "
            f"{fewshot.HOLDOUT_ROWS:,} held-out rows, one fit; those two where every class has "
            f"{fewshot.HOLDOUT_MIN_CLASS} rows)")


def describe() -> list[dict[str, Any]]:
    """One row per head: name, summary, preprocessing, defaults, grid, class weights, proba."""
    return [{"head": h.name, "summary": h.summary,
             "preprocessing": [PREPROCESSING[s] for s in h.steps],
             "defaults": {k: v for k, v in h.defaults().items()},
             "grid": {k: list(v) for k, v in h.grid.items()},
             "prep_grid": {p: {k: list(v) for k, v in g.items()} for p, g in h.prep_grid.items()},
             "class_weight": h.class_weight,
             "probabilities": "native" if h.native_proba else _calibration_words(h),
             "streaming": h.streaming,
             "data_rules": [{"params": p, "rule": text} for _, p, text in DATA_RULES.get(h.name, [])]}
            for h in HEADS.values()]
