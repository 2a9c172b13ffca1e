"""The streamed heads on large stores: standardised rows, with and without the square root.

sgd and logreg-sgd (averaged SGD streamed from the store, for stores larger than memory) take
their registry preprocessing from SMALL_DATA_ROWS (500) rows per class up; below it their data
rule (power- and L2-normalised rows, 20 epochs: bench/sgd_small.py). This script fits each
as `embedpipe fit STORE --head HEAD` does (``embedpipe.fit``: streamed from the store, 5
epochs) with ``prep=scale`` (the registry default before 2026-12-01), ``prep=sqrt+scale``
(power normalisation first, as every in-memory head since bench/results/power_norm.md) and
``prep=sqrt+l2`` (the small-store rule's rows), on the Fashion-MNIST stores of
bench/accuracy.py (10,000 train / 2,000 test) and bench/heads.py (60,000 / 10,000), with
seeds 0, 1, 2 (the SGD shuffling). Printed: test accuracy per seed, the mean, and each
preparation's paired difference to ``scale`` (mean ± s.e. over the seeds).

    python bench/sgd_large.py             # both stores, 3 seeds (about 10 CPU-minutes)
    python bench/sgd_large.py --quick     # the 10k store, 2 seeds

Writes bench/results/sgd_large.md and sgd_large.json (--quick: scratch files).
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

HEADS = ("sgd", "logreg-sgd")
PREPS = ("scale", "sqrt+scale", "sqrt+l2")
REFERENCE = "scale"


def main() -> None:
    import embedpipe
    from embedpipe.heads.rows import select_rows, targets
    from embedpipe.store import open_store

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    stores = [(1000, 200)] + ([] if args.quick else [(6000, 1000)])
    seeds = list(range(2 if args.quick else args.seeds))
    warnings.simplefilter("ignore")
    hdr = bu.Header("Streamed heads on large stores: standardised rows with and without the "
                    "square root")
    body, payload = "", {}
    for train, test in stores:
        _, path, _ = bu.fmnist_features(train, test)
        s = open_store(path)
        r = select_rows(s)
        te = r.heldout["test"]
        Xt, yt = np.asarray(s.features[te]), targets(s, te)
        n_train = len(r.train)
        acc: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        for seed in seeds:
            for head in HEADS:
                for prep in PREPS:  # the same seed for each prep: paired
                    c0 = time.process_time()
                    h = embedpipe.fit(path, head=head, seed=seed, prep=prep)
                    cpu.setdefault((head, prep), []).append(time.process_time() - c0)
                    a = float((h.predict(Xt) == yt).mean())
                    acc.setdefault((head, prep), []).append(a)
                    print(f"{n_train} rows seed {seed}: {head} prep={prep} {a:.4f}",
                          file=sys.stderr, flush=True)
        rows = []
        for head in HEADS:
            ref = np.array(acc[(head, REFERENCE)])
            for prep in PREPS:
                a = np.array(acc[(head, prep)])
                d = (a - ref) * 100
                se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
                rows.append((head, prep, " ".join(f"{v:.4f}" for v in a), f"{a.mean():.4f}",
                             "" if prep == REFERENCE else f"{d.mean():+.2f} ± {se:.2f}",
                             f"{np.median(cpu[(head, prep)]):.1f}"))
        body += (f"\n## Fashion-MNIST {n_train} train / {len(yt)} test rows "
                 f"({path.name})\n\n" + bu.table(
                     ["head", "prep", "test accuracy per seed", "mean",
                      f"paired vs {REFERENCE} (points)", "fit + predict CPU s (median)"],
                     rows) + "\n")
        payload[f"{train}-{test}"] = {"train_rows": n_train, "test_rows": len(yt),
                                      "seeds": seeds,
                                      "accuracy": {f"{h} {p}": v for (h, p), v in acc.items()},
                                      "cpu_s": {f"{h} {p}": v for (h, p), v in cpu.items()}}
    bu.finish("sgd_large", hdr, [
        "features: bundled EfficientNet-Lite0, 1280-d (bench/accuracy.py's and bench/heads.py's "
        "Fashion-MNIST stores)",
        "fits: `embedpipe.fit(store, head=HEAD, seed=SEED, prep=PREP)`, streamed from the store "
        "as `embedpipe fit` streams, 5 epochs (the registry's max_iter); accuracies do not "
        "depend on machine load"], body, payload, args.quick)


if __name__ == "__main__":
    main()
