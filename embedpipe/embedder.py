"""``Embedder``: a pretrained timm backbone as a scikit-learn transformer (images → pooled
features), with an optional feature store as a cache.

It uses extract's pieces rather than its own: the backbone is built by ``backbones``, images
are decoded by ``data`` and preprocessed by the model's timm eval transform, forward passes go
through extract's runtime (device, precision, torch or OpenVINO, TTA), and with ``cache`` the files go
through ``extract.local.run`` into a store like ``embedpipe extract`` does — so a cached
transform returns the very features `extract` stores, and a store made by `extract` with the
same options serves as the cache.

torch and timm are imported on the first transform that must run the backbone, never at
import; the loaded backbone is not part of the estimator's parameters, is not pickled and is
not cloned.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from . import DEFAULT_MODEL
from .errors import UserError

if TYPE_CHECKING:
    from PIL import Image

    from .extract.options import ExtractOptions


class EmbedderError(UserError):
    """An input the Embedder cannot embed, or a cache it cannot use; one line naming it and the
    fix."""


class _Runtime:
    """The loaded backbone and what ``embed`` needs (not an estimator parameter)."""

    def __init__(self, opts: ExtractOptions, stored_precision: str | None):
        from .backbones import build_backbone, decode_size, make_views_transform
        from .extract.local import _load

        # the same device, precision, runtime and identity rules as `extract` (one code path);
        # the backbone is kept for extract.run into the cache, so it is built once
        self.backbone = build_backbone(opts)
        self.device, self.engine, self.data_config, self.identity = _load(
            opts, {"precision": stored_precision} if stored_precision else {}, _stderr,
            self.backbone)
        self.transform = make_views_transform(self.data_config)
        self.min_size = None if opts.exact_decode else decode_size(self.data_config)
        self.dim = int(self.identity["feature_dim"])


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Embedder(TransformerMixin, BaseEstimator):
    """Images → pooled features of a pretrained timm backbone, as a scikit-learn transformer.

    ``transform(X)`` takes a sequence of image file paths (str or ``os.PathLike``) and/or PIL
    images and returns an ``(n, D)`` float32 ndarray, row i the features of ``X[i]`` (D: the
    backbone's pooled feature dim, 1280 for the default EfficientNet-Lite0). Images are decoded
    to RGB (EXIF orientation applied), preprocessed with the model's own timm eval transform
    (resize, centre crop, mean/std) and run in batches of ``batch_size``. ``fit`` learns
    nothing (the backbone is frozen) and returns self, so it fits in a ``Pipeline`` before a
    classifier and works with ``cross_val_score`` and ``GridSearchCV``.

    Parameters (stored as given; see ``embedpipe extract --help`` for each):
    ``model`` (a timm name; default EfficientNet-Lite0 with bundled offline ImageNet weights),
    ``weights`` (a file path, ``"bundled"`` or ``"hub"``), ``pool``, ``img_size``,
    ``crop_pct``, ``precision`` (auto, fp32, bf16, fp16; auto: bf16 on CUDA and on CPUs with
    native bf16, else fp32), ``device`` (auto, cpu, cuda[:N]), ``runtime`` (auto, torch,
    openvino: as `extract --runtime`), ``batch_size`` (images per
    forward pass), ``workers`` (loader processes for cached extraction; default cores − 1),
    ``cache`` (path of an HDF5 feature store, created when missing), ``progress`` (a progress
    bar on stderr).

    With ``cache``, files are looked up in the store by the sha256 of their bytes: files
    already there (under any path) are read from it without running, or even loading, the
    backbone; the others are extracted into it first (as ``embedpipe extract`` would, with a
    run record). A store written with other options is refused (StoreMismatch). If another
    process is writing the store, the missing files are embedded without caching. PIL images
    are never cached (they have no file to key on).

    After a transform, ``n_embedded_`` counts the images this instance ran through the
    backbone and ``n_cached_`` those read from the cache (both cumulative).

    Raises EmbedderError (an input that is not an image path or PIL image, an unreadable or
    undecodable file), WeightsError (model or weights), StoreError (cache) — all
    EmbedpipeError.
    """

    def __init__(self, model: str = DEFAULT_MODEL, weights: str | None = None, *,
                 pool: str | None = None, img_size: int | None = None,
                 crop_pct: float | None = None, precision: str = "auto", device: str = "auto",
                 runtime: str = "auto", batch_size: int = 32, workers: int | None = None,
                 cache: str | os.PathLike[str] | None = None, progress: bool = False):
        self.model = model
        self.weights = weights
        self.pool = pool
        self.img_size = img_size
        self.crop_pct = crop_pct
        self.precision = precision
        self.device = device
        self.runtime = runtime
        self.batch_size = batch_size
        self.workers = workers
        self.cache = cache
        self.progress = progress

    # -- scikit-learn protocol -----------------------------------------------------------

    def fit(self, X: Any = None, y: Any = None) -> Embedder:
        """Nothing to learn (a frozen backbone): checks the parameters and returns self."""
        self._options()
        return self

    def transform(self, X: Sequence[str | os.PathLike[str] | Image.Image]) -> np.ndarray:
        """Features of each image of ``X`` (paths and/or PIL images): float32, shape
        (len(X), D), in the order of ``X``."""
        items = _as_items(X)
        opts = self._options()
        rows: dict[int, np.ndarray] = {}
        files = [i for i, x in enumerate(items) if not _is_image(x)]
        if files:
            paths = [Path(os.fspath(items[i])) for i in files]
            feats = (self._from_cache(paths, opts) if self.cache is not None
                     else self._embed([_FileSource(p) for p in paths], opts))
            rows.update(zip(files, feats))
        images = [i for i, x in enumerate(items) if _is_image(x)]
        if images:
            rows.update(zip(images, self._embed([_ImageSource(items[i], i) for i in images],
                                                opts)))
        if not items:
            return np.zeros((0, self._feature_dim(opts)), dtype=np.float32)
        out = np.stack([rows[i] for i in range(len(items))]).astype(np.float32, copy=False)
        self._dim = int(out.shape[1])
        return out

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """``embedder0`` … ``embedder{D-1}`` (object ndarray, shape (D,)), scikit-learn's
        naming for features a transformer makes. D comes from the last transform, else the
        cache store, else the backbone (loaded for it)."""
        dim = self._feature_dim(self._options())
        return np.asarray([f"embedder{i}" for i in range(dim)], dtype=object)

    def __sklearn_is_fitted__(self) -> bool:
        return True  # stateless: usable without fit

    def __sklearn_tags__(self) -> Any:  # scikit-learn >= 1.6
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.one_d_array = True
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags

    def _more_tags(self) -> dict[str, Any]:  # scikit-learn < 1.6
        return {"stateless": True, "requires_fit": False, "X_types": ["string"]}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_runtime", None)  # the backbone is loaded again where it is needed
        return state

    # -- internals -------------------------------------------------------------------------

    def _options(self) -> ExtractOptions:
        from .api import extract_options
        from .extract.options import check_options

        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise EmbedderError(f"Embedder(batch_size={self.batch_size!r}): pass a positive "
                                "number of images per forward pass")
        # compile: a transform embeds few images at a time; torch.compile would not pay back
        opts = extract_options(self.model, self.weights, pool=self.pool,
                               img_size=self.img_size, crop_pct=self.crop_pct,
                               precision=self.precision, device=self.device,
                               runtime=self.runtime, batch_size=self.batch_size,
                               workers=self.workers,
                               compile="off")
        check_options(opts)
        return opts

    def _runtime_for(self, opts: ExtractOptions, stored_precision: str | None = None
                     ) -> _Runtime:
        rt = getattr(self, "_runtime", None)
        if rt is None:
            rt = self._runtime = _Runtime(opts, stored_precision)
        return rt

    def _count(self, embedded: int = 0, cached: int = 0) -> None:
        self.n_embedded_ = getattr(self, "n_embedded_", 0) + embedded
        self.n_cached_ = getattr(self, "n_cached_", 0) + cached

    def _feature_dim(self, opts: ExtractOptions) -> int:
        dim = getattr(self, "_dim", None)
        if dim:
            return int(dim)
        if self.cache is not None and Path(self.cache).exists():
            from .store.read import read_identity

            stored = read_identity(Path(self.cache))
            if stored.get("feature_dim"):
                return int(stored["feature_dim"])
        return self._runtime_for(opts).dim

    def _embed(self, sources: Sequence[_Source], opts: ExtractOptions,
               stored_precision: str | None = None, count: bool = True) -> list[np.ndarray]:
        """Run the backbone on ``sources`` in batches of ``batch_size``: one float32 (D,) row
        each."""
        import torch

        from .backbones import stack_views
        from .progress import Progress

        rt = self._runtime_for(opts, stored_precision)
        flip = "flip" in (rt.data_config.get("tta") or "")
        out: list[np.ndarray] = []
        with Progress(len(sources), "embed", enabled=self.progress) as bar, \
                torch.inference_mode():
            for lo in range(0, len(sources), opts.batch_size):
                batch = sources[lo:lo + opts.batch_size]
                views = stack_views([rt.transform(s.image(rt.min_size, opts.max_pixels))
                                     for s in batch])
                feats = rt.engine(views, flip=flip, chunk=opts.batch_size)
                out.extend(feats.float().cpu().numpy())
                bar.update(len(batch))
        if count:
            self._count(embedded=len(sources))
        return out

    def _from_cache(self, paths: list[Path], opts: ExtractOptions) -> list[np.ndarray]:
        """Features of ``paths`` from the cache store, by content hash; files not in it are
        extracted into it first (extract.local.run), or embedded in memory when another
        process is writing the store."""
        from .data import DecodeError, content_hash, read_file

        cache = Path(self.cache)  # type: ignore[arg-type]
        hashes = []
        for p in paths:
            try:
                hashes.append(content_hash(read_file(p)))
            except DecodeError as e:
                raise EmbedderError(f"{p}: {e}; pass image files that exist and can be "
                                    "read") from None
        if cache.exists() and not _trusted(cache, opts):
            self._check_identity(cache, opts)  # loads the backbone; StoreMismatch if it differs
        found = _lookup(cache, hashes)
        missing = sorted({i for i, h in enumerate(hashes) if h not in found},
                         key=lambda i: str(paths[i]))
        feats: dict[str, np.ndarray] = {}
        embedded = 0
        if missing:
            feats, embedded = self._extract_into(cache, [paths[i] for i in missing],
                                                 [hashes[i] for i in missing], opts)
            found = _lookup(cache, hashes)
        need = sorted({found[h] for h in hashes if h in found and h not in feats})
        stored = _read_rows(cache, need)
        self._count(embedded=embedded, cached=max(0, len(hashes) - embedded))
        return [feats[h] if h in feats else stored[found[h]] for h in hashes]

    def _check_identity(self, cache: Path, opts: ExtractOptions) -> None:
        """Raise StoreMismatch when the cache store holds features of another backbone,
        weights, preprocessing, pool, precision or dtype than this Embedder's."""
        from .store.read import read_identity
        from .store.schema import StoreMismatch, describe_mismatch

        stored = read_identity(cache)
        rt = self._runtime_for(opts, stored.get("precision"))
        mismatch = describe_mismatch(cache, stored, rt.identity)
        if mismatch:
            raise StoreMismatch(mismatch.replace("pass another --out", "pass another cache="))

    def _extract_into(self, cache: Path, paths: list[Path], hashes: list[str],
                      opts: ExtractOptions) -> tuple[dict[str, np.ndarray], int]:
        """Extract ``paths`` into the cache store with this instance's backbone. Returns the
        features embedded in memory instead, by hash, when the store is busy (else none), and
        how many images the backbone ran on."""
        from .data import Discovery, ImageRef
        from .extract.local import run
        from .store.read import read_identity
        from .store.schema import StoreBusy

        stored = read_identity(cache).get("precision") if cache.exists() else None
        rt = self._runtime_for(opts, stored)
        unique = dict(zip(hashes, paths))  # one file per content
        refs = sorted((ImageRef(p.resolve(), p.resolve().as_posix(), None, None)
                       for p in unique.values()), key=lambda r: r.rel)
        disc = Discovery(Path.cwd(), "unlabeled", refs, [], [])
        try:
            summary = run(disc, cache, opts, progress=self.progress, backbone=rt.backbone,
                          say=(lambda m: None))
        except StoreBusy:
            feats = self._embed([_FileSource(p) for p in unique.values()], opts, stored,
                                count=False)
            return dict(zip(unique, feats)), len(feats)
        if summary.interrupted:
            raise KeyboardInterrupt
        failed = dict(summary.failures)
        for p in unique.values():
            reason = failed.get(p.resolve().as_posix())
            if reason is not None:
                raise EmbedderError(f"{p}: {reason}; remove it from the images to transform or "
                                    "replace the file")
        return {}, summary.extracted + summary.replaced


# -- sources of images -------------------------------------------------------------------------

class _Source:
    def image(self, min_size: tuple[int, int] | None, max_pixels: int | None) -> Image.Image:
        raise NotImplementedError


class _FileSource(_Source):
    def __init__(self, path: Path):
        self.path = path

    def image(self, min_size: tuple[int, int] | None, max_pixels: int | None) -> Image.Image:
        from .data import DecodeError, load_image

        try:
            return load_image(self.path, min_size=min_size, max_pixels=max_pixels)
        except DecodeError as e:
            raise EmbedderError(f"{self.path}: {e}; remove it from the images to transform or "
                                "replace the file") from None


class _ImageSource(_Source):
    def __init__(self, img: Image.Image, index: int):
        self.img, self.index = img, index

    def image(self, min_size: tuple[int, int] | None, max_pixels: int | None) -> Image.Image:
        from PIL import ImageOps

        from .data import _to_rgb

        try:
            return _to_rgb(ImageOps.exif_transpose(self.img))
        except Exception as e:  # noqa: BLE001 - e.g. an image whose file was closed
            raise EmbedderError(f"X[{self.index}]: cannot read the PIL image ({e}); pass "
                                "loaded images (Image.open(...).convert('RGB'))") from None


def _is_image(x: Any) -> bool:
    mod = type(x).__module__ or ""
    return mod.startswith("PIL.") and hasattr(x, "getbands")


def _as_items(X: Any) -> list[Any]:
    """``X`` as a list of paths / PIL images (a list, tuple, 1-D ndarray or pandas Series)."""
    if isinstance(X, (str, os.PathLike)) or _is_image(X):
        raise EmbedderError("Embedder.transform takes a sequence of images (paths or PIL "
                            f"images), got a single {type(X).__name__}; wrap it in a list")
    if isinstance(X, np.ndarray):
        if X.ndim == 2 and X.shape[1] == 1:
            X = X[:, 0]
        if X.ndim != 1:
            raise EmbedderError(f"Embedder.transform: X has shape {X.shape}; pass a 1-D "
                                "sequence of image paths or PIL images")
    items = list(getattr(X, "tolist", lambda: X)()) if not isinstance(X, list) else X
    for i, x in enumerate(items):
        if not (isinstance(x, (str, os.PathLike)) or _is_image(x)):
            raise EmbedderError(f"Embedder.transform: X[{i}] is a {type(x).__name__}; pass "
                                "image file paths (str or Path) or PIL images")
    return items


# -- the cache store ---------------------------------------------------------------------------

def _trusted(cache: Path, opts: ExtractOptions) -> bool:
    """True when the cache's rows are known to be what ``opts`` extracts without loading the
    backbone (its last run had the same options; extract.plan decides). False for a missing
    store or one that needs the full identity check."""
    if not cache.exists():
        return False
    from .extract.plan import _same_as_last_run
    from .store.read import read_identity

    return _same_as_last_run(cache, opts, read_identity(cache))


def _lookup(cache: Path, hashes: Iterable[str]) -> dict[str, int]:
    """Row of the cache store holding each of ``hashes`` (content sha256), where one does."""
    if not cache.exists():
        return {}
    from .store.read import open_store

    store = open_store(cache, features=False)
    wanted = set(hashes)
    rows: dict[str, int] = {}
    for i, h in enumerate(store.hashes):
        if h in wanted and h not in rows:
            rows[h] = i
    return rows


def _read_rows(cache: Path, rows: list[int]) -> dict[int, np.ndarray]:
    """Feature rows (float32) of the cache store, by row index."""
    if not rows:
        return {}
    from .store.read import open_store

    store = open_store(cache, features=False)
    idx = np.asarray(rows, dtype=np.int64)
    out: dict[int, np.ndarray] = {}
    for pos, X in store.iter_feature_chunks(idx, 65536):
        for p, x in zip(pos, X.astype(np.float32, copy=False)):
            out[int(idx[p])] = x
    return out
