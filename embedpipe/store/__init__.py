"""The HDF5 feature store (numpy + h5py only, never torch); the only package that knows the HDF5 layout.

- ``schema``: the layout (datasets, dtypes, chunking, identity checksum) and what a store is;
- ``_hdf5``: HDF5 plumbing: SWMR open, file-access properties, reading with retries, the
  one-writer lock, disk reservations;
- ``read``: ``open_store``/``open_stores`` (a read-only ``FeatureStore`` snapshot), stacking of
  stores side by side, chunked feature reads;
- ``write``: ``StoreWriter`` (crash-safe append, resume, recovery of a killed writer's file);
- ``ops``: whole-store operations: ``merge`` and ``prune``.
"""

from ._hdf5 import check_not_busy
from .ops import merge, prune
from .read import (
    FeatureStore,
    open_store,
    open_stores,
    read_identity,
    read_runs,
    stack,
    verify,
)
from .schema import SCHEMA_VERSION, StoreBusy, StoreError, StoreFull, StoreMismatch
from .write import StoreWriter, hdf5_broken

__all__ = ["open_store", "open_stores", "FeatureStore", "stack", "verify", "read_identity", "read_runs", "StoreWriter", "StoreError", "StoreMismatch", "StoreBusy", "StoreFull", "check_not_busy", "hdf5_broken", "merge", "prune", "SCHEMA_VERSION"]
