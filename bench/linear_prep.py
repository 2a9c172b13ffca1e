"""logreg and linear-svm on large stores: L2-normalised rows (their defaults) against
standardised features (their earlier defaults), test accuracy and fit seconds.

Bundled-Lite0 features of Fashion-MNIST at two sizes: 1,000 train rows per class (10k/2k, the
accuracy bench's store) and the full 60k train / 10k test. Each configuration is one
scikit-learn fit with one BLAS thread (threadpoolctl); fit seconds are CPU (process time).
The stores are extracted on first use (incremental; a rerun extracts nothing).

Run from the repository root:  python bench/linear_prep.py [--quick]
(--quick: the 10k store only, scratch output). Writes bench/results/linear_prep.md and .json.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

CONFIGS = [  # (head, prep, C, the head's default?)
    ("logreg", "l2", 10.0, "default"),
    ("logreg", "l2", 100.0, ""),
    ("logreg", "scale", 1.0, "earlier default"),
    ("logreg", "scale", 0.01, ""),
    ("linear-svm", "l2", 1.0, "default"),
    ("linear-svm", "scale", 0.01, "earlier default"),
    ("linear-svm", "scale", 0.001, ""),
]


def fit_one(head: str, prep: str, C: float, Xtr, ytr, Xte, yte) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.svm import LinearSVC
    from threadpoolctl import threadpool_limits

    p = Normalizer() if prep == "l2" else StandardScaler()
    A, B = p.fit_transform(Xtr), p.transform(Xte)
    est = (LogisticRegression(C=C, max_iter=2000) if head == "logreg"
           else LinearSVC(C=C, max_iter=5000))
    with threadpool_limits(1), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = time.process_time()
        est.fit(A, ytr)
        seconds = time.process_time() - t
    converged = not any("converge" in str(w.message).lower() for w in caught)
    return {"accuracy": float(np.mean(est.predict(B) == yte)), "fit_cpu_s": seconds,
            "converged": converged}


def main() -> None:
    from embedpipe.store import open_store

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    head = bu.Header("logreg and linear-svm on large stores: L2-normalised vs standardised rows")
    sizes = [(1000, 200)] if args.quick else [(1000, 200), (6000, 1000)]
    rows, payload = [], []
    for train, test in sizes:
        _, path, _ = bu.fmnist_features(train, test)
        s = open_store(path)
        X = np.asarray(s.features, np.float32)
        y, split = np.asarray(s.labels), np.asarray(s.splits)
        tr, te = np.nonzero(split == "train")[0], np.nonzero(split == "test")[0]
        for name, prep, C, note in CONFIGS:
            r = fit_one(name, prep, C, X[tr], y[tr], X[te], y[te])
            print(f"{train}/class {name} prep={prep} C={C}: {r}", flush=True)
            rows.append([f"{len(tr)}/{len(te)}", name, prep, C, note, f"{r['accuracy']:.4f}",
                         f"{r['fit_cpu_s']:.1f}", "yes" if r["converged"] else "no"])
            payload.append({"train": len(tr), "test": len(te), "head": name, "prep": prep,
                            "C": C, **r})
    bu.publish("linear_prep", head,
               ["features: bundled EfficientNet-Lite0, 1280-d, extraction defaults",
                "one scikit-learn fit per row, one BLAS thread; fit s = CPU seconds",
                "not run: linear-svm on standardised rows at C >= 0.1 (C=1 took liblinear "
                "485 s at 10k rows in an earlier one-off run)"],
               ["train/test rows", "head", "prep", "C", "", "test accuracy", "fit s (CPU)",
                "converged"], rows, {"rows": payload}, args.quick)


if __name__ == "__main__":
    main()
