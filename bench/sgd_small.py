"""Small-data defaults side by side: the streaming heads' rule, and svm's preprocessing and C.

sgd and logreg-sgd default to standardised rows and 5 epochs of averaged SGD (chosen on 10k
rows). Below ``registry.SMALL_DATA_ROWS`` rows per class their data rule takes L2-normalised
rows and 20 epochs instead. This script fits both (and the alternatives tried) on the repeated
sets of bench/accuracy.py: random stratified 170/71 splits of the natural set and draws of 10
and 50 Fashion-MNIST train rows per class against the same 2,000 test rows. It prints mean test
accuracy ± standard error over the splits, next to the best in-memory heads' defaults. Fits
are in memory (``fit_configuration`` on arrays: scikit-learn's ``fit``, ``max_iter`` epochs
over all rows shuffled), which is what `embedpipe fit` does when the training rows fit in one
mixing window or chunk (bench/streaming.py measures the streamed reads).

svm (its default: L2-normalised rows, C=3, at every size) runs next to C=1, C=10 and its earlier
default (standardised rows, C=10) on the same sets, and on the 10k/2k Fashion-MNIST split (one
split; not with --quick).

    python bench/sgd_small.py              # 20 splits, 5 draws
    python bench/sgd_small.py --quick      # 4 splits, 2 draws

Writes bench/results/sgd_small.md and sgd_small.json (--quick: scratch files).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402
import accuracy  # noqa: E402

from embedpipe.heads.fit import fit_configuration  # noqa: E402
from embedpipe.heads.source import Labeled  # noqa: E402

SVM_CONFIGS = [
    ("svm defaults (l2, C=3)", "svm", None),
    ("svm l2, C=1", "svm", {"C": 1.0}),
    ("svm l2, C=10", "svm", {"C": 10.0}),
    ("svm standardised, C=10 (the earlier default)", "svm", {"prep": "scale", "C": 10.0}),
]
CONFIGS = [  # (label, head, parameters; None = its defaults for the data, the rule applied)
    *SVM_CONFIGS,
    ("logreg defaults", "logreg", None),
    ("sgd registry (scale, 5 epochs)", "sgd", {"prep": "scale", "max_iter": 5}),
    ("sgd scale, 20 epochs", "sgd", {"prep": "scale", "max_iter": 20}),
    ("sgd scale, 20 epochs, alpha=1e-3", "sgd", {"prep": "scale", "max_iter": 20,
                                                 "alpha": 1e-3}),
    ("sgd rule (l2, 20 epochs)", "sgd", None),
    ("sgd l2, 50 epochs, alpha=1e-5", "sgd", {"prep": "l2", "max_iter": 50, "alpha": 1e-5}),
    ("logreg-sgd registry (scale, 5 epochs)", "logreg-sgd", {"prep": "scale", "max_iter": 5}),
    ("logreg-sgd scale, 20 epochs", "logreg-sgd", {"prep": "scale", "max_iter": 20}),
    ("logreg-sgd scale, 20 epochs, alpha=1e-3", "logreg-sgd", {"prep": "scale", "max_iter": 20,
                                                               "alpha": 1e-3}),
    ("logreg-sgd rule (l2, 20 epochs)", "logreg-sgd", None),
    ("logreg-sgd l2, 50 epochs, alpha=1e-5", "logreg-sgd", {"prep": "l2", "max_iter": 50,
                                                            "alpha": 1e-5}),
]


def main() -> None:
    args = accuracy.repeated_args(quick=(4, 2))
    hdr = bu.Header("Small-data defaults: the streaming heads' rule, and svm's preprocessing and C")
    rows, text = [], ""
    sets = accuracy.repeated_splits(args)
    if not args.quick:
        args.sets = ["fmnist-all"]
        Xtr, ytr, Xte, yte, src = accuracy.load_sets(args)["fmnist-all"]
        sets["fmnist-all"] = ([(Xtr, ytr, Xte, yte)], f"one split: {src}, svm only")
    for name, (splits, how) in sets.items():
        table = []
        for label, head, params in SVM_CONFIGS if name == "fmnist-all" else CONFIGS:
            accs = [float((np.asarray(fit_configuration(Labeled.in_memory(a, b), head, params)[0]
                                      .predict(c)) == d).mean()) for a, b, c, d in splits]
            m = float(np.mean(accs))
            se = float(np.std(accs, ddof=1) / np.sqrt(len(accs))) if len(accs) > 1 else \
                float("nan")
            print(f"{name}: {label} {m:.3f} ± {se:.3f}", file=sys.stderr, flush=True)
            rows.append({"set": name, "config": label, "mean": m, "se": se, "accuracies": accs})
            table.append((label, f"{m:.3f}", f"{se:.3f}"))
        text += f"\n## {name}: {how}\n\n" + bu.table(["configuration", "mean test accuracy",
                                                       "± s.e."], table) + "\n"
    bu.finish("sgd_small", hdr, ["features: bundled EfficientNet-Lite0, 1280-d (the stores of "
                                 "bench/accuracy.py); one BLAS thread"], text, {"rows": rows},
              args.quick)


if __name__ == "__main__":
    main()
