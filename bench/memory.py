"""Peak memory of `embedpipe extract` as the dataset grows: it should stay flat.

Runs the real CLI in a subprocess on Fashion-MNIST folders of growing size and reads the peak
resident set size of the main process (``ru_maxrss``) and the largest live RSS of any child
process (its loader workers), sampled every 0.1 s from /proc. Writes bench/results/memory.md
and memory.json (rewritten after every size, so a long run that is stopped keeps what it has).

    python bench/memory.py                       # 2000 and 20000 images, default --workers
    python bench/memory.py --sizes 250 1000 4000 --workers 0 1
    python bench/memory.py --quick               # 100, 400 images (scratch file in /tmp)

The issue's target: peak RSS at 20k images <= 1.25x that at 2k.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

from embedpipe.datasets import write_fashion_mnist_folder  # noqa: E402

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
            try:  # a thread may end between glob and open
                with open(path) as f:
                    kids.update(f.read().split())
            except OSError:
                pass
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


def measure(data: Path, out: Path, workers: int | None) -> tuple[float, float, float]:
    cmd = [sys.executable, "-c", RUNNER, "extract", str(data), "-o", str(out), "-q"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(res.stderr)
    line = next(l for l in res.stderr.splitlines() if l.startswith("RSS "))
    self_kb, kids_kb = (int(v) for v in line.split()[1:])
    return self_kb / 1024, kids_kb / 1024, dt


def render(hdr: bu.Header, rows: list[dict], sizes: list[int], quick: bool) -> str:
    base = {}
    for r in rows:
        base.setdefault(r["workers"], r["main_mib"])
    table = bu.table(
        ["images", "--workers", "main peak RSS (MiB)", "ratio to smallest", "largest worker (MiB)",
         "seconds", "img/s", "load(1m) after"],
        [(r["images"], "default" if r["workers"] is None else r["workers"], f"{r['main_mib']:.1f}",
          f"{r['main_mib'] / base[r['workers']]:.2f}", f"{r['worker_mib']:.1f}",
          f"{r['seconds']:.0f}", f"{r['images'] / r['seconds']:.1f}", f"{r['load1']:.2f}")
         for r in rows])
    done = {r["images"] for r in rows}
    extra = [
        "Fashion-MNIST train PNGs (28x28, balanced, seed 0), default model (bundled "
        "EfficientNet-Lite0), default precision and batch size, fresh store per size. Main: peak "
        "RSS of the CLI process from getrusage; workers: largest RSS of one child, sampled every "
        "0.1 s (0 when no child lived long enough to be sampled). Most of the main process is the "
        "torch/timm import and the model.",
        "sizes planned: " + ", ".join(map(str, sizes))
        + ("" if done >= set(sizes) else " (NOT all finished: "
           + ", ".join(str(n) for n in sizes if n not in done) + " missing)"),
        "target (issue #5): peak RSS at 20k images <= 1.25x that at 2k",
    ]
    if quick:
        extra.append("QUICK smoke-test run")
    return hdr.render(extra) + "\n" + table + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="--workers values to pass (default: the CLI's own default)")
    args = ap.parse_args()
    sizes = args.sizes or ([100, 400] if args.quick else [2000, 20000])
    workers_list: list[int | None] = args.workers if args.workers is not None else [None]
    hdr = bu.Header("Peak memory of `embedpipe extract` vs dataset size")
    rows: list[dict] = []
    name = "memory.quick" if args.quick else "memory"
    out_dir = Path(tempfile.gettempdir()) if args.quick else bu.RESULTS
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            data = write_fashion_mnist_folder(Path(tmp) / f"d{n}", per_class=n // 10,
                                              split="train")
            for workers in workers_list:
                main_mb, kid_mb, dt = measure(data, Path(tmp) / f"s{n}_{workers}.h5", workers)
                rows.append({"images": n, "workers": workers, "main_mib": main_mb,
                             "worker_mib": kid_mb, "seconds": dt, "load1": bu.os.getloadavg()[0]})
                print(f"{n:>6} images, workers={workers}: main peak RSS {main_mb:7.1f} MiB, "
                      f"largest worker {kid_mb:7.1f} MiB, {dt:6.1f} s", flush=True)
                text = render(hdr, rows, sizes, args.quick)
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / f"{name}.md").write_text(text)
                (out_dir / f"{name}.json").write_text(json.dumps(
                    {"machine": {"cpu": bu.cpu_model(), "flags": bu.cpu_flags(),
                                 "cores": bu.cores(), "versions": bu.versions()},
                     "date": hdr.date, "load_start": hdr.load_start, "sizes": sizes,
                     "rows": rows}, indent=2))
    print(text)
    print(f"wrote {out_dir / (name + '.md')}")


if __name__ == "__main__":
    main()
