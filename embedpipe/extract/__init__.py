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
"""

from .local import run
from .options import ExtractError, ExtractOptions, Summary

__all__ = ["ExtractOptions", "ExtractError", "Summary", "run"]
