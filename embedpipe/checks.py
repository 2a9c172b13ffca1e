"""Checks of inputs that every command shares, run before work starts (numpy only, no torch).

Each raises an InputError (a UserError: one line naming the file and the fix, exit 2).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import UserError


class InputError(UserError):
    """Input data a command cannot use; one line naming it and the fix."""


# Beyond this magnitude a feature value is not an embedding: no backbone's pooled features come
# near it (fp16 stops at 65,504), and heads computing in float32 overflow on it. Measured with
# every in-memory head fitted with prep=scale on Fashion-MNIST Lite0 features (a scratch run; the
# knn case is tests/test_predict.py):
# rows with values of 1e12 and 1e15 predict; at 1e17 knn's squared distances to standardised
# rows overflow (scikit-learn raises ValueError), and from 1e20 heads answer with confidence 1.0
# or NaN.
FEATURE_LIMIT = 1e12


def unusable_rows(X: Any) -> np.ndarray:
    """Positions (int64) of the rows of ``X`` (N x D, any real dtype) holding a NaN, an infinity
    or a value beyond ±FEATURE_LIMIT (integers too: an import of int64 features)."""
    X = np.asarray(X)
    if X.size == 0 or X.dtype.kind not in "iuf":
        return np.zeros(0, dtype=np.int64)
    info = np.finfo(X.dtype) if X.dtype.kind == "f" else np.iinfo(X.dtype)
    if X.dtype.kind in "iu" and info.max <= FEATURE_LIMIT:
        return np.zeros(0, dtype=np.int64)  # int8-int32: always within the limit
    # a float dtype whose largest value is within the limit (float16, an fp16 store's rows) has
    # only NaN and infinities to refuse; comparing it with 1e12 would cast the limit to inf
    narrow = X.dtype.kind == "f" and float(info.max) <= FEATURE_LIMIT
    ok = np.empty(len(X), dtype=bool)
    step = max(1, (1 << 22) // max(1, X[0].size))  # ~4M values (16 MiB of float32) at a time
    for i in range(0, len(X), step):
        block = X[i:i + step]
        if narrow:
            good = np.isfinite(block)
        elif X.dtype.kind in "iu":  # exact integer bounds (no float cast of int64)
            good = (block <= int(FEATURE_LIMIT)) & (block >= -int(FEATURE_LIMIT))
        else:
            with np.errstate(invalid="ignore"):  # NaN compares False, as it should here
                good = np.abs(block) <= FEATURE_LIMIT
        ok[i:i + step] = good.reshape(len(block), -1).all(axis=1)
    return np.flatnonzero(~ok)


def refuse_unusable(X: Any, paths: Sequence[str], where: str, store: Any = None) -> None:
    """Raise InputError naming the rows of ``X`` whose features are NaN, infinite or beyond
    ±FEATURE_LIMIT (the first five paths and how many in all): no head can be fitted on them or
    predict them, and scikit-learn would stop with a ValueError deep inside (or print NaN or
    1.0 confidences).
    ``paths[i]`` names row i of ``X``; ``where`` is the store. ``store`` (optional, the
    FeatureStore ``X`` comes from): when it stacks several stores, the error names the ones
    whose columns hold the bad values."""
    bad = unusable_rows(X)
    if len(bad):
        raise _unusable_error(where, [str(paths[i]) for i in bad[:5]], len(bad),
                              np.asarray(X)[bad[:64]], store)


def refuse_unusable_chunk(X: Any, store: Any, over: Any, chunk_rows: int) -> None:
    """``refuse_unusable`` for one chunk ``X`` of a pass that streams rows of ``store`` (a
    FeatureStore). A chunk with unusable rows holds only some of them: the error counts
    and names them over all of ``over`` (store row indices: the rows the command reads) in one
    more pass, in store order, ``chunk_rows`` at a time, as the in-memory commands do."""
    if not len(unusable_rows(X)):
        return
    rows = np.asarray(over, dtype=np.int64)
    bad: list[int] = []
    sample: list[np.ndarray] = []
    for idx, chunk in store.iter_feature_chunks(rows, chunk_rows):
        found = unusable_rows(chunk)
        bad.extend(int(r) for r in rows[idx[found]])
        if sum(len(a) for a in sample) < 64:
            sample.append(np.asarray(chunk)[found])
    bad.sort()
    raise _unusable_error(str(store.path), [str(store.paths[r]) for r in bad[:5]], len(bad),
                          np.concatenate(sample) if sample else None, store)


def refuse_unusable_stored(store: Any, rows: Any, chunk_rows: int) -> None:
    """``refuse_unusable`` over store rows ``rows`` read ``chunk_rows`` at a time (a store
    whose features are not in memory)."""
    rows = np.asarray(rows, dtype=np.int64)
    for _, chunk in store.iter_feature_chunks(rows, chunk_rows):
        refuse_unusable_chunk(chunk, store, rows, chunk_rows)


def _stacked_culprits(store: Any, sample: Any) -> list[str]:
    """The stacked stores (paths) whose columns hold the unusable values of ``sample`` (rows of
    ``store``'s features); [] when ``store`` is not a stack of stores."""
    meta = getattr(store, "meta", None) or {}
    names, dims = meta.get("stores"), meta.get("feature_dims")
    if sample is None or not names or not dims or len(names) != len(dims):
        return []
    out, lo = [], 0
    for name, dim in zip(names, dims):
        if len(unusable_rows(np.asarray(sample)[:, lo:lo + int(dim)])):
            out.append(str(name))
        lo += int(dim)
    return out


def _unusable_error(where: str, shown: list[str], count: int, sample: Any = None,
                    store: Any = None) -> InputError:
    """The one-line refusal; ``sample``: some of the bad rows (to name the cause and, for
    stacked stores, the stores holding them)."""
    more = f" and {count - len(shown)} more" if count > len(shown) else ""
    culprits = _stacked_culprits(store, sample)
    if culprits:
        where = f"{' and '.join(culprits)} (stacked as {where})"
    with np.errstate(invalid="ignore"):
        nonfinite = sample is None or not np.isfinite(np.asarray(sample, dtype=np.float64)).all()
    cause = ("the store is damaged or the backbone overflowed (fp16 or bf16 precision): "
             "re-extract those images into a new store (e.g. with --precision fp32)"
             if nonfinite else
             "no backbone's pooled features come near that, so the store is damaged or its "
             "features were imported so: re-extract those images into a new store")
    return InputError(f"{where}: {count} row(s) hold NaN or infinite features, or values "
                      f"beyond ±{FEATURE_LIMIT:.0e} ({', '.join(shown)}{more}); {cause}, or "
                      "remove them from the folder and rerun extract with --prune")
