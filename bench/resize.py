"""The loader's resize + centre crop: timm's two steps (torchvision Resize, then CenterCrop, on
the PIL image) against `embedpipe.backbones.ResizeCenterCrop` (PIL's two resampling passes on
the crop's source box only), on one core.

For each source size: the CPU time per image of both (interleaved, min of 5 rounds of 50
calls) and how many pixels differ (none is the claim: equal pixels make equal features).
Images: scikit-image's bundled real photos
(astronaut, coffee, chelsea, rocket, cat) resized to the source size (bicubic), and uniform
noise (the worst case for rounding differences). Geometry: Lite0's (shorter side → 256
bicubic, centre crop 224).

Run from the repository root:  python bench/resize.py [--quick]
Writes bench/results/resize.md and .json (with --quick: scratch files in the temp dir).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

from embedpipe import backbones  # noqa: E402
from embedpipe.backbones import ResizeCenterCrop  # noqa: E402

SIZES = [(28, 28), (224, 224), (500, 375), (375, 500), (640, 480), (1024, 768), (1600, 1200),
         (1300, 300)]


def photos():
    import skimage.data as sd

    return [sd.astronaut(), sd.coffee(), sd.chelsea(), sd.rocket(), sd.cat()]


def cpu_ms(fn, img, calls: int) -> float:
    t = time.process_time()
    for _ in range(calls):
        fn(img)
    return (time.process_time() - t) / calls * 1e3


def main() -> None:
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls; scratch output")
    args = ap.parse_args()
    torch.set_num_threads(1)
    head = bu.Header("Resize + centre crop: timm's two steps vs ResizeCenterCrop, one core")
    geometry = backbones._split_normalize(backbones.load_backbone().data_config)[0]
    fused = ResizeCenterCrop.fuse(geometry)
    calls, rounds = (10, 2) if args.quick else (50, 5)
    srcs = photos()
    rng = np.random.default_rng(0)
    rows, payload = [], []
    for w, h in SIZES:
        for kind in ("photo", "noise"):
            if kind == "photo":
                imgs = [Image.fromarray(s).resize((w, h), Image.BICUBIC) for s in srcs]
            else:
                imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))]
            two, one = [], []
            for _ in range(rounds):
                two.append(cpu_ms(geometry, imgs[0], calls))
                one.append(cpu_ms(fused, imgs[0], calls))
            fracs, maxd = [], 0
            for img in imgs:
                a, b = np.asarray(geometry(img)), np.asarray(fused(img))
                d = np.abs(a.astype(int) - b.astype(int)) if a.shape == b.shape else None
                fracs.append(1.0 if d is None else float((d > 0).mean()))
                maxd = max(maxd, 255 if d is None else int(d.max()))
            rows.append([f"{w}x{h}", kind, f"{min(two):.3f}", f"{min(one):.3f}",
                         f"{min(two) / min(one):.2f}x", f"{100 * max(fracs):.3f}%", maxd])
            payload.append({"size": [w, h], "images": kind, "two_steps_ms": two,
                            "fused_ms": one, "pixels_differing": fracs, "max_diff": maxd})
    bu.publish("resize", head,
               [f"CPU ms per image: min of {rounds} interleaved rounds of {calls} calls "
                "(process time, one core)",
                f"photos: {len(srcs)} scikit-image photos per size (timing: the first); "
                "noise: one uniform-noise image"],
               ["source", "images", "two steps, ms", "fused, ms", "speed-up",
                "pixels differing (max)", "max diff (levels)"], rows, {"rows": payload},
               args.quick)


if __name__ == "__main__":
    main()
