"""Loader workers × torch intra-op threads for `embedpipe.extract.run()` on a small machine.

`default_workers()` gives cores − 1 loader processes (1 on a 2-core machine), while the main
process keeps torch's default intra-op thread count (= cores). On 2 cores that is three busy
threads on two cores. This script measures, side by side in one process, bf16 (`--precision
auto` on this CPU) extraction of the 1,000 1024×768 JPEGs of bench/extract_speed.py with:
  w0/t2  workers 0, torch default threads
  w1/t2  workers 1, torch default threads   (= embedpipe's default on 2 cores)
  w1/t1  workers 1, torch.set_num_threads(1) in the main process before run()
  w2/t2  workers 2, torch default threads
3 interleaved repetitions in a shuffled order, median img/s, fresh store each repetition.

Run from the repository root:  python bench/loader_threads.py [--quick]
Writes bench/results/loader_threads.md (with --quick: a scratch file in the temp dir instead).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402
from _benchutil import JPEG_H, JPEG_W, folder_stats, write_jpeg_folder  # noqa: E402
from extract_speed import embedpipe_run  # noqa: E402

from embedpipe.datasets import write_fashion_mnist_folder  # noqa: E402
from embedpipe.extract.loader import default_workers
from embedpipe.extract.runtime import resolve_precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke-test run (< 1 min)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick 1)")
    args = ap.parse_args()
    hdr = bu.Header("Loader workers × torch threads in embedpipe run() (bf16, 1024×768 JPEGs)")
    per_class = 4 if args.quick else 100
    reps = args.reps or (1 if args.quick else 3)
    dflt = torch.get_num_threads()
    configs = {
        f"w0/t{dflt}": (0, dflt, f"workers 0, torch threads {dflt} (default)"),
        f"w1/t{dflt}": (1, dflt, f"workers 1, torch threads {dflt} (default)"),
        "w1/t1": (1, 1, "workers 1, torch.set_num_threads(1) in the main process"),
        f"w2/t{dflt}": (2, dflt, f"workers 2, torch threads {dflt} (default)"),
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    try:
        data = write_jpeg_folder(tmp / "jpg", per_class=per_class)
        n_files, kb = folder_stats(data)
        warm = tmp / "warm"
        write_fashion_mnist_folder(warm / "data", per_class=4, split="test")
        embedpipe_run(warm / "data", warm / "s.h5", precision="bf16", workers=0)
        rates = {k: [] for k in configs}
        foreign = {k: [] for k in configs}
        rng = random.Random(0)
        for r in range(reps):
            order = list(configs)
            rng.shuffle(order)
            for k in order:
                workers, threads, _ = configs[k]
                out = tmp / f"rep{r}_{k.replace('/', '_')}.h5"
                torch.set_num_threads(threads)
                meter = bu.CpuMeter()
                t = time.perf_counter()
                try:
                    n = embedpipe_run(data, out, precision="bf16", workers=workers)
                finally:
                    torch.set_num_threads(dflt)
                dt = time.perf_counter() - t
                rates[k].append(n / dt)
                foreign[k].append(meter.foreign_cores())
                out.unlink()
                print(f"  rep {r + 1}/{reps} {k}: {n / dt:6.1f} img/s ({dt:5.1f} s; other "
                      f"processes busy {foreign[k][-1]:.2f} cores)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base_key = f"w1/t{dflt}"
    base = rates[base_key]
    rows = []
    for k, (_, _, label) in configs.items():
        v = rates[k]
        paired = [x / y for x, y in zip(v, base)]
        rows.append([k, label, f"{bu.median(v):.1f}", bu.spread(v),
                     f"{bu.median(v) / bu.median(base):.2f}",
                     f"{min(paired):.2f}–{max(paired):.2f}", f"{bu.median(foreign[k]):.2f}"])
    text = bu.table(["", "configuration (all bf16)", "img/s (median)", "min–max",
                     f"÷ {base_key} (default)", "paired per rep min–max", "other procs' cores"], rows)
    print("\n" + text)
    doc = hdr.render([f"`default_workers()` = {default_workers()}; `--precision auto` → "
                      f"{resolve_precision('auto', torch.device('cpu'))}; data: {n_files} JPEGs "
                      f"{JPEG_W}×{JPEG_H} q90, mean {kb:.0f} KB (`_benchutil.write_jpeg_folder`); "
                      "bundled tf_efficientnet_lite0, batch 32, run() with progress=False, bf16"]
                     + (["QUICK smoke-test run: numbers mean nothing"] if args.quick else []))
    doc += (f"\n{reps} interleaved repetitions in a shuffled order after one untimed warm-up; "
            "img/s = images ÷ wall time of the whole run() call; 'paired per rep' = the ratio "
            "within each repetition; 'other procs' cores' = cores other processes on this shared "
            "machine kept busy meanwhile (median over repetitions).\n\n" + text + "\n")
    if args.quick:
        path = Path(tempfile.gettempdir()) / "loader_threads.quick.md"
        path.write_text(doc)
    else:
        path = bu.write_result("loader_threads", doc)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
