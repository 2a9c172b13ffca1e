"""Whole-image extraction (`--crop-pct 1.0`, `--img-size 256 --crop-pct 1.0`) against the
model's centre crop, measured with less sampling noise than bench/feature_levers.py: should
either be a default, or a default chosen by the data (small source images)?

feature_levers.md scored Fashion-MNIST on one split of 2,000 test images (binomial s.e. about
0.7 points), where two runs of the same rows read 0.892 and 0.902. Here:

- Fashion-MNIST: two disjoint 10,000-row training draws (the two halves, per class, of
  cache/bench-heads/fmnist-2000-200/train: 2,000 images per class of its train split) and
  10,000 test images (1,000 per class of its test split; s.e. about 0.3 points), each head
  with its defaults for the data (fit_configuration);
- the natural set (bench/natural.py: 241 cut-out photos, median short side 116 px, 218 of
  them under 224 px) at its own size and shrunk so that the short side is 32 px (Lanczos, as
  a thumbnail set such as CIFAR's), 20 random stratified 170/71 splits, mean ± s.e. and the
  paired difference to the centre crop. The 32-px copy asks whether "small source image" is
  the property that makes the whole image pay.

Variants (extract options): the model's data config (resize the short side to 256 = 224 /
0.875, centre-crop 224), `--crop-pct 1.0` (the whole image at 224), `--img-size 256
--crop-pct 1.0` (the whole image at the default's scale, 256), `--img-size 256` (resize 293,
crop 256).

    python bench/crop_levers.py           # about 30 min on 2 cores when nothing is cached
    python bench/crop_levers.py --quick   # the natural set at its own size, 4 splits

Stores are kept under cache/crop-levers/ (a rerun extracts nothing). Writes
bench/results/crop_levers.md and .json (--quick: scratch files).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402
import feature_levers  # noqa: E402
import natural  # noqa: E402

from embedpipe.extract.local import run  # noqa: E402
from embedpipe.extract.options import ExtractOptions  # noqa: E402
from embedpipe.heads.fit import fit_configuration  # noqa: E402
from embedpipe.heads.rows import select_rows, targets  # noqa: E402
from embedpipe.heads.source import Labeled  # noqa: E402
from embedpipe.store import open_store  # noqa: E402

BASE = bu.ROOT / "cache" / "crop-levers"
VARIANTS = {  # name -> ExtractOptions fields
    "centre crop (defaults)": {},
    "--crop-pct 1.0": {"crop_pct": 1.0},
    "--img-size 256 --crop-pct 1.0": {"img_size": 256, "crop_pct": 1.0},
    "--img-size 256": {"img_size": 256},
}
SLUG = {"centre crop (defaults)": "default", "--crop-pct 1.0": "c100",
        "--img-size 256 --crop-pct 1.0": "s256c100", "--img-size 256": "s256"}
FMNIST_HEADS = ("svm", "logreg")
NATURAL_HEADS = ("svm", "logreg", "centroid")


def store(folder: Path, name: str, variant: str):
    """(features N×D float32, labels, paths) of ``folder`` extracted with ``variant``, rows in
    path order."""
    out = BASE / f"{name}-{SLUG[variant]}.h5"
    summary = run(folder, out, ExtractOptions(**VARIANTS[variant]), progress=True)
    print(summary.line(), file=sys.stderr)
    s = open_store(out)
    order = np.argsort(np.asarray(s.paths))
    return np.asarray(s.features)[order], targets(s, order), s, order


def fmnist(rows: list[dict]) -> str:
    from embedpipe.datasets import write_fashion_mnist_folder

    train = bu.fmnist_split_folder(bu.ROOT / "cache" / "bench-heads" / "fmnist-2000-200",
                                   2000, 200) / "train"
    test = BASE / "fmnist-test-1000"
    if not test.is_dir():
        write_fashion_mnist_folder(test, per_class=1000, split="test")
    table = []
    for variant in VARIANTS:
        Xtr, ytr, _, _ = store(train, "fmnist-train-2000", variant)
        Xte, yte, _, _ = store(test, "fmnist-test-1000", variant)
        cells = [variant]
        for head in FMNIST_HEADS:
            accs = []
            for half in (0, 1):
                sel = np.concatenate([np.flatnonzero(ytr == c)[half::2] for c in np.unique(ytr)])
                est, _ = fit_configuration(Labeled.in_memory(Xtr[sel], ytr[sel]), head, None)
                accs.append(float((np.asarray(est.predict(Xte)) == yte).mean()))
                print(f"fmnist {variant} {head} draw {half + 1}: {accs[-1]:.4f}", file=sys.stderr,
                      flush=True)
            rows.append({"set": "fmnist", "variant": variant, "head": head, "accuracies": accs,
                         "train_rows": int(len(sel)), "test_rows": int(len(yte))})
            cells.append(" / ".join(f"{a:.4f}" for a in accs))
        table.append(cells)
    return ("\n## Fashion-MNIST: 10,000 train rows (2 disjoint draws) / 10,000 test images\n\n"
            + bu.table(["extraction", *[f"{h} defaults (draw 1 / draw 2)" for h in FMNIST_HEADS]],
                       table) + "\n")


def shrunk(src: Path, short: int) -> Path:
    """A copy of the natural set whose images' short side is at most ``short`` px."""
    from PIL import Image

    if short <= 0:
        return src
    dst = BASE / f"natural-{short}px"
    if not dst.is_dir():
        for p in sorted(src.rglob("*.png")):
            q = dst / p.relative_to(src)
            q.parent.mkdir(parents=True, exist_ok=True)
            im = Image.open(p)
            f = short / min(im.size)
            if f < 1:
                im = im.resize((max(1, round(im.size[0] * f)), max(1, round(im.size[1] * f))),
                               Image.LANCZOS)
            im.save(q)
    return dst


def natural_set(short: int, n_splits: int, rows: list[dict]) -> str:
    data = shrunk(natural.build(), short)
    name = f"natural-{short}px" if short else "natural"
    feats, lab = {}, None
    for variant in VARIANTS:
        X, y, s, order = store(data, name, variant)
        feats[variant] = X
        if lab is None:
            r = select_rows(s)
            where = np.empty_like(order)
            where[order] = np.arange(len(order))
            lab = {"labels": y, "train": where[r.train], "test": where[r.heldout["test"]]}
    cuts = feature_levers.splits_of("natural", lab, n_splits)
    y = lab["labels"]
    base: dict[str, np.ndarray] = {}
    table = []
    for variant, X in feats.items():
        cells = [variant]
        for head in NATURAL_HEADS:
            accs = np.array([float((np.asarray(fit_configuration(
                Labeled.in_memory(X[a], y[a]), head, None)[0].predict(X[b])) == y[b]).mean())
                for a, b in cuts])
            base.setdefault(head, accs)
            d = (accs - base[head]) * 100
            se = accs.std(ddof=1) / np.sqrt(len(accs))
            dse = d.std(ddof=1) / np.sqrt(len(d)) if d.any() else 0.0
            cells.append(f"{accs.mean():.3f} ± {se:.3f} ({d.mean():+.1f} ± {dse:.1f})")
            rows.append({"set": name, "variant": variant, "head": head,
                         "accuracies": accs.tolist(), "paired_points": d.tolist()})
            print(f"{name} {variant} {head} {cells[-1]}", file=sys.stderr, flush=True)
        table.append(cells)
    how = "its own size" if not short else f"short side shrunk to {short} px"
    return (f"\n## natural set, {how}: {len(cuts)} random stratified 170/71 splits, mean ± s.e. "
            "(paired difference to the centre crop, points ± s.e.)\n\n"
            + bu.table(["extraction", *[f"{h} defaults" for h in NATURAL_HEADS]], table) + "\n")


def main() -> None:
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    threadpool_limits(1)
    warnings.simplefilter("ignore")
    hdr = bu.Header("Whole image vs centre crop at extraction: Fashion-MNIST on 10,000 test "
                    "images, the natural set at its size and at 32 px")
    rows: list[dict] = []
    body = natural_set(0, 4 if args.quick else args.splits, rows)
    if not args.quick:
        body += natural_set(32, args.splits, rows) + fmnist(rows)
    bu.finish("crop_levers", hdr,
              ["features: bundled EfficientNet-Lite0, extraction precision auto; heads: "
               "`fit_configuration(..., head, None)` (each head's defaults for the data), one "
               "BLAS thread", "accuracies do not depend on machine load (seeded fits)"],
              body, {"rows": rows}, args.quick)


if __name__ == "__main__":
    main()
