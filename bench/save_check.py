"""What saving a head file costs, and the compact-form check inside it: `fit` saves through
artifacts.save, which checks the head's compact form (compact.agrees) against the scikit-learn
estimator on 511 midpoints of 512 training rows (probabilities within 1e-5), and before this
change on the 512 rows' classes too. Before, for a head whose predict is the argmax of its
predict_proba (a calibrated head, a soft vote) the check scored the rows twice (predict on all
1,023, then predict_proba on 511); now once (predict_proba, the classes its argmax, as
scikit-learn's own predict takes them), and the training rows' classes only for a head holding
a kNN (compact.scores_training_rows_apart: its training rows are its own nearest neighbours).
An RBF svm's kernel rows against every support vector are most of the check.

The two ways side by side in one process (before: a copy of the old compact.agrees put in its
place, and every head's training rows checked), alternating which runs first, REPEATS each, on
heads fitted once as `fit` fits them: an svm and a soft vote svm+knn+ridge on 10,000 Fashion-
MNIST bundled-Lite0 rows (10k/2k store, extracted on first use). Each save writes, checks,
seals and reloads the whole file (one save before, not counted: imports and first calls);
the table gives the median seconds of save and of the check.

Run from the repository root:  python bench/save_check.py [--quick]
(--quick: 3,000 rows, one repeat, scratch output). Writes bench/results/save_check.md and
.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

REPEATS = 3


def old_agrees(estimator: Any, compact: Any, X: np.ndarray,
               classes_only: np.ndarray | None = None) -> bool:
    """compact.agrees as it was before this change (predict, then predict_proba)."""
    rows = X if classes_only is None else np.concatenate([X, classes_only])
    if len(X) == 0 or not np.array_equal(np.asarray(estimator.predict(rows)),
                                         compact.predict(rows)):
        return False
    for name in ("predict_proba", "decision_function"):
        if not hasattr(estimator, name):
            if name == "predict_proba" and hasattr(compact, name):
                return False
            continue
        try:
            want = np.asarray(getattr(estimator, name)(X), dtype=np.float64)
        except AttributeError:
            continue
        if not hasattr(compact, name):
            return False
        got = np.asarray(getattr(compact, name)(X), dtype=np.float64)
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-6,
                                                      equal_nan=True):
            return False
    return True


def fitted(head: str, X: np.ndarray, y: np.ndarray) -> Any:
    from embedpipe.heads import registry as heads
    from embedpipe.heads.fit import blas_threads
    from embedpipe.heads.source import Labeled
    from embedpipe.heads.train import _calibrated

    params = heads.with_data_defaults(head, None, y, X.shape[1])
    base = heads.build(head, params, data=heads.data_of(y, X.shape[1]))
    src = Labeled.in_memory(X, y)
    with blas_threads(len(y)):
        if heads.get(head).members:
            return src.fit(base, head, params)
        return _calibrated(None, base, src, src.take(np.zeros(0, np.int64)), 0, head)[0]


def timed_save(est: Any, check: np.ndarray, which: str, out: Path) -> dict:
    from embedpipe.heads import artifacts, compact

    real = compact.agrees
    spent = [0.0]

    def counted(*a: Any, **k: Any) -> bool:
        t = time.perf_counter()
        try:
            return (old_agrees if which == "before" else real)(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    apart = compact.scores_training_rows_apart
    compact.agrees = counted
    if which == "before":
        compact.scores_training_rows_apart = lambda est: True
    try:
        t = time.perf_counter()
        artifacts.save(out, est, artifacts.new_manifest(head="bench"), check_rows=check)
        total = time.perf_counter() - t
    finally:
        compact.agrees, compact.scores_training_rows_apart = real, apart
    with __import__("zipfile").ZipFile(out) as z:
        has_compact = compact.SPEC_MEMBER in z.namelist()
    return {"save_s": total, "check_s": spent[0], "compact_form": has_compact}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from embedpipe.heads.train import _check_sample

    header = bu.Header("Saving a head: the compact-form check scoring its rows once")
    path, X, y, _, _ = bu.fmnist_split(1000, 200)
    if args.quick:
        X, y = X[:3000], y[:3000]
    repeats = 1 if args.quick else REPEATS
    rows, payload = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for head in ("svm", "svm+knn+ridge"):
            t = time.perf_counter()
            est = fitted(head, X, y)
            fit_s = time.perf_counter() - t
            print(f"{head}: fitted in {fit_s:.1f} s", flush=True)
            check = X[_check_sample(len(y))]
            timed_save(est, check, "after", Path(tmp) / "warm.skops")  # imports, first calls
            got: dict[str, list[dict]] = {"before": [], "after": []}
            for r in range(repeats):
                for which in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    res = timed_save(est, check, which, Path(tmp) / f"{which}.skops")
                    print(head, which, res, flush=True)
                    got[which].append(res)
                    payload.append({"head": head, "rows": len(y), "which": which,
                                    "fit_s": fit_s, **res})
            med = {w: (statistics.median(g["save_s"] for g in got[w]),
                       statistics.median(g["check_s"] for g in got[w])) for w in got}
            for w, label in (("before", "predict (1,023 rows), then predict_proba (511)"),
                             ("after", "predict_proba once (511; 1,023 with a kNN)")):
                rows.append([head, f"{len(y):,}", f"{fit_s:.1f}", label,
                             f"{med[w][0]:.2f}", f"{med[w][1]:.2f}",
                             "yes" if all(g["compact_form"] for g in got[w]) else "NO"])
            rows.append([head, "", "", "ratio before / after",
                         f"{med['before'][0] / med['after'][0]:.2f}x",
                         f"{med['before'][1] / med['after'][1]:.2f}x", ""])
    bu.publish("save_check", header,
               [f"set: Fashion-MNIST bundled-Lite0 features ({path.name}), the first "
                f"{len(y):,} train rows, 10 classes; heads as `fit` fits them (defaults, data "
                "rules, calibration); check rows: fit's 512 (train._check_sample)",
                f"median of {repeats} saves each way, alternating which first; wall seconds"],
               ["head", "train rows", "fit s", "check scores the rows by", "save s",
                "of which check s", "compact form kept"], rows, {"rows": payload}, args.quick)


if __name__ == "__main__":
    main()
