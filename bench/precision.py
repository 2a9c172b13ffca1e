"""Does `--precision auto` pick the faster precision here, and are bf16 features good enough?

`embedpipe.extract.resolve_precision` picks bf16 autocast on a CPU where
`cpu_has_native_bf16()` is true (oneDNN runs bf16 natively: AVX512-BF16 or AMX), else fp32.
This script measures, in one process:

1. model-only throughput (pre-made random input, torch.inference_mode, channels_last, batch
   32) of tf_efficientnet_lite0 and resnet50 in fp32 and under bf16 autocast, interleaved
   repetitions in a shuffled order, median img/s and the bf16/fp32 ratio. The models are built
   with `load_backbone(name, random_init=True)`: the speed of dense inference does not depend on
   the weight values, and this needs no download. Each precision is measured at torch's
   default intra-op thread count and at 1 thread, because on a shared 2-core machine the thread
   count matters as much as the precision (see the results file).
2. feature agreement of bf16 vs fp32 on real images with real weights: 200 Fashion-MNIST test
   images (20 per class) through the bundled EfficientNet-Lite0 with embedpipe's own decoding
   and eval transform: cosine similarity of the pooled features (mean / min), max abs diff,
   and whether each image's nearest neighbour among the 200 stays the same.

Run from the repository root:  python bench/precision.py [--quick]
Writes bench/results/precision.md (with --quick: a scratch file in the temp dir instead).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

from embedpipe.backbones import load_backbone, make_transform  # noqa: E402
from embedpipe.data import decode_image, discover, read_file  # noqa: E402
from embedpipe.datasets import write_fashion_mnist_folder  # noqa: E402
from embedpipe.extract.runtime import cpu_has_native_bf16, resolve_precision

MODELS = ("tf_efficientnet_lite0", "resnet50")
BATCH = 32


def amp_ctx(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def time_batches(model: torch.nn.Module, x: torch.Tensor, precision: str, n: int) -> float:
    """img/s over n forward passes of the batch x."""
    with torch.inference_mode(), amp_ctx(precision):
        t0 = time.perf_counter()
        for _ in range(n):
            model(x)
        dt = time.perf_counter() - t0
    return n * x.shape[0] / dt


def throughput(reps: int, batches_per_rep: int, thread_counts: list[int], warmup: int) -> tuple[str, list[str]]:
    default_threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    models = {}
    for name in MODELS:
        bb = load_backbone(name, random_init=True)
        m = bb.model.eval().to(memory_format=torch.channels_last)
        size = bb.data_config["input_size"]
        x = torch.randn(BATCH, *size, generator=gen).contiguous(memory_format=torch.channels_last)
        models[name] = (m, x, size)
    configs = [(name, prec, th) for name in MODELS for prec in ("fp32", "bf16") for th in thread_counts]
    # warm-up: oneDNN builds (and caches) its primitives on the first call of each shape/dtype
    for name, prec, th in configs:
        torch.set_num_threads(th)
        m, x, _ = models[name]
        time_batches(m, x, prec, warmup)
    rates: dict[tuple[str, str, int], list[float]] = {c: [] for c in configs}
    foreign: list[float] = []
    rng = random.Random(0)
    for r in range(reps):
        order = configs[:]
        rng.shuffle(order)
        meter = bu.CpuMeter()
        for c in order:
            name, prec, th = c
            torch.set_num_threads(th)
            m, x, _ = models[name]
            rates[c].append(time_batches(m, x, prec, batches_per_rep))
        foreign.append(meter.foreign_cores())
        print(f"  rep {r + 1}/{reps} (other processes busy {foreign[-1]:.2f} cores): " + ", ".join(
            f"{n.split('_')[-1]}/{p}/{t}t {rates[(n, p, t)][-1]:.0f}" for n, p, t in configs), flush=True)
    torch.set_num_threads(default_threads)

    rows = []
    for name in MODELS:
        for th in thread_counts:
            f32, b16 = rates[(name, "fp32", th)], rates[(name, "bf16", th)]
            paired = [b / f for b, f in zip(b16, f32)]
            rows.append([name, th, f"{bu.median(f32):.1f} ({bu.spread(f32)})",
                         f"{bu.median(b16):.1f} ({bu.spread(b16)})",
                         f"{bu.median(b16) / bu.median(f32):.2f}",
                         f"{bu.median(paired):.2f} ({min(paired):.2f}–{max(paired):.2f})"])
    headers = ["model", "threads", "fp32 img/s median (min–max)", "bf16 img/s median (min–max)",
               "bf16/fp32 (ratio of medians)", "bf16/fp32 paired per rep, median (min–max)"]
    # threads: 1 vs default, per precision
    thread_rows = []
    if len(thread_counts) > 1:
        lo, hi = min(thread_counts), max(thread_counts)
        for name in MODELS:
            for prec in ("fp32", "bf16"):
                a, b = rates[(name, prec, hi)], rates[(name, prec, lo)]
                paired = [y / x for x, y in zip(a, b)]
                thread_rows.append([name, prec, f"{bu.median(b) / bu.median(a):.2f}",
                                    f"{bu.median(paired):.2f} ({min(paired):.2f}–{max(paired):.2f})"])
    text = bu.table(headers, rows)
    notes = [f"{reps} interleaved repetitions (configuration order shuffled each repetition), "
             f"each timing {batches_per_rep} forward passes of one pre-made batch of {BATCH} "
             f"random {models[MODELS[0]][2][1]}×{models[MODELS[0]][2][2]} inputs (resnet50: "
             f"{models['resnet50'][2][1]}×{models['resnet50'][2][2]}); one warm-up of {warmup} passes "
             "per configuration before the first repetition.",
             "Cores kept busy by other processes during the repetitions (machine busy time minus "
             f"ours): median {bu.median(foreign):.2f}, min {min(foreign):.2f}, max {max(foreign):.2f} "
             f"(of {bu.cores()}).",
             "Weights are random (`load_backbone(name, random_init=True)`): throughput of dense "
             "fp32/bf16 inference does not depend on the weight values; the agreement section "
             "below uses the real bundled weights."]
    if thread_rows:
        text += (f"\n\nSame measurements, {min(thread_counts)} thread vs {max(thread_counts)} "
                 "threads (>1 means one thread is faster):\n\n"
                 + bu.table(["model", "precision", f"{min(thread_counts)}t/{max(thread_counts)}t "
                             "(ratio of medians)", "paired per rep, median (min–max)"], thread_rows))
    return text, notes


def agreement(n_per_class: int) -> tuple[str, list[str]]:
    bb = load_backbone()  # the bundled, pretrained EfficientNet-Lite0
    model = bb.model.eval().to(memory_format=torch.channels_last)
    transform = make_transform(bb.data_config)
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        root = write_fashion_mnist_folder(Path(tmp) / "fmnist", per_class=n_per_class, split="test")
        refs = discover(root).items
        x = torch.stack([transform(decode_image(read_file(r.path))) for r in refs])
        labels = np.array([r.label for r in refs])
    x = x.contiguous(memory_format=torch.channels_last)
    feats = {}
    for prec in ("fp32", "bf16"):
        outs = []
        with torch.inference_mode(), amp_ctx(prec):
            for i in range(0, len(x), BATCH):
                outs.append(model(x[i:i + BATCH]).float())
        feats[prec] = torch.cat(outs).numpy().astype(np.float64)
    f32, b16 = feats["fp32"], feats["bf16"]
    cos = (f32 * b16).sum(1) / (np.linalg.norm(f32, axis=1) * np.linalg.norm(b16, axis=1))
    absdiff = np.abs(f32 - b16)
    rel_l2 = np.linalg.norm(f32 - b16, axis=1) / np.linalg.norm(f32, axis=1)

    def nn_idx(f: np.ndarray) -> np.ndarray:
        fn = f / np.linalg.norm(f, axis=1, keepdims=True)
        s = fn @ fn.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)

    nn32, nn16 = nn_idx(f32), nn_idx(b16)
    rows = [
        ["images", len(f32)],
        ["feature dim", f32.shape[1]],
        ["cosine(bf16, fp32): mean", f"{cos.mean():.4f}"],
        ["cosine(bf16, fp32): min", f"{cos.min():.4f}"],
        ["cosine(bf16, fp32): 5th percentile", f"{np.percentile(cos, 5):.4f}"],
        ["max abs diff (any image, any dim)", f"{absdiff.max():.4f}"],
        ["mean abs diff", f"{absdiff.mean():.4f}"],
        ["for scale: mean |fp32 feature|, max |fp32 feature|", f"{np.abs(f32).mean():.4f}, {np.abs(f32).max():.4f}"],
        ["relative L2 error ‖bf16−fp32‖/‖fp32‖: mean / max", f"{rel_l2.mean():.4f} / {rel_l2.max():.4f}"],
        ["same nearest neighbour (cosine, among the images)", f"{(nn32 == nn16).mean():.3f}"],
        ["leave-one-out 1-NN label accuracy fp32 / bf16",
         f"{(labels[nn32] == labels).mean():.3f} / {(labels[nn16] == labels).mean():.3f}"],
    ]
    notes = [f"Agreement: {len(f32)} Fashion-MNIST test images ({n_per_class} per class, "
             "`write_fashion_mnist_folder`, seed 0), decoded with `embedpipe.data.decode_image` and "
             "the model's eval transform (`make_transform`), bundled pretrained "
             f"{bb.name} ({bb.weights.describe()}), channels_last, batch {BATCH}; bf16 = "
             "`torch.autocast('cpu', dtype=torch.bfloat16)` exactly as `embedpipe.extract` uses it."]
    return bu.table(["bf16 vs fp32 pooled features", "value"], rows), notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke-test run (< 1 min)")
    args = ap.parse_args()
    hdr = bu.Header("bf16 autocast vs fp32 on this CPU (justifies `--precision auto`)")
    native = cpu_has_native_bf16()
    auto = resolve_precision("auto", torch.device("cpu"))
    print(f"cpu_has_native_bf16() = {native}; --precision auto resolves to {auto} on this CPU")
    default_threads = torch.get_num_threads()
    threads = sorted({default_threads, 1}, reverse=True)
    reps, per_rep = (2, 1) if args.quick else (7, 2)
    n_per_class = 2 if args.quick else 20

    print(f"model-only throughput: {reps} interleaved reps, threads {threads} ...", flush=True)
    t_text, t_notes = throughput(reps, per_rep, threads, 1 if args.quick else 2)
    print(t_text, flush=True)
    print(f"\nfeature agreement on {10 * n_per_class} real images ...", flush=True)
    a_text, a_notes = agreement(n_per_class)
    print(a_text, flush=True)

    doc = hdr.render([f"`embedpipe.extract.cpu_has_native_bf16()` = **{native}** here; "
                      f"`--precision auto` resolves to **{auto}** on this CPU"]
                     + (["QUICK smoke-test run: too few repetitions to mean anything"]
                        if args.quick else []))
    doc += "\n## Model-only throughput, batch 32, channels_last, inference_mode\n\n"
    doc += t_text + "\n\n" + "\n".join(f"- {n}" for n in t_notes) + "\n"
    doc += "\n## bf16 vs fp32 feature agreement (real weights, real images)\n\n"
    doc += a_text + "\n\n" + "\n".join(f"- {n}" for n in a_notes) + "\n"
    if args.quick:
        path = Path(tempfile.gettempdir()) / "precision.quick.md"
        path.write_text(doc)
    else:
        path = bu.write_result("precision", doc)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
