"""Preprocessing cost: the CPU time of decode + resize + crop + normalize per image on ONE core,
for each way of doing it; and the pipeline split of two cores between loader workers and
inference threads.

Part A (one process, torch.set_num_threads(1), every method on every image set, interleaved
repetitions with the method order shuffled each time). The target is embedpipe's default
backbone's eval preprocessing (tf_efficientnet_lite0: shorter side → 256 bicubic, center crop
224, mean = std = 0.5):
  pil-exact       decode_image(min_size=None) (full-size decode) + timm's eval transform
                  (PIL resize, crop, ToTensor, Normalize): embedpipe with --exact-decode
  pil-draft       decode_image(min_size=decode_size) (JPEG DCT-domain downscale by 1/2, 1/4,
                  1/8 via Image.draft while staying ≥ 257 px) + timm's eval transform:
                  embedpipe's default today
  pil-draft-gap   the same draft, then PIL resize with reducing_gap=3 (Image.reduce by an
                  integer factor first, then bicubic) + crop + float normalize in numpy
  pil-uint8       draft + PIL resize + crop, handed on as uint8 HWC (normalize in the graph)
  tv-float        torchvision.io.decode_jpeg + transforms.v2 Resize (bicubic, antialias) +
                  CenterCrop on the uint8 tensor, ToDtype(float32, scale) + Normalize
  tv-uint8        torchvision decode + v2 resize + crop, uint8 CHW (normalize in the graph)
  ingraph-norm    (measured per image on a batch of 32) the cost normalize adds when the
                  model does it: uint8 NHWC batch → float, (x/255 - mean)/std, channels_last
Each method's features (Lite0, torch fp32) are compared with pil-draft's (today's path) on
the same images: cosine mean/min.

Image sets: Fashion-MNIST test images upscaled to 224×224 (RGB JPEG q90, what extract.py
uses), and 1024×768 photos made from scikit-image's bundled real photos (astronaut, coffee,
chelsea, rocket, hubble_deep_field, immunohistochemistry, retina, cat): random crops, scaled
to cover 1024×768 (bicubic), flipped at random, JPEG q90. (Upscaled photos are smoother than
camera photos of that size; JPEG decode cost depends mostly on the pixel count.)

Part B (two cores): `embedpipe.extract.run()` with the torch bf16 model (Lite0, channels_last,
compile off) on each image set, for DataLoader workers 0/1/2 × torch intra-op threads 1/2,
interleaved; img/s and the CPU time per image.

Run from the repository root:  python bench/preprocess.py [--quick]
Writes bench/results/preprocess.md and preprocess.json (with --quick: scratch files).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "cat")
PHOTO_W, PHOTO_H = 1024, 768


def write_photo_folder(out: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs of PHOTO_W×PHOTO_H (q90) cut from scikit-image's bundled photos, in class
    folders named after the source photo."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    srcs = {name: Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS}
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        src = srcs[name]
        w, h = src.size
        # a random crop of 60-100% of the photo with the target's aspect, scaled to cover
        f = rng.uniform(0.6, 1.0)
        cw = min(w, int(h * f * PHOTO_W / PHOTO_H))
        ch = int(cw * PHOTO_H / PHOTO_W)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((PHOTO_W, PHOTO_H), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"photo_{i:05d}.jpg", quality=90)
    return out


# -- the methods (bytes -> model input) --------------------------------------------------------

def make_methods(cfg: dict):
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import v2

    from embedpipe.backbones import decode_size, make_transform
    from embedpipe.data import decode_image

    tf = make_transform(cfg)
    size = decode_size(cfg)
    crop = cfg["input_size"][1]
    short = int(crop / cfg["crop_pct"])  # timm: math.floor(224 / 0.875) = 256
    mean = np.array(cfg["mean"], np.float32) * 255
    inv_std = 1 / (np.array(cfg["std"], np.float32) * 255)

    def pil_resize_crop(img: Image.Image, gap: float | None) -> Image.Image:
        w, h = img.size
        if w <= h:
            nw, nh = short, int(short * h / w)
        else:
            nw, nh = int(short * w / h), short
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=gap)
        left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
        return img.crop((left, top, left + crop, top + crop))

    tv_resize = v2.Compose([v2.Resize(short, interpolation=v2.InterpolationMode.BICUBIC,
                                      antialias=True), v2.CenterCrop(crop)])
    tv_float = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(cfg["mean"], cfg["std"])])

    def tv_decode(data: bytes):
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                           mode=ImageReadMode.RGB)

    return {
        "pil-exact": lambda b: tf(decode_image(b, min_size=None)),
        "pil-draft": lambda b: tf(decode_image(b, min_size=size)),
        "pil-draft-gap": lambda b: torch.from_numpy(
            ((np.asarray(pil_resize_crop(decode_image(b, min_size=size), 3.0), np.float32)
              - mean) * inv_std).transpose(2, 0, 1).copy()),
        "pil-uint8": lambda b: torch.from_numpy(
            np.asarray(pil_resize_crop(decode_image(b, min_size=size), None)).copy()),
        "tv-float": lambda b: tv_float(tv_resize(tv_decode(b))),
        "tv-uint8": lambda b: tv_resize(tv_decode(b)),
    }


def to_model_input(method: str, t, cfg: dict):
    """A method's output as the float NCHW-normalised tensor the model takes."""
    import torch

    if method == "pil-uint8":
        t = t.permute(2, 0, 1)
    if method in ("pil-uint8", "tv-uint8"):
        mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
        std = torch.tensor(cfg["std"]).view(3, 1, 1)
        t = (t.float() / 255 - mean) / std
    return t


def ingraph_norm_cost(cfg: dict, reps: int = 20) -> float:
    """CPU ms per image that normalizing a uint8 NHWC batch of 32 costs inside torch."""
    import torch

    torch.set_num_threads(1)  # one core, as the rest of part A
    x = torch.randint(0, 256, (32, 224, 224, 3), dtype=torch.uint8)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255
    best = []
    for _ in range(reps):
        t = time.process_time()
        y = (x.permute(0, 3, 1, 2).float() - mean) / std
        y.contiguous(memory_format=torch.channels_last)
        best.append((time.process_time() - t) * 1000 / 32)
    torch.set_num_threads(bu.cores())
    return bu.median(best)


def part_a(sets: dict[str, list[bytes]], cfg: dict, reps: int, model, log) -> dict:
    import torch

    torch.set_num_threads(1)
    methods = make_methods(cfg)
    cost: dict[tuple[str, str], list[float]] = {}
    wall: dict[tuple[str, str], list[float]] = {}
    rng = random.Random(0)
    for name, files in sets.items():  # warm-up: lazy imports, first-call allocations
        for m in methods.values():
            m(files[0])
    for r in range(reps):
        order = [(s, m) for s in sets for m in methods]
        rng.shuffle(order)
        for s, m in order:
            fn, files = methods[m], sets[s]
            c, t = time.process_time(), time.perf_counter()
            for b in files:
                fn(b)
            cost.setdefault((s, m), []).append((time.process_time() - c) * 1000 / len(files))
            wall.setdefault((s, m), []).append((time.perf_counter() - t) * 1000 / len(files))
        log(f"  part A rep {r + 1}/{reps} done ({bu.load_snapshot()})")
    torch.set_num_threads(bu.cores())
    # fidelity: Lite0 fp32 features of each method vs pil-draft (today's path)
    fid = {}
    with torch.inference_mode():
        for s, files in sets.items():
            sub = files[:64]
            feats = {}
            for m, fn in methods.items():
                x = torch.stack([to_model_input(m, fn(b), cfg) for b in sub])
                feats[m] = model(x).numpy().astype(np.float64)
            ref = feats["pil-draft"]
            for m, f in feats.items():
                c = (f * ref).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(ref, axis=1))
                fid[(s, m)] = (float(c.mean()), float(c.min()))
    return {"cost_ms": cost, "wall_ms": wall, "fidelity": fid}


def part_b(folders: dict[str, Path], reps: int, bb, log) -> dict:
    import resource

    import torch

    from embedpipe.extract import ExtractOptions, run

    def cpu() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    configs = [(w, t) for w in (0, 1, 2) for t in (1, 2)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-pre-b-"))
    rates: dict[tuple[str, int, int], list[float]] = {}
    cpu_ms: dict[tuple[str, int, int], list[float]] = {}
    rng = random.Random(1)
    try:
        for s, folder in folders.items():  # warm-up
            torch.set_num_threads(2)
            run(folder, tmp / "warm.h5", ExtractOptions(precision="bf16", compile="off", workers=1),
                progress=False, backbone=bb)
            (tmp / "warm.h5").unlink()
        for r in range(reps):
            order = [(s, w, t) for s in folders for w, t in configs]
            rng.shuffle(order)
            for s, w, t in order:
                torch.set_num_threads(t)
                store = tmp / "b.h5"
                c0 = cpu()
                summ = run(folders[s], store, ExtractOptions(precision="bf16", compile="off",
                                                             workers=w),
                           progress=False, backbone=bb)
                c1 = cpu()
                store.unlink()
                rates.setdefault((s, w, t), []).append(summ.extracted / summ.seconds)
                cpu_ms.setdefault((s, w, t), []).append((c1 - c0) * 1000 / summ.extracted)
            log(f"  part B rep {r + 1}/{reps} done ({bu.load_snapshot()})")
    finally:
        torch.set_num_threads(bu.cores())
        shutil.rmtree(tmp, ignore_errors=True)
    return {"img_s": rates, "cpu_ms": cpu_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", type=int, default=300, help="224×224 Fashion-MNIST JPEGs (×10)")
    ap.add_argument("--photos", type=int, default=120, help="1024×768 photo JPEGs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pipeline-images", type=int, default=320,
                    help="images per part-B run (from each set)")
    ap.add_argument("--parts", default="AB", help="A (one-core costs), B (two-core pipeline) "
                    "or AB (default); B's img/s mean nothing on a loaded machine")
    ap.add_argument("--quick", action="store_true", help="smoke test: 40 + 16 images, 1 rep")
    a = ap.parse_args()
    if a.quick:
        a.small, a.photos, a.reps, a.pipeline_images = 40, 16, 1, 64
    hdr = bu.Header("Preprocessing cost per image (one core) and the two-core pipeline split")
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, flush=True)

    from embedpipe.backbones import load_backbone

    bb = load_backbone()
    cfg = bb.data_config
    tmp = Path(tempfile.mkdtemp(prefix="bench-pre-"))
    try:
        small = bu.write_small_jpeg_folder(tmp / "fmnist224", per_class=max(1, a.small // 10))
        photos = write_photo_folder(tmp / "photos", a.photos)
        sets = {"fmnist-224": [p.read_bytes() for p in sorted(small.rglob("*.jpg"))],
                f"photo-{PHOTO_W}x{PHOTO_H}": [p.read_bytes() for p in sorted(photos.rglob("*.jpg"))]}
        kb = {s: sum(map(len, f)) / len(f) / 1024 for s, f in sets.items()}
        log("sets: " + ", ".join(f"{s} {len(f)} files, mean {kb[s]:.0f} KB" for s, f in sets.items()))
        A = part_a(sets, cfg, a.reps, bb.model.eval(), log)
        norm_ms = ingraph_norm_cost(cfg)
        # part B folders: the first pipeline-images files of each set
        folders = {}
        for s, src in (("fmnist-224", small), (f"photo-{PHOTO_W}x{PHOTO_H}", photos)):
            d = tmp / f"b-{s}"
            for p in sorted(src.rglob("*.jpg"))[:a.pipeline_images]:
                q = d / p.relative_to(src)
                q.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, q)
            folders[s] = d
        B = part_b(folders, a.reps, bb, log) if "B" in a.parts else {"img_s": {}, "cpu_ms": {}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for s in sets:
        base = bu.median(A["cost_ms"][(s, "pil-draft")])
        for m in make_methods(cfg):
            v = A["cost_ms"][(s, m)]
            c = A["fidelity"][(s, m)]
            rows.append([s, m, f"{bu.median(v):.2f}", bu.spread(v),
                         f"{bu.median(A['wall_ms'][(s, m)]):.2f}", f"{base / bu.median(v):.2f}",
                         f"{c[0]:.5f} / {c[1]:.5f}"])
    ta = bu.table(["images", "method", "CPU ms/img (median)", "min–max", "wall ms/img",
                   "speed vs pil-draft (today)", "cosine to today's features mean / min"], rows)
    rows = []
    for s in (folders if B["img_s"] else ()):
        best = max(B["img_s"], key=lambda k: bu.median(B["img_s"][k]) if k[0] == s else -1)
        for w in (0, 1, 2):
            for t in (1, 2):
                v = B["img_s"][(s, w, t)]
                rows.append([s, w, t, f"{bu.median(v):.1f}", bu.spread(v),
                             f"{bu.median(B['cpu_ms'][(s, w, t)]):.1f}",
                             "best" if (s, w, t) == best else ""])
    tb = bu.table(["images", "loader workers", "torch threads", "img/s (median)", "min–max",
                   "CPU ms/img (all processes)", ""], rows)
    wall = time.perf_counter() - t_start
    facts = [f"CPU flags: avx512_bf16 {'yes' if 'avx512_bf16' in bu.cpu_flags() else 'no'}, "
             f"AMX {'yes' if 'amx_bf16' in bu.cpu_flags() else 'no'}",
             "image sets: " + ", ".join(f"{s}: {len(f)} JPEGs, mean {kb[s]:.0f} KB"
                                        for s, f in sets.items()),
             f"part A: {a.reps} interleaved repetitions, one thread; CPU ms = process CPU "
             "time (robust to other load), wall ms beside it",
             (f"part B: {a.pipeline_images} images per set and run, {a.reps} interleaved "
              "repetitions; Lite0 bf16 autocast, channels_last, compile off, batch 32"
              if B["img_s"] else "part B: not run"),
             f"whole script {wall / 60:.1f} min"]
    if a.quick:
        facts.append("QUICK smoke-test run: numbers mean nothing")
    doc = hdr.render(facts)
    doc += ("\n## A. Decode + resize + crop + normalize, one core\n\n" + ta + "\n\n"
            f"- normalize inside the graph (uint8 NHWC batch of 32 → float, (x − mean)/std, "
            f"channels_last, torch, one thread): {norm_ms:.2f} CPU ms per image\n"
            "\n## B. Two cores: loader workers × inference threads (Lite0, torch bf16)\n\n"
            + (tb if B["img_s"] else "not run (--parts A)") + "\n")
    print("\n" + doc)
    payload = {"part_a": {"cost_ms": {f"{s}|{m}": v for (s, m), v in A["cost_ms"].items()},
                          "wall_ms": {f"{s}|{m}": v for (s, m), v in A["wall_ms"].items()},
                          "cosine_to_pil_draft": {f"{s}|{m}": v for (s, m), v in A["fidelity"].items()},
                          "ingraph_norm_ms": norm_ms},
               "part_b": {"img_s": {f"{s}|w{w}|t{t}": v for (s, w, t), v in B["img_s"].items()},
                          "cpu_ms": {f"{s}|w{w}|t{t}": v for (s, w, t), v in B["cpu_ms"].items()}},
               "reps": a.reps, "wall_s": wall}
    out = bu.save_results("preprocess", doc, payload, a.quick)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
