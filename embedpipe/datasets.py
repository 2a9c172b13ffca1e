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
