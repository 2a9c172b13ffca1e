"""Few-shot accuracy: frozen bundled-backbone features vs raw pixels, with the heads users get.

From the 10k-train / 2k-test Fashion-MNIST store that bench/heads.py uses (built or completed
under cache/bench-heads/ when missing), draw k labelled train images per class (k = 1, 5, 10,
20, 50, 100; several random draws each), fit `embedpipe.heads.build(name)` with its defaults on
them and score the 2k test images. The same draws are fitted on the raw 784 pixels of the same
images, so each row compares features and pixels on identical training sets.

    python bench/fewshot.py                  # logreg and svm, 10 draws for k <= 20, 5 above
    python bench/fewshot.py --quick          # k = 1, 10; 2 draws; scratch result in /tmp
    python bench/fewshot.py --heads logreg svm knn

Writes bench/results/fewshot.md and fewshot.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

from embedpipe import heads  # noqa: E402
from embedpipe.heads.rows import select_rows, targets
from embedpipe.store import open_store  # noqa: E402

SHOTS = (1, 5, 10, 20, 50, 100)


def draw(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k indices of each class of ``y``, seeded."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False)
                           for c in np.unique(y)])


def accuracy(head: str, Xtr, ytr, Xte, yte, seed: int) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence notes on 10-image fits
        est = heads.build(head, seed=seed)
        est.fit(Xtr, ytr)
        return float((est.predict(Xte) == yte).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", nargs="+", default=["logreg", "svm"])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    shots = (1, 10) if args.quick else SHOTS
    draws = (lambda k: 2) if args.quick else (lambda k: 10 if k <= 20 else 5)
    hdr = bu.Header("Few-shot accuracy on Fashion-MNIST: frozen Lite0 features vs raw pixels")
    data, store_path, summary = bu.fmnist_features(1000, 200)
    store = open_store(store_path)
    rows = select_rows(store)
    te = rows.heldout["test"]
    ytr_all, yte = targets(store, rows.train), targets(store, te)
    inputs = {
        "features": (store.features[rows.train], store.features[te]),
        "pixels": (bu.pixels(data, [store.paths[i] for i in rows.train]),
                   bu.pixels(data, [store.paths[i] for i in te])),
    }
    runs: list[dict] = []
    for k in shots:
        for d in range(draws(k)):
            idx = draw(ytr_all, k, seed=1000 * k + d)
            for head in args.heads:
                for kind, (Xtr, Xte) in inputs.items():
                    t = time.perf_counter()
                    acc = accuracy(head, Xtr[idx], ytr_all[idx], Xte, yte, seed=d)
                    runs.append({"k": k, "draw": d, "head": head, "input": kind,
                                 "accuracy": acc, "seconds": time.perf_counter() - t})
            last = [r for r in runs if r["k"] == k and r["draw"] == d]
            print(f"k={k:>3} draw {d}: " + ", ".join(
                f"{r['head']}/{r['input']} {r['accuracy']:.3f}" for r in last),
                file=sys.stderr, flush=True)

    def cell(k: int, head: str, kind: str) -> tuple[float, float]:
        accs = [r["accuracy"] for r in runs if (r["k"], r["head"], r["input"]) == (k, head, kind)]
        return statistics.mean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)

    headers = ["images/class", "draws"]
    for head in args.heads:
        headers += [f"{head}: features", f"{head}: pixels", f"{head}: gain"]
    table_rows, summary_rows = [], []
    for k in shots:
        row: list[object] = [k, draws(k)]
        for head in args.heads:
            (fm, fs), (pm, ps) = cell(k, head, "features"), cell(k, head, "pixels")
            row += [f"{fm:.3f} ± {fs:.3f}", f"{pm:.3f} ± {ps:.3f}", f"{fm - pm:+.3f}"]
            summary_rows.append({"k": k, "head": head, "draws": draws(k),
                                 "features_mean": fm, "features_std": fs,
                                 "pixels_mean": pm, "pixels_std": ps})
        table_rows.append(row)
    table = bu.table(headers, table_rows)
    extra = [
        f"training pool: {len(ytr_all)} Fashion-MNIST train images (1000/class, seed 0); each "
        f"draw picks k per class from it (seed 1000*k + draw); scored on {len(yte)} test "
        "images (200/class); mean ± sample std over the draws",
        f"features: {store.meta['model']} ({store.meta['weights_source']}), {store.dim}-d, "
        f"precision {store.meta['precision']}, from {store_path.name} (this run: "
        f"{summary.line().split(' → ')[0]})",
        "pixels: the same 28x28 PNGs, 784 values in [0, 1]",
        "heads: `embedpipe.heads.build(name)` with the registry's defaults (logreg: standardise "
        "+ C=1; svm: standardise + RBF C=10), no search, the same for features and pixels",
    ]
    if args.quick:
        extra.append("QUICK smoke-test run: 2 draws; numbers mean little")
    text = hdr.render(extra) + "\n" + table + "\n"
    print(text)
    out = bu.save_results("fewshot", text, {"date": hdr.date, "load_start": hdr.load_start,
                                            "store": str(store_path), "summary": summary_rows,
                                            "runs": runs}, args.quick)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
