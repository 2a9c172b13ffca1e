"""bench/reject.py: open-set rejection (`fit --reject-rate`, `predict --reject auto`) on
Fashion-MNIST with classes held out as "unknown".

Question: how well do the head's confidence and the distance to the training class centroids
separate images of classes the head never saw from known ones, and what do `--reject auto`'s
thresholds (chosen on out-of-fold training rows for a 5% false-reject rate) give on new rows?

Data: bundled-Lite0 features of Fashion-MNIST (cache/bench-heads/fmnist-100-10.h5: 100 train
images per class from the train split, 10 per class from the test split). For each of three
rotations, three classes are held out: the head is fitted (exactly as `fit --reject-rate 0.05`
does, embedpipe.heads.train) on the train rows of the other seven; the known rows scored are
the test rows of the seven, the unknown rows every row of the three held-out classes.

Reported per head and rotation: AUROC (unknown = positive) of 1 - confidence, of the centroid
distance, and of the auto rule's combined score; false-accept (unknown rows accepted) at a 5%
false-reject rate of the known test rows with the threshold set on those rows (oracle, per
score); and the auto rule as `predict --reject auto` applies it: its false-reject rate on the
known test rows and false-accept rate on the unknown rows. `--quick`: one rotation, logreg.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

ROTATIONS = [("bag", "sneaker", "trouser"), ("ankle_boot", "coat", "shirt"),
             ("dress", "pullover", "sandal")]


def far_at_frr(known: np.ndarray, unknown: np.ndarray, frr: float = 0.05) -> float:
    """Fraction of unknown scores accepted (below the threshold) when the threshold rejects a
    fraction ``frr`` of the known scores (higher score = more unknown)."""
    t = np.quantile(known, 1 - frr)
    return float((unknown <= t).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--heads", default="logreg,mlp,svm")
    args = ap.parse_args()
    heads_ = ["logreg"] if args.quick else args.heads.split(",")
    rotations = ROTATIONS[:1] if args.quick else ROTATIONS

    from sklearn.metrics import roc_auc_score

    from embedpipe.features_io import export_features, import_features
    from embedpipe.heads import artifacts, reject
    from embedpipe.heads.train import fit
    from embedpipe.predict import from_store
    from embedpipe.store import open_store

    header = bu.Header("reject: open-set rejection with held-out Fashion-MNIST classes")
    _, store_path, _ = bu.fmnist_features(train=100, test=10)
    full = open_store(store_path)
    names = np.array(full.label_names(), dtype=object)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-reject-") as tmp:
        tmp = Path(tmp)
        npz = tmp / "all.npz"
        export_features(store_path, npz)
        data = dict(np.load(npz))
        for rot in rotations:
            held = np.isin(names, rot)
            keep = ~held & (full.splits == "train") | (full.splits == "test") | held
            # the store the head is fitted on: known train rows; every other row scored
            sub = tmp / f"{'-'.join(rot)}.npz"
            lab = data["label"].copy()
            split = data["split"].copy()
            split[held] = "unknown"  # held-out rows never train the head
            np.savez(sub, path=data["path"][keep], label=lab[keep], split=split[keep],
                     features=data["features"][keep])
            store = tmp / f"{'-'.join(rot)}.h5"
            import_features(sub, store)
            st = open_store(store)
            for head in heads_:
                out = tmp / f"{head}.skops"
                t = time.perf_counter()
                fit(store, head, out, reject_rate=0.05)
                fit_s = time.perf_counter() - t
                h = artifacts.load(out)
                auto = h.manifest["open_set"]["auto"]
                cents = reject.unpack(h.manifest["open_set"]["centroids"])
                preds = from_store(out, store, reject="auto", top_k=1)
                row = {p: i for i, p in enumerate(st.paths)}
                idx = np.array([row[p] for p in preds.paths])
                sp = st.splits[idx]
                is_unknown = np.isin(np.array(preds.labels, dtype=object), rot)
                scored = (sp == "test") | is_unknown
                conf = 1 - preds.confidence
                dist = reject.distance(st.features[idx], cents)
                # the auto rule as one score: how far past its threshold each signal is
                comb = np.maximum((auto["min_confidence"] - preds.confidence)
                                  / max(auto["min_confidence"], 1e-9),
                                  (dist - auto["max_distance"]) / max(auto["max_distance"], 1e-9))
                y = is_unknown[scored]
                rej = np.array([p == reject.UNKNOWN for p in preds.predicted])[scored]
                r = dict(head=head, held_out=list(rot), fit_s=fit_s,
                         known=int((~y).sum()), unknown=int(y.sum()),
                         auroc_conf=roc_auc_score(y, conf[scored]),
                         auroc_dist=roc_auc_score(y, dist[scored]),
                         auroc_rule=roc_auc_score(y, comb[scored]),
                         far5_conf=far_at_frr(conf[scored][~y], conf[scored][y]),
                         far5_dist=far_at_frr(dist[scored][~y], dist[scored][y]),
                         far5_rule=far_at_frr(comb[scored][~y], comb[scored][y]),
                         auto_frr=float(rej[~y].mean()), auto_far=float((~rej[y]).mean()),
                         oof_frr=auto["false_reject"],
                         known_acc=float(np.mean([p == t for p, t, u, s in zip(
                             preds.predicted, preds.labels, is_unknown, sp)
                             if s == "test" and not u])))
                results.append(r)
                print(r, file=sys.stderr)
    table = bu.table(
        ["head", "held out", "known / unknown rows", "AUROC conf", "AUROC dist",
         "AUROC rule", "FA@5%FR conf", "FA@5%FR dist", "FA@5%FR rule",
         "auto: FR known (OOF)", "auto: FA unknown", "known acc (unknown = error)"],
        [[r["head"], ", ".join(r["held_out"]), f"{r['known']} / {r['unknown']}",
          f"{r['auroc_conf']:.3f}", f"{r['auroc_dist']:.3f}", f"{r['auroc_rule']:.3f}",
          f"{r['far5_conf']:.3f}", f"{r['far5_dist']:.3f}", f"{r['far5_rule']:.3f}",
          f"{r['auto_frr']:.3f} ({r['oof_frr']:.3f})", f"{r['auto_far']:.3f}",
          f"{r['known_acc']:.3f}"] for r in results])
    means = {h: {k: float(np.mean([r[k] for r in results if r["head"] == h]))
                 for k in ("auroc_conf", "auroc_dist", "auroc_rule", "far5_conf", "far5_dist",
                           "far5_rule", "auto_frr", "auto_far")} for h in heads_}
    mtable = bu.table(["head (mean of rotations)", "AUROC conf", "AUROC dist", "AUROC rule",
                       "FA@5%FR rule", "auto: FR known", "auto: FA unknown"],
                      [[h, f"{m['auroc_conf']:.3f}", f"{m['auroc_dist']:.3f}",
                        f"{m['auroc_rule']:.3f}", f"{m['far5_rule']:.3f}",
                        f"{m['auto_frr']:.3f}", f"{m['auto_far']:.3f}"]
                       for h, m in means.items()])
    text = header.render([
        "store: bundled-Lite0 features (bf16) of 100 train + 10 test Fashion-MNIST images per "
        "class; per rotation the head trains on the 700 train rows of 7 classes",
        "known rows: the 70 test rows of the 7 classes; unknown: the 330 rows of the 3 held out",
        "conf: 1 - the head's (calibrated) probability of its class; dist: cosine distance to "
        "the nearest training class centroid; rule: the auto rule's two signals as one score "
        "(the larger relative excess over its threshold)",
        "FA@5%FR: unknown rows accepted when a threshold on that score rejects 5% of the known "
        "test rows (set on those rows: an oracle); auto: `predict --reject auto` with the "
        "thresholds `fit --reject-rate 0.05` chose on out-of-fold training rows (OOF rate in "
        "brackets)",
    ]) + "\n" + table + "\n\n" + mtable + "\n"
    out = bu.save_results("reject", text, {"results": results, "means": means}, args.quick)
    print(text)
    print(f"→ {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
