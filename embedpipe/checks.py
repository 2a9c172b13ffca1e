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


def refuse_nonfinite(X: Any, paths: Sequence[str], where: str, *, total: int | None = None
                     ) -> None:
    """Raise InputError naming the rows of ``X`` whose features are NaN or infinite (the first
    five paths and how many in all): no head can be fitted on them or predict them, and
    scikit-learn would stop with a ValueError deep inside (or print NaN confidences).
    ``paths[i]`` names row i of ``X``; ``where`` is the store."""
    bad = nonfinite_rows(X)
    if not len(bad):
        return
    shown = ", ".join(str(paths[i]) for i in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise InputError(f"{where}: {len(bad)} row(s) hold NaN or infinite features ({shown}{more})"
                     f"; the store is damaged or the backbone overflowed (fp16): re-extract "
                     "those images into a new store (e.g. with --precision fp32), or remove "
                     "them from the folder and rerun extract with --prune")
