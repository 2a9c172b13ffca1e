"""How `--head auto` should choose on few rows: the best inner-CV row, or a vote of the best heads.

On the repeated sets of bench/accuracy.py (random stratified 170/71 splits of the natural set;
draws of 10 and 50 Fashion-MNIST train rows per class against the same 2,000 test rows), every
auto candidate (``heads.auto.candidates``) is scored by the same stratified 5-fold CV auto
uses and refitted on all train rows; its test-row class scores are kept, temperature-scaled
with the temperature fitted on its out-of-fold scores (as auto's ensembles are). Then each
policy's choice is scored on the test rows, on the same splits:

- ``best CV row``: the rule auto had before this script: the best row of the table of singles
  and greedy ensembles (``heads.auto._ensembles``: members join only while the out-of-fold
  score strictly improves);
- ``best single``: the best single configuration by CV;
- ``vote of the N best heads``: the soft vote of the best configuration of each of the N heads
  with the best CV scores (N = 2..6; 4 was auto's rule before power normalisation), and of
  every head;
- ``vote of every candidate``: all 13 configurations;
- ``vote of every head's defaults``: the 7 in-memory heads' defaults for the data, whatever
  their CV scores (auto's rule since 2026-12-01);
- ``vote of the 4 best heads, sqrt prep only``: as the 4 best, among power-normalised rows;
- ``vote of the best of each family`` (and ``... best default of each family``): one member per
  FAMILIES entry (linear, kernel, lda, mlp), the best by CV;
- each head's defaults, for reference.

Printed: mean test accuracy ± standard error over the splits, and each policy's paired
difference to ``best CV row`` (mean ± standard error of the per-split differences).

    python bench/auto_policy.py            # 20 natural splits, 5 draws each of fmnist-10/50
    python bench/auto_policy.py --quick    # 3 splits, 2 draws
    python bench/auto_policy.py --draws 10 --keep /tmp/policy.pkl  # keep the scored splits
    python bench/auto_policy.py --draws 10 --seed0 100 --name auto_policy-fresh  # new splits

Writes bench/results/auto_policy.md and auto_policy.json (--quick: scratch files).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402
import accuracy  # noqa: E402

from embedpipe.evaluate.cv import make_folds  # noqa: E402
from embedpipe.heads import auto, registry as heads  # noqa: E402
from embedpipe.heads.compact import class_scores  # noqa: E402
from embedpipe.heads.rows import min_class, scores as metric_scores  # noqa: E402

REFERENCE = "best CV row"


def _scores_on(est, X, classes, head):
    s, _ = class_scores(est, X, use_proba=heads.get(head).native_proba)
    out = np.zeros((len(X), len(classes)))
    out[:, np.searchsorted(classes, np.asarray(est.classes_))] = s
    return out


# the heads auto's vote may draw from, by family: a vote of the best of each family is the
# "diverse" policy (linear models, the RBF kernel, LDA prototypes/neighbours, the MLP)
FAMILIES = {"logreg": "linear", "linear-svm": "linear", "ridge": "linear", "svm": "kernel",
            "knn": "lda", "centroid": "lda", "mlp": "mlp"}


def score_split(X, y, Xt, yt) -> dict:
    """Every candidate scored on one split: its inner-CV row (auto's ``_row``), its test-row
    class scores raw and temperature-scaled, and whether it is its head's default for the
    data. The policies are then chosen from this (``policies``), so a new policy costs no
    refit."""
    classes = np.unique(y)
    y_idx = np.searchsorted(classes, y)
    _, smallest = min_class(y)
    k = min(auto.MAX_FOLDS, smallest)
    splitter, _ = make_folds(k, 1, 0)
    folds = list(splitter.split(np.zeros((len(y), 1)), y))

    defaults = {auto.describe(h, p) for h, p in auto.defaults(smallest, X.shape[1])}
    rows = []
    for head, params in auto.candidates(smallest, X.shape[1]):
        oof = np.zeros((len(y), len(classes)))
        for tr, te in folds:
            est = heads.build(head, params).fit(X[tr], y[tr])
            oof[te] = _scores_on(est, X[te], classes, head)
        test = _scores_on(heads.build(head, params).fit(X, y), Xt, classes, head)
        r = auto._row(auto.describe(head, params), head, params, oof, y, classes, folds,
                      "accuracy", metric_scores, 0.0)
        t = auto._temperature(oof, y_idx)
        r["test"], r["test_cal"] = test, auto._calibrate(test, t)
        r["default"] = r["name"] in defaults  # as auto._select tells its voters
        rows.append(r)
    return {"rows": rows, "y": y, "yt": yt, "classes": classes, "folds": folds}


def policies(split: dict) -> dict[str, float]:
    """Test accuracy of every policy's choice on one scored split (``score_split``)."""
    rows, y, yt, classes, folds = (split[k] for k in ("rows", "y", "yt", "classes", "folds"))
    y_idx = np.searchsorted(classes, y)
    by_name = {r["name"]: r for r in rows}
    singles = sorted(rows, key=lambda r: -r["mean"])

    def acc(P):
        return float((classes[np.argmax(P, axis=1)] == yt).mean())

    def vote(rs):
        return acc(np.mean([r["test_cal"] for r in rs], axis=0))

    out = {}
    table = sorted(singles + auto._ensembles([dict(r) for r in singles], y, y_idx, classes,
                                             folds, "accuracy", metric_scores),
                   key=lambda r: -r["mean"])
    top = table[0]
    out[REFERENCE] = acc(np.mean([by_name[auto.describe(m["head"], m["params"])]["test_cal"]
                                  for m in top["members"]], axis=0)
                         if top.get("members") else by_name[top["name"]]["test"])
    out["best single"] = acc(singles[0]["test"])
    best_of = {}
    for r in singles:
        best_of.setdefault(r["head"], r)
    pool = list(best_of.values())
    for n in (2, 3, 4, 5, 6):
        out[f"vote of the {n} best heads"] = vote(pool[:n])
    out["vote of every head"] = vote(pool)
    out["vote of every candidate"] = vote(rows)
    dflt = [r for r in rows if r["default"]]
    out["vote of every head's defaults"] = vote(dflt)
    sqrt_pool = list({r["head"]: r for r in reversed(singles)  # prep as given or the head's
                      if " prep=sqrt" in r["name"]}.values())
    sqrt_pool.sort(key=lambda r: -r["mean"])
    out["vote of the 4 best heads, sqrt prep only"] = vote(sqrt_pool[:4])
    fam = {}
    for r in pool:
        fam.setdefault(FAMILIES.get(r["head"], r["head"]), r)
    out["vote of the best of each family"] = vote(list(fam.values()))
    fam_d = {}
    for r in sorted(dflt, key=lambda r: -r["mean"]):
        fam_d.setdefault(FAMILIES.get(r["head"], r["head"]), r)
    out["vote of the best default of each family"] = vote(list(fam_d.values()))
    for r in dflt:
        out[f"defaults: {r['head']}"] = acc(r["test"])
    return out


def main() -> None:
    def extra(ap):
        ap.add_argument("--keep", metavar="PICKLE",
                        help="also write every split's scored candidates here")
        ap.add_argument("--name", default="auto_policy",
                        help="results file name under bench/results/ (e.g. a --seed0 rerun)")

    args = accuracy.repeated_args(quick=(3, 2), extra=extra)
    hdr = bu.Header("--head auto on few rows: best inner-CV row vs a vote of the best heads")
    text, payload, raw = "", {}, {}
    for name, (splits, how) in accuracy.repeated_splits(args).items():
        per: dict[str, list[float]] = {}
        for i, (X, y, Xt, yt) in enumerate(splits):
            t0 = time.perf_counter()
            with heads.lda_cache(len(y)):  # knn and centroid share each fold's lda fit
                scored = score_split(X, y, Xt, yt)
            got = policies(scored)
            raw.setdefault(name, []).append(scored)
            for p, a in got.items():
                per.setdefault(p, []).append(a)
            print(f"{name} split {i + 1}/{len(splits)} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
        ref = np.array(per[REFERENCE])
        lines = []
        for p, accs in sorted(per.items(), key=lambda kv: -np.mean(kv[1])):
            a = np.array(accs)
            d = a - ref
            se = (lambda v: float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1
                  else float("nan"))
            lines.append((p, f"{a.mean():.4f}", f"{se(a):.4f}",
                          "" if p == REFERENCE else f"{d.mean() * 100:+.2f} ± {se(d) * 100:.2f}"))
        text += f"\n## {name}: {how}\n\n" + bu.table(
            ["policy", "mean test accuracy", "± s.e.", f"paired vs {REFERENCE} (points)"],
            lines) + "\n"
        payload[name] = {"how": how, "accuracies": per}
    text = hdr.render(["features: bundled EfficientNet-Lite0, 1280-d (the stores of "
                       "bench/accuracy.py); one BLAS thread",
                       "candidates: heads.auto.candidates with no budget (all scored)"]
                      + (["QUICK run"] if args.quick else [])) + text
    print(text)
    out = bu.save_results(args.name, text, payload, args.quick)
    if args.keep:  # every split's scored candidates, to try another policy without refitting
        import pickle

        with open(args.keep, "wb") as f:
            pickle.dump(raw, f)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
