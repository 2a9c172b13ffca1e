"""Heads: classical classifiers on stored features, and the files they are saved in.

- ``registry``: the head registry (``build``, ``get``, ``describe``, ``param_grid``, ensembles):
  scikit-learn Pipelines, one per head name;
- ``train``: ``fit`` a head on a store and save it (in memory, or streamed for the out-of-core
  heads through ``stream``);
- ``stream``: streamed fit, search and scoring of the out-of-core heads (``sgd``, ``logreg-sgd``)
  from the store's chunks;
- ``artifacts``: head files (skops archive + manifest), loaded with an allow-list, never pickle;
- ``compact``: numpy-only prediction of linear and MLP heads, for ``predict --store`` without
  scikit-learn.

Importing this package imports nothing heavy: the registry (and scikit-learn) loads on first
use of one of its names (``embedpipe.heads.build``, ...), so ``embedpipe.heads.compact`` stays
numpy-only.
"""

from __future__ import annotations

import importlib
from typing import Any

#: The head `fit` and `quickstart` train when none is named: chosen by cross-validation
#: (heads/auto.py).
DEFAULT_HEAD = "auto"

_SUBMODULES = ("registry", "train", "stream", "artifacts", "compact")


def __getattr__(name: str) -> Any:  # PEP 562: the registry's names, imported on first use
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    registry = importlib.import_module(f"{__name__}.registry")
    try:
        return getattr(registry, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
