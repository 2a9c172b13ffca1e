"""What `--compile` costs and gains on this machine (sets `--compile auto`'s threshold).

For each backbone (bundled tf_efficientnet_lite0; resnet50 with random weights), two fresh
child processes share one empty inductor cache directory: the first compiles cold, the second
finds the cache filled (what a user's second run sees). Each child builds the model as
`embedpipe extract` does (channels_last, `--precision auto`), times the first compiled call
through `embedpipe.extract.CompiledForward` (the code path extract uses), then alternates
eager and compiled forward passes of one batch of 32 random 224×224 inputs (interleaved
repetitions) and checks compiled vs eager outputs. Break-even = compile seconds ÷ seconds saved
per image: how many images a run must have before compiling pays back.

Run from the repository root:  python bench/compile.py [--reps N]
Writes bench/results/compile.md and compile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

MODELS = ("tf_efficientnet_lite0", "resnet50")
BATCH = 32


def child(model_name: str, reps: int) -> dict:
    import torch

    from embedpipe.backbones import load_backbone
    from embedpipe.extract.runtime import CompiledForward, prepare_model, resolve_precision

    t = time.perf_counter()
    bb = load_backbone(model_name, random_init=model_name != "tf_efficientnet_lite0")
    precision = resolve_precision("auto", torch.device("cpu"))
    model, amp = prepare_model(bb, torch.device("cpu"), precision, channels_last=True)
    x = torch.randn(BATCH, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    warnings: list[str] = []
    with torch.inference_mode(), amp:
        model(x)  # eager warm-up
        t = time.perf_counter()
        compiled = CompiledForward(model, BATCH, warn=warnings.append)
        y = compiled(x)
        first = time.perf_counter() - t
        diff = float((y.float() - model(x).float()).abs().max())
        rates: dict[str, list[float]] = {"eager": [], "compiled": []}
        for r in range(reps):
            order = ["eager", "compiled"] if r % 2 == 0 else ["compiled", "eager"]
            for k in order:
                f = model if k == "eager" else compiled
                t = time.perf_counter()
                f(x)
                f(x)
                rates[k].append(2 * BATCH / (time.perf_counter() - t))
    return {"precision": precision, "first_call_s": first, "max_abs_diff": diff,
            "rates": rates, "warnings": warnings, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.reps)))
        return
    hdr = bu.Header("torch.compile (`extract --compile`) on this CPU: cost and gain")
    results = {}
    rows = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-inductor-") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            for phase in ("cold", "warm"):
                load = bu.load_snapshot()
                meter = bu.CpuMeter()
                proc = subprocess.run([sys.executable, __file__, "--child", name, "--reps",
                                       str(args.reps)], env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} {phase}: child failed:\n{proc.stderr[-3000:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                res["load"] = load
                res["other_cores"] = meter.foreign_cores()
                results[f"{name}/{phase}"] = res
                e, c = bu.median(res["rates"]["eager"]), bu.median(res["rates"]["compiled"])
                paired = [cc / ee for cc, ee in zip(res["rates"]["compiled"], res["rates"]["eager"])]
                saved = 1 / e - 1 / c
                breakeven = res["first_call_s"] / saved if saved > 0 else float("inf")
                res["break_even_images"] = breakeven
                row = [name, phase, res["precision"], f"{res['first_call_s']:.1f}",
                       f"{e:.1f}", f"{c:.1f}", f"{c / e:.2f}",
                       f"{min(paired):.2f}–{max(paired):.2f}",
                       "never" if breakeven == float("inf") else f"{breakeven:,.0f}",
                       f"{res['max_abs_diff']:.1e}", f"{res['other_cores']:.2f}"]
                rows.append(row)
                print(" | ".join(row), flush=True)
    headers = ["model", "inductor cache", "precision", "first compiled call s", "eager img/s",
               "compiled img/s", "compiled ÷ eager", "paired per rep", "break-even images",
               "max |compiled − eager|", "other procs' cores"]
    t = bu.table(headers, rows)
    print(t)
    doc = hdr.render(["resnet50 has random weights (timing only); lite0 has the bundled "
                      "ImageNet weights", f"batch {BATCH}, 224×224, channels_last, "
                      f"{args.reps} interleaved repetitions of 2 forward passes per mode; "
                      "img/s are medians"])
    doc += ("\n" + t + "\n\n- 'first compiled call' includes dynamo tracing and inductor code "
            "generation and C++ compilation (cold) or loading from the cache (warm).\n"
            "- break-even images = first compiled call ÷ (1/eager − 1/compiled img/s): below "
            "this many images compiling costs more than it saves.\n")
    path = bu.write_result("compile", doc)
    bu.write_json("compile", {"machine": bu.machine_facts(), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
