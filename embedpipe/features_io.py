"""Embeddings in and out: `embedpipe export-features` and `embedpipe import-features`. Torch-free.

Files hold one row per image with five columns (the same names in every format):

- ``path``: str, unique; ``label``: str class name ("" or null: unlabeled); ``split``: str
  (optional on import; "" when absent); ``hash``: the sha256 of the image's bytes as 64
  lowercase hex digits (the store's row hash; optional on import); ``features``: float (D
  values per row).

A store of `embedpipe finetune` weights also has the run's record: the sha256 of every image
its backbone was trained on (store.schema FINETUNE_HASHES), which lets cv, fit, predict and
info say which rows an accuracy overrates. It travels as ``finetune_train_hash`` where a
format can hold it, and an imported store keeps it (matched against the rows' ``hash``):

Formats, chosen by the file's suffix:

- ``.parquet`` (Apache Parquet, through pyarrow: the ``parquet`` extra): ``features`` is a
  fixed-size list of float32 (a list column of equal lengths is accepted on import). The
  store's identity is kept in the schema metadata (key ``embedpipe``), the record under the
  key ``embedpipe.finetune_train_hash`` (the digests one a line, as the run's .train-hashes
  file: 65 bytes an image; pyarrow's readers refuse footers with strings over 100 MB, a
  record of about 1.1 million images, unless given ``thrift_string_size_limit``, as import
  gives it).
- ``.npz`` (numpy): arrays ``path``, ``label``, ``split`` (unicode, shape (N,)), ``hash``
  (ascii, (N,)) and ``features`` (float32 or float16, (N, D)); ``paths``/``labels``/
  ``splits``/``hashes`` are accepted too. The record is the array ``finetune_train_hash``
  (ascii, (K,)).
- ``.npy`` (numpy): one structured array of N records with fields ``path``, ``label``,
  ``split`` (unicode), ``hash`` (ascii) and ``features`` (float32 or float16, (D,)). Loaded
  without pickle. It cannot hold the record: export says so in one line (use .npz or
  .parquet), and its import has none.

An imported store records the identity ``model = imported:<--model-name or file stem>``,
``weights_source = imported:<file sha256>``, ``weights_sha256`` = that sha256, and the feature
dim; it never matches an extracted store's identity, so `extract` into it (or a head from one
applied to the other) is refused by the usual identity checks. The row ``hash`` of an imported
row is the file's ``hash`` where it has one, else the sha256 of its float32 features (the
image bytes are unknown). A file with a record needs the ``hash`` column to match it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import _io, checks
from .errors import UserError
from .store.read import open_store

SUFFIXES = (".parquet", ".npz", ".npy")
IMPORTED = "imported:"
#: The record of a fine-tuned backbone's training images: .npz array, Parquet metadata key.
RECORD = "finetune_train_hash"
PARQUET_RECORD = b"embedpipe." + RECORD.encode()


class FeaturesFileError(UserError):
    """A features file cannot be read or written as asked; one line naming it and the fix."""


def _suffix(path: Path, what: str) -> str:
    suf = path.suffix.lower()
    if suf not in SUFFIXES:
        raise FeaturesFileError(f"{what} {path}: unknown format {suf or '(no suffix)'}; pass a "
                                f"file ending in {', '.join(SUFFIXES)}")
    return suf


def _pyarrow(path: Path) -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise FeaturesFileError(f"{path}: Parquet needs pyarrow: pip install "
                                "'embedpipe[parquet]' (or use .npz / .npy)") from None
    return pyarrow


# -- export --------------------------------------------------------------------------------

def export_features(store_path: str | Path, out: str | Path, *, chunk_rows: int = 8192,
                    progress: bool = False, notice: Callable[[str], None] | None = None
                    ) -> int:
    """Write every committed row of a store to ``out`` (.parquet, .npz or .npy; see the
    module docstring), with its fine-tuning record where the store has one and the format
    holds it; for .npy, which cannot, ``notice`` gets one line saying so and the fix. Parquet
    and .npy are written ``chunk_rows`` rows at a time (memory bounded by the chunk); .npz
    holds the features in memory (N·D·4 bytes). The file is written under a temporary name
    and renamed into place. Returns the number of rows.

    Raises FeaturesFileError (format, pyarrow missing, cannot write), StoreError."""
    from .progress import Progress

    out = Path(out)
    suf = _suffix(out, "-o")
    _io.check_output(out, [store_path], flag="-o", kind="a features file",
                     example=f"features{suf}")
    store = open_store(store_path, features=False)
    if "stacked" in store.meta:  # pragma: no cover - open_store never stacks
        raise FeaturesFileError(f"{store.path}: pass one store")
    n, dim = len(store), store.dim
    labels = np.array([c or "" for c in store.label_names()], dtype=str).reshape(n)
    paths = np.array(store.paths, dtype=str).reshape(n)
    splits = np.array([str(s) for s in store.splits], dtype=str).reshape(n)
    hashes = np.array(store.hashes, dtype="S64").reshape(n)
    record = store.finetune_hashes  # sorted S64, or None for other weights
    if record is not None and suf == ".npy" and notice is not None:
        notice(f"note: {out.name} cannot hold the record of the {len(record)} images the "
               f"backbone of {store.path} was fine-tuned on, so a store imported from it will "
               "not say which rows an accuracy overrates; export to .npz or .parquet to keep it")
    dtype = np.float16 if store.features.dtype == np.float16 else np.float32
    rows = np.arange(n, dtype=np.int64)
    with _io.atomic_output(out, flag="-o") as tmp, \
            Progress(n, "export", enabled=progress, unit="row") as bar:
        if suf == ".npz":
            X = np.empty((n, dim), dtype=dtype)
            for pos, block in store.iter_feature_chunks(rows, chunk_rows):
                # import-features would refuse the file: nothing is written (atomic_output)
                checks.refuse_unusable_chunk(block, store, rows, chunk_rows)
                X[pos] = block
                bar.update(len(pos))
            extra = {} if record is None else {RECORD: record}
            with open(tmp, "wb") as f:
                np.savez(f, path=paths, label=labels, split=splits, hash=hashes, features=X,
                         **extra)
        elif suf == ".npy":
            rec = np.dtype([("path", paths.dtype), ("label", labels.dtype),
                            ("split", splits.dtype), ("hash", hashes.dtype),
                            ("features", dtype, (dim,))])
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=rec, shape=(n,))
            arr["path"], arr["label"], arr["split"] = paths, labels, splits
            arr["hash"] = hashes
            for pos, block in store.iter_feature_chunks(rows, chunk_rows):
                # import-features would refuse the file: nothing is written (atomic_output)
                checks.refuse_unusable_chunk(block, store, rows, chunk_rows)
                arr["features"][pos] = block
                bar.update(len(pos))
            arr.flush()
            del arr
        else:
            _write_parquet(store, tmp, paths, labels, splits, hashes, chunk_rows, bar)
    return n


def _write_parquet(store: Any, tmp: Path, paths: np.ndarray, labels: np.ndarray,
                   splits: np.ndarray, hashes: np.ndarray, chunk_rows: int, bar: Any) -> None:
    pa = _pyarrow(tmp)
    import pyarrow.parquet as pq

    dim = store.dim
    ftype = pa.float16() if store.features.dtype == np.float16 else pa.float32()
    meta = {b"embedpipe": json.dumps({"store": str(store.path), "identity": store.identity},
                                     default=str).encode()}
    if store.finetune_hashes is not None:  # as the run's .train-hashes file: one a line
        meta[PARQUET_RECORD] = b"".join(h + b"\n" for h in store.finetune_hashes.tolist())
    schema = pa.schema([("path", pa.string()), ("label", pa.string()), ("split", pa.string()),
                        ("hash", pa.string()), ("features", pa.list_(ftype, dim))],
                       metadata=meta)
    hashes = hashes.astype(str)
    rows = np.arange(len(store), dtype=np.int64)
    with pq.ParquetWriter(tmp, schema) as w:
        for pos, block in store.iter_feature_chunks(rows, chunk_rows):
            # import-features would refuse the file: nothing is written (atomic_output)
            checks.refuse_unusable_chunk(block, store, rows, chunk_rows)
            flat = pa.array(np.ascontiguousarray(block).reshape(-1), type=ftype)
            feats = pa.FixedSizeListArray.from_arrays(flat, dim)
            w.write_table(pa.Table.from_arrays(
                [pa.array(paths[pos]), pa.array(labels[pos]), pa.array(splits[pos]),
                 pa.array(hashes[pos]), feats], schema=schema))
            bar.update(len(pos))


# -- import --------------------------------------------------------------------------------

def _column(cols: dict[str, Any], name: str, path: Path, required: bool) -> Any:
    for key in (name, name + ("es" if name.endswith("h") else "s")):
        if key in cols:
            return cols[key]
    if required:
        raise FeaturesFileError(f"{path}: no '{name}' column (has {', '.join(sorted(cols)) or 'none'}); "
                                f"add one ({name} per row) — see `embedpipe import-features "
                                "--help` for the columns")
    return None


def _strings(v: Any, name: str, path: Path, n: int, *, nullable: bool) -> list[str]:
    arr = np.asarray(v)
    if arr.shape != (n,):
        raise FeaturesFileError(f"{path}: '{name}' has shape {arr.shape}, expected ({n},) like "
                                "the features; give one value per row")
    if arr.dtype.kind in "US":
        return [x.decode() if isinstance(x, bytes) else str(x) for x in arr.tolist()]
    if arr.dtype.kind == "O":
        out = []
        for x in arr.tolist():
            if x is None and nullable:
                out.append("")
            elif isinstance(x, str):
                out.append(x)
            else:
                raise FeaturesFileError(f"{path}: '{name}' holds {type(x).__name__} values "
                                        f"({x!r}); '{name}' must be text (class names, paths): "
                                        "convert it to strings")
        return out
    raise FeaturesFileError(f"{path}: '{name}' has dtype {arr.dtype}; '{name}' must be text "
                            "(class names, paths): convert it to strings")


_HEX = re.compile(r"[0-9a-f]{64}")


def _digests(values: list[str], what: str, path: Path, fix: str) -> np.ndarray:
    """``values`` as an ``S64`` array when each is a sha256 hex digest (64 lowercase hex
    digits); else FeaturesFileError naming the first other value, ``what`` and ``fix``."""
    for x in values:
        if not _HEX.fullmatch(x):
            raise FeaturesFileError(f"{path}: {what} holds {x[:80]!r}, not a sha256 hex digest "
                                    f"(64 lowercase hex digits); {fix}")
    return np.array(values, dtype="S64")


def _record(v: Any, path: Path) -> np.ndarray:
    """The fine-tuning record of a file (RECORD: .npz array or the Parquet metadata's lines),
    checked: a sorted unique ``S64`` array of sha256 digests."""
    arr = np.asarray(v)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "USO"):
        raise FeaturesFileError(f"{path}: '{RECORD}' has shape {arr.shape} and dtype "
                                f"{arr.dtype}; it must list sha256 hex digests (K,), one per "
                                "image the backbone was fine-tuned on: export it again with "
                                "`embedpipe export-features`")
    vals = [x.decode("ascii", "replace") if isinstance(x, bytes) else str(x)
            for x in arr.tolist()]
    return np.unique(_digests(vals, f"'{RECORD}'", path, "export it again with `embedpipe "
                              "export-features`, or drop the record"))


def _features(v: Any, path: Path) -> np.ndarray:
    arr = v if isinstance(v, np.ndarray) else None
    if arr is None or arr.dtype == object:
        rows = list(v)
        lens = {len(r) if hasattr(r, "__len__") else -1 for r in rows}
        if len(lens) > 1:
            raise FeaturesFileError(f"{path}: 'features' rows have different lengths "
                                    f"({', '.join(map(str, sorted(lens)[:4]))}); every row "
                                    "needs the same number of values")
        try:
            arr = np.array([np.asarray(r) for r in rows])
            if arr.dtype == object:
                arr = arr.astype(np.float64)
        except (ValueError, TypeError):
            raise FeaturesFileError(f"{path}: 'features' is not a table of numbers; give "
                                    "each row D float values") from None
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise FeaturesFileError(f"{path}: 'features' has shape {arr.shape}; it must be N rows "
                                "of D > 0 float values (N x D)")
    if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
        raise FeaturesFileError(f"{path}: 'features' has dtype {arr.dtype}; pass float values "
                                "(float32 or float16)")
    return arr


def _read_npz(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise FeaturesFileError(f"{path}: holds Python objects (pickled); save text "
                                    "columns as numpy strings (np.array(x, dtype=str)) and "
                                    "features as a float array") from None
        raise FeaturesFileError(f"{path}: not a readable .npz ({e}); write it with "
                                "numpy.savez") from None
    except (OSError, EOFError) as e:
        raise FeaturesFileError(f"{path}: not a readable .npz ({e}); write it with "
                                "numpy.savez") from None


def _read_npy(path: Path) -> dict[str, Any]:
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as e:
        raise FeaturesFileError(f"{path}: cannot load without pickle ({e}); save a structured "
                                "array with fields path, label, split, features") from None
    except (OSError, EOFError) as e:
        raise FeaturesFileError(f"{path}: not a readable .npy ({e}); write it with "
                                "numpy.save") from None
    if arr.dtype.names is None:
        raise FeaturesFileError(f"{path}: a plain {arr.dtype} array of shape {arr.shape} has no "
                                "paths or labels; save a structured array with fields path, "
                                "label, split, features (or use .npz)")
    return {k: np.asarray(arr[k]) for k in arr.dtype.names}


def _read_parquet(path: Path) -> dict[str, Any]:
    pa = _pyarrow(path)
    import pyarrow.parquet as pq

    try:
        # a large record outgrows pyarrow's default 100 MB limit on footer strings (about 1.1
        # million images: the metadata is stored twice, in pyarrow's schema copy too); no
        # string in the footer can be larger than the file
        size = min(2**31 - 1, max(10**8, path.stat().st_size))
        table = pq.read_table(path, thrift_string_size_limit=size)
    except (pa.ArrowException, OSError) as e:
        raise FeaturesFileError(f"{path}: not a readable Parquet file ({str(e)[:120]}); write "
                                "it with pyarrow or pandas") from None
    cols: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        t = col.type
        if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
            if pa.types.is_fixed_size_list(t):
                flat = col.flatten().to_numpy(zero_copy_only=False)
                cols[name] = flat.reshape(len(col), t.list_size) if len(col) else \
                    flat.reshape(0, t.list_size)
            else:
                vals = col.to_pylist()
                cols[name] = np.empty(len(vals), dtype=object)  # rows, maybe ragged
                cols[name][:] = [None if x is None else np.asarray(x) for x in vals]
        else:
            cols[name] = np.array(col.to_pylist(), dtype=object)
    meta = table.schema.metadata or {}
    if PARQUET_RECORD in meta:
        cols[RECORD] = np.array(meta[PARQUET_RECORD].split(), dtype=object)
    return cols


def _check_values(X: np.ndarray, paths: list[str], path: Path) -> None:
    bad = checks.unusable_rows(X)
    if len(bad):
        raise FeaturesFileError(f"{path}: {len(bad)} row(s) have NaN or infinite features, or "
                                f"values beyond ±{checks.FEATURE_LIMIT:.0e} (first: "
                                f"{paths[int(bad[0])]!r}); drop or recompute them")
    seen: dict[str, int] = {}
    for p in paths:
        if not p:
            raise FeaturesFileError(f"{path}: an empty path; give every row a unique path")
        if p in seen:
            raise FeaturesFileError(f"{path}: path {p!r} appears more than once; paths must be "
                                    "unique (one row per image): drop the duplicates")
        seen[p] = 1


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def imported_identity(sha256: str, dim: int, dtype: str, model_name: str) -> dict[str, Any]:
    """The store identity of features imported from a file with this sha256 (see the module
    docstring): never equal to an extracted store's."""
    return {"model": IMPORTED + model_name, "weights_source": IMPORTED + sha256,
            "weights_sha256": sha256,
            "data_config": json.dumps({"imported": True}, sort_keys=True),
            "pool": "imported", "feature_dim": int(dim), "precision": "imported",
            "dtype": dtype}


def is_imported(identity: dict[str, Any]) -> bool:
    """True for the identity of a store made by import-features."""
    return str(identity.get("weights_source") or "").startswith(IMPORTED)


def import_features(src: str | Path, out: str | Path, *, model_name: str | None = None,
                    chunk_rows: int = 8192, progress: bool = False,
                    say: Callable[[str], None] | None = None) -> tuple[int, int, int]:
    """Make a new store ``out`` from a features file (.parquet, .npz or .npy; see the module
    docstring), through StoreWriter, with the file's fine-tuning record where it has one (and
    none where it has none). The file is read into memory (N·D values) and checked first
    (columns, dtypes, ragged or non-finite features, duplicate paths, hashes and a record
    that are not sha256 digests, a record without hashes to match); the store is
    written under a temporary name and renamed into place, so a failure leaves nothing.
    Returns (rows, classes, feature dim).

    Raises FeaturesFileError naming the file and the fix, StoreError."""
    from .env import versions
    from .progress import Progress
    from .store import StoreWriter

    src, out = Path(src), Path(out)
    suf = _suffix(src, "FILE")
    if not src.is_file():
        raise FeaturesFileError(f"{src}: no such file; pass a .parquet, .npz or .npy of "
                                "features")
    if out.exists():
        raise FeaturesFileError(f"-o {out}: already exists; import into a new store (pass "
                                "another -o), a store never mixes features")
    cols = {".npz": _read_npz, ".npy": _read_npy, ".parquet": _read_parquet}[suf](src)
    X = _features(_column(cols, "features", src, True), src)
    n, dim = X.shape
    paths = _strings(_column(cols, "path", src, True), "path", src, n, nullable=False)
    labels = _strings(_column(cols, "label", src, True), "label", src, n, nullable=True)
    split_col = _column(cols, "split", src, False)
    splits = ([""] * n if split_col is None
              else _strings(split_col, "split", src, n, nullable=True))
    hash_col = _column(cols, "hash", src, False)
    hashes = (None if hash_col is None else _digests(
        _strings(hash_col, "hash", src, n, nullable=False), "'hash'", src,
        "give each row its image's sha256 (what `embedpipe export-features` writes), or drop "
        "the column"))
    record = _record(cols[RECORD], src) if RECORD in cols and suf != ".npy" else None
    if record is not None and hashes is None:
        raise FeaturesFileError(f"{src}: has a fine-tuning record ('{RECORD}', {len(record)} "
                                "images) but no 'hash' column to match its rows against it; "
                                "add each row's image sha256 as 'hash' (export-features "
                                "writes it), or drop the record")
    _check_values(X, paths, src)
    dtype = "float16" if X.dtype == np.float16 else "float32"
    X = X.astype(dtype, copy=False)
    sha = file_sha256(src)
    name = model_name or src.stem
    identity = imported_identity(sha, dim, dtype, name)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.import.h5")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        with StoreWriter.open(tmp, identity, versions=versions(),
                              finetune_hashes=record) as w:
            ids = w.class_ids(sorted({lab for lab in labels if lab}))
            lab = np.array([ids[x] if x else -1 for x in labels], dtype=np.int32)
            with Progress(n, "import", enabled=progress, unit="row") as bar:
                for lo in range(0, n, chunk_rows):
                    hi = min(n, lo + chunk_rows)
                    block = np.ascontiguousarray(X[lo:hi])
                    f32 = block.astype(np.float32, copy=False)
                    w.append(block, paths=paths[lo:hi], labels=lab[lo:hi],
                             hashes=([hashlib.sha256(r.tobytes()).hexdigest() for r in f32]
                                     if hashes is None else hashes[lo:hi].astype(str).tolist()),
                             splits=splits[lo:hi], mtime_ns=[0] * (hi - lo),
                             size=[0] * (hi - lo))
                    bar.update(hi - lo)
            w.log_run({"command": "import-features", "source": str(src), "sha256": sha,
                       "rows": n, "feature_dim": dim, "model_name": name,
                       "row_hashes": "image sha256" if hashes is not None else "features",
                       "finetuned_on_images": None if record is None else len(record),
                       "started": started, "status": "complete", "device": "none",
                       "versions": versions()})
            classes = len(w.classes)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
        with contextlib.suppress(OSError):
            tmp.with_name(f".{tmp.name}.lock").unlink()
    if say:
        say(f"identity: model {identity['model']}, weights_source {IMPORTED}{sha[:12]}…, "
            f"{dim}-d {dtype}" + ("" if record is None else
                                  f"; fine-tuning record: {len(record)} images"))
    return n, classes, dim
