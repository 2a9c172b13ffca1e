"""Calibrating heads without native probabilities on 5,000-20,000 rows: 5-fold temperature
scaling (scikit-learn's CalibratedClassifierCV: the head fitted 6 times, 5 folds and all rows;
embedpipe's calibration there before) against a held-out fifth then refitted (the head fitted on
a stratified 4/5, the temperature on its decision values for the other fifth, the head refitted
on all rows: 2 fits; embedpipe's calibration there now, fewshot.refit_split and
calibration.fit). Both end with the same head fitted on all rows, so the predicted classes are
the same; what differs is the temperature (fitted on every row's out-of-fold value, or on a
fifth of the rows) and the time. Test accuracy, log loss, top-label ECE (15 equal-width bins)
and fit seconds, the two ways side by side on the same rows, alternating which runs first.

Bundled-Lite0 features of Fashion-MNIST, a 20,000 train / 2,000 test store (extracted on first
use, incremental); the 6,000 and 10,000-row sets are stratified samples of its train rows. Each
head is built as `fit` builds it (its defaults and data rules for those rows), with fit's BLAS
threads (blas_threads: the library's count above 5,000 rows).

Run from the repository root:  python bench/calibration_refit.py [--quick]
(--quick: 5,500 rows, linear-svm and ridge, scratch output). Writes
bench/results/calibration_refit.md and .json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402
from calibration import ece  # noqa: E402


def run_one(head: str, how: str, X, y, Xte, yte) -> dict:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.metrics import log_loss

    from embedpipe.heads import calibration, fewshot
    from embedpipe.heads import registry as heads
    from embedpipe.heads.fit import blas_threads

    params = heads.with_data_defaults(head, None, y, X.shape[1])
    base = heads.build(head, params, data=heads.data_of(y, X.shape[1]))
    cal = CalibratedClassifierCV(base, method="temperature", ensemble=False, cv=5)
    fewshot.adapt(cal, y, head)
    if how == "refit":
        assert calibration.refits(cal, y), "outside the refit range"
    with blas_threads(len(y)):
        t, c = time.perf_counter(), time.process_time()
        cal = calibration.fit(cal, X, y) if how == "refit" else cal.fit(X, y)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    proba = cal.predict_proba(Xte)
    return {"head": head, "rows": len(y), "calibration": fewshot.calibration_text(cal),
            "how": how, "accuracy": float(np.mean(cal.classes_[proba.argmax(axis=1)] == yte)),
            "predicted": cal.classes_[proba.argmax(axis=1)].tolist(),
            "log_loss": float(log_loss(yte, proba, labels=cal.classes_)),
            "ece": ece(proba, cal.classes_, yte),
            "mean_confidence": float(proba.max(axis=1).mean()),
            "fit_wall_s": wall, "fit_cpu_s": cpu}


def sample(y: np.ndarray, n: int) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    if n >= len(y):
        return np.arange(len(y))
    keep, _ = train_test_split(np.arange(len(y)), train_size=n, stratify=y, random_state=0)
    return np.sort(keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    header = bu.Header("Calibration on 6,000-20,000 rows: 5-fold vs a held-out fifth, refitted")
    path, X_all, y_all, Xte, yte = bu.fmnist_split(2000, 200)
    sizes = [5500] if args.quick else [6000, 10000, 20000]
    names = ["linear-svm", "ridge"] if args.quick else ["svm", "linear-svm", "ridge"]
    rows, payload, turn = [], [], 0
    for n in sizes:
        keep = sample(y_all, n)
        X, y = X_all[keep], y_all[keep]
        for name in names:
            got = {}
            order = ("5-fold", "refit") if turn % 2 == 0 else ("refit", "5-fold")
            turn += 1
            for how in order:
                res = run_one(name, how, X, y, Xte, yte)
                print({k: v for k, v in res.items() if k != "predicted"}, flush=True)
                got[how] = res
            same = got["5-fold"]["predicted"] == got["refit"]["predicted"]
            for how in ("5-fold", "refit"):
                res = got[how]
                del res["predicted"]
                payload.append({"train": n, "test": len(yte), "same_predictions": same, **res})
                rows.append([name, f"{n:,}", res["calibration"], f"{res['accuracy']:.4f}",
                             f"{res['log_loss']:.4f}", f"{res['ece']:.4f}",
                             f"{res['mean_confidence']:.3f}", f"{res['fit_wall_s']:.1f}",
                             f"{res['fit_cpu_s']:.1f}"])
            ratio = got["5-fold"]["fit_cpu_s"] / max(got["refit"]["fit_cpu_s"], 1e-9)
            wall = got["5-fold"]["fit_wall_s"] / max(got["refit"]["fit_wall_s"], 1e-9)
            rows.append([name, f"{n:,}", "ratio 5-fold / refit; same predicted class on every "
                         f"test row: {'yes' if same else 'NO'}", "", "", "", "",
                         f"{wall:.1f}x", f"{ratio:.1f}x"])
    bu.publish("calibration_refit", header,
               [f"set: Fashion-MNIST bundled-Lite0 features ({path.name}), train rows sampled "
                f"per size (stratified, seed 0), the same {len(yte)} test rows, 10 classes",
                "each head as `fit` builds it (defaults and data rules), fit's BLAS threads; "
                "ECE: top-label, 15 equal-width bins; the two ways of each row pair ran one "
                "after the other, alternating which first"],
               ["head", "train rows", "calibration", "test accuracy", "log loss", "ECE",
                "mean confidence", "fit s (wall)", "fit s (CPU)"], rows, {"rows": payload},
               args.quick)


if __name__ == "__main__":
    main()
