"""Which feature levers move frozen-Lite0 accuracy, on Fashion-MNIST 10k/2k and the natural set?

The heads are at their ceiling on the default features (bench/results/accuracy-10k.md: svm
0.892, auto 0.893, hand-built ensembles at most 0.896 on Fashion-MNIST 10k/2k, where issue #16
asks for 0.90). This script changes the features instead and fits the same heads (their
defaults for the data, ``fit_configuration``) on each:

- ``extract`` options a user can pass today: ``--crop-pct 1.0`` (the default centre crop keeps
  87.5 % of the resized image), ``--img-size 256 --crop-pct 1.0``, ``--pool catavgmax``,
  ``--tta flip``; and two stores of the same images stacked (`fit a.h5 b.h5`: the default and
  the ``--crop-pct 1.0`` store side by side, 2,560-d).
- Features from inside the network, which ``extract`` does not offer: the mean over space of
  stage 4's output (112 channels, stride 16; timm ``forward_intermediates``) next to the pooled
  1,280-d features, each row block L2-normalised, computed here in torch bf16. Its control row
  is the pooled features of the same torch forward (they differ from the OpenVINO-bf16 store by
  rounding only).
- ``--head auto`` (``--auto-budget`` seconds) on the Fashion-MNIST default store and on the
  two stacked stores.

Sets: Fashion-MNIST 1,000 train / 200 test images per class (cache/bench-heads/fmnist-1000-200,
bench/_benchutil.py; one split, 2,000 test images, 1 image = 0.05 points, binomial s.e. about
0.7 points at 0.89) and the natural set (bench/natural.py: 241 photos, 8 classes; 20 random
stratified 170/71 splits as bench/accuracy.py draws them, mean ± s.e.).

    python bench/feature_levers.py            # both sets (about 30 min on 2 cores)
    python bench/feature_levers.py --quick    # natural set only, 4 splits

Stores are kept under cache/levers/ (a rerun extracts nothing). Writes
bench/results/feature_levers.md and .json (--quick: scratch files).
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
import natural  # noqa: E402

from embedpipe.extract.local import run  # noqa: E402
from embedpipe.extract.options import ExtractOptions  # noqa: E402
from embedpipe.heads.fit import fit_configuration  # noqa: E402
from embedpipe.heads.rows import select_rows, targets  # noqa: E402
from embedpipe.heads.source import Labeled  # noqa: E402
from embedpipe.store import open_store  # noqa: E402

BASE = bu.ROOT / "cache" / "levers"
OPTION_VARIANTS = {  # name -> ExtractOptions fields (what `extract` takes on its command line)
    "defaults": {},
    "--crop-pct 1.0": {"crop_pct": 1.0},
    "--img-size 256 --crop-pct 1.0": {"img_size": 256, "crop_pct": 1.0},
    "--pool catavgmax": {"pool": "catavgmax"},
    "--tta flip": {"tta": "flip"},
}
STACKED = ("defaults", "--crop-pct 1.0")
STAGE = 3  # index into forward_intermediates' outputs: stage 4 of 5 (112 channels, stride 16)
HEADS = {"fmnist": ("svm", "logreg"), "natural": ("svm", "logreg", "centroid")}


def _slug(name: str) -> str:
    return "defaults" if name == "defaults" else \
        name.replace("--", "").replace(" ", "-").replace(".", "")


def _l2(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def option_store(set_name: str, data: Path, variant: str) -> Path:
    out = BASE / f"{set_name}-{_slug(variant)}.h5"
    summary = run(data, out, ExtractOptions(**OPTION_VARIANTS[variant]), progress=True)
    print(summary.line(), file=sys.stderr)
    return out


def stage_features(set_name: str, data: Path, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(pooled 1280-d, stage-4 mean 112-d) float32 arrays in ``paths`` order, torch bf16, the
    default preprocessing (timm's eval transform of the bundled backbone's data config; images
    decoded as ``extract`` decodes them). Cached in cache/levers/<set>-stages.npz."""
    cache = BASE / f"{set_name}-stages.npz"
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        if list(z["paths"]) == list(paths):
            return z["pooled"], z["stage"]
    import torch
    from timm.data import create_transform

    from embedpipe.backbones import load_backbone
    from embedpipe.data import load_image

    bb = load_backbone()
    model = bb.model.eval().to(memory_format=torch.channels_last)
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    tf = create_transform(**{k: v for k, v in bb.data_config.items() if k in keys})
    pooled, stage = [], []
    t0 = time.time()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(paths), 64):
            x = torch.stack([tf(load_image(data / p))
                             for p in paths[i:i + 64]]).contiguous(memory_format=torch.channels_last)
            final, inter = model.forward_intermediates(x)
            pooled.append(model.forward_head(final).float().numpy())
            stage.append(inter[STAGE].float().mean((2, 3)).numpy())
            print(f"\r{set_name} stages: {i + len(x)}/{len(paths)} images, "
                  f"{time.time() - t0:.0f} s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    pooled, stage = np.concatenate(pooled), np.concatenate(stage)
    BASE.mkdir(parents=True, exist_ok=True)
    np.savez(cache, pooled=pooled, stage=stage, paths=np.array(paths))
    return pooled, stage


def feature_sets(set_name: str, data: Path) -> tuple[dict[str, np.ndarray], list[str], dict]:
    """Every variant's features, row-aligned to the defaults store's order; its paths; and
    (labels, train rows, test rows) of that store."""
    stores = {v: open_store(option_store(set_name, data, v)) for v in OPTION_VARIANTS}
    ref = stores["defaults"]
    order = list(ref.paths)
    feats = {}
    for v, s in stores.items():
        where = {p: i for i, p in enumerate(s.paths)}
        feats[v] = np.asarray(s.features)[[where[p] for p in order]]
    feats[" + ".join(STACKED) + " (2 stores stacked)"] = np.hstack([feats[v] for v in STACKED])
    pooled, stage = stage_features(set_name, data, order)
    feats["pooled, torch bf16 (control of the next row)"] = pooled
    feats["pooled + stage-4 mean, each L2-normalised (not an extract option)"] = \
        np.hstack([_l2(pooled), _l2(stage)])
    r = select_rows(ref)
    return feats, order, {"labels": targets(ref, np.arange(len(order))), "train": r.train,
                          "test": r.heldout["test"]}


def splits_of(set_name: str, rows: dict, n_splits: int) -> list[tuple[np.ndarray, np.ndarray]]:
    if set_name == "fmnist":
        return [(rows["train"], rows["test"])]
    from sklearn.model_selection import StratifiedShuffleSplit

    idx = np.concatenate([rows["train"], rows["test"]])  # as bench/accuracy.py pools them
    y = rows["labels"][idx]
    cut = StratifiedShuffleSplit(n_splits=n_splits, test_size=len(rows["test"]), random_state=0)
    return [(idx[a], idx[b]) for a, b in cut.split(idx, y)]


def auto_on(feats: dict[str, np.ndarray], y: np.ndarray, cut: tuple, budget: float,
            rows: list[dict]) -> str:
    """`fit --head auto` (heads.auto.fit_auto, wall-clock ``budget``) on the default store and
    on the two stacked stores, scored on the test rows: the section's text."""
    from embedpipe.heads.auto import fit_auto

    a, b = cut
    out = ["", f"`--head auto` (budget {budget:g} s of wall time, so how many candidates it "
               "scores depends on the machine's load; its CV table is in the JSON):", ""]
    for variant in ("defaults", " + ".join(STACKED) + " (2 stores stacked)"):
        X = feats[variant]
        t0 = time.time()
        est, chosen, sel = fit_auto(X[a], y[a], budget=budget)
        acc = float((np.asarray(est.predict(X[b])) == y[b]).mean())
        line = (f"- {variant}: auto chose {chosen['choice']} (CV {sel.choice['mean']:.3f}, "
                f"{len(sel.table)} rows scored), test accuracy **{acc:.3f}**, "
                f"{time.time() - t0:.0f} s")
        print(line, file=sys.stderr, flush=True)
        out.append(line)
        rows.append({"set": "fmnist", "variant": variant, "head": "auto", "mean": acc,
                     "choice": chosen["choice"], "budget": budget, "table": sel.lines()})
    return "\n".join(out) + "\n"


def main() -> None:
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--auto-budget", type=float, default=400.0,
                    help="seconds of `--head auto` on the Fashion-MNIST features (0: skip)")
    args = ap.parse_args()
    sets = {"natural": natural.build()}
    if args.quick:
        args.splits = 4
    else:
        sets["fmnist"] = bu.fmnist_split_folder(bu.ROOT / "cache" / "bench-heads" /
                                                "fmnist-1000-200", 1000, 200)
    threadpool_limits(1)
    warnings.simplefilter("ignore")
    hdr = bu.Header("Feature levers: what moves frozen-Lite0 accuracy when the heads cannot")
    text, rows = "", []
    for set_name, data in sets.items():
        feats, _, lab = feature_sets(set_name, data)
        y = lab["labels"]
        cuts = splits_of(set_name, lab, args.splits)
        heads = HEADS[set_name]
        table = []
        for variant, X in feats.items():
            cells = [variant, str(X.shape[1])]
            for head in heads:
                t0 = time.time()
                accs = [float((np.asarray(fit_configuration(Labeled.in_memory(X[a], y[a]), head,
                                                            None)[0].predict(X[b])) == y[b]).mean())
                        for a, b in cuts]
                m = float(np.mean(accs))
                se = float(np.std(accs, ddof=1) / np.sqrt(len(accs))) if len(accs) > 1 else None
                cells.append(f"{m:.3f}" + (f" ± {se:.3f}" if se is not None else ""))
                rows.append({"set": set_name, "variant": variant, "head": head, "mean": m,
                             "se": se, "accuracies": accs, "dim": X.shape[1],
                             "fit_s": time.time() - t0})
                print(f"{set_name}: {variant} {head} {cells[-1]} ({time.time() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
            table.append(cells)
        how = ("one split, 10,000 train / 2,000 test" if set_name == "fmnist" else
               f"{len(cuts)} random stratified 170/71 splits, mean ± s.e.")
        text += (f"\n## {set_name}: {how}\n\n"
                 + bu.table(["features", "dim", *[f"{h} defaults" for h in heads]], table) + "\n")
        if set_name == "fmnist" and args.auto_budget > 0:
            text += auto_on(feats, y, cuts[0], args.auto_budget, rows)
    bu.finish("feature_levers", hdr,
              ["heads: `fit_configuration(..., head, None)`, each head's defaults for the data "
               "(their data rules applied), one BLAS thread",
               "accuracies do not depend on machine load (seeded, single-threaded fits)"],
              text, {"rows": rows}, args.quick)


if __name__ == "__main__":
    main()
