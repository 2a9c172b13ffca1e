"""embedpipe: cache pretrained-backbone embeddings to HDF5, then fit classical heads on a CPU.

The Python API (the README's "Python API" section has examples)::

    import embedpipe
    store = embedpipe.extract("photos/", "cache/photos.h5")   # -> Store (HDF5, resumable)
    report = embedpipe.cv(store, heads=["logreg", "knn"])     # -> CVReport
    head = embedpipe.fit(store, "logreg", C=1.0)              # -> Head
    head.predict(store), head.predict_proba(store.features)
    embedpipe.Embedder()                                      # a scikit-learn transformer

Importing ``embedpipe`` is light (no torch, numpy, h5py or scikit-learn): every name below is
imported on first use (PEP 562). Errors a user can fix are ``EmbedpipeError`` (the CLI's
``UserError``) or a subclass; the library never exits the interpreter.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import UserError

__version__ = "0.1.0"

# The backbone with bundled offline ImageNet weights (see backbones.py); here so that modules
# that must not import torch (extract's no-op rerun path) can name it.
DEFAULT_MODEL = "tf_efficientnet_lite0"

#: The one base class of every error a user can fix (bad input, options or environment); its
#: message is one line naming the file or option and the fix. Subclasses: ExtractError,
#: DataError, WeightsError, StoreError (StoreMismatch, StoreBusy, StoreFull), HeadError,
#: EvaluateError, ArtifactError, PredictError, OptionError, ApiError, EmbedderError, ...
EmbedpipeError = UserError

__all__ = ["extract", "open_store", "fit", "cv", "load_head", "Embedder", "Store", "Head",
           "CVReport", "EmbedpipeError", "DEFAULT_MODEL", "__version__"]

# name -> (module, attribute); attribute None: the module itself
_LAZY: dict[str, tuple[str, str | None]] = {
    # the package embedpipe.extract is callable: embedpipe.extract(...) runs api.extract
    "extract": (f"{__name__}.extract", None),
    "open_store": (f"{__name__}.store.read", "open_store"),
    "Store": (f"{__name__}.store.read", "FeatureStore"),
    "fit": (f"{__name__}.api", "fit"),
    "cv": (f"{__name__}.api", "cv"),
    "load_head": (f"{__name__}.api", "load_head"),
    "Head": (f"{__name__}.api", "Head"),
    "CVReport": (f"{__name__}.api", "CVReport"),
    "Embedder": (f"{__name__}.embedder", "Embedder"),
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time these load on first use
    from .api import CVReport, Head, cv, fit, load_head
    from .api import extract as extract
    from .embedder import Embedder
    from .store.read import FeatureStore as Store
    from .store.read import open_store


def __getattr__(name: str) -> Any:  # PEP 562: the public names, imported on first use
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    if attr is not None:
        globals()[name] = value  # cached: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
