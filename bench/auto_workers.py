"""`--head auto`'s cross-validation: its folds one after another (in-process, as before) against
several folds at once in worker processes (heads.auto.score_workers: one per usable core above
PARALLEL_ROWS rows, cores // workers BLAS/OpenMP threads each).

The same selection (heads.auto.select, every candidate scored: the budget is set out of reach,
so both ways do the same work) on bundled-Lite0 features of Fashion-MNIST train rows, stratified
samples of 2,000 and 10,000 rows (10 classes; 5 folds up to 5,000 rows, 3 above), the two ways one
after the other, alternating which runs first. Printed: wall and CPU seconds of the
selection, the ratio, and whether the two tables are equal (every candidate's name and mean CV
score to the last digit; above 5,000 rows the in-process way runs the library's BLAS threads and
each worker one, so logistic regression's lbfgs may end a few 1e-4 apart). Then, at 10,000
rows, what the default budget (120 s of wall time) scores each way.

Run from the repository root:  python bench/auto_workers.py [--quick]
(--quick: 2,000 rows only, one repetition, scratch output). Writes bench/results/auto_workers.md
and .json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402
from calibration_refit import sample  # noqa: E402


def select(X, y, workers: int, budget: float) -> dict:
    from embedpipe.heads import auto

    auto.score_workers = lambda rows: workers  # this run's way (the module looks it up per call)
    t, c = time.perf_counter(), time.process_time()
    sel = auto.select(X, y, budget=budget)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {"workers": workers, "rows": len(y), "budget": budget, "wall_s": wall, "cpu_s": cpu,
            "scored": sum(not r.get("members") for r in sel.table), "choice": sel.choice["name"],
            "table": [(r["name"], r["mean"]) for r in sel.table], "notes": sel.notes}


def main() -> None:
    from embedpipe.heads import auto

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    header = bu.Header("`--head auto`: folds one at a time vs in worker processes")
    many = auto.score_workers(10**9)  # this machine's way: one worker per usable core
    path, X_all, y_all, _, _ = bu.fmnist_split(1000, 200)
    sizes = [2000] if args.quick else [2000, 10000]
    reps = 1 if args.quick else args.reps
    rows, payload, turn = [], [], 0
    for n in sizes:
        keep = sample(y_all, n)
        X, y = X_all[keep], y_all[keep]
        got: dict[int, list[dict]] = {1: [], many: []}
        for _ in range(reps):
            for w in ((1, many) if turn % 2 == 0 else (many, 1)):
                res = select(X, y, w, 1e6)
                print({k: v for k, v in res.items() if k not in ("table", "notes")}, flush=True)
                got[w].append(res)
            turn += 1
        same = all(r["table"] == got[1][0]["table"] for w in got for r in got[w])
        for w in (1, many):
            wall = [r["wall_s"] for r in got[w]]
            cpu = [r["cpu_s"] for r in got[w]]
            payload += got[w]
            rows.append([f"{n:,}", f"{w}", f"{got[w][0]['scored']}", f"{bu.median(wall):.1f}",
                         bu.spread(wall), f"{bu.median(cpu):.1f}", got[w][0]["choice"]])
        ratio = bu.median([r["wall_s"] for r in got[1]]) / bu.median(
            [r["wall_s"] for r in got[many]])
        rows.append([f"{n:,}", f"ratio 1 / {many}: {ratio:.2f}x wall; same table both ways: "
                     f"{'yes' if same else 'NO'}", "", "", "", "", ""])
    if not args.quick:
        keep = sample(y_all, 10000)
        for w in (1, many):
            res = select(X_all[keep], y_all[keep], w, auto.DEFAULT_BUDGET)
            print({k: v for k, v in res.items() if k != "table"}, flush=True)
            payload.append(res)
            rows.append(["10,000", f"{w} (default budget {auto.DEFAULT_BUDGET:g} s)",
                         f"{res['scored']}", f"{res['wall_s']:.1f}", "", f"{res['cpu_s']:.1f}",
                         res["choice"]])
    bu.publish("auto_workers", header,
               [f"set: Fashion-MNIST bundled-Lite0 features ({path.name}), train rows sampled "
                "per size (stratified, seed 0), 10 classes, 1,280-d",
                f"workers: 1 (folds one after another, the library's BLAS threads above 5,000 "
                f"rows) vs {many} (one per usable core, cores // workers BLAS threads each); "
                f"{reps} repetition(s) each, alternating which way runs first; budget out of "
                "reach (every candidate scored) except in the last rows"],
               ["train rows", "workers", "candidates scored", "wall s (median)", "min–max",
                "CPU s (this process; workers' not counted)", "choice"], rows,
               {"rows": payload}, args.quick)


if __name__ == "__main__":
    main()
