"""Test-time augmentation at extraction: what `--tta` costs in throughput and gains in accuracy.

One Fashion-MNIST folder (N images per class from the test split, 28x28 PNGs), extracted with
the bundled pretrained EfficientNet-Lite0 at `--precision auto` four ways: no TTA, `flip`,
`crops` (five crops) and `flip,crops`. Throughput: each setting's extraction of the same folder
into a fresh store, repeated R times in a shuffled, interleaved order (median img/s). Accuracy:
`embedpipe.evaluate.run_cv` of logreg, svm, knn and ridge (defaults) with the same 5 folds on
each store. With a few hundred images a cv accuracy has a standard error of ~2 points: read
small differences as noise.

    python bench/tta.py               # 40 images per class (400), 2 repetitions
    python bench/tta.py --quick       # 6 per class, 1 repetition: a smoke test

Writes bench/results/tta.md (with --quick: a scratch file in the temp dir instead).
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

from embedpipe.datasets import write_fashion_mnist_folder  # noqa: E402
from embedpipe.evaluate.cv import run_cv
from embedpipe.extract.options import ExtractOptions
from embedpipe.extract.local import run

SETTINGS = ("none", "flip", "crops", "flip,crops")
HEADS = ["logreg", "svm", "knn", "ridge"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    per_class, reps = (6, 1) if args.quick else (40, 2)
    per_class, reps = args.per_class or per_class, args.reps or reps
    hdr = bu.Header("Test-time augmentation at extraction: cost and gain")
    tmp = Path(tempfile.mkdtemp(prefix="bench-tta-"))
    try:
        data = write_fashion_mnist_folder(tmp / "data", per_class=per_class, split="test")
        n = 10 * per_class
        rates: dict[str, list[float]] = {s: [] for s in SETTINGS}
        stores: dict[str, Path] = {}
        rng = random.Random(0)
        for rep in range(reps):
            order = list(SETTINGS)
            rng.shuffle(order)
            for s in order:
                out = tmp / f"{s}-{rep}.h5"
                t0 = time.perf_counter()
                summary = run(data, out, ExtractOptions(tta=None if s == "none" else s),
                              progress=False)
                rates[s].append(n / (time.perf_counter() - t0))
                assert summary.extracted == n, summary.line()
                stores.setdefault(s, out)
                print(f"rep {rep} {s}: {rates[s][-1]:.1f} img/s", file=sys.stderr, flush=True)
        acc = {}
        for s in SETTINGS:
            report = run_cv(stores[s], HEADS, folds=5, seed=0, progress=False, top_errors=0,
                            warn=lambda m: None)
            acc[s] = {h["head"]: h["accuracy"]["mean"] for h in report["heads"]}
        base = bu.median(rates["none"])
        rows = []
        for s in SETTINGS:
            r = bu.median(rates[s])
            rows.append([s, f"{r:.1f}", bu.spread(rates[s]), f"{r / base:.2f}"]
                        + [f"{acc[s][h]:.3f} ({100 * (acc[s][h] - acc['none'][h]):+.1f})"
                           for h in HEADS])
        se = 100 * math.sqrt(0.8 * 0.2 / n)
        table = bu.table(["--tta", "img/s (median)", "min–max", "÷ none"]
                         + [f"{h} cv acc (Δ pts)" for h in HEADS], rows)
        extra = [f"data: {n} Fashion-MNIST test-split images ({per_class}/class, seed 0), "
                 "28x28 PNG; bundled pretrained tf_efficientnet_lite0, --precision auto, "
                 f"batch 32, default workers; {reps} interleaved repetitions per setting",
                 "accuracy: 5-fold stratified cv (seed 0, the same folds for every store) of "
                 f"each head with its defaults; standard error of one accuracy ≈ {se:.1f} "
                 "points at 80% on this many images",
                 "views: flip = 2 (image + mirror), crops = 5 (center + 4 corners of the resized "
                 "image), flip,crops = 10; the stored feature is the mean over the views"]
        if args.quick:
            extra.append("QUICK smoke-test run: numbers mean nothing")
        text = hdr.render(extra) + "\n" + table + "\n"
        print(text)
        if args.quick:
            (Path(tempfile.gettempdir()) / "tta.quick.md").write_text(text)
        else:
            print(f"wrote {bu.write_result('tta', text)}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
