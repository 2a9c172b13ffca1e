"""Calibrating heads without native probabilities on many rows: 5-fold temperature scaling
(the head fitted 6 times: 5 folds and all rows; embedpipe's calibration below
fewshot.HOLDOUT_ABOVE rows) against one held-out stratified sample (fitted once, on all but
fewshot.HOLDOUT_ROWS rows; embedpipe's above it). Test accuracy, log loss, top-label expected
calibration error (15 equal-width bins) and fit seconds, side by side on the same rows.

Bundled-Lite0 features of Fashion-MNIST, the full 60k train / 10k test store (extracted on
first use, incremental). Each head is built as `fit` builds it (its defaults and data rules),
one BLAS thread (threadpoolctl); the two calibrations of a head run one after the other.

Run from the repository root:  python bench/calibration.py [--quick]
(--quick: linear-svm on 25,000 of the train rows, scratch output). Writes
bench/results/calibration.md and .json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402


def ece(proba: np.ndarray, classes: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Top-label expected calibration error: the row-weighted mean over equal-width confidence
    bins of |accuracy - mean confidence|."""
    conf = proba.max(axis=1)
    right = classes[proba.argmax(axis=1)] == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(right[which == b].mean() - conf[which == b].mean()) * np.sum(which == b)
                     for b in range(bins) if np.any(which == b)) / len(y))


def run_one(head: str, how: str, X, y, Xte, yte) -> dict:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.metrics import log_loss
    from threadpoolctl import threadpool_limits

    from embedpipe.heads import fewshot
    from embedpipe.heads import registry as heads

    params = heads.with_data_defaults(head, None, y, X.shape[1])
    base = heads.build(head, params, data=heads.data_of(y, X.shape[1]))
    cal = CalibratedClassifierCV(base, method="temperature", ensemble=False, cv=5)
    if how == "held-out":
        fewshot.adapt(cal, y, head)  # above HOLDOUT_ABOVE rows: one held-out split
        assert not isinstance(cal.cv, int), "adapt kept k folds: too few rows for the bench"
    with threadpool_limits(1):
        t, c = time.perf_counter(), time.process_time()
        cal.fit(X, y)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    proba = cal.predict_proba(Xte)
    return {"head": head, "calibration": fewshot.calibration_text(cal), "how": how,
            "accuracy": float(np.mean(cal.classes_[proba.argmax(axis=1)] == yte)),
            "log_loss": float(log_loss(yte, proba, labels=cal.classes_)),
            "ece": ece(proba, cal.classes_, yte), "fit_wall_s": wall, "fit_cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    head = bu.Header("Calibration on many rows: 5-fold vs one held-out sample")
    path, X, y, Xte, yte = bu.fmnist_split(6000, 1000)
    if args.quick:
        keep = np.sort(np.random.default_rng(0).choice(len(y), 25_000, replace=False))
        X, y = X[keep], y[keep]
    heads_run = ["linear-svm"] if args.quick else ["linear-svm", "svm"]
    rows, payload = [], []
    for name in heads_run:
        got = {}
        for how in ("5-fold", "held-out"):
            res = run_one(name, how, X, y, Xte, yte)
            print(res, flush=True)
            got[how] = res
            payload.append({"train": len(y), "test": len(yte), **res})
            rows.append([name, res["calibration"], f"{res['accuracy']:.4f}",
                         f"{res['log_loss']:.4f}", f"{res['ece']:.4f}",
                         f"{res['fit_wall_s']:.0f}", f"{res['fit_cpu_s']:.0f}"])
        ratio = got["5-fold"]["fit_cpu_s"] / max(got["held-out"]["fit_cpu_s"], 1e-9)
        rows.append([name, "ratio 5-fold / held-out (CPU s)", "", "", "", "", f"{ratio:.1f}x"])
    bu.publish("calibration", head,
               [f"set: Fashion-MNIST bundled-Lite0 features, {len(y)} train / {len(yte)} test "
                f"rows, 10 classes ({path.name})",
                "each head as `fit` builds it (defaults and data rules), one BLAS thread; "
                "ECE: top-label, 15 equal-width bins",
                "the machine's load shows in the wall seconds, much less in the CPU seconds"],
               ["head", "calibration", "test accuracy", "log loss", "ECE", "fit s (wall)",
                "fit s (CPU)"], rows, {"rows": payload}, args.quick)


if __name__ == "__main__":
    main()
