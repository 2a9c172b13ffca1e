"""The store's HDF5 layout and what makes a file a store. Only embedpipe.store knows it:

  /features   float32|float16 (N, D), chunked by rows
  /labels     int32 (N,)         index into /class_names, -1 = unlabeled
  /paths      utf-8 str (N,)     path relative to the data root (or as written in a manifest)
  /hash       ascii (N,)         sha256 of the file's bytes
  /split      utf-8 str (N,)     train/val/test/... or "" when the data has no splits
  /mtime_ns, /size  int64 (N,)   stat of the file when extracted: lets a rerun skip hashing
  /class_names utf-8 str (C,)    class index → name (append-only, so labels never change meaning)
  /errors/{path,reason,hash,mtime_ns,size}   files that could not be used, and why
  /runs       utf-8 str (R,)     one JSON record per extract run (options, counts, versions)
  /committed  int64 (2,)         [rows, errors] that are complete; everything past them is junk
  /finetune_train_hash  ascii (K,)  only in a store of `embedpipe finetune` weights: the sha256
              of every image that run trained on (sorted, unique; the same digest as /hash), so
              an accuracy over rows the backbone was tuned on can say so (read.finetuned_note)
  attributes  identity (embedpipe.provenance.IDENTITY_KEYS) and identity_sha256,
              schema_version, created, versions, store_id (a random id given at creation,
              kept by every later write: tells apart files of one identity, e.g. two stacked
              stores renamed; absent from stores written before it was added)

Fixed-size datasets carry HDF5 Fletcher-32 checksums (HDF5 cannot filter variable-length
strings), so damaged features are refused when read instead of being used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import UserError
from ..provenance import IDENTITY_KEYS, diff, short

SCHEMA_VERSION = 1
STORE_ID = "store_id"  # the attribute naming this file (a uuid4's hex, given at creation)
ROW_FIELDS = ("labels", "paths", "hash", "split", "mtime_ns", "size")
ERROR_FIELDS = ("path", "reason", "hash", "mtime_ns", "size")
_STR = h5py.string_dtype("utf-8")
_HASH = h5py.string_dtype("ascii", 64)
# the record of the images a fine-tuned backbone was trained on (see the layout above)
FINETUNE_HASHES = "finetune_train_hash"


class StoreError(UserError):
    """A store cannot be used as asked; the message is one line naming the file and the fix."""


class StoreMismatch(StoreError):
    pass


class StoreBusy(StoreError):
    """Another process is writing the store."""


class StoreFull(StoreError):
    """The disk holding the store is full; committed rows are kept."""


# Fixed-size datasets get Fletcher-32 checksums (HDF5 cannot filter variable-length strings).
_CHECKSUMMED = ("features", "labels", "hash", "mtime_ns", "size")


def _row_dtype(name: str) -> Any:
    return {"labels": "i4", "paths": _STR, "hash": _HASH, "split": _STR,
            "mtime_ns": "i8", "size": "i8"}[name]


def _err_dtype(name: str) -> Any:
    return {"path": _STR, "reason": _STR, "hash": _HASH, "mtime_ns": "i8", "size": "i8"}[name]


def _chunk_rows(dim: int, itemsize: int) -> int:
    return max(16, min(4096, (1 << 20) // max(1, dim * itemsize)))


def _decode(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.generic):
        return v.item()
    return v


def _check_schema(f: h5py.File, path: Path) -> None:
    if "features" not in f or "committed" not in f or "schema_version" not in f.attrs:
        raise StoreError(f"{path}: not an embedpipe feature store (no features/committed); "
                         "pass a file made by `embedpipe extract`")
    if int(f.attrs["schema_version"]) > SCHEMA_VERSION:
        raise StoreError(f"{path}: store schema {int(f.attrs['schema_version'])} is newer than "
                         f"this embedpipe ({SCHEMA_VERSION}); upgrade embedpipe")
    digest = f.attrs.get("identity_sha256")
    if digest is not None and _decode(digest) != _identity_digest(f.attrs):
        raise StoreError(f"{path}: the store's identity attributes (model, weights, "
                         "preprocessing, ...) do not match their checksum: the file was edited "
                         "or is damaged; move it aside and run `embedpipe extract` again")


def _identity_digest(attrs: Any) -> str:
    """sha256 of the identity attributes as stored. HDF5 does not checksum attribute values
    (a store keeps them in a fractal heap), so this catches a damaged or naively edited
    identity; it is no signature: whoever edits the attributes can recompute it."""
    ident = {k: _decode(attrs.get(k)) for k in IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def read_meta(f: h5py.File) -> dict[str, Any]:
    meta = {k: _decode(v) for k, v in f.attrs.items()}
    for k in ("data_config", "versions"):
        if isinstance(meta.get(k), str):
            meta[k] = json.loads(meta[k])
    return meta


def describe_mismatch(path: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """One line saying how a store's identity differs from what a run asks for, or None."""
    diffs = diff(stored, wanted)
    if not diffs:
        return None
    fields = []
    for k, va, vb in diffs:
        if isinstance(va, dict) and isinstance(vb, dict):  # data_config: name its fields
            fields += [(f"{k}.{f}", va.get(f), vb.get(f))
                       for f in sorted(set(va) | set(vb)) if va.get(f) != vb.get(f)]
        else:
            fields.append((k, va, vb))
    parts = "; ".join(f"{k}: the store has {_value(a)}, this run asks for {_value(b)}"
                      for k, a, b in fields[:3])
    if len(fields) > 3:
        parts += f"; and {len(fields) - 3} more"
    return (f"{path}: store was made with other settings ({parts}); a store never mixes them — "
            "pass another --out, or the options the store was made with")


def _value(v: Any) -> str:
    """An identity value for a mismatch message: ``none`` for a missing one, else its repr
    (shortened: provenance.short)."""
    return "none" if v is None else short(v)


_DATASETS = ("features", *ROW_FIELDS, *(f"errors/{x}" for x in ERROR_FIELDS), "class_names",
             "runs", "committed")


def _make_layout(f: h5py.File, dim: int, dtype: np.dtype, n: int = 0, n_err: int = 0,
                 n_classes: int = 0, n_runs: int = 0) -> None:
    rows = _chunk_rows(dim, dtype.itemsize)
    f.create_dataset("features", shape=(n, dim), maxshape=(None, dim), dtype=dtype,
                     chunks=(rows, dim), fletcher32=True)
    for name in ROW_FIELDS:
        f.create_dataset(name, shape=(n,), maxshape=(None,), dtype=_row_dtype(name),
                         chunks=(4096,), fletcher32=name in _CHECKSUMMED)
    for name in ERROR_FIELDS:
        f.create_dataset("errors/" + name, shape=(n_err,), maxshape=(None,),
                         dtype=_err_dtype(name), chunks=(256,))
    f.create_dataset("class_names", shape=(n_classes,), maxshape=(None,), dtype=_STR,
                     chunks=(256,))
    f.create_dataset("runs", shape=(n_runs,), maxshape=(None,), dtype=_STR, chunks=(64,))
    f.create_dataset("committed", data=np.array([n, n_err], dtype="i8"))


def put_finetune_hashes(f: h5py.File, hashes: Any) -> None:
    """Write the record of the images the store's fine-tuned backbone was trained on
    (``/finetune_train_hash``: sorted unique sha256 hex digests, Fletcher-32 checksummed).
    Nothing for None; a store that has one keeps it (the identity fixes the weights, and the
    weights fix the run that trained them)."""
    if hashes is None or FINETUNE_HASHES in f:
        return
    arr = np.unique(np.asarray(hashes, dtype="S64"))
    # an empty record (a run whose backbone never trained, of a base without one) is a
    # record too; HDF5 takes a chunk larger than the data only with an unlimited maxshape
    f.create_dataset(FINETUNE_HASHES, data=arr.astype(_HASH), dtype=_HASH,
                     chunks=(max(1, min(len(arr), 65536)),), fletcher32=True,
                     maxshape=(None,))


def get_finetune_hashes(f: h5py.File) -> np.ndarray | None:
    """The store's record of the images its fine-tuned backbone was trained on, as a sorted
    ``S64`` array; None when it has none (other weights, or a store written before records)."""
    if FINETUNE_HASHES not in f:
        return None
    return np.asarray(f[FINETUNE_HASHES][:], dtype="S64")
