"""torch's small tensor ops on 2 intra-op threads vs 1, on a quiet core pair and next to a busy
process: why extraction runs torch's own ops on one thread where OpenVINO runs the backbone
(`embedpipe.extract.runtime.one_torch_thread`).

Where OpenVINO runs the model, the main process still does a few torch ops per batch around it:
the mean over a batch's views (B×V×1280 floats), TTA flips (a torch.cat of the batch and its
mirror), and, in the loader, torch.stack of the batch's uint8 views. On 2 threads each is an
OpenMP parallel region, and a parallel region waits for every thread of its team: when another
process (or embedpipe's own loader worker) holds the other core, the op waits for that core.

For each op, both thread counts, both conditions (quiet; a busy-looping subprocess beside it),
interleaved: the median and the spread of 30 timings of one call.

Run from the repository root:  python bench/contention.py [--quick]
Writes bench/results/contention.md and .json (with --quick: scratch files in the temp dir).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

BUSY = "import time\nend = time.time() + 600\nwhile time.time() < end: pass\n"


def ops(batch: int) -> dict:
    feats = torch.randn(batch, 1, 1280)
    views = [torch.randint(0, 255, (1, 224, 224, 3), dtype=torch.uint8) for _ in range(batch)]
    pixels = torch.stack(views).flatten(0, 1)
    return {
        f"mean over views of {batch}x1x1280 float32": lambda: feats.mean(dim=1),
        f"torch.stack of {batch} uint8 224x224x3 views": lambda: torch.stack(views),
        f"flip TTA: cat of {batch} uint8 views and their mirror": (
            lambda: torch.cat([pixels, pixels.flip(2)])),
    }


def time_once(fn, threads: int) -> float:
    torch.set_num_threads(threads)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="5 repetitions; scratch output")
    args = ap.parse_args()
    reps = 5 if args.quick else args.reps
    head = bu.Header("torch's small ops on 2 threads vs 1, quiet and next to a busy process")
    table = ops(args.batch)
    times: dict[tuple[str, str, int], list[float]] = {}
    for condition in ("quiet", "one busy process"):
        busy = (subprocess.Popen([sys.executable, "-c", BUSY]) if condition != "quiet"
                else None)
        try:
            time.sleep(0.5)
            for fn in table.values():  # warm both thread counts
                time_once(fn, 2), time_once(fn, 1)
            for _ in range(reps):
                for name, fn in table.items():
                    for threads in (2, 1):
                        times.setdefault((condition, name, threads), []).append(
                            time_once(fn, threads))
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    rows, payload = [], []
    for (condition, name, threads), xs in times.items():
        if threads != 2:
            continue
        one = times[(condition, name, 1)]
        ratio = bu.median(xs) / max(bu.median(one), 1e-6)
        rows.append([condition, name, f"{bu.median(xs):.2f} ({bu.spread(xs)})",
                     f"{bu.median(one):.2f} ({bu.spread(one)})", f"{ratio:.1f}x"])
        payload.append({"condition": condition, "op": name, "ms_2_threads": xs,
                        "ms_1_thread": one})
    bu.publish("contention", head,
               [f"{reps} interleaved timings of one call per cell; median (min-max) ms",
                "busy process: a Python busy loop in a subprocess (stands for the loader "
                "worker or any other job on the other core)"],
               ["condition", "op", "2 threads, ms", "1 thread, ms", "2 threads / 1 thread"],
               rows, {"timings": payload}, args.quick)


if __name__ == "__main__":
    main()
