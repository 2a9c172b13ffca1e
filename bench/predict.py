"""`embedpipe predict --store`: start-up time, throughput, and proof that torch is never imported.

Uses the 10k-train / 2k-test Fashion-MNIST store of bench/heads.py (built or completed under
cache/bench-heads/ when missing) and a 20-image store of the same backbone (1 train + 1 test
image per class, built beside it). Fits each head once with `embedpipe fit` on the big store's
train rows, then, all through the CLI in subprocesses, as a user runs it:

* start-up: wall time of `embedpipe predict HEAD --store SMALL` (20 rows), repeated, median;
  next to it `python -c pass` and `python -c "import embedpipe.cli"` for the floor;
* throughput: wall time of `embedpipe predict HEAD --store BIG` (all 12k rows), rows/s with and
  without the start-up median;
* imports: one run under `python -X importtime`: is any torch module imported, and which
  top-level imports cost most;
* heads with a compact form (compact.py: logreg, mlp) are also run from a copy of their head
  file without it, i.e. through scikit-learn, side by side.

    python bench/predict.py                  # logreg, mlp and svm, 7 start-up runs, 3 big runs
    python bench/predict.py --quick          # logreg, 3 and 1 runs; scratch result in /tmp

Writes bench/results/predict.md and predict.json. The issue's target: starts in < 1 s, never
imports torch.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402


SKLEARN = " (scikit-learn path)"


def importtime(head: Path, store: Path, out: Path) -> tuple[bool, list[tuple[str, float]], float,
                                                           list[str]]:
    """(torch imported?, slowest top-level imports [(module, s)], sum of top-level imports s,
    which of scikit-learn/scipy/skops/pandas were imported) of one `predict --store` run under
    -X importtime."""
    code = "import sys; from embedpipe.cli import main; sys.argv[0] = 'embedpipe'; main()"
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", code, "predict", str(head),
                          "--store", str(store), "-o", str(out)], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    mods, torch, heavy = [], False, set()
    for line in res.stderr.splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3 or "cumulative" in line:
            continue
        name = parts[2].strip()
        torch |= name == "torch" or name.startswith("torch.")
        if name.split(".")[0] in ("sklearn", "scipy", "skops", "pandas"):
            heavy.add(name.split(".")[0])
        if not parts[2].startswith("  "):  # top level: nested imports are indented further
            mods.append((name, int(parts[1]) / 1e6))
    mods.sort(key=lambda m: -m[1])
    return torch, mods[:6], sum(s for _, s in mods), sorted(heavy)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", nargs="+", default=None)
    ap.add_argument("--fit-on", choices=("big", "small"), default="big",
                    help="store whose train rows the heads are fitted on (small: seconds; "
                         "a linear head's predict cost does not depend on it, an SVM's does)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    heads = args.heads or (["logreg"] if args.quick else ["logreg", "mlp", "svm"])
    n_start, n_big = (3, 1) if args.quick else (7, 3)
    hdr = bu.Header("`embedpipe predict --store`: start-up, throughput, torch never imported")
    _, big, _ = bu.fmnist_features(1000, 200)
    _, small, _ = bu.fmnist_features(1, 1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    from embedpipe.heads import artifacts, compact

    files = {}
    for h in heads:
        files[h] = tmp / f"{h}.skops"
        dt, _ = bu.timed_cli("fit", big if args.fit_on == "big" else small, "--head", h,
                             "-o", files[h], "-q")
        print(f"fit {h}: {dt:.1f} s", file=sys.stderr, flush=True)
        if artifacts.load_compact(files[h]) is not None:  # the same head, through sklearn
            files[h + SKLEARN] = compact.strip(files[h], tmp / f"{h}.sklearn.skops")
    heads = list(files)

    floor = {"python -c pass": [sys.executable, "-c", "pass"],
             "python -c 'import embedpipe.cli'": [sys.executable, "-c", "import embedpipe.cli"]}
    start: dict[str, list[float]] = {k: [] for k in [*floor, *heads]}
    cpu: dict[str, list[float]] = {k: [] for k in start}
    for rep in range(n_start):  # interleaved, shuffled order per repetition
        order = list(start)
        random.Random(rep).shuffle(order)
        for k in order:
            cmd = floor.get(k) or bu.cli_command() + ["predict", str(files[k]), "--store",
                                                      str(small), "-o", str(tmp / "s.csv")]
            dt, c, _ = bu.timed(cmd)
            start[k].append(dt)
            cpu[k].append(c)
    load_after_start = bu.load_snapshot()
    big_rows = {}
    for h in heads:
        times = []
        for _ in range(n_big):
            dt, res = bu.timed_cli("predict", files[h], "--store", big, "-o", tmp / "b.csv")
            times.append(dt)
        n = sum(1 for _ in open(tmp / "b.csv")) - 1
        big_rows[h] = (n, times, res.stderr.strip().splitlines()[-1] if res.stderr else "")
        print(f"predict {h} on {n} rows: {bu.median(times):.1f} s", file=sys.stderr, flush=True)
    torch, slow, total_imports, heavy = importtime(files[heads[0]], small, tmp / "i.csv")
    ratios = [f"{h}: the compact form starts {bu.median(start[h + SKLEARN]) / bu.median(start[h]):.1f}x "
              f"faster in wall time ({bu.median(cpu[h + SKLEARN]) / bu.median(cpu[h]):.1f}x in CPU "
              "time) than the same head through scikit-learn"
              for h in heads if h + SKLEARN in files]

    rows = []
    for k, ts in start.items():
        label = k if k in floor else f"predict --store (20 rows), {k}" + (
            "" if k.endswith(SKLEARN) or k + SKLEARN not in files else " (compact form)")
        rows.append((label, f"{bu.median(ts):.2f}", f"{min(ts):.2f}–{max(ts):.2f}",
                     f"{bu.median(cpu[k]):.2f}", len(ts)))
    t1 = bu.table(["command", "median wall s", "min–max", "median CPU s (user+sys)", "runs"],
                  rows)
    rows2 = []
    for h, (n, ts, _) in big_rows.items():
        m, s0 = bu.median(ts), bu.median(start[h])
        rows2.append((h, n, f"{m:.2f}", f"{n / m:.0f}",
                      f"{n / (m - s0):.0f}" if m > s0 else "n/a (start-up median longer)"))
    t2 = bu.table(["head", "rows", "median wall s", "rows/s (incl. start-up)",
                   "rows/s (minus start-up median)"], rows2)
    t3 = bu.table(["top-level import (one run, -X importtime)", "cumulative s"],
                  [(m, f"{s:.2f}") for m, s in slow])
    verdict = "; ".join(
        f"{h}: {'met' if bu.median(start[h]) < 1.0 else 'NOT met'} "
        f"({bu.median(start[h]):.2f} s wall, {bu.median(cpu[h]):.2f} s CPU)"
        for h in heads if not h.endswith(SKLEARN))
    extra = [
        f"stores: {big.name} ({big_rows[heads[0]][0]} rows, bundled Lite0 features) and "
        f"{small.name} (20 rows); heads fitted with `embedpipe fit "
        f"{'BIG' if args.fit_on == 'big' else 'SMALL'} --head NAME` (defaults)",
        f"CLI: `{' '.join(bu.cli_command())}` in a subprocess; PYTHONPATH="
        f"{os.environ.get('PYTHONPATH', '')}",
        f"torch imported on the predict --store path: {'YES' if torch else 'no'} "
        f"(python -X importtime; sum of top-level imports {total_imports:.2f} s); "
        f"scikit-learn, scipy, skops, pandas imported with {heads[0]}: "
        f"{', '.join(heavy) or 'none of them'}",
        f"target (issue #5): starts in < 1 s and never imports torch: start-up (median wall "
        f"time at this load) {verdict}; torch "
        f"{'imported: NOT met' if torch else 'never imported: met'}",
        f"load after the start-up runs: {load_after_start}",
        "compact form: `fit` writes linear and MLP heads also as numpy arrays (compact.py), "
        "which `predict --store` reads without importing scikit-learn or skops; "
        f"'{SKLEARN.strip()}' rows are the same head file without it",
        *ratios,
    ]
    if args.quick:
        extra.append("QUICK smoke-test run")
    text = (hdr.render(extra) + "\n## Start-up\n\n" + t1 + "\n\n## Throughput\n\n" + t2
            + "\n\n## Slowest imports\n\n" + t3 + "\n")
    print(text)
    payload = {"date": hdr.date, "load_start": hdr.load_start, "startup_s": start,
               "startup_cpu_s": cpu,
               "throughput": {h: {"rows": n, "wall_s": ts} for h, (n, ts, _) in big_rows.items()},
               "torch_imported": torch, "slowest_imports_s": slow,
               "heavy_imports": heavy}
    out = bu.save_results("predict", text, payload, args.quick)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
