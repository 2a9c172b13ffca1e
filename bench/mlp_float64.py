"""The mlp head trained in float64 (embedpipe.heads.mlp) vs in float32 (scikit-learn's
MLPClassifier on our float32 rows, the head before), as ``fit`` fits it; and which of the two
the head's rule picks for each set (float64 when the fit may take more than
mlp.FLOAT32_MAX_STEPS Adam steps).

Why: float32 weights turn subnormal after about 1,500 Adam steps and epochs then cost 8-14x
more CPU (bench/results/mlp_subnormal.md). float64 weights stay normal but every epoch costs
more before that point. This script measures both sides of that trade on the sizes the head
meets: Fashion-MNIST bundled-Lite0 features, few-shot draws of 50, 200 and 400 rows per class
from the 10,000 train rows of bench/accuracy.py (the small-store rule: no early stopping, up to
300 epochs; auto's vote holds mlp up to 5,000 rows), the 10,000 rows themselves and, with
``--large``, the 60,000 (early stopping). Test rows: the store's test split (2,000 / 10,000).

Each size fits the head's pipeline (``registry.build`` with the data's defaults) once per seed
in each dtype, the two alternating, so machine load hits both alike. Printed per fit: CPU
seconds (all threads, process time) and wall seconds of the fit, epochs run (``n_iter_``), the
share of subnormal weights at the end, test accuracy; per size the ratio of the CPU seconds.

    python bench/mlp_float64.py                 # 50/200/400 per class and 10k, 2 seeds
    python bench/mlp_float64.py --large         # also 60k (1 seed; about 25 CPU-minutes)
    python bench/mlp_float64.py --quick         # 50/class and 10k, 1 seed (scratch files)

Writes bench/results/mlp_float64.md and .json.
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


def _subnormal(net) -> float:
    """Share of the network's weights that are subnormal in their own dtype."""
    tiny = np.finfo(net.coefs_[0].dtype).tiny
    n = sum(c.size for c in net.coefs_)
    return sum(int(((np.abs(c) < tiny) & (c != 0)).sum()) for c in net.coefs_) / n


def _pipe(dtype: str, y: np.ndarray, dim: int, seed: int):
    """The head's pipeline for labels ``y``; its network trained in ``dtype`` whatever the
    head's own rule (mlp.FLOAT32_MAX_STEPS) would pick."""
    from sklearn.neural_network import MLPClassifier as SklearnMLP

    from embedpipe.heads import mlp
    from embedpipe.heads.registry import build, with_data_defaults

    pipe = build("mlp", with_data_defaults("mlp", {}, y, dim), seed=seed)
    ours = pipe.steps[-1][1]
    if dtype == "float32":  # the head before: scikit-learn's class, trained in X's dtype
        pipe.steps[-1] = ("clf", SklearnMLP(**ours.get_params()))
    else:  # ours, made to cast whatever its step bound
        pipe.steps[-1] = ("clf", type("Float64MLP", (mlp.MLPClassifier,), {
            "max_steps": lambda self, rows: mlp.FLOAT32_MAX_STEPS + 1})(**ours.get_params()))
    return pipe


def _rule(y: np.ndarray, dim: int) -> str:
    """The dtype `fit` trains the head in on these labels (the step bound of heads/mlp.py)."""
    from embedpipe.heads import mlp
    from embedpipe.heads.registry import build, with_data_defaults

    net = build("mlp", with_data_defaults("mlp", {}, y, dim)).steps[-1][1]
    return "float64" if net.max_steps(len(y)) > mlp.FLOAT32_MAX_STEPS else "float32"


def _draw(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False)
                                   for c in np.unique(y)]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--large", action="store_true", help="also the 60,000-row store")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # ConvergenceWarning of capped few-shot fits
    hdr = bu.Header("mlp head: float64 vs float32 training")
    seeds = 1 if args.quick else args.seeds
    _, X, y, Xt, yt = bu.fmnist_split(1000, 200)
    sets = [(f"{k}/class", X, y, Xt, yt, k) for k in ((50,) if args.quick else (50, 200, 400))]
    sets.append(("10k", X, y, Xt, yt, None))
    if args.large:
        _, X6, y6, Xt6, yt6 = bu.fmnist_split(6000, 1000)
        sets.append(("60k", X6, y6, Xt6, yt6, None))
    rows, ratios, payload = [], [], []
    for name, A, b, At, bt, per_class in sets:
        cpu = {"float32": [], "float64": []}
        for seed in range(seeds if name != "60k" else 1):
            idx = _draw(b, per_class, seed) if per_class else np.arange(len(b))
            order = ("float32", "float64") if seed % 2 == 0 else ("float64", "float32")
            for dtype in order:
                pipe = _pipe(dtype, b[idx], A.shape[1], seed)
                t, w = time.process_time(), time.perf_counter()
                pipe.fit(A[idx], b[idx])
                c, w = time.process_time() - t, time.perf_counter() - w
                net = pipe.steps[-1][1]
                acc = float((pipe.predict(At) == bt).mean())
                cpu[dtype].append(c)
                rec = {"set": name, "rows": len(idx), "seed": seed, "weights": dtype,
                       "cpu_s": c, "wall_s": w, "epochs": int(net.n_iter_),
                       "subnormal_share": _subnormal(net), "test_accuracy": acc}
                payload.append(rec)
                rows.append((name, len(idx), seed, dtype, f"{c:.1f}", f"{w:.1f}", net.n_iter_,
                             f"{rec['subnormal_share']:.1%}", f"{acc:.4f}"))
                print(rows[-1], file=sys.stderr, flush=True)
        r = float(np.sum(cpu["float64"]) / np.sum(cpu["float32"]))
        accs = {d: float(np.mean([p["test_accuracy"] for p in payload
                                  if p["set"] == name and p["weights"] == d]))
                for d in cpu}
        ratios.append((name, f"{np.sum(cpu['float32']):.1f}", f"{np.sum(cpu['float64']):.1f}",
                       f"{r:.2f}", f"{accs['float32']:.4f}", f"{accs['float64']:.4f}",
                       _rule(b[idx], A.shape[1])))
    body = ("\n## Each fit\n\n"
            + bu.table(["set", "train rows", "seed", "weights", "CPU s", "wall s", "epochs",
                        "subnormal weights", "test accuracy"], rows)
            + "\n\n## Per set (sums over seeds)\n\n"
            + bu.table(["set", "float32 CPU s", "float64 CPU s", "float64 / float32",
                        "float32 mean accuracy", "float64 mean accuracy", "`fit` trains in"],
                       ratios) + "\n")
    bu.finish("mlp_float64", hdr, [
        "head: `mlp` as `fit` builds it for the data (registry.build with with_data_defaults: "
        "below 500 rows per class no early stopping), default threads",
        "float32: scikit-learn's MLPClassifier on the float32 rows (the head before); "
        "float64: embedpipe.heads.mlp.MLPClassifier made to cast the rows to float64 in fit; "
        "`fit trains in`: what the head's rule picks (float64 above "
        "mlp.FLOAT32_MAX_STEPS = 1,000 possible Adam steps)"],
        body, {"fits": payload}, args.quick)


if __name__ == "__main__":
    main()
