"""Small real datasets on local disk, written out as image folders (numpy + pillow only).

Fashion-MNIST (idx gz files) is looked for in $EMBEDPIPE_FASHION_MNIST, ../shared/datasets/
fashion-mnist beside the working directory or this checkout, and /usr/share/datasets/
fashion-mnist (Debian package ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

FASHION_CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle_boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class DatasetError(UserError):
    """The dataset's files are missing or malformed."""


def fashion_mnist_dir() -> Path:
    here = Path(__file__).resolve().parent.parent
    candidates = [os.environ.get("EMBEDPIPE_FASHION_MNIST"),
                  Path.cwd().parent / "shared/datasets/fashion-mnist",
                  Path.cwd() / "../shared/datasets/fashion-mnist",
                  here.parent / "shared/datasets/fashion-mnist",
                  "/usr/share/datasets/fashion-mnist"]
    for c in candidates:
        if c and (Path(c) / _FILES["test"][0]).is_file():
            return Path(c).resolve()
    raise DatasetError("Fashion-MNIST not found; set EMBEDPIPE_FASHION_MNIST to its folder or "
                       "`apt-get install dataset-fashion-mnist`")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DatasetError(f"{path}: not an idx file of unsigned bytes; re-download it")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "test", root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N×28×28, labels uint8 N) of the 'train' or 'test' split."""
    root = root or fashion_mnist_dir()
    img, lbl = (_read_idx(root / name) for name in _FILES[split])
    return img, lbl


def balanced_indices(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """``per_class`` indices of each class, chosen reproducibly."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
             for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def write_fashion_mnist_folder(out: Path, per_class: int = 20, split: str = "test",
                               seed: int = 0, splits: dict[str, int] | None = None) -> Path:
    """Write PNGs of Fashion-MNIST's ``split`` as ``out/<class>/<split>_<index>.png``, or, when
    ``splits`` maps folder names to per-class counts, as ``out/<name>/<class>/...``: disjoint
    draws from that one Fashion-MNIST split (e.g. ``{"train": 20, "test": 5}`` of the test
    split, so no image is in two folders). Returns ``out``."""
    from PIL import Image

    out = Path(out)

    plan = splits or {None: per_class}
    if any(n < 1 for n in plan.values()):
        raise DatasetError(f"--per-class {min(plan.values())}: pass 1 or more images per class")
    images, labels = load_fashion_mnist(split)
    most = int(np.bincount(labels).min())
    if sum(plan.values()) > most:
        raise DatasetError(f"--per-class {sum(plan.values())}: Fashion-MNIST's {split} split has "
                           f"{most} images per class; pass at most {most}")
    idx = balanced_indices(labels, sum(plan.values()), seed)
    by_class: dict[int, list[int]] = {}
    for i in idx:
        by_class.setdefault(int(labels[i]), []).append(int(i))
    for c, members in by_class.items():
        start = 0
        for name, count in plan.items():
            folder = out / name / FASHION_CLASSES[c] if name else out / FASHION_CLASSES[c]
            try:
                folder.mkdir(parents=True, exist_ok=True)
                for i in members[start:start + count]:
                    Image.fromarray(images[i], mode="L").save(folder / f"{split}_{i:05d}.png")
            except OSError as e:
                raise DatasetError(f"{out}: cannot write the images there ({e.strerror or e}); "
                                   "pass a --folder in a writable place") from None
            start += count
    return out


# -- planted problems (tests and bench/audit.py check that `embedpipe audit` finds them) --------

FOREIGN_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page",
                  "text", "clock", "hubble_deep_field", "immunohistochemistry", "colorwheel",
                  "brick", "grass", "gravel", "retina")
"""scikit-image's bundled sample photos (``skimage.data``), used as images foreign to a set."""

COPY_KINDS = {
    "exact": "a byte-identical file",
    "jpeg90": "re-encoded as JPEG quality 90",
    "jpeg75": "re-encoded as JPEG quality 75",
    "jpeg60": "re-encoded as JPEG quality 60",
    "up2-jpeg90": "upscaled 2x (bicubic), saved as JPEG quality 90",
    "up4-jpeg75": "upscaled 4x (bicubic), saved as JPEG quality 75",
    "up2": "upscaled 2x (bicubic), PNG",
    "down24": "downscaled to 6/7 of the size (bilinear), PNG",
    "crop1": "1 px cropped from every side (93% of the width), PNG",
    "crop2": "2 px cropped from every side (86% of the width), PNG",
    "flip": "mirrored left-right, PNG",
}
"""How ``degraded_copy`` can alter an image (names and what they do)."""


def degraded_copy(img: Any, kind: str) -> tuple[Any, str, dict]:
    """A near-duplicate of the PIL image ``img`` (see COPY_KINDS): (image, file suffix,
    save parameters)."""
    from PIL import Image, ImageOps

    w, h = img.size
    if kind not in COPY_KINDS:
        raise DatasetError(f"copy kind {kind!r}: use one of {', '.join(COPY_KINDS)}")
    if kind.startswith("up"):
        f = int(kind[2])
        img = img.resize((f * w, f * h), Image.BICUBIC)
    if kind.startswith("down"):
        img = img.resize((w * 6 // 7, h * 6 // 7), Image.BILINEAR)
    if kind.startswith("crop"):
        c = int(kind[4:])
        img = img.crop((c, c, w - c, h - c))
    if kind == "flip":
        img = ImageOps.mirror(img)
    if "jpeg" in kind:
        return img, ".jpg", {"quality": int(kind.split("jpeg")[1])}
    return img, ".png", {}


def write_planted_fashion_mnist(out: Path, *, splits: dict[str, int], classes: int = 10,
                                duplicates: int = 0, copy_kinds: tuple[str, ...] = (
                                    "exact", "jpeg90", "up2-jpeg90", "up2"),
                                flip_fraction: float = 0.0, foreign: int = 0,
                                source: str = "train", seed: int = 0) -> dict:
    """A ``split/class/`` PNG folder of Fashion-MNIST (the first ``classes`` classes,
    ``splits`` maps split names to per-class counts, disjoint draws from ``source``) with
    known problems planted, for checking an audit:

    - ``duplicates`` images of the first split get a copy (cycling through ``copy_kinds``,
      see ``degraded_copy``) written into the last split, same class: train/test leaks;
    - ``flip_fraction`` of the first split's originals are moved into another class folder;
    - ``foreign`` photos (``FOREIGN_PHOTOS``, needs scikit-image) go into class folders of
      the first split, as 64x64 RGB PNGs.

    Returns the truth (paths relative to ``out``): {"duplicates": [[original, copy, kind]],
    "flipped": [[path, true class, given class]], "foreign": [path]}."""
    from PIL import Image

    out = Path(out)
    names = list(splits)
    rng = np.random.default_rng(seed)
    images, labels = load_fashion_mnist(source)
    keep = labels < classes
    pool = np.flatnonzero(keep)
    idx = balanced_indices(labels[pool], sum(splits.values()), seed)
    by_class: dict[int, list[int]] = {}
    for i in pool[idx]:
        by_class.setdefault(int(labels[i]), []).append(int(i))
    placed: list[tuple[str, int, int]] = []  # (split, class, image index)
    for c, members in sorted(by_class.items()):
        start = 0
        for name, count in splits.items():
            placed += [(name, c, i) for i in members[start:start + count]]
            start += count
    first = [p for p in placed if p[0] == names[0]]
    order = rng.permutation(len(first))
    n_flip = int(round(flip_fraction * len(first)))
    flip_ids = set(order[:n_flip].tolist())
    dup_ids = order[n_flip:n_flip + duplicates].tolist()
    truth: dict = {"duplicates": [], "flipped": [], "foreign": []}
    given: dict[int, int] = {}
    for j in flip_ids:
        c = first[j][1]
        given[j] = int((c + rng.integers(1, classes)) % classes)
    rel_of: dict[int, str] = {}
    for j, (split, c, i) in enumerate(first):
        g = given.get(j, c)
        rel = f"{split}/{FASHION_CLASSES[g]}/{source}_{i:05d}.png"
        rel_of[j] = rel
        if j in given:
            truth["flipped"].append([rel, FASHION_CLASSES[c], FASHION_CLASSES[g]])
    try:
        for j, (split, c, i) in enumerate(first):
            path = out / rel_of[j]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(path)
        for split, c, i in placed:
            if split != names[0]:
                path = out / split / FASHION_CLASSES[c] / f"{source}_{i:05d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i], mode="L").save(path)
        for n, j in enumerate(dup_ids):
            split, c, i = first[j]
            kind = copy_kinds[n % len(copy_kinds)]
            img, suffix, params = degraded_copy(Image.fromarray(images[i], mode="L"), kind)
            rel = f"{names[-1]}/{FASHION_CLASSES[c]}/copy_{kind}_{i:05d}{suffix}"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            if kind == "exact":
                (out / rel).write_bytes((out / rel_of[j]).read_bytes())
            else:
                img.save(out / rel, **params)
            truth["duplicates"].append([rel_of[j], rel, kind])
        if foreign:
            from skimage import data as skdata

            for n in range(foreign):
                name = FOREIGN_PHOTOS[n % len(FOREIGN_PHOTOS)]
                photo = Image.fromarray(np.asarray(getattr(skdata, name)())).convert("RGB")
                c = int(rng.integers(0, classes))
                rel = f"{names[0]}/{FASHION_CLASSES[c]}/foreign_{n:02d}_{name}.png"
                photo.resize((64, 64), Image.BILINEAR).save(out / rel)
                truth["foreign"].append(rel)
    except OSError as e:
        raise DatasetError(f"{out}: cannot write the images there ({e.strerror or e}); "
                           "pass a folder in a writable place") from None
    return truth
