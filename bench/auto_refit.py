"""The final fit of `fit --head auto` on 10,000 rows: the chosen head's (or its vote members')
temperature scaling fitted on the out-of-fold decision values auto's cross-validation already
computed (``calibration.calibrated_from_oof``: the head fitted once, on all rows) against a
cross-validation of its own (CalibratedClassifierCV's k folds: the head fitted k+1 times).
Fit seconds (wall and CPU), test accuracy, log loss and top-label ECE on the same rows, the two
fits of each choice one after the other.

Bundled-Lite0 features of Fashion-MNIST, 10,000 train / 2,000 test rows (1,000 and 200 per
class, extracted on first use under cache/bench-heads/). ``auto.select`` runs once (budget
--budget seconds); then each choice is refitted both ways: (a) auto's own choice on this store,
(b) the soft vote svm + knn + ridge of the heads' defaults (what auto chose on two stacked
Lite0 stores of these images, bench/results/feature_levers.md), whose svm and ridge are
calibrated.

Run from the repository root:  python bench/auto_refit.py [--budget 400] [--reps 1]
Writes bench/results/auto_refit.md and .json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402
from calibration import ece  # noqa: E402


def refit(choice, X, y, Xte, yte, sel, reuse: bool) -> dict:
    from sklearn.metrics import log_loss

    from embedpipe.heads import auto

    t, c = time.perf_counter(), time.process_time()
    est, calibration, _ = auto._refit(choice, X, y, 0, lambda m: None, calibrate_single=True,
                                      decisions=sel.decisions if reuse else None,
                                      folds=sel.folds)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    proba = est.predict_proba(Xte)
    classes = np.asarray(est.classes_)
    return {"choice": choice["name"], "how": "auto's out-of-fold values" if reuse
            else "its own k-fold CV", "calibration": calibration,
            "accuracy": float(np.mean(classes[proba.argmax(axis=1)] == yte)),
            "log_loss": float(log_loss(yte, proba, labels=classes)),
            "ece": ece(proba, classes, yte), "mean_confidence": float(proba.max(axis=1).mean()),
            "fit_wall_s": wall, "fit_cpu_s": cpu}


def fold_draws(X, y, Xte, yte) -> list[dict]:
    """How much the svm's calibration moves with the draw of folds alone: its temperature
    fitted on out-of-fold decision values of shuffled stratified 3- and 5-fold splits of
    several seeds (calibrated_from_oof, the head fitted on all rows each time)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from threadpoolctl import threadpool_limits

    from embedpipe.heads import calibration as temperature
    from embedpipe.heads import registry as heads

    classes = np.unique(y)
    out = []
    with threadpool_limits(1):
        for k, seed in [(3, 0), (3, 1), (3, 2), (5, 0), (5, 1)]:
            splits = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(X, y))
            d = cross_val_predict(heads.build("svm"), X, np.searchsorted(classes, y),
                                  cv=splits, method="decision_function")
            cal = temperature.calibrated_from_oof(CalibratedClassifierCV(
                heads.build("svm"), method="temperature", ensemble=False, cv=k), X, y, d)
            p = cal.predict_proba(Xte)
            out.append({"folds": k, "seed": seed,
                        "beta": float(cal.calibrated_classifiers_[0].calibrators[0].beta_),
                        "mean_confidence": float(p.max(axis=1).mean()),
                        "accuracy": float(np.mean(classes[p.argmax(axis=1)] == yte)),
                        "log_loss": float(log_loss(yte, p, labels=classes)),
                        "ece": ece(p, classes, yte)})
            print(out[-1], file=sys.stderr, flush=True)
    return out


def main() -> None:
    from embedpipe.heads import auto
    from embedpipe.heads.rows import min_class

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=400.0)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    head = bu.Header("auto's final fit: calibration from its own CV's out-of-fold values")
    path, X, y, Xte, yte = bu.fmnist_split(1000, 200)
    t = time.perf_counter()
    sel = auto.select(X, y, budget=args.budget, say=lambda m: print(m, file=sys.stderr))
    select_s = time.perf_counter() - t
    print("\n".join(sel.lines()), file=sys.stderr)
    _, smallest = min_class(y)
    by_name = {r["name"]: r for r in sel.table if not r.get("members")}
    names = {h: auto.describe(h, p) for h, p in auto.defaults(smallest, X.shape[1])}
    members = [by_name[names[h]] for h in ("svm", "knn", "ridge") if names[h] in by_name]
    vote = {"name": " + ".join(m["name"] for m in members), "head": "+".join(
        m["head"] for m in members), "params": {},
        "members": [{"head": m["head"], "params": m["params"]} for m in members]}
    choices = [sel.choice] + ([vote] if len(members) == 3 else [])
    rows, payload = [], []
    for choice in choices:
        got: dict[bool, list[dict]] = {True: [], False: []}
        for rep in range(args.reps):  # interleaved, the order alternating
            for reuse in ((True, False) if rep % 2 == 0 else (False, True)):
                res = refit(choice, X, y, Xte, yte, sel, reuse)
                print(res, file=sys.stderr, flush=True)
                got[reuse].append(res)
                payload.append({"rep": rep, **res})
        for reuse in (False, True):
            r = got[reuse]
            rows.append([choice["name"], r[0]["how"], r[0]["calibration"],
                         f"{np.mean([x['accuracy'] for x in r]):.4f}",
                         f"{np.mean([x['log_loss'] for x in r]):.4f}",
                         f"{np.mean([x['ece'] for x in r]):.4f}",
                         f"{np.mean([x['mean_confidence'] for x in r]):.4f}",
                         f"{bu.median([x['fit_wall_s'] for x in r]):.0f}",
                         f"{bu.median([x['fit_cpu_s'] for x in r]):.0f}"])
        ratio = (bu.median([x["fit_cpu_s"] for x in got[False]])
                 / max(bu.median([x["fit_cpu_s"] for x in got[True]]), 1e-9))
        rows.append([choice["name"], "ratio own CV / out-of-fold (CPU s)", "", "", "", "", "",
                     "", f"{ratio:.2f}x"])
    draws = fold_draws(X, y, Xte, yte)
    body = "\n" + bu.table(
        ["choice", "temperature fitted on", "calibration (manifest)", "test accuracy",
         "log loss", "ECE", "mean confidence", "fit s (wall)", "fit s (CPU)"], rows)
    body += ("\n## svm alone: the same calibration on other draws of folds\n\n"
             "Its temperature fitted on the out-of-fold decision values of shuffled stratified "
             "k-fold splits (seeds 0-2), the head fitted on all rows: how far the draw of "
             "folds alone moves the numbers above.\n\n" + bu.table(
                 ["folds", "seed", "inverse temperature", "test accuracy", "log loss", "ECE",
                  "mean confidence"],
                 [[d["folds"], d["seed"], f"{d['beta']:.4f}", f"{d['accuracy']:.4f}",
                   f"{d['log_loss']:.4f}", f"{d['ece']:.4f}", f"{d['mean_confidence']:.4f}"]
                  for d in draws]))
    bu.finish("auto_refit", head,
              [f"set: Fashion-MNIST bundled-Lite0 features, {len(y)} train / {len(yte)} test "
               f"rows, 10 classes ({path.name})",
               f"auto.select once: {select_s:.0f} s, budget {args.budget:g} s, "
               f"{sum(not r.get('members') for r in sel.table)} candidates scored by "
               f"{sel.folds}-fold CV, chose {sel.choice['name']}",
               f"each choice refitted both ways, {args.reps} time(s) each, interleaved; "
               "fits as `fit --head auto` does them (auto._refit)",
               "ECE: top-label, 15 equal-width bins; mean confidence: of the predicted class "
               "(test accuracy is what a calibrated head's would be)",
               "the machine's load shows in the wall seconds, much less in the CPU seconds"],
              body, {"select_s": select_s, "choice": sel.choice["name"], "rows": payload,
                     "fold_draws": draws}, False)


if __name__ == "__main__":
    main()
