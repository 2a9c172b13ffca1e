"""What a rerun of `embedpipe extract` costs: first run vs rerun on the unchanged folder.

Writes N real Fashion-MNIST train images as PNG class folders (embedpipe.datasets), then runs the
CLI in a subprocess, as a user does:

1. the first run (everything extracted);
2. reruns on the unchanged folder (median of --reps);
3. a rerun after touching 5 files (new mtime, same bytes: settled by their hash);
4. a rerun after adding 5 new files (extracted: the model is loaded).

Wall time includes interpreter start-up and imports; the CLI's own "in X s" (from the start of
extract.run to its end) is reported beside it. With ``--before CHECKOUT`` the unchanged-folder
rerun is also timed with another checkout's code (PYTHONPATH=CHECKOUT), interleaved with ours, to
show what a change to the rerun path bought.

    python bench/incremental.py                         # N=1000, 3 reruns
    python bench/incremental.py --before /work/main     # also time main's code on the rerun
    python bench/incremental.py --quick                 # N=100, scratch result in /tmp

Writes bench/results/incremental.md and incremental.json. The issue's target: a rerun on an
unchanged folder >= 50x faster than the first run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

from embedpipe.datasets import write_fashion_mnist_folder  # noqa: E402


def extract(data: Path, store: Path, env: dict | None = None) -> dict:
    wall, res = bu.timed_cli("extract", data, "-o", store, "-q", env=env)
    line = res.stdout.strip().splitlines()[-1]
    m = re.search(r" in ([0-9.]+) s ", line)
    return {"wall_s": wall, "reported_s": float(m.group(1)) if m else None, "line": line,
            "load1": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=None, help="images (default 1000)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--before", type=Path, default=None,
                    help="a checkout whose code also times the unchanged rerun")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = args.n or (100 if args.quick else 1000)
    hdr = bu.Header("Incremental `embedpipe extract`: first run vs reruns")
    tmp = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    data = write_fashion_mnist_folder(tmp / "data", per_class=n // 10, split="train")
    store = tmp / "s.h5"
    runs: dict[str, list[dict]] = {"first run": [extract(data, store)]}
    print(runs["first run"][0]["line"], file=sys.stderr, flush=True)
    before_env = ({**os.environ, "PYTHONPATH": str(args.before.resolve())}
                  if args.before else None)
    for _ in range(args.reps):  # interleaved with the other checkout's code
        runs.setdefault("rerun, unchanged folder", []).append(extract(data, store))
        if before_env:
            runs.setdefault(f"rerun, unchanged folder, code of {args.before}", []).append(
                extract(data, store, before_env))
    files = sorted(data.rglob("*.png"))
    for f in files[:5]:
        os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    runs["rerun after touching 5 files"] = [extract(data, store)]
    for i, f in enumerate(files[5:10]):
        shutil.copy(f, f.with_name(f"added_{i}.png"))
    runs["rerun after adding 5 files"] = [extract(data, store)]
    shutil.rmtree(tmp, ignore_errors=True)

    first = runs["first run"][0]
    rows, summary = [], {}
    for name, rs in runs.items():
        wall = bu.median([r["wall_s"] for r in rs])
        rep = bu.median([r["reported_s"] for r in rs if r["reported_s"] is not None])
        summary[name] = {"wall_s": wall, "reported_s": rep, "runs": len(rs)}
        rows.append((name, len(rs), f"{wall:.2f}", f"{rep:.2f}",
                     f"{first['wall_s'] / wall:.1f}x", f"{first['reported_s'] / rep:.0f}x"
                     if rep > 0 else "-", rs[-1]["line"].split(" in ")[0]))
    table = bu.table(["run", "runs", "median wall s", "CLI's own s", "first/this (wall)",
                      "first/this (CLI's own)", "CLI says"], rows)
    ratio = first["wall_s"] / summary["rerun, unchanged folder"]["wall_s"]
    extra = [
        f"data: {n} Fashion-MNIST train PNGs (28x28, {n // 10}/class, seed 0) in class folders; "
        "default model (bundled EfficientNet-Lite0), default options; fresh store",
        f"CLI: `{' '.join(bu.cli_command())} extract DATA -o STORE -q` in a subprocess; wall "
        "time includes interpreter start-up and imports; \"CLI's own s\" is the time the command "
        "prints (extract.run from start to end, without the imports before it)",
        f"target (issue #5): rerun on an unchanged folder >= 50x faster than the first run: "
        f"{ratio:.0f}x wall, {'met' if ratio >= 50 else 'NOT met'}",
        "load(1m) per run: " + "; ".join(f"{k}: " + ", ".join(f"{r['load1']:.1f}" for r in rs)
                                          for k, rs in runs.items()),
    ]
    if args.quick:
        extra.append("QUICK smoke-test run: few images; the ratio means little")
    text = hdr.render(extra) + "\n" + table + "\n"
    print(text)
    payload = {"date": hdr.date, "load_start": hdr.load_start, "images": n,
               "summary": summary, "runs": runs}
    out = bu.save_results("incremental", text, payload, args.quick)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
