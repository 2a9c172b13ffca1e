"""The Python API: ``extract``, ``fit``, ``cv``, ``load_head`` and their result types.

Each function is a thin wrapper over exactly what the command line runs (``run_extract`` for
``embedpipe extract``, ``heads.train.fit`` for ``embedpipe fit``, ``evaluate.cv.run_cv`` for
``embedpipe cv``), so a script and a shell get the same behaviour, resumability and errors.
Differences are those of a library: progress is off unless ``progress=True``, errors are raised
(subclasses of :class:`embedpipe.EmbedpipeError`, never ``SystemExit``), and results are
objects instead of printed lines.

Importing this module imports nothing heavy: numpy, h5py, scikit-learn and torch are imported
by the functions that need them, when they are called.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

from . import DEFAULT_MODEL
from .errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from .extract.options import ExtractOptions, Summary
    from .heads.artifacts import HeadFile
    from .store.read import FeatureStore

#: Where ``extract`` (and ``embedpipe extract``) put a store when no ``out`` is given,
#: relative to the working directory: ``cache/<data>__<model>__<weights>.h5``.
CACHE_DIR = Path("cache")

PathLike = Union[str, "os.PathLike[str]"]
#: A store argument: a path, several paths (stacked side by side, see ``embedpipe.store.stack``)
#: or a store object returned by ``open_store``/``extract``.
StoreLike = Union[PathLike, Sequence[PathLike], "FeatureStore"]

ENGINES = ("in-process", "ray")


class ApiError(UserError):
    """A bad argument to a library function; the message names it and the fix."""


# -- extract ---------------------------------------------------------------------------------

def extract_options(model: str = DEFAULT_MODEL, weights: str | None = None,
                    **options: Any) -> ExtractOptions:
    """``ExtractOptions`` from keyword arguments named like ``embedpipe extract``'s options
    (``--img-size`` is ``img_size``, ``--batch-size`` is ``batch_size``, ...).

    Raises ApiError for a name that is not an option of ``extract``."""
    from dataclasses import fields

    from .extract.options import ExtractOptions

    known = {f.name for f in fields(ExtractOptions)} - {"model", "weights"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ApiError(f"extract: unknown option {', '.join(unknown)}; pass any of "
                       f"{', '.join(sorted(known))} (see `embedpipe extract --help`)")
    return ExtractOptions(model=model, weights=weights, **options)


def run_extract(source: PathLike, out: PathLike, opts: ExtractOptions, *,
                engine: str = "in-process", address: str | None = None,
                workers: int | None = None, gpus_per_worker: float = 0.0,
                progress: bool = False,
                notice: Callable[[str], None] | None = None) -> Summary:
    """Run one extraction of ``source`` into the store ``out`` on ``engine`` and return its
    ``Summary`` (counts, skipped files, seconds, device, precision). ``embedpipe extract`` and
    :func:`extract` both call this. ``notice``: a callable given each line the user should see
    even without progress (which entry of a finetune checkpoint the weights are: the CLI prints
    it); default: shown with the progress, so nothing by default.

    ``engine``: ``in-process`` (a DataLoader and one model in this process) or ``ray``
    (decoding as Ray tasks, the backbone on a pool of Ray actors; needs the ``ray`` extra).
    Raises ExtractError for a bad engine or engine option, a missing Ray, and any error of the
    runners (StoreError, DataError, WeightsError, ...)."""
    from .errors import RAY_MISSING
    from .extract.options import ExtractError

    if engine not in ENGINES:
        raise ExtractError(f"--engine {engine}: pass in-process (the default) or ray")
    if engine == "ray":
        try:  # before torch is imported: a missing extra fails fast
            import ray  # noqa: F401
        except ImportError:
            raise ExtractError(RAY_MISSING) from None
        from .extract.ray import run as run_ray

        return run_ray(Path(source), Path(out), opts, address=address, workers=workers,
                       gpus_per_worker=gpus_per_worker, progress=progress, notice=notice)
    if address is not None or gpus_per_worker:
        raise ExtractError("--address and --num-gpus-per-worker go with --engine ray; add "
                           "--engine ray or drop them")
    from .extract.local import run as run_local

    return run_local(Path(source), Path(out), opts, progress=progress, notice=notice)


def extract(source: PathLike, out: PathLike | None = None, *, model: str = DEFAULT_MODEL,
            weights: str | None = None, progress: bool = False, engine: str = "in-process",
            address: str | None = None, num_gpus_per_worker: float = 0.0,
            **options: Any) -> FeatureStore:
    """Extract pooled backbone features of every image under ``source`` into an HDF5 store
    and return it opened (``embedpipe extract SOURCE -o OUT``; resumable and incremental: a
    rerun extracts only new or changed files).

    ``source``: an image folder (class folders, split/class folders or unlabeled) or a CSV
    manifest (``path,label[,split]``). ``out``: the store to create or extend (default
    ``cache/<data>__<model>__<weights>.h5`` under the working directory). ``model``: any timm
    model name (default EfficientNet-Lite0 with its bundled offline ImageNet weights);
    ``weights``: a weight file path, ``"bundled"`` or ``"hub"``. ``options``: the other
    options of ``embedpipe extract`` by their Python names (``pool``, ``img_size``,
    ``crop_pct``, ``device``, ``precision``, ``dtype``, ``batch_size``, ``workers``,
    ``layout``, ``exact_decode``, ``max_pixels``, ``prune``, ``shard``, ``tta``, ``compile``,
    ``random_init``). ``progress``: show a progress bar on stderr (off by default).

    Returns the store (``features``: N×D float32, or float16 with ``dtype="float16"``;
    ``labels``: N int64 indices into ``classes``, −1 unlabeled; ``paths``; ``splits``;
    ``provenance``); files that could not be decoded are in ``errors`` as (path, reason).

    Raises ApiError (unknown option), ExtractError, DataError, WeightsError, StoreError (all
    EmbedpipeError); KeyboardInterrupt after committing every finished batch when interrupted
    (call again to continue). Changed-but-undecodable and vanished files give a
    ``UserWarning`` unless ``prune=True`` (which removes their rows)."""
    from .extract.options import default_store_path
    from .store.read import open_store

    opts = extract_options(model, weights, **options)
    dest = Path(out) if out is not None else default_store_path(Path(source), opts, CACHE_DIR)
    summary = run_extract(source, dest, opts, engine=engine, address=address,
                          workers=opts.workers, gpus_per_worker=num_gpus_per_worker,
                          progress=progress)
    if summary.interrupted:
        raise KeyboardInterrupt
    if summary.stale and not summary.pruned:
        warnings.warn(f"{len(summary.stale)} files changed and no longer decode; their rows "
                      "still hold the old features (pass prune=True to remove them)",
                      UserWarning, stacklevel=2)
    if summary.all_vanished:
        warnings.warn(f"none of the {len(summary.vanished)} stored files is in {source} (e.g. "
                      f"{summary.vanished[0]}): another dataset, or the images moved; their rows "
                      "are kept", UserWarning, stacklevel=2)
    elif summary.vanished and not summary.pruned:
        warnings.warn(f"{len(summary.vanished)} stored files are gone from {source} (e.g. "
                      f"{summary.vanished[0]}); pass prune=True to remove their rows",
                      UserWarning, stacklevel=2)
    return open_store(dest)


# -- heads -----------------------------------------------------------------------------------

def _store_paths(store: StoreLike) -> list[Path]:
    """The store file(s) behind a store argument (stacked stores: each, in order)."""
    from .store.read import FeatureStore

    if isinstance(store, FeatureStore):
        if "stores" in store.meta:  # stacked by store.stack: its members
            return [Path(p) for p in store.meta["stores"]]
        return [store.path]
    if isinstance(store, (str, os.PathLike)):
        return [Path(store)]
    if isinstance(store, Sequence) and store and all(isinstance(p, (str, os.PathLike))
                                                     for p in store):
        return [Path(p) for p in store]
    raise ApiError(f"store {type(store).__name__}: pass a store path, a list of store paths "
                   "or a store from embedpipe.open_store / embedpipe.extract")


def _from_pandas(X: Any) -> Any:
    """A pandas DataFrame or Series of features as a float32 array (n, D), or ``X`` as it is
    when it is neither. A DataFrame with a ``features`` column (the layout `embedpipe
    export-features` writes: one array per row) gives that column stacked; any other DataFrame
    its numeric columns in their order (column names are not matched to features: a store's
    features have no names), nullable dtypes (Float64, Int64) with missing values as NaN,
    refused below. A Series of equal-length arrays is stacked. Raises PredictError naming
    non-numeric columns or ragged rows."""
    import numpy as np

    from .errors import first_line
    from .predict import PredictError

    def stacked(values: Any, what: str) -> Any:
        rows, shape = [], None
        for i, v in enumerate(values):
            try:
                if v is None or np.ndim(v) == 0:  # None, NaN, pd.NA, a pyarrow null, 3.0
                    raise ValueError("a missing value or a single number")
                a = np.asarray(v)
                if a.dtype.kind not in "biuf":
                    raise ValueError(f"dtype {a.dtype}")
                a = a.astype(np.float32)
            except (ValueError, TypeError) as e:
                raise PredictError(f"X's {what}: row {i} is not a numeric array "
                                   f"({first_line(e, 100)}); pass one array of D features per "
                                   "row") from None
            if shape is None:
                shape = a.shape
            elif a.shape != shape:
                raise PredictError(f"X's {what}: row {i} has shape {a.shape}, row 0 {shape}; "
                                   "pass one array of D features per row") from None
            rows.append(a)
        return np.stack(rows) if rows else []  # no rows: no predictions

    kind = type(X).__name__
    if kind == "DataFrame":
        twice = sorted({str(c) for c in X.columns[X.columns.duplicated()]})
        if twice:
            raise PredictError(f"X (DataFrame) has columns named more than once "
                               f"({', '.join(twice[:4])}); give each column one name")
        if "features" in X.columns and getattr(X["features"].dtype, "kind", "O") not in "biuf":
            # export-features' layout: object arrays, or pyarrow lists (dtype_backend="pyarrow")
            return stacked(X["features"], "'features' column")
        # numeric: numpy's and pandas' nullable kinds (Float64 'f', Int64 'i', boolean 'b');
        # not complex, timedelta or datetime values, whose cast would drop or invent values
        other = [str(c) for c, t in X.dtypes.items()
                 if getattr(t, "kind", "O") not in "biuf"]
        if other:
            shown = ", ".join(other[:4]) + (f" and {len(other) - 4} more" if len(other) > 4
                                            else "")
            raise PredictError(f"X (DataFrame) has non-numeric columns ({shown}); pass the "
                               "feature columns only, e.g. X.drop(columns=[...]), or a "
                               "'features' column of arrays as export-features writes")
        if not len(X):
            return []
        with np.errstate(over="ignore"):  # beyond float32: inf, refused as non-finite
            return np.ascontiguousarray(X.to_numpy(dtype=np.float32, na_value=np.nan))
    if kind == "Series" and getattr(X.dtype, "kind", "O") not in "biuf":
        return stacked(X, "Series")
    return X


class Head:
    """A fitted head: a scikit-learn pipeline on stored features plus its manifest.

    ``classes_``: the class names (str ndarray, shape (C,)), in the column order of
    ``predict_proba``. ``manifest``: what ``embedpipe fit`` records (head, parameters,
    calibration, the store identity it was trained on, per-class training counts, library
    versions). ``estimator``: the fitted scikit-learn object. ``path``: the head file, or None
    for a head not saved yet (see ``save``)."""

    def __init__(self, head_file: HeadFile, *, saved: bool = True,
                 data: bytes | None = None):
        self._file = head_file
        self._saved = saved
        self._data = data  # the head file's bytes, for a head fitted without ``out``

    @property
    def path(self) -> Path | None:
        return self._file.path if self._saved else None

    @property
    def manifest(self) -> dict[str, Any]:
        return self._file.manifest

    @property
    def estimator(self) -> Any:
        return self._file.estimator

    @property
    def classes_(self) -> np.ndarray:
        import numpy as np

        return np.asarray(self._file.classes, dtype=str)

    @property
    def feature_dim(self) -> int:
        """Columns the head expects (the feature_dim of the store it was fitted on)."""
        return int(self._file.identity.get("feature_dim") or 0)

    def __repr__(self) -> str:
        where = self.path or "not saved"
        return (f"Head({self.manifest.get('head')!r}, classes={len(self._file.classes)}, "
                f"feature_dim={self.feature_dim}, path={str(where)!r})")

    def save(self, path: PathLike) -> Path:
        """Write the head file (a skops archive, loaded with ``load_head``; `embedpipe predict`
        and `serve` take it too). Returns the path. Raises ApiError when it cannot be
        written."""
        import shutil

        dest = Path(path)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if self._data is not None:
                tmp.write_bytes(self._data)
            else:
                shutil.copyfile(self._file.path, tmp)
            os.replace(tmp, dest)
        except OSError as e:
            raise ApiError(f"{dest}: cannot write the head file ({e.strerror or e}); pass a "
                           "writable path") from None
        finally:
            if tmp.exists():
                tmp.unlink()
        return dest

    def _features(self, X_or_store: Any) -> np.ndarray:
        """A float32 (n, D) matrix from an array or a store (checked against the head)."""
        import numpy as np

        from .errors import first_line
        from .heads import artifacts
        from .predict import PredictError
        from .store.read import FeatureStore, open_stores

        if isinstance(X_or_store, (list, tuple)) and not X_or_store:  # no rows: no answers
            return np.zeros((0, self.feature_dim), np.float32)
        if all(hasattr(X_or_store, a) for a in ("detach", "cpu", "device")):  # a torch tensor
            if getattr(X_or_store.device, "type", "") == "meta":
                raise PredictError("X is a tensor on the meta device, which holds no values: "
                                   "pass the features themselves")
            t = X_or_store.detach().cpu()
            if t.is_complex():
                raise PredictError(f"X is a complex tensor ({t.dtype}); a head scores real "
                                   "features: pass the features themselves")
            if not t.is_floating_point() or t.element_size() < 4:
                t = t.float()  # bf16/fp16 (numpy has no bf16), ints
            X_or_store = t.numpy()
        if type(X_or_store).__module__.startswith("scipy.sparse"):  # a sparse matrix/array
            X_or_store = X_or_store.toarray()  # checked and cast below, as any array
        if type(X_or_store).__module__.split(".")[0] == "pandas":
            X_or_store = _from_pandas(X_or_store)
            if isinstance(X_or_store, list):  # no rows
                return np.zeros((0, self.feature_dim), np.float32)
        rows = (isinstance(X_or_store, Sequence) and not isinstance(X_or_store, str)
                and len(X_or_store) and not isinstance(X_or_store[0], (str, os.PathLike)))
        if rows or (not isinstance(X_or_store, (np.ndarray, FeatureStore, str, os.PathLike,
                                                Sequence))
                    and hasattr(X_or_store, "__array__")):  # rows, a DataFrame
            try:
                X_or_store = np.asarray(X_or_store)
            except (ValueError, TypeError, RuntimeError) as e:  # an array-like's __array__
                raise PredictError(f"X ({type(X_or_store).__name__}) is not an (n, D) array "
                                   f"({first_line(e, 100)}); pass equal-length rows of "
                                   "numbers") from None
        if isinstance(X_or_store, np.ndarray):
            # a subclass as a plain array: np.matrix (scikit-learn refuses it) or a masked
            # array (np.isfinite would skip its masked NaNs, which scikit-learn then meets)
            X = np.asarray(X_or_store)
            if X.ndim != 2 or (self.feature_dim and X.shape[1] != self.feature_dim):
                raise PredictError(f"X has shape {X.shape}; head {self._name} expects "
                                   f"(n, {self.feature_dim}) features of "
                                   f"{self._file.identity.get('model')}")
            if X.dtype.kind not in "biuf":
                raise PredictError(f"X has dtype {X.dtype}; head {self._name} scores numeric "
                                   "features (float32, as stores keep them): convert it, e.g. "
                                   "X.astype('float32')")
            with np.errstate(over="ignore"):  # beyond float32's range: inf, refused below
                X = X.astype(np.float32, copy=False)
            from . import checks  # numpy-bound: `import embedpipe` stays light
            bad = checks.unusable_rows(X)
            if len(bad):
                raise PredictError(f"X has {len(bad)} row(s) with NaN or infinite values, or "
                                   f"values beyond ±{checks.FEATURE_LIMIT:.0e} (the first: row "
                                   f"{int(bad[0])}); a head scores embeddings, finite and "
                                   "far below that: drop or re-extract those rows")
            return X
        paths = _store_paths(X_or_store)
        from .data import IMAGE_EXTENSIONS

        images = [p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS]
        if images:
            model = self._file.identity.get("model")
            how = (f"head.predict(embedpipe.Embedder({model!r}).transform(paths)), or "
                   if model and "stacked" not in self._file.identity else "")
            raise PredictError(f"{images[0]} is an image; a head scores features (an array or a "
                               "store): embed the images with the head's backbone first, e.g. "
                               f"{how}run `embedpipe predict HEAD IMAGES...`")
        store = X_or_store if (isinstance(X_or_store, FeatureStore)
                               and X_or_store.features_loaded) else open_stores(paths)
        for note in artifacts.check_compatible(self._file, store.meta, str(store.path)):
            warnings.warn(note, UserWarning, stacklevel=3)
        from . import checks

        checks.refuse_unusable(store.features, store.paths, str(store.path), store)
        return store.features.astype(np.float32, copy=False)

    @property
    def _name(self) -> str:
        return str(self.path or self.manifest.get("head"))

    def predict(self, X_or_store: Any) -> np.ndarray:
        """Predicted class names (str ndarray, shape (n,)) of the rows of ``X_or_store``: an
        (n, D) feature array (or what ``numpy.asarray`` makes one of: a list of rows, a
        torch tensor on any device, in any float dtype; a scipy sparse matrix, made dense; a
        pandas DataFrame of numeric columns in feature order or with a ``features`` column of
        arrays, a Series of arrays; cast to float32), or a store (path, paths of stacked
        stores, or a store object; all its rows, in store order); image paths are refused
        (PredictError naming ``Embedder``: a head scores features). A store made with another
        backbone, weights, preprocessing or pool than the head's is refused (ArtifactError);
        another precision or dtype gives a UserWarning. Raises PredictError for an array of
        the wrong width or a non-numeric dtype, ragged rows, or rows holding NaN, infinities or
        values beyond ±1e12 (checks.FEATURE_LIMIT)."""
        import numpy as np

        from .heads.compact import predict_scored

        X = self._features(X_or_store)
        if not len(X):  # scikit-learn refuses 0 rows; the answer is 0 predictions
            return np.asarray(self.classes_, dtype=str)[:0]
        pred, _, _, _ = predict_scored(self.estimator, X, use_proba=self._use_proba)
        return pred

    def predict_proba(self, X_or_store: Any) -> np.ndarray:
        """Class probabilities (float64, shape (n, C), columns in ``classes_`` order; rows sum
        to 1) of the rows of ``X_or_store`` (as ``predict``). They are the head's own
        ``predict_proba`` for heads with native or calibrated probabilities (the manifest's
        ``probabilities``: ``native`` or ``calibrated``, temperature scaling fitted by `fit`);
        for ``scores`` (a class too small to calibrate) a softmax of decision scores: a
        ranking, not a calibrated probability. ``predict`` is the argmax of these."""
        import numpy as np

        from .heads.compact import predict_scored

        X = self._features(X_or_store)
        if not len(X):
            return np.zeros((0, len(self.classes_)))
        _, scores, _, _ = predict_scored(self.estimator, X, use_proba=self._use_proba)
        return np.asarray(scores, dtype=np.float64)  # one dtype whatever the head computes in

    @property
    def _use_proba(self) -> bool:
        from .heads import artifacts

        return artifacts.probability_kind(self.manifest) != "scores"


def load_head(path: PathLike) -> Head:
    """Load a head file made by `embedpipe fit` or ``Head.save`` (a skops archive; nothing in
    it is run: only trusted scikit-learn and numpy types are rebuilt). Raises ArtifactError for
    a missing, damaged, foreign or untrusted file."""
    from .heads import artifacts

    return Head(artifacts.load(Path(path)))


def fit(store: StoreLike, head: str = "auto", *, out: PathLike | None = None,
        class_weight: str | None = None, search: bool = False, seed: int = 0,
        jobs: int | None = None, chunk_rows: int | None = None, progress: bool = False,
        **params: Any) -> Head:
    """Fit a head on a store's training rows (the ``train`` split, or every labeled row when
    there is none), as ``embedpipe fit STORE --head HEAD``.

    ``head``: ``auto`` (the default, as for the CLI: the head, its parameters and
    preprocessing chosen by cross-validation on the training rows; see heads/auto.py), a head
    name (``logreg``, ``svm``, ``linear-svm``, ``knn``, ``ridge``,
    ``centroid``, ``mlp``, ``sgd``, ``logreg-sgd``; see `embedpipe heads`), or ``a+b+c`` for a
    soft-voting ensemble. ``params``: parameters of the head's final estimator (``C=10``,
    ``n_neighbors=3``, ``hidden_layer_sizes=(512,)``) or ``pca=N`` (components, or a variance
    fraction < 1). ``search``: pick parameters from the head's grid by stratified 3-fold CV on
    the training rows. ``out``: also write the head file there (else keep it in memory; see
    ``Head.save``). ``chunk_rows``: rows read at a time by the streamed heads (sgd,
    logreg-sgd; default 65536). Heads without native probabilities are calibrated by
    temperature scaling (see ``Head.predict_proba``).

    Raises HeadError (unknown head, parameter or value), EvaluateError (fewer than two
    classes), StoreError (unreadable store) — all EmbedpipeError."""
    from .heads import artifacts, train

    paths = _store_paths(store)
    src: Any = paths[0] if len(paths) == 1 else paths
    say = (lambda m: None) if not progress else _stderr
    if out is not None:
        res = train.fit(src, head, Path(out), params=params, class_weight=class_weight,
                        search=search, seed=seed, jobs=jobs, chunk_rows=chunk_rows,
                        progress=progress, say=say)
        if res.finetuned:  # the backbone was fine-tuned on rows it was fitted and scored on
            warnings.warn(res.finetuned, UserWarning, stacklevel=2)
        return load_head(out)
    with tempfile.TemporaryDirectory(prefix="embedpipe-fit-") as tmp:
        dest = Path(tmp) / f"{head}{artifacts.SUFFIX}"
        res = train.fit(src, head, dest, params=params, class_weight=class_weight,
                        search=search, seed=seed, jobs=jobs, chunk_rows=chunk_rows,
                        progress=progress, say=say)
        if res.finetuned:
            warnings.warn(res.finetuned, UserWarning, stacklevel=2)
        data = dest.read_bytes()
        return Head(artifacts.load(dest), saved=False, data=data)


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


# -- cv --------------------------------------------------------------------------------------

class CVReport:
    """The report of :func:`cv` (``embedpipe cv``): heads ranked by ``metric``.

    ``best``: the best head's name; ``heads``: head names, best first; ``to_dict()``: the full
    JSON-ready report (the ``--json`` file: per-fold scores, per-class precision/recall/F1,
    confusion matrix and top errors of the best head, held-out split scores, versions);
    ``to_frame()``: one row per head (pandas). ``str(report)`` is the CLI's table."""

    def __init__(self, report: dict[str, Any]):
        self._report = report

    @property
    def metric(self) -> str:
        return str(self._report["metric"])

    @property
    def best(self) -> str:
        return str(self._report["heads"][0]["head"])

    @property
    def heads(self) -> list[str]:
        return [str(h["head"]) for h in self._report["heads"]]

    def score(self, head: str | None = None) -> float:
        """Mean cross-validated ``metric`` (a fraction in [0, 1]) of ``head`` (default: the
        best). Raises ApiError for a head that was not evaluated."""
        name = head or self.best
        for h in self._report["heads"]:
            if h["head"] == name:
                return float(h[self.metric]["mean"])
        raise ApiError(f"cv report: no head {name!r}; it has {', '.join(self.heads)}")

    @property
    def finetuned_rows(self) -> dict[str, Any]:
        """How many scored rows are images the store's backbone was fine-tuned on (`embedpipe
        finetune` weights; 0 for others): ``{"cross_validated": N, "heldout": {split: N}}``.
        Scores over such rows overrate the model; cv also says so on stderr."""
        return copy.deepcopy(self._report["finetuned_rows"])

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the whole report (JSON-ready: str keys, lists, numbers)."""
        return copy.deepcopy(self._report)

    def to_frame(self) -> pd.DataFrame:
        """One row per head, best first: ``head``, then ``<metric>_mean`` and ``<metric>_std``
        (fractions over the folds) for accuracy, balanced_accuracy and f1_macro,
        ``fit_seconds`` (mean per fold, seconds) and ``convergence_warnings``. Needs pandas
        (raises ApiError naming `pip install pandas` without it)."""
        try:
            import pandas as pd
        except ImportError:
            raise ApiError("CVReport.to_frame needs pandas, which is not installed: pip "
                           "install pandas (or use to_dict())") from None
        from .heads.rows import METRICS

        rows = []
        for h in self._report["heads"]:
            row: dict[str, Any] = {"head": h["head"]}
            for m in METRICS:
                row[f"{m}_mean"], row[f"{m}_std"] = h[m]["mean"], h[m]["std"]
            row["fit_seconds"] = h["fit_seconds"]
            row["convergence_warnings"] = h["convergence_warnings"]
            rows.append(row)
        return pd.DataFrame(rows)

    def __str__(self) -> str:
        from .evaluate.report import format_report

        return format_report(self._report)

    def __repr__(self) -> str:
        return (f"CVReport(best={self.best!r}, {self.metric}={self.score():.3f}, "
                f"heads={self.heads})")


def _param_items(params: Mapping[str, Any] | Sequence[str] | None) -> list[str] | None:
    """``{"C": 10, "knn:n_neighbors": 3}`` → ``["C=10", "knn:n_neighbors=3"]`` (the CLI's
    ``--param`` items; values are written as Python literals, which it parses back)."""
    if params is None:
        return None
    if isinstance(params, Mapping):
        return [f"{k}={v!r}" for k, v in params.items()]
    if isinstance(params, str):
        return [params]
    return list(params)


def cv(store: StoreLike, heads: Sequence[str] | str | None = None, *, folds: int = 5,
       repeats: int = 1, search: bool = False, metric: str = "accuracy",
       params: Mapping[str, Any] | Sequence[str] | None = None,
       class_weight: str | None = None, jobs: int = 1, seed: int = 0, top_errors: int = 10,
       chunk_rows: int | None = None, progress: bool = False) -> CVReport:
    """Cross-validate heads on a store's training rows and rank them (``embedpipe cv``).

    Folds are computed once on the training rows in store order and shared by every head:
    ``StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)`` (``repeats`` > 1:
    ``RepeatedStratifiedKFold``), lowered with a warning to the size of the smallest class.
    ``heads``: names (default logreg, svm, knn, ridge, centroid). ``metric``: accuracy,
    balanced_accuracy or f1_macro. ``params``: ``{"C": 10}`` for every head that has C,
    ``{"knn:n_neighbors": 3}`` for one head. ``search``: nested grid search in each outer
    fold. ``jobs``: parallel (head, fold) fits (−1: one per core). The best head is refit on
    all training rows and scored on each held-out split (``to_dict()["heldout"]``).

    Raises EvaluateError (too few classes or images, bad option), HeadError, StoreError — all
    EmbedpipeError; warnings (fewer folds, ...) go to stderr as one line each."""
    from .evaluate.cv import run_cv

    paths = _store_paths(store)
    names = [heads] if isinstance(heads, str) else (list(heads) if heads else None)
    report = run_cv(paths[0] if len(paths) == 1 else paths, names, folds=folds,
                    repeats=repeats, search=search, metric=metric,
                    params=_param_items(params), class_weight=class_weight, jobs=jobs,
                    seed=seed, top_errors=top_errors, progress=progress,
                    chunk_rows=chunk_rows)
    return CVReport(report)
