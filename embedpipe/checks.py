"""Checks of inputs that every command shares, run before work starts (numpy only, no torch).

Each raises an InputError (a UserError: one line naming the file and the fix, exit 2).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import UserError


class InputError(UserError):
    """Input data a command cannot use; one line naming it and the fix."""


def nonfinite_rows(X: Any) -> np.ndarray:
    """Positions (int64) of the rows of ``X`` (N x D) holding a NaN or an infinity."""
    X = np.asarray(X)
    if X.size == 0 or np.issubdtype(X.dtype, np.integer):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(~np.isfinite(X).all(axis=1))


def refuse_nonfinite(X: Any, paths: Sequence[str], where: str) -> None:
    """Raise InputError naming the rows of ``X`` whose features are NaN or infinite (the first
    five paths and how many in all): no head can be fitted on them or predict them, and
    scikit-learn would stop with a ValueError deep inside (or print NaN confidences).
    ``paths[i]`` names row i of ``X``; ``where`` is the store."""
    bad = nonfinite_rows(X)
    if len(bad):
        raise _nonfinite_error(where, [str(paths[i]) for i in bad[:5]], len(bad))


def refuse_nonfinite_chunk(X: Any, store: Any, over: Any, chunk_rows: int) -> None:
    """``refuse_nonfinite`` for one chunk ``X`` of a pass that streams rows of ``store`` (a
    FeatureStore). A chunk with NaN or infinite rows holds only some of them: the error counts
    and names them over all of ``over`` (store row indices: the rows the command reads) in one
    more pass, in store order, ``chunk_rows`` at a time, as the in-memory commands do."""
    if not len(nonfinite_rows(X)):
        return
    rows = np.asarray(over, dtype=np.int64)
    bad: list[int] = []
    for idx, chunk in store.iter_feature_chunks(rows, chunk_rows):
        bad.extend(int(r) for r in rows[idx[nonfinite_rows(chunk)]])
    bad.sort()
    raise _nonfinite_error(str(store.path), [str(store.paths[r]) for r in bad[:5]], len(bad))


def _nonfinite_error(where: str, shown: list[str], count: int) -> InputError:
    more = f" and {count - len(shown)} more" if count > len(shown) else ""
    return InputError(f"{where}: {count} row(s) hold NaN or infinite features "
                      f"({', '.join(shown)}{more}); the store is damaged or the backbone "
                      "overflowed (fp16): re-extract those images into a new store (e.g. with "
                      "--precision fp32), or remove them from the folder and rerun extract "
                      "with --prune")
