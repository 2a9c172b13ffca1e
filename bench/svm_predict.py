"""An svm head's prediction: scikit-learn (libsvm) against its compact form (compact.py).

An RBF SVM scores every row against every support vector. libsvm takes one dot product per
(row, support vector) pair; the compact form takes one matrix product per block of rows
(numpy's BLAS), then the same one-vs-one decision values, scikit-learn's one-vs-rest
transform and the fitted temperature. This bench measures both on the same head files and the
same rows, side by side:

* heads: `embedpipe fit STORE --head svm` (defaults, the user path) on the train rows of the
  Fashion-MNIST bundled-Lite0 stores of bench/heads.py: 10,000 rows (1000/200 per class) and
  60,000 rows (6000/1000 per class, full Fashion-MNIST; skipped by --quick);
* prediction: ``predict_proba`` on the store's test rows, in the process (the head loaded by
  ``artifacts.load`` for scikit-learn, ``artifacts.load_compact`` for the compact form),
  interleaved repetitions, CPU seconds (process time) with 1 and 2 BLAS threads: CPU time
  barely depends on other processes' load, wall time does (both are printed);
* agreement: the predicted classes must be identical and the probabilities within 1e-5 on
  every row (the bench stops otherwise);
* the CLI: `embedpipe predict HEAD --store STORE --split test` on the head file and on a copy
  without its compact form (compact.strip), wall and CPU seconds of the subprocess.

    python bench/svm_predict.py            # 10k and 60k heads, 3 repetitions
    python bench/svm_predict.py --quick    # 10k head, 1 repetition; scratch result in /tmp

Writes bench/results/svm_predict.md and svm_predict.json.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402


def _timed(fn, threads: int) -> tuple[float, float, object]:
    """(CPU s, wall s, result) of ``fn()`` under ``threads`` BLAS threads."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads):
        c, w = time.process_time(), time.perf_counter()
        out = fn()
        return time.process_time() - c, time.perf_counter() - w, out


def main() -> None:
    import numpy as np

    from embedpipe.heads import artifacts, compact

    args, reps = bu.reps_args(3)
    sizes = [(1000, 200)] if args.quick else [(1000, 200), (6000, 1000)]
    hdr = bu.Header("svm head prediction: scikit-learn (libsvm) vs the compact form")
    tmp = Path(tempfile.mkdtemp(prefix="bench-svm-predict-"))
    rows, cli_rows, payload = [], [], {"sizes": []}
    for train, test in sizes:
        path, _, _, Xte, _ = bu.fmnist_split(train, test)
        head = tmp / f"svm-{train}.skops"
        fit_s, _ = bu.timed_cli("fit", path, "--head", "svm", "-o", head, "-q")
        sk = artifacts.load(head).estimator
        fast = artifacts.load_compact(head)
        if fast is None:
            raise SystemExit(f"{head}: no compact form was written")
        fast = fast.estimator
        inner = sk.calibrated_classifiers_[0].estimator[-1]
        n_sv = int(inner.support_vectors_.shape[0])
        label = f"{10 * train:,} train rows ({n_sv:,} support vectors), {len(Xte):,} test rows"
        print(f"{label}: fit {fit_s:.0f} s", file=sys.stderr, flush=True)
        got: dict[tuple[str, int], list[tuple[float, float]]] = {}
        probs = {}
        for rep in range(reps):
            for threads in (1, 2):
                order = [("scikit-learn", sk), ("compact form", fast)]
                if rep % 2:
                    order.reverse()
                for name, est in order:
                    c, w, p = _timed(lambda e=est: e.predict_proba(Xte), threads)
                    got.setdefault((name, threads), []).append((c, w))
                    probs[name] = p
                    print(f"  {name}, {threads} thread(s): {c:.1f} CPU s, {w:.1f} s wall",
                          file=sys.stderr, flush=True)
        a, b = probs["scikit-learn"], probs["compact form"]
        same = bool(np.array_equal(a.argmax(1), b.argmax(1)))
        diff = float(np.abs(a - b).max())
        if not same or diff > 1e-5:
            raise SystemExit(f"{label}: the compact form disagrees (same classes {same}, "
                             f"max probability difference {diff:.2e})")
        for threads in (1, 2):
            s = got[("scikit-learn", threads)]
            f = got[("compact form", threads)]
            sc, fc = bu.median([x[0] for x in s]), bu.median([x[0] for x in f])
            sw, fw = bu.median([x[1] for x in s]), bu.median([x[1] for x in f])
            rows.append((label, threads, f"{sc:.2f}", f"{fc:.2f}", f"{sc / fc:.1f}x",
                         f"{sw:.2f}", f"{fw:.2f}", f"{sw / fw:.1f}x", f"{diff:.1e}"))
        plain = compact.strip(head, tmp / f"svm-{train}.sklearn.skops")
        cli = {}
        for name, h in (("compact form", head), ("scikit-learn", plain)):
            w, res = bu.timed_cli("predict", h, "--store", path, "--split", "test", "-o",
                                  tmp / "p.csv", "-q")
            cli[name] = (w, res.cpu_s)
        cli_rows.append((label, f"{cli['scikit-learn'][0]:.1f}", f"{cli['compact form'][0]:.1f}",
                         f"{cli['scikit-learn'][1]:.1f}", f"{cli['compact form'][1]:.1f}",
                         f"{cli['scikit-learn'][1] / cli['compact form'][1]:.1f}x"))
        payload["sizes"].append({"train": 10 * train, "test": len(Xte), "support_vectors": n_sv,
                                 "fit_s": fit_s, "predict_proba": {f"{k[0]}, {k[1]}": v
                                                                   for k, v in got.items()},
                                 "max_prob_diff": diff, "cli": cli})
    body = ("\n## predict_proba in the process (median of the repetitions)\n\n" + bu.table(
        ["head", "BLAS threads", "scikit-learn CPU s", "compact CPU s", "CPU ratio",
         "scikit-learn wall s", "compact wall s", "wall ratio", "max |Δ probability|"], rows)
        + "\n\n## `embedpipe predict HEAD --store STORE --split test` (one run each)\n\n"
        + bu.table(["head", "scikit-learn wall s", "compact wall s", "scikit-learn CPU s",
                    "compact CPU s", "CPU ratio"], cli_rows) + "\n")
    extra = [f"heads: `embedpipe fit STORE --head svm` (defaults); {reps} interleaved "
             "repetitions; classes identical and probabilities within 1e-5 on every test row "
             "(checked)",
             "CPU seconds are the figure to compare on a loaded machine; wall seconds show "
             "the 2-thread effect"]
    bu.finish("svm_predict", hdr, extra, body, payload, args.quick)


if __name__ == "__main__":
    main()
