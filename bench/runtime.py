"""Runtimes compared on the same tensors: feature fidelity, head accuracy, conversion cost.

Question: may features of torch and OpenVINO share a store (embedpipe/runtime.py's identity
rule)? Fashion-MNIST train/test images (the train split's first TRAIN, the test split's first
TEST, balanced) are decoded and preprocessed once, exactly as `embedpipe extract` does (the
backbone's views transform), then embedded by
  torch fp32 (channels-last, inference_mode) · torch bf16 autocast · OpenVINO f32 · OpenVINO bf16
(the last two built by embedpipe.extract.runtime.build_openvino from a fresh cache, so the conversion
time is measured), interleaved batch by batch so every runtime sees the same machine load.
Reported: cosine of every runtime's features to torch fp32 and torch bf16 vs OpenVINO bf16
(min, mean), logistic-regression test accuracy on each (scikit-learn, standardized, C=1), the
model-only img/s of each (interleaved, so ratios hold on a busy machine), and the conversion
time of the two routes (openvino.convert_model on the torch module vs via torch.onnx.export)
with their fidelity.

    python bench/runtime.py            # 2000 train / 500 test, Lite0
    python bench/runtime.py --quick    # 300 / 100, scratch output
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import _benchutil as bu  # noqa: E402


def images(split: str, n: int) -> tuple[list, np.ndarray]:
    from PIL import Image

    from embedpipe.datasets import balanced_indices, load_fashion_mnist

    img, lbl = load_fashion_mnist(split)
    idx = balanced_indices(lbl, n // 10, seed=0)
    return [Image.fromarray(img[i]).convert("RGB") for i in idx], lbl[idx].astype(int)


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def logreg(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, yte: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    clf.fit(ftr, ytr)
    return float((clf.predict(fte) == yte).mean())


def onnx_route(model, example, tmp: Path) -> tuple[float, object]:
    """torch.onnx.export, then openvino.convert_model on the .onnx file: (seconds, ov model)."""
    import openvino as ov
    import torch

    t = time.perf_counter()
    path = tmp / "m.onnx"
    torch.onnx.export(model, example, str(path), input_names=["x"], output_names=["f"],
                      dynamic_axes={"x": {0: "n"}}, opset_version=17, dynamo=False)
    m = ov.convert_model(str(path))
    return time.perf_counter() - t, m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="300/100 images; scratch output")
    args = ap.parse_args()
    if args.quick:
        args.train, args.test = 300, 100
    hdr = bu.Header(f"Runtimes side by side: {args.model}, Fashion-MNIST {args.train}/{args.test}")

    import openvino as ov
    import torch

    from embedpipe.backbones import input_normalization, load_backbone, make_views_transform
    from embedpipe.extract.runtime import (
        build_openvino,
        cpu_has_native_bf16,
        model_input,
        prepare_model,
    )

    tmp = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    os.environ["XDG_CACHE_HOME"] = str(tmp / "xdg")  # a cold OpenVINO cache: conversion timed
    bb = load_backbone(args.model)
    tf = make_views_transform(bb.data_config)
    tr, ytr = images("train", args.train)
    te, yte = images("test", args.test)
    x = torch.stack([tf(im)[0] for im in tr + te])  # N×H×W×3 uint8 pixels, decoded once
    norm = input_normalization(bb.data_config)
    if norm is not None:  # the float model input every runtime here takes (N×C×H×W)
        x = model_input(x, norm, channels_last=False)
    print(f"{len(x)} images preprocessed", file=sys.stderr)

    native = cpu_has_native_bf16()
    model, _ = prepare_model(bb, torch.device("cpu"), "fp32", channels_last=True)
    conv: dict[str, float] = {}
    runners = {}

    def torch_runner(prec: str):
        amp = (torch.autocast("cpu", dtype=torch.bfloat16) if prec == "bf16"
               else torch.autocast("cpu", enabled=False))

        def run(b: torch.Tensor) -> np.ndarray:
            with torch.inference_mode(), amp:
                return model(b.contiguous(memory_format=torch.channels_last)).float().numpy()
        return run

    runners["torch fp32"] = torch_runner("fp32")
    runners["torch bf16"] = torch_runner("bf16")
    for prec in ("fp32", "bf16") if native else ("fp32",):
        t = time.perf_counter()
        fwd = build_openvino(bb, prec, say=lambda m: None)
        what = ("convert + save + compile, cold cache" if prec == "fp32" else
                "IR cached by the fp32 build: read + compile")
        conv[f"openvino {prec} ({what})"] = time.perf_counter() - t
        runners[f"openvino {'f32' if prec == 'fp32' else prec}"] = (
            lambda b, f=fwd: f(b).numpy())
    t = time.perf_counter()
    build_openvino(bb, "fp32", say=lambda m: None)
    conv["openvino fp32 (warm cache: read + compile)"] = time.perf_counter() - t

    # the two conversion routes, f32, fidelity on the first batch
    example = x[:1]
    t = time.perf_counter()
    with torch.no_grad():
        direct = ov.convert_model(bb.model.float(), example_input=example,
                                  input=[(-1, *example.shape[1:])])
    conv["route: openvino.convert_model(torch module)"] = time.perf_counter() - t
    secs, via_onnx = onnx_route(bb.model.float(), example, tmp)
    conv["route: torch.onnx.export + openvino.convert_model(.onnx)"] = secs
    core = ov.Core()
    probe = x[:args.batch].numpy()
    with torch.inference_mode():
        ref = bb.model(x[:args.batch]).numpy()
    route_cos = {name: float(cos(core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(
        probe)[0], ref).min()) for name, m in (("convert_model", direct), ("via ONNX", via_onnx))}

    feats = {k: [] for k in runners}
    spent = {k: 0.0 for k in runners}
    order = list(runners)
    rng = np.random.default_rng(0)
    for i, lo in enumerate(range(0, len(x), args.batch)):
        b = x[lo:lo + args.batch]
        for k in rng.permutation(order):  # interleaved, shuffled per batch
            t = time.perf_counter()
            feats[k].append(runners[k](b))
            spent[k] += time.perf_counter() - t
        if i % 10 == 0:
            print(f"  {lo + len(b)}/{len(x)}", file=sys.stderr)
    F = {k: np.concatenate(v) for k, v in feats.items()}
    n = len(tr)
    ref = F["torch fp32"]
    rows = []
    for k, f in F.items():
        c = cos(f, ref)
        acc = logreg(f[:n], ytr, f[n:], yte)
        rows.append([k, f"{c.min():.6f}", f"{c.mean():.6f}", f"{acc:.4f}",
                     f"{len(x) / spent[k]:.1f}", f"{spent['torch fp32'] / spent[k]:.2f}x"])
    extra = []
    if "openvino bf16" in F:
        c = cos(F["torch bf16"], F["openvino bf16"])
        extra.append(f"torch bf16 vs openvino bf16: cosine min {c.min():.6f}, mean {c.mean():.6f}")
    c = cos(F["torch fp32"], F["openvino f32"])
    extra.append(f"torch fp32 vs openvino f32: cosine min {c.min():.7f}, mean {c.mean():.7f}; "
                 f"max abs diff {np.abs(F['torch fp32'] - F['openvino f32']).max():.2e}")
    body = [
        "## Features and heads (same preprocessed tensors; logreg trained on each runtime's "
        "own features)", "",
        bu.table(["runtime", "cos min vs torch fp32", "cos mean", "logreg acc", "model img/s",
                  "vs torch fp32"], rows), "",
        *[f"- {e}" for e in extra], "",
        "## Conversion (seconds, wall; a loaded machine inflates them)", "",
        bu.table(["what", "seconds"], [[k, f"{v:.2f}"] for k, v in conv.items()]), "",
        "- fidelity of the two routes (f32, cosine min to torch fp32 on one batch): "
        + ", ".join(f"{k} {v:.7f}" for k, v in route_cos.items()), "",
    ]
    if not native:
        body.append("- this CPU has no native bf16: OpenVINO bf16 not measured")
    text = hdr.render([f"cpu_has_native_bf16() = {native}", f"batch {args.batch}"]) + "\n" + \
        "\n".join(body)
    payload = {"rows": rows, "extra": extra, "conversion_s": conv, "route_cos": route_cos,
               "train": args.train, "test": args.test, "model": args.model}
    out = bu.save_results(f"runtime-{args.model}" if args.model != "tf_efficientnet_lite0"
                          else "runtime", text, payload, args.quick)
    print(text)
    print(f"written: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
