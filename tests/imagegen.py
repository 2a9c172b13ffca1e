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


def header_only_png(size: tuple[int, int]) -> bytes:
    """A PNG whose header declares `size` but whose pixel data is a few bytes: a decoder that
    trusted the header would allocate w*h bytes before noticing."""
    w, h = size

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _truncate_in(blob: bytes, start: int, end: int, rng: np.random.Generator) -> bytes:
    """`blob` cut at a random offset in [start, end)."""
    return blob[: int(rng.integers(start, end))]


def make_hostile_folder(root: Path, seed: int = 0) -> dict[str, str | None]:
    """Everything :func:`make_messy_folder` writes (modes, formats, broken files) plus the
    hostile cases of a folder nobody curated, in class folders whose names have spaces,
    unicode and bytes that are not UTF-8.

    Returns rel -> None for decodable images, rel -> a keyword of the expected reason for the
    others. Rels are as embedpipe shows them: non-UTF-8 bytes as backslash escapes.
    ``dogs/locked.png`` is a good PNG made unreadable with chmod 000, which does not stop root:
    callers running as root must make its reads fail themselves (see tests/test_data.py).
    """
    import os

    rng = np.random.default_rng(seed)
    expected: dict[str, str | None] = make_messy_folder(root)
    noisy = Image.fromarray(pattern((96, 96), seed=seed + 3))

    # truncated JPEGs (cut inside the entropy-coded scan) and PNGs (cut inside IDAT)
    jpeg = encode(noisy, "JPEG", quality=95)
    sos = jpeg.index(b"\xff\xda")
    png = encode(noisy, "PNG")
    idat = png.index(b"IDAT")
    idat_len = struct.unpack(">I", png[idat - 4: idat])[0]
    for i in range(3):
        rel = f"big cats/cut_{i}.jpg"
        (root / "big cats").mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_truncate_in(jpeg, sos + 16, len(jpeg) - 16, rng))
        expected[rel] = "truncated or corrupt"
        rel = f"big cats/cut_{i}.png"
        (root / rel).write_bytes(_truncate_in(png, idat + 8, idat + 4 + idat_len - 8, rng))
        expected[rel] = "truncated or corrupt"
    # random bytes with image extensions, and a zero-byte file
    for ext in ("jpg", "png", "gif", "webp", "tiff"):
        rel = f"big cats/noise.{ext}"
        (root / rel).write_bytes(rng.bytes(int(rng.integers(16, 4096))))
        expected[rel] = "not an image"
    (root / "big cats/zero.jpg").write_bytes(b"")
    expected["big cats/zero.jpg"] = "empty file"
    save(noisy, root / "big cats/fine.png")
    expected["big cats/fine.png"] = None

    # decompression bombs: a header declaring 60000x60000, and a real 20000x20000 1-bit PNG
    # (about 50 KB on disk; decoded 400 MB, and 1.2 GB more as RGB)
    uni = "chats été 猫"
    (root / uni).mkdir(parents=True, exist_ok=True)
    (root / uni / "declared_60000.png").write_bytes(header_only_png((60000, 60000)))
    expected[f"{uni}/declared_60000.png"] = "decompression bomb"
    (root / uni / "bomb_20000.png").write_bytes(bomb_png((20000, 20000)))
    expected[f"{uni}/bomb_20000.png"] = "decompression bomb"
    # every EXIF orientation, a 16-bit RGBA PNG, a palette PNG with a transparent colour
    for o in range(1, 9):
        (root / uni / f"exif_{o}.jpg").write_bytes(exif_rotated_jpeg((60, 40), o))
        expected[f"{uni}/exif_{o}.jpg"] = None
    pal = noisy.quantize(8)
    save(pal, root / uni / "palette_alpha.png", transparency=3)
    expected[f"{uni}/palette_alpha.png"] = None
    frames = [Image.new("RGB", (40, 30), c) for c in (RED, GREEN, (0, 0, 255))]
    save(frames[0], root / uni / "anim.gif", save_all=True, append_images=frames[1:], duration=50,
         loop=0)
    expected[f"{uni}/anim.gif"] = None
    save(frames[0], root / uni / "pages.tiff", save_all=True, append_images=frames[1:])
    expected[f"{uni}/pages.tiff"] = None

    # files that are not regular files or cannot be opened
    dogs = root / "dogs"
    save(noisy, dogs / "locked.png")
    os.chmod(dogs / "locked.png", 0)
    expected["dogs/locked.png"] = "Permission denied"
    (dogs / "self_loop.jpg").symlink_to("self_loop.jpg")
    expected["dogs/self_loop.jpg"] = "Too many levels of symbolic links"
    (dogs / "loop").symlink_to("..", target_is_directory=True)
    expected["dogs/loop"] = "loops back"
    os.mkfifo(dogs / "pipe.jpg")
    expected["dogs/pipe.jpg"] = "named pipe"
    (dogs / "zeros.png").symlink_to("/dev/zero")
    expected["dogs/zeros.png"] = "a device"

    # names that are not UTF-8: a file and a whole class folder
    bdogs = os.fsencode(dogs)
    with open(bdogs + b"/caf\xe9.png", "wb") as f:
        f.write(encode(noisy, "PNG"))
    expected["dogs/caf\\xe9.png"] = None
    bclass = os.fsencode(root) + b"/caf\xe9s"
    os.mkdir(bclass)
    with open(bclass + b"/x.png", "wb") as f:
        f.write(encode(noisy.rotate(90), "PNG"))
    expected["caf\\xe9s/x.png"] = None
    return expected


def strip_png(size: tuple[int, int]) -> bytes:
    """A 1-pixel-thin (or thin) RGB PNG of `size` holding a gradient along its long side: a
    few hundred bytes on disk for 65000 pixels, an aspect-ratio bomb for a resize that scales
    the short side up to the model's size."""
    w, h = size
    n = max(w, h)
    ramp = (np.arange(n) * 255 // max(n - 1, 1)).astype(np.uint8)
    a = np.stack([ramp, 255 - ramp, np.full(n, 64, np.uint8)], -1)
    a = a[None, :, :] if w >= h else a[:, None, :]
    a = np.broadcast_to(a, (h, w, 3))
    return encode(Image.fromarray(np.ascontiguousarray(a)), "PNG", optimize=True)


def centre_crop_16(blob: bytes) -> bytes:
    """The documented handling of an elongated image, computed here independently of
    embedpipe: the longer side centre-cropped to 16 x the shorter (offset (long - 16 *
    short) // 2), as PNG."""
    img = Image.open(io.BytesIO(blob)).convert("RGB")
    a = np.asarray(img)
    h, w = a.shape[:2]
    if w > 16 * h:
        a = a[:, (w - 16 * h) // 2:(w - 16 * h) // 2 + 16 * h]
    elif h > 16 * w:
        a = a[(h - 16 * w) // 2:(h - 16 * w) // 2 + 16 * w]
    return encode(Image.fromarray(np.ascontiguousarray(a)), "PNG")


def make_aspect_bombs(root: Path, n: int) -> dict[str, str]:
    """Write ``wide.png`` (n x 1) and ``tall.png`` (1 x n) under root, and beside each its
    documented 16:1 centre crop (``wide_crop.png``, ``tall_crop.png``); returns bomb → crop."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, size in (("wide", (n, 1)), ("tall", (1, n))):
        blob = strip_png(size)
        (root / f"{name}.png").write_bytes(blob)
        (root / f"{name}_crop.png").write_bytes(centre_crop_16(blob))
        out[f"{name}.png"] = f"{name}_crop.png"
    return out
