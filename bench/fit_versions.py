"""`embedpipe fit` end to end, this checkout against an older commit, side by side: what a user
waits for (fit, calibration, training accuracy, saving and checking the head file), not one
part of it. The older commit is checked out in a temporary git worktree and run with the same
Python environment (PYTHONPATH), the two interleaved, REPEATS times each, alternating which
runs first; every run is a fresh process on the same store.

Default: `fit --head svm` on the 10,000 train rows of the Fashion-MNIST 10k/2k bundled-Lite0
store (extracted on first use), against b149ebf (before the held-out-then-refitted calibration
and the single-pass compact-form check).

Run from the repository root:  python bench/fit_versions.py [--old REV] [--head svm] [--quick]
(--quick: one repeat, scratch output). Writes bench/results/fit_versions.md and .json.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REPEATS = 3


def run_fit(code: Path, store: Path, head: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    t = time.perf_counter()
    # run outside the repository: `python -m` puts the working directory first on sys.path
    res = subprocess.run([sys.executable, "-m", "embedpipe", "fit", str(store), "--head", head,
                          "-o", str(out)], env=env, capture_output=True, text=True,
                         check=True, cwd=out.parent)
    wall = time.perf_counter() - t
    line = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr
    acc = re.search(r"training accuracy ([0-9.]+)", line)
    how = re.search(r"probabilities: (.*) →", line)
    return {"wall_s": wall, "train_accuracy": float(acc.group(1)) if acc else None,
            "probabilities": how.group(1) if how else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default="b149ebf")
    ap.add_argument("--head", default="svm")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    header = bu.Header(f"`embedpipe fit --head {args.head}` end to end: HEAD vs {args.old}")
    _, store, _ = bu.fmnist_features(1000, 200)
    head_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    repeats = 1 if args.quick else REPEATS
    got: dict[str, list[dict]] = {"old": [], "new": []}
    probe = "import embedpipe, sys; print(embedpipe.__file__)"
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old),
                        args.old], check=True)
        try:
            for code in (old, ROOT):  # each run imports the code it names
                where = subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                       text=True, check=True, cwd=tmp,
                                       env={**os.environ, "PYTHONPATH": str(code)}).stdout
                assert where.startswith(str(code)), (code, where)
            for r in range(repeats):
                for which in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    res = run_fit(old if which == "old" else ROOT, store, args.head,
                                  Path(tmp) / f"{which}.skops")
                    print(which, res, flush=True)
                    got[which].append(res)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                           check=False)
    med = {w: statistics.median(r["wall_s"] for r in got[w]) for w in got}
    rows = [[f"{args.old} (before)", got["old"][0]["probabilities"],
             ", ".join(f"{r['wall_s']:.1f}" for r in got["old"]), f"{med['old']:.1f}",
             got["old"][0]["train_accuracy"]],
            [f"{head_rev} (this checkout)", got["new"][0]["probabilities"],
             ", ".join(f"{r['wall_s']:.1f}" for r in got["new"]), f"{med['new']:.1f}",
             got["new"][0]["train_accuracy"]],
            ["ratio before / after", "", "", f"{med['old'] / med['new']:.2f}x", ""]]
    bu.publish("fit_versions", header,
               [f"store: {store.name} (10,000 train rows, 1280-d), `embedpipe fit STORE --head "
                f"{args.head}`, a fresh process per run (imports and store reading included); "
                f"{repeats} runs each, interleaved, alternating which first; wall seconds"],
               ["code", "probabilities (manifest)", "runs (s)", "median s",
                "training accuracy"], rows, {"runs": got, "old": args.old, "new": head_rev},
               args.quick)


if __name__ == "__main__":
    main()
