"""Every head on real cached features: fit time, predict time and test accuracy on Fashion-MNIST.

Extracts N train images per class (from Fashion-MNIST's train split) and M test images per class
(from its test split) with the bundled pretrained EfficientNet-Lite0 at `--precision auto`, into
a store kept under cache/bench-heads/ (a rerun reuses it: extraction is incremental), then fits
every registered head with its default parameters (`heads.build`, no search, no calibration) on
the train rows and scores the test rows. Next to them, in the same run: RBF SVC (C=10) and
logistic regression on the raw 28x28 pixels of the same images, the baseline the public
Fashion-MNIST table reports (see ../shared/ANCHORS.md).

    python bench/heads.py                 # 1000/class train (10k), 200/class test (2k)
    python bench/heads.py --quick         # 50/class, 20/class: a smoke test, numbers mean little
    python bench/heads.py --train 6000 --test 1000 --heads logreg ridge knn --no-pixels
                                          # the full 60k / 10k, some heads (RBF SVMs on 60k
                                          # rows take hours on 2 cores)

Writes bench/results/heads.md and heads.json for the default sizes, heads-<train>-<test>.md/.json
for others (with --quick: scratch files in the temp dir instead).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

from embedpipe import heads  # noqa: E402
from embedpipe.heads.rows import select_rows, targets
from embedpipe.store import open_store  # noqa: E402

ANCHOR = {  # ../shared/ANCHORS.md: frozen Lite0 features, 10k train / 2k test, fp32
    "logreg": "0.864", "svm": "0.890", "knn": "0.851 (k=5)", "linear-svm": "0.831",
    "raw pixels: svm (C=10)": "0.874 (this split); 0.897 full 60k/10k",
}


def score(est, Xtr, ytr, Xte, yte) -> tuple[float, float, float, float, bool]:
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        est.fit(Xtr, ytr)
        t1 = time.perf_counter()
        pred = est.predict(Xte)
        t2 = time.perf_counter()
    converged = not any("converge" in str(w.message).lower() for w in caught)
    acc = float((pred == yte).mean())
    return acc, float(balanced_accuracy_score(yte, pred)), t1 - t0, t2 - t1, converged


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=None, help="train images per class")
    ap.add_argument("--test", type=int, default=None, help="test images per class")
    ap.add_argument("--heads", nargs="+", default=None, help="heads to fit (default: all)")
    ap.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel baselines")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    train, test = (50, 20) if args.quick else (1000, 200)
    train, test = args.train or train, args.test or test
    hdr = bu.Header("Heads on cached EfficientNet-Lite0 features: Fashion-MNIST test accuracy")
    base = Path(tempfile.gettempdir()) / "bench-heads-quick" if args.quick else None
    t0 = time.perf_counter()
    data, store_path, summary = bu.fmnist_features(train, test, base)
    store = open_store(store_path)
    rows = select_rows(store)
    te = rows.heldout["test"]
    Xtr, Xte = store.features[rows.train], store.features[te]
    ytr, yte = targets(store, rows.train), targets(store, te)
    results = []
    for name in args.heads or heads.HEADS:
        print(f"fitting {name} ...", file=sys.stderr, flush=True)
        acc, bal, fit_s, pred_s, conv = score(heads.build(name), Xtr, ytr, Xte, yte)
        results.append((name, acc, bal, fit_s, pred_s, conv))
    if not args.no_pixels:
        print("raw pixels ...", file=sys.stderr, flush=True)
        Ptr = bu.pixels(data, [store.paths[i] for i in rows.train])
        Pte = bu.pixels(data, [store.paths[i] for i in te])
        from sklearn.svm import SVC

        acc, bal, fit_s, pred_s, conv = score(SVC(C=10.0), Ptr, ytr, Pte, yte)
        results.append(("raw pixels: svm (C=10)", acc, bal, fit_s, pred_s, conv))
        acc, bal, fit_s, pred_s, conv = score(heads.build("logreg"), Ptr, ytr, Pte, yte)
        results.append(("raw pixels: logreg", acc, bal, fit_s, pred_s, conv))
    results.sort(key=lambda r: -r[1])
    table = bu.table(
        ["head (defaults)", "test accuracy", "balanced acc.", "fit s", "predict s",
         "converged", "ANCHORS.md"],
        [(n, f"{a:.3f}", f"{b:.3f}", f"{f:.1f}", f"{p:.2f}", "yes" if c else "no",
          ANCHOR.get(n, "") if (train, test) == (1000, 200) else "")
         for n, a, b, f, p, c in results])
    extra = [
        f"data: {len(ytr)} Fashion-MNIST train images ({train}/class, seed 0) and {len(yte)} "
        f"test images ({test}/class), 28x28 PNG upscaled by the model's transform to 224",
        f"features: {store.meta['model']} ({store.meta['weights_source']}), "
        f"{store.dim}-d, precision {store.meta['precision']}; extraction this run: "
        f"{summary.line()}",
        "each head: `embedpipe.heads.build(name)` with its defaults (no search, no calibration) "
        "fitted on the train rows, scored on the test rows; times are wall seconds on this "
        "shared machine",
    ]
    if (train, test) != (1000, 200):
        extra.append("ANCHORS.md's frozen-feature numbers are for 10k/2k (see heads.md); its "
                     "public 60k/10k results on raw pixels: MLP 256-128-100 0.883, RBF SVC "
                     "(C=10) 0.897, HOG + SVM 0.926, ResNet-18 with augmentation 0.949")
    if args.quick:
        extra.append("QUICK smoke-test run: tiny sets; numbers mean little")
    text = hdr.render(extra) + "\n" + table + "\n"
    print(text)
    name = ("heads" if args.quick or (train, test) == (1000, 200)
            else f"heads-{train * 10}-{test * 10}")
    out = bu.save_results(name, text, {
        "date": hdr.date, "load_start": hdr.load_start, "store": str(store_path),
        "train": len(ytr), "test": len(yte),
        "heads": [{"head": n, "accuracy": a, "balanced_accuracy": b, "fit_s": f,
                   "predict_s": p, "converged": c} for n, a, b, f, p, c in results]}, args.quick)
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
