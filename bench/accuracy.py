"""Accuracy of every head (defaults, `--search`, `auto`) on frozen bundled-Lite0 features.

Sets (train rows → test rows, all from stores built by the other benches, extraction
incremental):

- ``natural``: the Tux Paint stamp photos of bench/natural.py (8 classes, 170 train / 71 test);
- ``fmnist-10``, ``fmnist-50``: Fashion-MNIST few-shot, 10 or 50 train images per class drawn
  (seed 0) from the train rows of ``cache/bench-heads/fmnist-T-S.h5`` (bench/_benchutil.py), all
  its test rows;
- ``fmnist-all``: every row of that store (T per class train, S per class test).

For each set and head: test accuracy and fit seconds with the head's defaults for that data
(``fit_configuration``: its data rules applied), with the defaults before data rules (the bare
registry pipeline), with ``--search`` (its grid by 3-fold CV on the train rows), and ``auto``
(``heads.auto.fit_auto`` with ``--budget``). Beside them every auto candidate fitted on all train
rows and scored on the test rows ("by hand": the best of these is chosen on the test split, an
upper bound for what selection on the train rows can find). Fit seconds are wall and CPU
(process) seconds: the CPU seconds barely move with other people's load.

Repeated sections (``--splits``, ``--draws``): every head's defaults and auto on 20 random
stratified 170/71 splits of the natural set's 241 images and on 5 more draws of the few-shot
Fashion-MNIST rows, as mean test accuracy ± standard error. On 71 test images one image is 1.4
points, so a 3-point spread is two images on the fixed split; the means are what the defaults
spread target is read on.

    python bench/accuracy.py                 # natural + fmnist 10/50/all from the 1000/200 store
    python bench/accuracy.py --fmnist 100 100  # the store with 100/class train, 100/class test
    python bench/accuracy.py --quick         # natural + fmnist-10 only, few heads

Writes bench/results/accuracy.md and accuracy.json (--quick: scratch files in the temp dir).
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

from embedpipe.heads import auto, registry  # noqa: E402
from embedpipe.heads.fit import fit_configuration  # noqa: E402
from embedpipe.heads.source import Labeled  # noqa: E402
from embedpipe.heads.rows import select_rows, targets  # noqa: E402
from embedpipe.store import open_store  # noqa: E402

ANCHORS = [  # ../shared/ANCHORS.md, quoted (the README must not point there)
    "Fashion-MNIST 10k/2k, frozen Lite0 fp32: logreg 0.864, RBF SVC 0.890, kNN-5 0.851, "
    "LinearSVC 0.831; RBF SVC on raw pixels 0.874. Public 60k/10k: MLP 0.883, RBF SVC on "
    "pixels 0.897, HOG+SVM 0.926, ResNet-18 with augmentation 0.949.",
    "A small natural-image set (8 classes, ~200 train / ~80 test RGBA photos; the issue's, "
    "not necessarily this one), Lite0: logreg 0.864; RBF svm defaults 0.741, searched 0.864; "
    "logreg on L2-normalised features C=100 0.901 (chosen on the test split); Lite0+Lite2 "
    "stacked logreg 0.901.",
    "Transfer-learning guides claim 90–95% from ~100 images per task.",
]


def _fit_score(make, Xtr, ytr, Xte, yte):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w0, c0 = time.perf_counter(), time.process_time()
        est, extra = make(Xtr, ytr)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        acc = float((np.asarray(est.predict(Xte)) == yte).mean())
    return acc, wall, cpu, extra


def _train_test(path) -> tuple:
    """(train features, train labels, test features, test labels) of a store's splits."""
    s = open_store(path)
    r = select_rows(s)
    te = r.heldout["test"]
    return s.features[r.train], targets(s, r.train), s.features[te], targets(s, te)


def load_sets(args) -> dict[str, tuple]:
    sets = {}
    if "natural" in args.sets:
        import natural

        _, path = natural.features()
        sets["natural"] = (*_train_test(path), f"{path.name}")
    want = [n for n in args.sets if n.startswith("fmnist")]
    if want:
        train, test = args.fmnist
        _, path, _ = bu.fmnist_features(train, test)
        X, y, Xte, yte = _train_test(path)
        rng = np.random.default_rng(0)
        for name in want:
            k = name.split("-")[1]
            if k == "all":
                idx = np.arange(len(y))
            else:
                idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), int(k),
                                                         replace=False)
                                              for c in np.unique(y)]))
            sets[name] = (X[idx], y[idx], Xte, yte, f"{path.name} ({len(idx)} train rows)")
    return sets


def repeated_splits(args) -> dict[str, tuple[list[tuple], str]]:
    """Many draws of the few-row sets, for a spread that one 71-image test split (1 image =
    1.4 points) or one draw of 10 rows per class cannot give: the natural set's 241 images
    pooled and split 170/71 (stratified, as the fixed split) ``args.splits`` times; the
    Fashion-MNIST few-shot train rows drawn ``args.draws`` times (seeds 1, 2, ...) against the
    same 2,000 test rows."""
    out = {}
    if "natural" in args.sets:
        import natural
        from sklearn.model_selection import StratifiedShuffleSplit

        _, path = natural.features()
        Xtr, ytr, Xte, yte = _train_test(path)
        X, y = np.concatenate([Xtr, Xte]), np.concatenate([ytr, yte])
        cut = StratifiedShuffleSplit(n_splits=args.splits, test_size=len(yte),
                                     random_state=args.seed0)
        out["natural"] = ([(X[a], y[a], X[b], y[b]) for a, b in cut.split(X, y)],
                          f"{args.splits} random stratified {len(ytr)}/{len(yte)} splits of "
                          f"the {len(y)} images" + (f" (random_state {args.seed0})"
                                                    if args.seed0 else ""))
    want = [n for n in args.sets if n.startswith("fmnist") and n != "fmnist-all"]
    if want:
        _, path, _ = bu.fmnist_features(*args.fmnist)
        X, y, Xte, yte = _train_test(path)
        for name in want:
            k = int(name.split("-")[1])
            draws = []
            seeds = range(args.seed0 + 1, args.seed0 + args.draws + 1)
            for seed in seeds:
                rng = np.random.default_rng(seed)
                idx = np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False)
                                      for c in np.unique(y)])
                draws.append((X[idx], y[idx], Xte, yte))
            out[name] = (draws, f"{args.draws} draws of {k} train rows per class (seeds "
                                f"{seeds[0]}-{seeds[-1]}), the same {len(yte)} test rows")
    return out


def repeated_args(quick: tuple[int, int] = (3, 2), extra=None):
    """The command line of the scripts that run on the repeated sets only (bench/sgd_small.py,
    bench/auto_policy.py): --splits, --draws, --quick (``quick`` splits and draws); the sets
    natural, fmnist-10 and fmnist-50 of the 1000/200 store; ``extra(parser)`` adds a script's
    own options. Also sets one BLAS thread and silences scikit-learn's warnings, as this
    script's fits run."""
    import argparse

    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed0", type=int, default=0,
                    help="fresh splits: the natural set's random_state and the draws' first "
                         "seed - 1 (default 0: the splits of the committed results)")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    if args.quick:
        args.splits, args.draws = quick
    args.sets = ["natural", "fmnist-10", "fmnist-50"]
    args.fmnist = [1000, 200]
    threadpool_limits(1)
    warnings.simplefilter("ignore")
    return args


def run_repeated(name, splits, args, log) -> list[dict]:
    """Every head's defaults and (unless --no-search) its --search, and auto, on each split:
    mean test accuracy and its standard error over the splits; each split's accuracies are
    kept in split order, so that two rows can be compared split by split (paired)."""
    rows = []
    kinds = ["defaults"] + ([] if args.no_search else ["--search"])
    for head, kind in [(h, k) for h in args.heads for k in kinds] + [("auto", "auto")]:
        accs = []
        for Xtr, ytr, Xte, yte in splits:
            if head == "auto":
                make = lambda X, y: (lambda r: (r[0], {}))(auto.fit_auto(X, y, budget=args.budget))  # noqa: E731,E501
            else:
                make = lambda X, y: fit_configuration(Labeled.in_memory(X, y), head, None,  # noqa: E731,B023,E501
                                                     search=kind == "--search")  # noqa: B023
            accs.append(_fit_score(make, Xtr, ytr, Xte, yte)[0])
        m, se = float(np.mean(accs)), float(np.std(accs, ddof=1) / np.sqrt(len(accs)))
        log(f"{name} (repeated): {head} {kind} {m:.3f} ± {se:.3f}")
        rows.append({"set": name, "head": head, "kind": kind, "mean": m, "se": se,
                     "accuracies": accs})
    return rows


def _paired(a: dict, b: dict) -> str:
    """a's mean minus b's, in points, ± the standard error of the split-by-split difference."""
    d = np.asarray(a["accuracies"]) - np.asarray(b["accuracies"])
    return f"{100 * d.mean():+.1f} ± {100 * d.std(ddof=1) / np.sqrt(len(d)):.1f} points"


def repeated_text(name, how, rows) -> str:
    text = f"\n## {name}, repeated: {how}\n\n" + bu.table(
        ["head", "kind", "mean test accuracy", "± s.e.", "min–max"],
        [(r["head"], r.get("kind", "defaults"), f"{r['mean']:.3f}", f"{r['se']:.3f}",
          f"{min(r['accuracies']):.3f}–{max(r['accuracies']):.3f}") for r in rows]) + "\n"
    defaults = [r for r in rows if r.get("kind", "defaults") == "defaults"]
    best = max(defaults, key=lambda r: r["mean"])
    worst = min(defaults, key=lambda r: r["mean"])
    gap = best["mean"] - worst["mean"]
    a = next(r for r in rows if r["head"] == "auto")
    text += (f"\ntargets on {name} (means over the splits; differences paired split by "
             "split):\n"
             f"- defaults spread: best {best['head']} {best['mean']:.3f}, worst {worst['head']} "
             f"{worst['mean']:.3f} ({100 * gap:.1f} points): "
             f"{'met' if gap <= 0.03 else 'not met'} (≤ 3 points)\n"
             f"- auto {a['mean']:.3f} vs the best head's defaults ({best['head']}) "
             f"{best['mean']:.3f}: {_paired(a, best)}\n")
    searched = [r for r in rows if r.get("kind") == "--search"]
    if searched:
        bs = max(searched, key=lambda r: r["mean"])
        text += (f"- auto {a['mean']:.3f} vs the best single head with --search ({bs['head']}) "
                 f"{bs['mean']:.3f}: {_paired(a, bs)}: "
                 f"{'met' if a['mean'] >= bs['mean'] else 'not met'} (at least as good)\n")
        by_hand = max(rows[:-1], key=lambda r: r["mean"])
        text += (f"- auto vs the best configuration by hand ({by_hand['head']} "
                 f"{by_hand.get('kind', 'defaults')}) {by_hand['mean']:.3f}: "
                 f"{_paired(a, by_hand)}: "
                 f"{'met' if a['mean'] >= by_hand['mean'] - 0.01 else 'not met'} "
                 "(within 1 point)\n")
    return text


def run_set(name, Xtr, ytr, Xte, yte, args, log):
    rows = []
    for head in args.heads:
        for kind in ("defaults", "registry (no data rule)", "--search"):
            if kind == "--search" and (args.no_search or (head in args.slow_search
                                                          and len(ytr) > 1000)):
                log(f"{name}: {head} --search skipped (over 1,000 rows: --slow-search)")
                continue
            if kind == "registry (no data rule)" and not registry.with_data_defaults(
                    head, None, ytr, Xtr.shape[1]):
                continue
            if kind == "defaults":
                make = lambda X, y: fit_configuration(Labeled.in_memory(X, y), head, None)  # noqa
            elif kind == "--search":
                make = lambda X, y: fit_configuration(Labeled.in_memory(X, y), head, None,  # noqa
                                                     search=True)
            else:
                make = lambda X, y: (registry.build(head).fit(X, y), {})  # noqa: E731
            acc, wall, cpu, params = _fit_score(make, Xtr, ytr, Xte, yte)
            log(f"{name}: {head} {kind} {acc:.3f} ({wall:.1f} s)")
            rows.append({"set": name, "head": head, "kind": kind, "accuracy": acc,
                         "fit_s": wall, "cpu_s": cpu, "params": params})
    acc, wall, cpu, sel = _fit_score(
        lambda X, y: (lambda r: (r[0], r[2]))(auto.fit_auto(X, y, budget=args.budget)),
        Xtr, ytr, Xte, yte)
    log(f"{name}: auto {acc:.3f} ({wall:.1f} s) chose {sel.choice['name']}")
    rows.append({"set": name, "head": "auto", "kind": f"auto (budget {args.budget:g} s)",
                 "accuracy": acc, "fit_s": wall, "cpu_s": cpu,
                 "params": {"choice": sel.choice["name"], "cv": sel.choice["mean"],
                            "notes": sel.notes}})
    hand = []
    for r in sel.table:  # every scored candidate, refitted on all train rows, on the test rows
        a, w, c, _ = _fit_score(lambda X, y: (auto.build_choice(r).fit(X, y), {}),
                                Xtr, ytr, Xte, yte)
        hand.append({"set": name, "config": r["name"], "cv": r["mean"], "accuracy": a,
                     "fit_s": w, "cpu_s": c})
    return rows, hand, sel.record()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", nargs="+", default=None,
                    help="natural fmnist-10 fmnist-50 fmnist-all")
    ap.add_argument("--fmnist", nargs=2, type=int, default=None, metavar=("TRAIN", "TEST"),
                    help="per-class sizes of the Fashion-MNIST store (default 1000 200)")
    ap.add_argument("--heads", nargs="+", default=None)
    ap.add_argument("--budget", type=float, default=auto.DEFAULT_BUDGET)
    ap.add_argument("--no-search", action="store_true")
    ap.add_argument("--slow-search", nargs="*", default=["mlp"],
                    help="heads whose --search is skipped above 1,000 train rows (mlp: 19 fits "
                         "without early stopping took over 10 minutes on 3,000 rows here)")
    ap.add_argument("--splits", type=int, default=20,
                    help="random splits of the natural set for the repeated section")
    ap.add_argument("--draws", type=int, default=5,
                    help="draws of the Fashion-MNIST few-shot rows for the repeated section")
    ap.add_argument("--seed0", type=int, default=0,
                    help="fresh repeated splits: the natural set's random_state and the draws' "
                         "first seed - 1 (default 0)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--name", default="accuracy",
                    help="results file name under bench/results/ (a partial rerun, e.g. "
                         "--sets fmnist-all --name accuracy-10k, keeps the full file)")
    args = ap.parse_args()
    args.sets = args.sets or (["natural", "fmnist-10"] if args.quick else
                              ["natural", "fmnist-10", "fmnist-50", "fmnist-all"])
    args.fmnist = args.fmnist or ([100, 100] if args.quick else [1000, 200])
    args.heads = args.heads or (["logreg", "svm", "knn", "centroid"] if args.quick
                                else list(registry.HEADS))
    hdr = bu.Header("Accuracy of every head on frozen bundled-Lite0 features: defaults, "
                    "--search, auto")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    sets = load_sets(args)
    from threadpoolctl import threadpool_limits

    # one BLAS thread for every fit (auto does the same on small data): on this shared, loaded
    # machine two threads made small fits up to 90x slower in wall time
    threadpool_limits(1)
    all_rows, all_hand, records, sizes = [], [], {}, {}
    for name, (Xtr, ytr, Xte, yte, src) in sets.items():
        sizes[name] = f"{len(ytr)} train / {len(yte)} test, {len(np.unique(ytr))} classes ({src})"
        rows, hand, rec = run_set(name, Xtr, ytr, Xte, yte, args, log)
        all_rows += rows
        all_hand += hand
        records[name] = rec
    repeated = {}
    for name, (splits, how) in repeated_splits(args).items():
        repeated[name] = (how, run_repeated(name, splits, args, log))
    text = hdr.render([f"set {n}: {d}" for n, d in sizes.items()] + [
        "features: bundled EfficientNet-Lite0, 1280-d, extraction precision auto",
        "every fit runs with one BLAS thread (threadpoolctl)",
        f"auto: `heads.auto.fit_auto(X, y, budget={args.budget:g})`; fit seconds are wall "
        "(this shared machine) and CPU (process time)",
    ] + (["QUICK run: small sets and few heads"] if args.quick else []))
    for name in sets:
        rs = [r for r in all_rows if r["set"] == name]
        text += f"\n## {name}: {sizes[name]}\n\n" + bu.table(
            ["head", "kind", "test accuracy", "fit s (wall)", "fit s (CPU)", "parameters"],
            [(r["head"], r["kind"], f"{r['accuracy']:.3f}", f"{r['fit_s']:.1f}",
              f"{r['cpu_s']:.1f}", ", ".join(f"{k}={v}" for k, v in r["params"].items()
                                             if k != "notes"))
             for r in rs]) + "\n"
        hs = sorted([h for h in all_hand if h["set"] == name], key=lambda h: -h["accuracy"])
        text += "\nauto's candidates, each refitted on all train rows and scored on the test " \
                "rows (by hand):\n\n" + bu.table(
                    ["configuration", "inner CV", "test accuracy", "fit s (wall)"],
                    [(h["config"], f"{h['cv']:.3f}", f"{h['accuracy']:.3f}", f"{h['fit_s']:.1f}")
                     for h in hs]) + "\n"
        text += "".join(f"\nnote: {n}\n" for n in records[name]["notes"])
        text += "\n" + targets_text(name, rs, hs) + "\n"
    for name, (how, rows) in repeated.items():
        text += repeated_text(name, how, rows)
    text += "\n## Compared with ANCHORS.md (quoted)\n\n" + "".join(f"- {a}\n" for a in ANCHORS)
    print(text)
    out = bu.save_results(args.name, text, {"sets": sizes, "rows": all_rows, "hand": all_hand,
                                             "auto": records, "anchors": ANCHORS,
                                             "repeated": {n: {"how": h, "rows": r}
                                                          for n, (h, r) in repeated.items()}},
                          args.quick)
    log(f"wrote {out}")


def targets_text(name, rs, hs) -> str:
    best_default = max((r for r in rs if r["kind"] == "defaults"), key=lambda r: r["accuracy"])
    worst_default = min((r for r in rs if r["kind"] == "defaults"), key=lambda r: r["accuracy"])
    a = next(r for r in rs if r["head"] == "auto")["accuracy"]
    searched = [r for r in rs if r["kind"] == "--search"]
    lines = [f"targets on {name}:"]
    if searched:
        bs = max(searched, key=lambda r: r["accuracy"])
        lines.append(f"- auto {a:.3f} vs best single head with --search ({bs['head']}) "
                     f"{bs['accuracy']:.3f}: {'met' if a >= bs['accuracy'] else 'not met'}")
    # by hand: the best test accuracy of anything a user could have fitted, auto's scored
    # candidates and every head's defaults and --search rows alike (auto's table alone hides
    # the heads its budget cut: 60k rows, 2026-11-30)
    by_hand = [(h["config"], h["accuracy"]) for h in hs] + [
        (f"{r['head']} {r['kind']}", r["accuracy"]) for r in rs if r["head"] != "auto"]
    if by_hand:
        cfg, best = max(by_hand, key=lambda t: t[1])
        lines.append(f"- auto {a:.3f} vs best configuration by hand ({cfg}) {best:.3f}: "
                     f"{'met' if a >= best - 0.01 else 'not met'} (within 1 point)")
    gap = best_default["accuracy"] - worst_default["accuracy"]
    lines.append(f"- defaults spread: best {best_default['head']} {best_default['accuracy']:.3f}, "
                 f"worst {worst_default['head']} {worst_default['accuracy']:.3f} "
                 f"({100 * gap:.1f} points): {'met' if gap <= 0.03 else 'not met'} (≤ 3 points)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
