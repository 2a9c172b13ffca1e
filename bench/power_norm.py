"""Power normalisation (the signed square root, ``prep=sqrt+...``) before each head's own
preprocessing: every in-memory head with and without it, paired split by split.

Pooled CNN features are averages of ReLU activations: a few channels fire strongly and dominate
dot products and distances. ``sign(x) * sqrt(|x|)`` per feature evens them out (Perronnin et
al. 2010's signed square root; the "power transform" of few-shot transfer, PT-MAP). Each head
is fitted as `fit` fits it (``fit_configuration``: its defaults and data rules for the data,
fewshot.adapt on few rows), once with the square root in front of its preprocessing and once
without (``prep`` with ``sqrt+`` removed, or added), on the same rows; the table gives both
test accuracies and their difference, paired per split (mean ± standard error).

Sets (bundled-Lite0 features, extracted on first use):
  * natural: the 241 photos of bench/natural.py, 20 random stratified 170/71 splits (as
    bench/accuracy.py draws them);
  * Fashion-MNIST 3, 10 and 50 train rows per class, 5 draws each (seeds 1-5) against the same
    2,000 test rows (3 per class: below the lda step's minimum, where knn and centroid follow
    their few-rows rules);
  * Fashion-MNIST 10,000 / 2,000 and 60,000 / 10,000 (one split each; --quick skips 60k).

Run from the repository root:  python bench/power_norm.py [--quick]
Writes bench/results/power_norm.md and .json (--quick: scratch output, fewer splits).
Accuracies do not depend on the machine's load (seeded fits, one BLAS thread).
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

HEADS = ["logreg", "svm", "linear-svm", "knn", "centroid", "ridge", "mlp"]
SQRT = "sqrt"


def variants(head: str, y: np.ndarray, dim: int) -> tuple[dict, dict, bool]:
    """(params with the square root, params without, whether the default has it) for ``head``
    on labels ``y``: its data rule's parameters with ``prep`` set both ways."""
    from embedpipe import heads

    rule = heads.data_params(head, *heads.data_of(y, dim))
    prep = rule.get("prep") or "+".join(heads.get(head).steps) or "none"
    without = heads.without_sqrt(prep)
    with_ = SQRT if without == "none" else f"{SQRT}+{without}"
    return {**rule, "prep": with_}, {**rule, "prep": without}, prep.startswith(SQRT)


def score(head: str, params: dict, Xtr, ytr, Xte, yte) -> tuple[float, float]:
    """(test accuracy, fit CPU seconds) of ``head`` fitted as `fit` fits it."""
    from embedpipe.heads.fit import fit_configuration
    from embedpipe.heads.source import Labeled

    t = time.process_time()
    est = fit_configuration(Labeled.in_memory(Xtr, ytr), head, dict(params))[0]
    seconds = time.process_time() - t
    return float(np.mean(np.asarray(est.predict(Xte)) == yte)), seconds


def sets(args) -> dict[str, tuple[list[tuple], str]]:
    import accuracy

    ns = argparse.Namespace(sets=["natural", "fmnist-3", "fmnist-10", "fmnist-50"],
                            fmnist=[1000, 200], splits=args.splits, draws=args.draws,
                            seed0=0)
    out = accuracy.repeated_splits(ns)
    for train, test in [(1000, 200)] + ([] if args.quick else [(6000, 1000)]):
        _, path, _ = bu.fmnist_features(train, test)
        Xtr, ytr, Xte, yte = accuracy._train_test(path)
        out[f"fmnist {len(ytr)}/{len(yte)}"] = ([(Xtr, ytr, Xte, yte)],
                                                f"one split, {len(ytr)} train / {len(yte)} test")
    return out


def main() -> None:
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.splits, args.draws = 3, 2
    threadpool_limits(1)
    warnings.simplefilter("ignore")
    hdr = bu.Header("Power normalisation (signed square root) before each head's preprocessing")
    rows, payload = [], []
    data = sets(args)
    for name, (splits, how) in data.items():
        for head in HEADS:
            w, wo, default_sqrt = variants(head, splits[0][1], splits[0][0].shape[1])
            acc_w, acc_wo, cpu_w, cpu_wo = [], [], [], []
            for Xtr, ytr, Xte, yte in splits:
                a, s = score(head, w, Xtr, ytr, Xte, yte)
                acc_w.append(a)
                cpu_w.append(s)
                a, s = score(head, wo, Xtr, ytr, Xte, yte)
                acc_wo.append(a)
                cpu_wo.append(s)
            d = 100 * (np.asarray(acc_w) - np.asarray(acc_wo))
            se = f" ± {np.std(d, ddof=1) / np.sqrt(len(d)):.2f}" if len(d) > 1 else ""
            rows.append([name, head, f"{'**' if default_sqrt else ''}{w['prep']}"
                         f"{'**' if default_sqrt else ''}", f"{np.mean(acc_w):.4f}",
                         f"{'' if default_sqrt else '**'}{wo['prep']}"
                         f"{'' if default_sqrt else '**'}", f"{np.mean(acc_wo):.4f}",
                         f"{np.mean(d):+.2f}{se}", f"{np.mean(cpu_w):.1f} / {np.mean(cpu_wo):.1f}"])
            payload.append({"set": name, "how": how, "head": head, "with": w, "without": wo,
                            "default_has_sqrt": default_sqrt, "acc_with": acc_w,
                            "acc_without": acc_wo, "fit_cpu_with": cpu_w,
                            "fit_cpu_without": cpu_wo})
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    bu.publish("power_norm", hdr,
               ["features: bundled EfficientNet-Lite0, 1280-d, extraction defaults",
                "each head fitted as `fit` fits it (fit_configuration: defaults and data rules "
                "for the data), with and without the signed square root in front of its "
                "preprocessing; the head's default for that data in bold",
                "difference: test accuracy with minus without, points, mean ± standard error "
                "over the splits (paired)",
                "sets: " + "; ".join(f"{n}: {h}" for n, (_, h) in data.items()),
                "one BLAS thread; fit s = CPU seconds per fit (process time), with / without"],
               ["set", "head", "with", "test accuracy", "without", "test accuracy",
                "difference (points)", "fit s (CPU)"], rows, {"rows": payload}, args.quick)


if __name__ == "__main__":
    main()
