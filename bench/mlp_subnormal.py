"""Why mlp fits slow down after some epochs: subnormal float32 weights.

scikit-learn's MLPClassifier trains in the dtype of its input. Our features are float32, so
are its weights. Weights that only the L2 penalty moves (those of input channels that are
always 0 after the ReLU-pooled backbone, and of hidden units that never fire) decay
exponentially under Adam once their gradient is below Adam's epsilon, and after about 1,500
steps they are subnormal floats. Every matrix product with them then runs on the CPU's slow
subnormal path.

This script fits the mlp head's network (256 hidden units, alpha=1e-3, Adam, batch 200, on the
power- and L2-normalised rows that are its default preprocessing) epoch by epoch with
``partial_fit``, once on float32 rows and once on the same rows as float64, on the 10,000
Fashion-MNIST train rows of bench/accuracy.py. The two runs alternate in chunks of 10 epochs,
so machine load hits both alike. Printed for each chunk:
- the CPU seconds of its last epoch and so far;
- the share of each weight matrix that is subnormal;
- test accuracy on the 2,000 test rows.

    python bench/mlp_subnormal.py             # 60 epochs each (about 3 CPU-minutes)
    python bench/mlp_subnormal.py --quick     # 40 epochs

Writes bench/results/mlp_subnormal.md and .json (--quick: scratch files).
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


def main() -> None:
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import normalize
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    epochs = 40 if args.quick else args.epochs
    warnings.simplefilter("ignore")
    threadpool_limits(1)
    hdr = bu.Header("mlp fits: subnormal float32 weights")
    _, X, y, Xt, yt = bu.fmnist_split(1000, 200)

    def prep(A):
        return normalize(np.sign(A) * np.sqrt(np.abs(A)))

    Z, Zt = prep(X), prep(Xt)
    classes = np.unique(y)
    runs = {"float32": (Z, Zt), "float64": (Z.astype(np.float64), Zt.astype(np.float64))}
    nets = {k: MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, random_state=0)
            for k in runs}
    total = {k: 0.0 for k in runs}
    rows, payload = [], {k: [] for k in runs}
    for start in range(0, epochs, 10):
        for name, (A, At) in runs.items():
            net = nets[name]
            for ep in range(start, min(start + 10, epochs)):
                idx = np.random.default_rng(ep).permutation(len(A))  # same order for both
                t = time.process_time()
                net.partial_fit(A[idx], y[idx], classes=classes)
                last = time.process_time() - t
                total[name] += last
            tiny = np.finfo(net.coefs_[0].dtype).tiny
            sub = [float(np.mean((np.abs(c) < tiny) & (c != 0))) for c in net.coefs_]
            acc = float((net.predict(At) == yt).mean())
            rows.append((name, ep + 1, f"{last:.2f}", f"{total[name]:.1f}",
                         " / ".join(f"{s:.1%}" for s in sub), f"{acc:.4f}"))
            payload[name].append({"epoch": ep + 1, "last_epoch_cpu_s": last,
                                  "cpu_s": total[name], "subnormal_share": sub,
                                  "test_accuracy": acc})
            print(f"{name} epoch {ep + 1}: {last:.2f} s, subnormal {sub}", file=sys.stderr,
                  flush=True)
    rows.sort(key=lambda r: (r[0], r[1]))
    body = ("\n## Fashion-MNIST 10,000 train / 2,000 test rows, bundled Lite0 features\n\n"
            + bu.table(["weights", "epochs", "CPU s of the last epoch", "CPU s so far",
                        "subnormal share (hidden / output weights)", "test accuracy"],
                       rows) + "\n")
    bu.finish("mlp_subnormal", hdr, [
        "network: MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, Adam, batch 200), "
        "partial_fit one epoch at a time (seeded shuffles, the same for both dtypes); one "
        "BLAS thread; rows: signed square root, then L2 (the mlp head's default prep)"],
        body, payload, args.quick)


if __name__ == "__main__":
    main()
