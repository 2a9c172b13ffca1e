"""Sizing: extraction throughput and store bytes per image, in-process vs `--engine ray`.

One Fashion-MNIST folder (N images per class from the test split, 28x28 PNGs), the bundled
pretrained EfficientNet-Lite0 (1280-d features), --precision fp32, batch 32:
  * in-process, features stored float32 and float16 (bytes per image of each);
  * Ray with 1 and 2 backbone actors (`embedpipe.ray_engine.run`, the code behind
    `extract --engine ray`) on one local Ray cluster started once by this script
    (ray.init, all cores, loopback); its start-up is reported apart, the actors' start-up
    (one backbone load each) is inside each run's time, as a user would see it.
Each setting extracts the same folder into a fresh store, R repetitions in a shuffled,
interleaved order; img/s = images / wall time of the run. Store bytes = file size / rows
(the Ray engine also keeps its shard stores: reported as a second number).

    python bench/ray_scaling.py            # 20 per class (200 images), 2 repetitions
    python bench/ray_scaling.py --quick    # 4 per class, 1 repetition: a smoke test

Writes bench/results/ray.md and ray.json (with --quick: scratch files in the temp dir).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

from embedpipe import ray_engine  # noqa: E402
from embedpipe.datasets import write_fashion_mnist_folder  # noqa: E402
from embedpipe.extract import ExtractOptions, run  # noqa: E402
from embedpipe.store import open_store  # noqa: E402

SETTINGS = ("in-process fp32", "in-process fp16", "ray 1 worker fp32", "ray 2 workers fp32")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.h5")) if path.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    per_class, reps = (4, 1) if args.quick else (20, 2)
    per_class, reps = args.per_class or per_class, args.reps or reps
    hdr = bu.Header("Sizing: in-process vs Ray extraction, store bytes per image")
    ray = ray_engine.import_ray()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    t = time.perf_counter()
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.ERROR)
    ray_start = time.perf_counter() - t
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        data = write_fashion_mnist_folder(tmp / "data", per_class=per_class, split="test")
        n = 10 * per_class
        rates: dict[str, list[float]] = {s: [] for s in SETTINGS}
        sizes: dict[str, tuple[float, float]] = {}
        rng = random.Random(0)
        for rep in range(reps):
            order = list(SETTINGS)
            rng.shuffle(order)
            for s in order:
                out = tmp / f"{s.replace(' ', '_')}-{rep}.h5"
                dtype = "float16" if "fp16" in s else "float32"
                opts = ExtractOptions(precision="fp32", dtype=dtype)
                t0 = time.perf_counter()
                if s.startswith("ray"):
                    summary = ray_engine.run(data, out, opts, address=None,
                                             workers=int(s.split()[1]), progress=False)
                else:
                    summary = run(data, out, opts, progress=False)
                rates[s].append(n / (time.perf_counter() - t0))
                assert summary.extracted == n and len(open_store(out)) == n, summary.line()
                sizes[s] = (out.stat().st_size / n,
                            dir_bytes(ray_engine.shard_dir(out)) / n)
                print(f"rep {rep} {s}: {rates[s][-1]:.2f} img/s", file=sys.stderr, flush=True)
        base = bu.median(rates["in-process fp32"])
        rows, records = [], []
        for s in SETTINGS:
            r = bu.median(rates[s])
            store_b, shard_b = sizes[s]
            rows.append([s, f"{r:.2f}", bu.spread(rates[s]), f"{r / base:.2f}",
                         f"{store_b:,.0f}", f"{shard_b:,.0f}" if shard_b else "–"])
            records.append({"setting": s, "img_per_s_median": r, "img_per_s": rates[s],
                            "store_bytes_per_image": store_b,
                            "shard_bytes_per_image": shard_b})
        table = bu.table(["setting", "img/s (median, wall)", "min–max", "÷ in-process",
                          "store bytes/img", "+ shard stores bytes/img"], rows)
        extra = [f"data: {n} Fashion-MNIST test-split images ({per_class}/class, seed 0), 28x28 "
                 "PNG; bundled pretrained tf_efficientnet_lite0 (1280-d), --precision fp32, "
                 f"batch 32; {reps} interleaved repetitions per setting",
                 f"Ray {ray.__version__}: one local cluster on loopback with "
                 f"{ray.cluster_resources().get('CPU', 0):g} CPUs, started once in "
                 f"{ray_start:.1f} s (not in the runs' times); each Ray run includes its "
                 "actors' start-up (one backbone load per actor), the shard planning and the "
                 "final merge",
                 "one machine with 2 cores shared with other jobs: this measures the Ray "
                 "engine's overhead, not its scaling (2 actors compete for the same 2 cores)"]
        if args.quick:
            extra.append("QUICK smoke-test run: numbers mean nothing")
        text = hdr.render(extra) + "\n" + table + "\n"
        print(text)
        result = {"title": hdr.title, "images": n, "reps": reps, "ray_version": ray.__version__,
                  "ray_start_seconds": ray_start, "settings": records,
                  "header": hdr.render(extra)}
        if args.quick:
            (Path(tempfile.gettempdir()) / "ray.quick.md").write_text(text)
        else:
            md = bu.write_result("ray", text)
            md.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {md} and {md.with_suffix('.json')}", file=sys.stderr)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
