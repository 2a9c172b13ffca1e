"""Deterministic generators of small test image folders (Pillow + numpy only)."""

from __future__ import annotations

import colorsys
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED = (255, 0, 0)
GREEN = (0, 255, 0)


def pattern(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 image: smooth colour gradient plus mild seeded noise."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack(
        [x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(w + h - 2, 1)], -1
    )
    noise = np.random.default_rng(seed).integers(-20, 21, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def exif_rotated_jpeg(stored_size: tuple[int, int] = (60, 40), orientation: int = 6) -> bytes:
    """JPEG bytes with an EXIF orientation tag; a red 10x10 block marks the stored top-left corner."""
    img = Image.new("RGB", stored_size, (0, 0, 200))
    img.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif)


def save(img: Image.Image, path: Path, **params: object) -> None:
    """Save `img` to `path`, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **params)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    """Encode `img` in memory."""
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def bomb_png(size: tuple[int, int] = (20000, 20000)) -> bytes:
    """A valid all-black 1-bit PNG of `size`: a few tens of KB encoded, w*h pixels decoded."""
    w, h = size
    row = b"\x00" * (1 + (w + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_messy_folder(root: Path) -> dict[str, str | None]:
    """Write a class-folder tree (cats/, dogs/) of many image modes and formats plus broken files.

    Returns rel -> None for decodable images, rel -> expected reason keyword for bad files.
    Hidden files and ``__MACOSX`` entries are also written but not returned (discovery skips them).
    """
    rgb = Image.fromarray(pattern((48, 40), seed=1))
    alpha = np.full((40, 48), 255, np.uint8)
    alpha[:, :16] = 0  # fully transparent left strip
    alpha[:, 16:32] = 128  # semi-transparent middle strip
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(alpha))
    gray = rgb.convert("L")
    la = gray.copy()
    la.putalpha(Image.fromarray(alpha))
    palette = rgb.quantize(16)
    gray16 = Image.fromarray((np.asarray(gray, np.uint16) * 257).astype(np.uint16))
    frames = [Image.new("RGB", (32, 32), c) for c in (RED, GREEN)]
    noisy = Image.fromarray(pattern((64, 64), seed=2))
    truncated = encode(noisy, "JPEG", quality=95)

    save(rgb, root / "cats/rgb.jpg", quality=90)
    save(rgba, root / "cats/rgba.png")
    save(gray, root / "cats/gray.png")
    save(la, root / "cats/la.png")
    save(palette, root / "cats/palette.png", transparency=0)
    save(rgb.convert("CMYK"), root / "cats/cmyk.jpg")
    save(rgb, root / "cats/UPPER.JPG")
    save(frames[0], root / "cats/anim.gif", save_all=True, append_images=frames[1:], duration=100)
    save(gray16, root / "cats/nested/deep/gray16.png")
    (root / "dogs").mkdir(parents=True, exist_ok=True)
    (root / "dogs/exif6.jpg").write_bytes(exif_rotated_jpeg())
    save(rgb, root / "dogs/pic.webp", quality=90)
    save(frames[0], root / "dogs/pages.tif", save_all=True, append_images=frames[1:])
    save(rgb, root / "dogs/pic.bmp")
    (root / "dogs/truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    (root / "dogs/empty.png").write_bytes(b"")
    (root / "dogs/fake.jpg").write_text("this is a text file, not a JPEG\n")
    (root / "notes.txt").write_text("collected in 2024\n")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    save(rgb, root / "cats/.hidden.png")
    save(rgb, root / "__MACOSX/cats/._rgb.jpg")

    good = [
        "cats/rgb.jpg", "cats/rgba.png", "cats/gray.png", "cats/la.png", "cats/palette.png",
        "cats/cmyk.jpg", "cats/UPPER.JPG", "cats/anim.gif", "cats/nested/deep/gray16.png",
        "dogs/exif6.jpg", "dogs/pic.webp", "dogs/pages.tif", "dogs/pic.bmp",
    ]  # fmt: skip
    bad = {
        "dogs/truncated.jpg": "truncated",
        "dogs/empty.png": "empty",
        "dogs/fake.jpg": "not an image",
        "notes.txt": "unsupported extension",
    }
    return {**dict.fromkeys(good), **bad}


def make_class_folders(
    root: Path,
    n_per_class: int,
    classes: list[str] | tuple[str, ...],
    size: tuple[int, int] = (32, 32),
    seed: int = 0,
) -> dict[str, str]:
    """Write `n_per_class` PNGs per class to root/<class>/; each class has its own base colour.

    Returns rel -> class name.
    """
    rng = np.random.default_rng(seed)
    written: dict[str, str] = {}
    for k, name in enumerate(classes):
        base = np.array(colorsys.hsv_to_rgb(k / len(classes), 0.8, 0.8)) * 255
        for i in range(n_per_class):
            noise = rng.integers(-40, 41, (size[1], size[0], 3))
            img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
            rel = f"{name}/{name}_{i:03d}.png"
            save(img, root / rel)
            written[rel] = name
    return written
