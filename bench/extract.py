"""Extraction throughput: the tutorial loop vs `embedpipe extract` vs the model-only ceiling.

One JPEG folder (class folders): Fashion-MNIST test images rendered at 224×224 (RGB JPEG q90)
plus large 1024×768 JPEGs (a garment on a textured colour field, q90). In ONE run, with
interleaved repetitions (configuration order shuffled within each repetition), for each
backbone:
  a. tutorial: torchvision ImageFolder + timm's eval transform + DataLoader(batch 32,
     num_workers 0) + the model in fp32 under torch.no_grad (not channels_last), features
     collected and np.save'd;
  b. embedpipe: `embedpipe.extract.run()` with its defaults (ExtractOptions(): batch 32,
     `--precision auto`, `--compile auto`, default loader workers, JPEG draft decoding,
     channels_last) writing a fresh HDF5 store;
  c. ceiling: the model alone on the same images pre-decoded (embedpipe's decoding and
     transform, done before the clock starts) in batches of 32, with the same precision,
     channels_last and compile choice as (b).
The backbone is built once per model, before timing, and handed to all three (the tutorial
gets its own non-channels_last copy with the same weights), so img/s = images ÷ wall time of
decoding + forward + writing, not of model construction. Backbones: the bundled pretrained
tf_efficientnet_lite0 and timm `resnet50` with RANDOM weights (timing only).

Run from the repository root:  python bench/extract.py [--small 300 --large 100 --reps 3]
Writes bench/results/extract.md and extract.json (with --quick: scratch files in the temp dir).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402
from _benchutil import JPEG_H, JPEG_W, folder_stats, write_jpeg_folder, write_small_jpeg_folder  # noqa: E402

from embedpipe.backbones import decode_size, load_backbone, make_views_transform  # noqa: E402
from embedpipe.data import decode_image  # noqa: E402
from embedpipe.provenance import identity_of  # noqa: E402
from embedpipe.extract.runtime import CompiledForward, prepare_model, resolve_compile, resolve_precision
from embedpipe.extract.options import ExtractOptions
from embedpipe.extract.loader import default_workers
from embedpipe.extract.local import run
from embedpipe.store import open_store  # noqa: E402

BATCH = 32
MODELS = {"tf_efficientnet_lite0": "bundled ImageNet weights",
          "resnet50": "RANDOM weights (timing only)"}
TARGETS = {("tf_efficientnet_lite0", "tutorial"): 6.0, ("tf_efficientnet_lite0", "ceiling"): 0.75,
           ("resnet50", "tutorial"): 6.0}


def backbones(name: str):
    """(embedpipe's Backbone, a separate plain fp32 copy with the same weights for the tutorial)."""
    bb = load_backbone(name, random_init=name != "tf_efficientnet_lite0")
    plain = load_backbone(name, random_init=True).model
    plain.load_state_dict(bb.model.state_dict())
    return bb, plain.eval()


def tutorial(model: torch.nn.Module, root: Path, out: Path) -> int:
    return bu.tutorial_loop(model, root, out, BATCH)


def embedpipe(bb, root: Path, out: Path, opts: ExtractOptions) -> int:
    s = run(root, out, opts, progress=False, backbone=bb)
    if s.failed or s.extracted != s.total:
        raise RuntimeError(f"embedpipe did not extract everything: {s.line()}")
    return s.extracted


class Ceiling:
    """The model on pre-decoded batches, prepared exactly as run() prepares it."""

    def __init__(self, bb, root: Path, opts: ExtractOptions):
        data_config, _ = identity_of(bb, opts, "fp32")
        transform = make_views_transform(data_config)
        size = None if opts.exact_decode else decode_size(data_config)
        files = sorted(p for p in root.rglob("*.jpg"))
        x = torch.cat([transform(decode_image(f.read_bytes(), min_size=size)) for f in files])
        self.batches = [x[i:i + BATCH].contiguous(memory_format=torch.channels_last)
                        for i in range(0, len(x), BATCH)]
        self.n = len(files)
        self.precision = resolve_precision(opts.precision, torch.device("cpu"))
        self.compiled = resolve_compile(opts.compile, torch.device("cpu"), self.n)
        self.bb, self.opts = bb, opts

    def __call__(self) -> int:
        model, amp = prepare_model(self.bb, torch.device("cpu"), self.precision, True)
        if self.compiled:
            model = CompiledForward(model, BATCH)
        with torch.inference_mode(), amp:
            for x in self.batches:
                model(x).float().numpy()
        return self.n


def cosine_to_tutorial(tut: Path, store: Path) -> tuple[float, float]:
    ref = np.load(tut).astype(np.float64)
    pos = {p: i for i, p in enumerate(np.load(tut.with_suffix(".paths.npy")))}
    st = open_store(store)
    f = st.features.astype(np.float64)
    r = ref[[pos[p] for p in st.paths]]
    cos = (f * r).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(r, axis=1))
    return float(cos.mean()), float(cos.min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", type=int, default=300, help="224×224 JPEGs (multiple of 10)")
    ap.add_argument("--large", type=int, default=100, help="1024×768 JPEGs (multiple of 10)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--quick", action="store_true", help="smoke test: 20 + 10 images, 1 rep")
    args = ap.parse_args()
    if args.quick:
        args.small, args.large, args.reps = 20, 10, 1
    models = args.models.split(",")
    hdr = bu.Header("Extraction throughput: tutorial loop vs embedpipe extract vs model-only "
                    "ceiling")
    opts_default = ExtractOptions()
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    rates: dict[tuple[str, str], list[float]] = {}
    other: dict[tuple[str, str], list[float]] = {}
    cosines: dict[str, tuple[float, float]] = {}
    settings: dict[str, dict] = {}
    try:
        data = tmp / "jpegs"
        write_small_jpeg_folder(data, per_class=args.small // 10)
        write_jpeg_folder(data, per_class=args.large // 10)
        n_files, kb = folder_stats(data)
        print(f"{n_files} JPEGs ({args.small} at 224×224, {args.large} at {JPEG_W}×{JPEG_H}), "
              f"mean {kb:.0f} KB", flush=True)
        warm = tmp / "warm"
        write_small_jpeg_folder(warm, per_class=1)
        write_jpeg_folder(warm, per_class=1)
        jobs = {}
        for name in models:
            bb, plain = backbones(name)
            opts = ExtractOptions(model=name, random_init=name != "tf_efficientnet_lite0")
            ceiling = Ceiling(bb, data, opts)
            settings[name] = {"precision": ceiling.precision, "compile": ceiling.compiled,
                              "workers": default_workers(), "batch": opts.batch_size}
            jobs[(name, "tutorial")] = lambda out, plain=plain: tutorial(plain, data, out)
            jobs[(name, "embedpipe")] = lambda out, bb=bb, opts=opts: embedpipe(bb, data, out, opts)
            jobs[(name, "ceiling")] = lambda out, c=ceiling: c()
            # untimed warm-up of each path (oneDNN primitive creation, lazy imports, compile)
            tutorial(plain, warm, tmp / "warm.npy")
            embedpipe(bb, warm, tmp / f"warm-{name}.h5", opts)
            Ceiling(bb, warm, opts)()
        rng = random.Random(0)
        for r in range(args.reps):
            order = list(jobs)
            rng.shuffle(order)
            rep = tmp / f"rep{r}"
            rep.mkdir()
            for key in order:
                out = rep / (f"{key[0]}.npy" if key[1] == "tutorial" else f"{key[0]}.h5")
                meter = bu.CpuMeter()
                t = time.perf_counter()
                n = jobs[key](out)
                dt = time.perf_counter() - t
                rates.setdefault(key, []).append(n / dt)
                other.setdefault(key, []).append(meter.foreign_cores())
                print(f"  rep {r + 1}/{args.reps} {key[0]:>22} {key[1]:>9}: {n / dt:6.1f} img/s "
                      f"({dt:5.1f} s; other processes busy {other[key][-1]:.2f} cores; "
                      f"{bu.load_snapshot()})", flush=True)
            for name in models:
                cosines[name] = cosine_to_tutorial(rep / f"{name}.npy", rep / f"{name}.h5")
            if r < args.reps - 1:
                shutil.rmtree(rep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows, summary = [], {}
    for name in models:
        tut, emb, ceil = (rates[(name, k)] for k in ("tutorial", "embedpipe", "ceiling"))
        ratios = {"tutorial": bu.median(emb) / bu.median(tut),
                  "ceiling": bu.median(emb) / bu.median(ceil)}
        paired = {"tutorial": [e / t for e, t in zip(emb, tut)],
                  "ceiling": [e / c for e, c in zip(emb, ceil)]}
        s = settings[name]
        labels = {"tutorial": "tutorial loop (ImageFolder, DataLoader workers 0, fp32)",
                  "embedpipe": f"embedpipe extract defaults ({s['precision']}, compile "
                               f"{'on' if s['compile'] else 'off'}, workers {s['workers']})",
                  "ceiling": f"model-only ceiling ({s['precision']}, channels_last, compile "
                             f"{'on' if s['compile'] else 'off'}, pre-decoded)"}
        for k in ("tutorial", "embedpipe", "ceiling"):
            v = rates[(name, k)]
            rows.append([name, labels[k], f"{bu.median(v):.1f}", bu.spread(v),
                         f"{bu.median(other[(name, k)]):.2f}"])
        summary[name] = {"settings": s, "weights": MODELS[name],
                         "img_s": {k: rates[(name, k)] for k in ("tutorial", "embedpipe", "ceiling")},
                         "other_cores": {k: other[(name, k)] for k in ("tutorial", "embedpipe", "ceiling")},
                         "embedpipe_over_tutorial": ratios["tutorial"],
                         "embedpipe_over_ceiling": ratios["ceiling"],
                         "paired": paired, "cosine_to_tutorial": cosines[name]}
    table = bu.table(["model", "configuration", "img/s (median)", "min–max", "other procs' cores"],
                     rows)
    rrows = []
    for name in models:
        sm = summary[name]
        for k, label in (("tutorial", "embedpipe ÷ tutorial"), ("ceiling", "embedpipe ÷ ceiling")):
            target = TARGETS.get((name, k))
            val = sm[f"embedpipe_over_{k}"]
            rrows.append([name, label, f"{val:.2f}",
                          f"{min(sm['paired'][k]):.2f}–{max(sm['paired'][k]):.2f}",
                          "—" if target is None else
                          f"≥ {target:g}: {'met' if val >= target else 'NOT met'}"])
    rtable = bu.table(["model", "ratio", "ratio of medians", "paired per rep min–max",
                       "issue #5 target"], rrows)
    print("\n" + table + "\n\n" + rtable, flush=True)
    facts = [f"images per repetition: {n_files} JPEGs in class folders = {args.small} "
             f"Fashion-MNIST test images rendered at 224×224 (RGB, q90) + {args.large} "
             f"{JPEG_W}×{JPEG_H} (q90); mean file {kb:.0f} KB",
             f"{args.reps} interleaved repetitions, order shuffled per repetition, after an "
             "untimed warm-up of every path; img/s are medians over repetitions",
             "backbones: " + "; ".join(f"{m}: {MODELS[m]}" for m in models),
             f"embedpipe defaults here: --precision auto → {settings[models[0]]['precision']}, "
             f"--compile auto → {'on' if settings[models[0]]['compile'] else 'off'} for "
             f"{n_files} images, workers {default_workers()}, batch {opts_default.batch_size}"]
    if args.quick:
        facts.append("QUICK smoke-test run: numbers mean nothing")
    doc = hdr.render(facts)
    doc += ("\n" + table + "\n\n" + rtable + "\n\n"
            "- 'other procs' cores': cores that other processes on this shared machine kept busy "
            "during that measurement (median over repetitions; 2 cores in all).\n"
            "- paired per rep: the ratio within each repetition (both measured minutes apart "
            "under the same load).\n")
    for name in models:
        c = summary[name]["cosine_to_tutorial"]
        doc += (f"- {name}: embedpipe features vs the tutorial's (same weights, last "
                f"repetition): cosine mean {c[0]:.4f}, min {c[1]:.4f} (differences: JPEG draft "
                "decoding of the large images and the precision).\n")
    if args.quick:
        out_md = Path(tempfile.gettempdir()) / "extract.quick.md"
        out_md.write_text(doc)
    else:
        out_md = bu.write_result("extract", doc)
        bu.write_json("extract", {"machine": bu.machine_facts(), "load_start": hdr.load_start,
                                  "images": {"small_224": args.small, "large_1024x768": args.large,
                                             "total": n_files, "mean_kb": kb},
                                  "reps": args.reps, "models": summary})
    print(f"\nwrote {out_md}")


if __name__ == "__main__":
    main()
