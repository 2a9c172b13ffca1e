"""knn's neighbour count by rows per class: test accuracy of the knn head (its preprocessing:
L2-normalised rows in the linear-discriminant space) at k = 10 (the registry default), 20, 30
and 50, on stratified samples of Fashion-MNIST train rows, scored on the 10k test rows.

Bundled-Lite0 features of the full 60k train / 10k test store (extracted on first use,
incremental). The samples are drawn per class with a fixed seed; one draw per size above 500
per class, three at and below (where a draw moves the result more). Accuracy only (it does not
depend on the machine's load); each fit with one BLAS thread.

Run from the repository root:  python bench/knn_k.py [--quick]
(--quick: 50 and 500 per class, one draw, scratch output). Writes bench/results/knn_k.md and
.json. The registry's knn data rule (k=20 from 1,000 rows per class) comes from this table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

KS = (10, 20, 30, 50)


def main() -> None:
    from threadpoolctl import threadpool_limits

    from embedpipe.heads import registry as heads

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    head = bu.Header("knn: accuracy by neighbour count and rows per class")
    path, X, y, Xte, yte = bu.fmnist_split(6000, 1000)
    sizes = [(50, 1), (500, 1)] if args.quick else [(50, 3), (200, 3), (500, 3), (1000, 1),
                                                     (2000, 1), (6000, 1)]
    rng = np.random.default_rng(0)
    rows, payload = [], []
    for per, draws in sizes:
        acc = np.zeros((draws, len(KS)))
        for d in range(draws):
            idx = np.concatenate([rng.choice(np.flatnonzero(y == c), min(per, int(np.sum(y == c))),
                                             replace=False) for c in np.unique(y)])
            for j, k in enumerate(KS):
                # the registry's knn with n_neighbors set (no data rule: k is what is compared)
                est = heads.build("knn", {"n_neighbors": k})
                with threadpool_limits(1):
                    est.fit(X[idx], y[idx])
                    acc[d, j] = float(np.mean(est.predict(Xte) == yte))
            print(per, d, acc[d], flush=True)
        mean = acc.mean(axis=0)
        best = KS[int(np.argmax(mean))]
        rows.append([per, draws] + [f"{a:.4f}" for a in mean] + [best])
        payload.append({"per_class": per, "draws": draws,
                        "accuracy": {str(k): acc[:, j].tolist() for j, k in enumerate(KS)}})
    bu.publish("knn_k", head,
               [f"set: Fashion-MNIST bundled-Lite0 features, samples of {len(y)} train rows, "
                f"{len(yte)} test rows ({path.name})",
                "knn as registered (prep=l2+lda, euclidean, distance weights), n_neighbors set; "
                "mean test accuracy over the draws"],
               ["train rows per class", "draws"] + [f"k={k}" for k in KS] + ["best k"], rows,
               {"rows": payload}, args.quick)


if __name__ == "__main__":
    main()
