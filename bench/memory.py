"""Peak memory of `embedpipe extract` as the dataset grows: it should stay flat.

Runs the real CLI in a subprocess on Fashion-MNIST folders of growing size and reads the peak
resident set size of the main process (``ru_maxrss``) and the largest live RSS of any child
process (its loader workers), sampled every 0.1 s from /proc. Writes bench/results/memory.md.

    python bench/memory.py            # 250, 1000, 4000 images
    python bench/memory.py --quick    # 100, 400 images
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from embedpipe.datasets import write_fashion_mnist_folder

RUNNER = r"""
import glob, resource, sys, runpy, threading, time
peak_child = [0]

def vmrss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0])
    except (OSError, IndexError):
        return 0

def watch():  # loader workers: sample the live RSS of every child process
    while True:
        kids = set()
        for path in glob.glob("/proc/self/task/*/children"):
            with open(path) as f:
                kids.update(f.read().split())
        peak_child[0] = max([peak_child[0]] + [vmrss(k) for k in kids])
        time.sleep(0.1)

threading.Thread(target=watch, daemon=True).start()
sys.argv = ["embedpipe"] + sys.argv[1:]
try:
    runpy.run_module("embedpipe.cli", run_name="__main__")
finally:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"RSS {self_kb} {peak_child[0]}", file=sys.stderr)
"""


def measure(data: Path, out: Path, workers: int) -> tuple[float, float, float]:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", RUNNER, "extract", str(data), "-o", str(out),
                          "-q", "--workers", str(workers)], capture_output=True, text=True)
    dt = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(res.stderr)
    line = next(l for l in res.stderr.splitlines() if l.startswith("RSS "))
    self_kb, kids_kb = (int(v) for v in line.split()[1:])
    return self_kb / 1024, kids_kb / 1024, dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sizes = [100, 400] if args.quick else [250, 1000, 4000]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            data = write_fashion_mnist_folder(Path(tmp) / f"d{n}", per_class=n // 10,
                                              split="train")
            for workers in (0, 1):
                main_mb, kid_mb, dt = measure(data, Path(tmp) / f"s{n}_{workers}.h5", workers)
                rows.append((n, workers, main_mb, kid_mb, dt))
                print(f"{n:>6} images, workers={workers}: main peak RSS {main_mb:7.1f} MiB, "
                      f"largest worker {kid_mb:7.1f} MiB, {dt:6.1f} s", flush=True)
    base = {w: m for n, w, m, _, _ in rows if n == sizes[0]}
    lines = [
        "# Peak memory of `embedpipe extract` vs dataset size",
        "",
        f"Run {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; command: `python bench/memory.py{' --quick' if args.quick else ''}`.",
        "Fashion-MNIST train PNGs, default model (bundled EfficientNet-Lite0), default precision, "
        "batch 32. Main: peak RSS from getrusage; workers: largest RSS of one child, sampled every "
        "0.1 s. Most of the main process is the torch/timm import (~0.7 GiB) and batch activations.",
        "",
        "| images | workers | main peak RSS (MiB) | ratio to smallest | largest worker (MiB) | seconds |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n, w, m, k, dt in rows:
        lines.append(f"| {n} | {w} | {m:.1f} | {m / base[w]:.2f} | {k:.1f} | {dt:.1f} |")
    out = Path(__file__).parent / "results" / "memory.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
