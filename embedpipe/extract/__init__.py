"""Extraction: images → pooled backbone features in a store, as a reader → mapper → writer.

- ``options``: ``ExtractOptions``, the run ``Summary``, option checks, default store paths;
- ``plan``: what a run must do against what the store holds, and the ``Session`` that commits
  finished batches (torch-free);
- ``loader``: the reader: stat, read, hash and decode one file (never raises for a bad file);
- ``runtime``: the mapper's tools: device, precision, compile, ``embed`` (imports torch);
- ``shards``: stable partition of the files into shards;
- ``local``: the in-process runner (torch DataLoader workers + one model);
- ``ray``: the Ray Data runner (``--engine ray``), imported only then.

torch, timm and the backbone are imported and loaded only when something must be extracted: a
rerun with the options of the store's last run on an unchanged folder plans against the store
and finishes without them.

The package is also the library function ``embedpipe.extract``, which shares its name: calling
it, ``embedpipe.extract(source, out, model=..., **options)``, runs ``embedpipe.api.extract``.
"""

import sys as _sys
import types as _types
from typing import Any as _Any

from .local import run
from .options import ExtractError, ExtractOptions, Summary

__all__ = ["ExtractOptions", "ExtractError", "Summary", "run"]


class _CallablePackage(_types.ModuleType):
    """``embedpipe.extract`` is this package and, called, the library function (api.extract):
    a submodule named like a function of its parent package replaces that function as the
    parent's attribute once imported, so the package itself calls it."""

    def __call__(self, *args: _Any, **kwargs: _Any) -> _Any:
        from ..api import extract

        return extract(*args, **kwargs)

    @property
    def __signature__(self) -> _Any:  # inspect.signature / help() show api.extract's
        import inspect

        from ..api import extract

        return inspect.signature(extract)


_sys.modules[__name__].__class__ = _CallablePackage
