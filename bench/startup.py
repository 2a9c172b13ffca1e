"""Start-up of `embedpipe extract` on 50 images: where the seconds go, cold and warm.

Whole processes, interleaved (each repetition runs every variant once, in a shuffled order):
  * import      `python -c "import <what extract imports>"`: the floor of any extract run
  * cold        `embedpipe extract` into a new store with an empty OpenVINO cache
  * warm        the same with the OpenVINO cache filled by an earlier run
  * warm torch  `--runtime torch` (no OpenVINO; compile off as auto does for 50 images)
and, in one process, the phases of a warm run (imports, backbone build, runtime build, the
extraction itself) so the biggest one is named. Wall and CPU seconds are both given: on a
shared machine the CPU seconds say what an idle machine's wall time would be for the
single-threaded parts (imports, start-up).

    python bench/startup.py            # 50 images, 3 repetitions
    python bench/startup.py --quick    # 20 images, 1 repetition, scratch output
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _benchutil as bu  # noqa: E402

IMPORTS = ("import embedpipe.cli, embedpipe.extract, embedpipe.backbones, "
           "embedpipe.extract.runtime, torch.utils.data, openvino")

PHASES = r"""
import json, sys, time
t0 = time.perf_counter(); c0 = time.process_time()
marks = []
def mark(name):
    marks.append((name, time.perf_counter() - t0, time.process_time() - c0))
import embedpipe.cli, embedpipe.extract; mark("import embedpipe (cli, extract)")
import torch, timm, embedpipe.backbones; mark("import torch + timm")
import openvino; mark("import openvino")
from embedpipe.backbones import load_backbone
bb = load_backbone("tf_efficientnet_lite0"); mark("build backbone (timm + bundled weights)")
from embedpipe.extract.runtime import build_engine, resolve_precision
dev = torch.device("cpu")
eng = build_engine(bb, dev, resolve_precision("auto", dev), "auto", say=lambda m: None)
mark(f"build runtime ({eng.describe()})")
from embedpipe.extract import ExtractOptions, run
s = run(sys.argv[1], sys.argv[2], ExtractOptions(), progress=False)
mark("extract run (own backbone + runtime build, decode, infer, write)")
print(json.dumps(marks))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.images, args.reps = 20, 1
    hdr = bu.Header(f"extract start-up, {args.images} images")
    from embedpipe.datasets import write_fashion_mnist_folder

    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    data = write_fashion_mnist_folder(tmp / "data", per_class=max(1, args.images // 10))
    warm_env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "warm")}
    bu.timed(bu.cli_command() + ["extract", str(data), "-o", str(tmp / "fill.h5"), "-q"],
             env=warm_env)  # fill the warm cache
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in
                                                    ("import", "cold", "warm", "warm torch")}
    n = 0
    for rep in range(args.reps):
        order = list(results)
        random.Random(rep).shuffle(order)
        for k in order:
            n += 1
            store = tmp / f"s{n}.h5"
            ext = ["extract", str(data), "-o", str(store), "-q"]
            if k == "import":
                dt, cpu, _ = bu.timed([sys.executable, "-c", IMPORTS])
            elif k == "cold":
                env = {**os.environ, "XDG_CACHE_HOME": str(tmp / f"cold{n}")}
                dt, cpu, _ = bu.timed(bu.cli_command() + ext, env=env)
            elif k == "warm":
                dt, cpu, _ = bu.timed(bu.cli_command() + ext, env=warm_env)
            else:
                dt, cpu, _ = bu.timed(bu.cli_command() + ext + ["--runtime", "torch"],
                                      env=warm_env)
            results[k].append((dt, cpu))
            print(f"{k}: {dt:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr)
    _, _, res = bu.timed([sys.executable, "-c", PHASES, str(data), str(tmp / "phases.h5")],
                         env=warm_env)
    marks = json.loads(res.stdout.strip().splitlines()[-1])
    med = {k: (bu.median([w for w, _ in v]), bu.median([c for _, c in v]))
           for k, v in results.items()}
    rows = [[k, f"{w:.2f}", f"{c:.2f}", f"{w / med['import'][0]:.2f}x",
             f"{c / med['import'][1]:.2f}x"] for k, (w, c) in med.items()]
    prev_w = prev_c = 0.0
    phase_rows = []
    for name, w, c in marks:
        phase_rows.append([name, f"{w - prev_w:.2f}", f"{c - prev_c:.2f}"])
        prev_w, prev_c = w, c
    text = hdr.render([f"{args.images} Fashion-MNIST PNGs, {args.reps} interleaved repetitions, "
                       "medians; `embedpipe extract DATA -o NEW.h5 -q` with default options"]) + \
        "\n".join(["", "## Whole processes", "",
                   bu.table(["run", "wall s", "CPU s", "wall / import", "CPU / import"], rows),
                   "", "## Phases of one warm run (one process)", "",
                   bu.table(["phase", "wall s", "CPU s"], phase_rows), ""])
    payload = {"medians": med, "runs": results, "phases": marks, "images": args.images}
    out = bu.save_results("startup", text, payload, args.quick)
    print(text)
    print(f"written: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
