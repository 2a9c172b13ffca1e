"""Image discovery (folder layouts, CSV manifests) and robust decoding to RGB.

Depends only on numpy and Pillow (no torch), so it can run in light worker processes.

Importing this module sets ``PIL.Image.MAX_IMAGE_PIXELS = None`` process-wide: Pillow's own
decompression-bomb check would warn (or raise before the size is even known), so
:func:`decode_image` enforces its own per-call ``max_pixels`` limit from the header instead.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import posixpath
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import UserError

Image.MAX_IMAGE_PIXELS = None  # we enforce max_pixels ourselves, see decode_image

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default bomb limit
# Longest side / shortest side an image keeps before any resize (limit_aspect). 16:1 leaves
# every photo and panorama as it is; a 1x65000 strip would otherwise be resized to 256 x
# 16.6 million pixels (12 GB) on its way to a 224 x 224 model input.
MAX_ASPECT = 16
LAYOUTS = ("auto", "class-folders", "split-folders", "manifest", "unlabeled")

_HIGH_BIT_GRAY = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})


class DataError(UserError):
    """Bad input the user must fix; the message is one line naming the file/folder and the fix."""


class DecodeError(Exception):
    """One image cannot be read or decoded; the message is a short human-readable reason."""


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One discovered image."""

    path: Path  # absolute path on disk
    rel: str  # POSIX path relative to the data root (manifest: as written, normalised)
    label: str | None  # class name, None when unlabeled
    split: str | None  # 'train' / 'val' / 'test' / manifest split name, None when no split


@dataclass
class Discovery:
    """Result of :func:`discover`."""

    root: Path  # data root (for a manifest: the CSV's folder)
    layout: str  # 'class-folders' | 'split-folders' | 'manifest' | 'unlabeled'
    items: list[ImageRef]  # sorted by rel
    class_names: list[str]  # sorted unique labels
    ignored: list[tuple[str, str]]  # sorted (rel, reason) of files skipped during discovery
    notes: list[str] = field(default_factory=list)  # what the user should know (one line each)


# ---------------------------------------------------------------------------------------
# discovery


def discover(source: str | Path, layout: str = "auto") -> Discovery:
    """Find the images under a folder (class/split/unlabeled layout) or listed in a CSV manifest.

    `layout` is one of LAYOUTS; raises DataError for input the user must fix.
    """
    source = Path(os.path.abspath(source))
    if layout not in LAYOUTS:
        raise DataError(f"{source}: unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if not source.exists():
        raise DataError(f"{source}: no such file or folder; pass an image folder or a .csv manifest")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(
                f"{source} is a file, not a folder; pass an image folder or a .csv manifest"
            )
        if layout not in ("auto", "manifest"):
            raise DataError(f"{source}: a .csv manifest needs --layout manifest (or auto), not {layout}")
        return _discover_manifest(source)
    if layout == "manifest":
        raise DataError(f"{source}: --layout manifest needs a .csv file, not a folder")
    return _discover_folder(source, layout)


def _control_char(text: str) -> str | None:
    """The first control character (C0 or DEL) of ``text``, or None."""
    return next((c for c in text if ord(c) < 32 or ord(c) == 127), None)


def _refuse_control_chars(root: Path, rels: Iterable[str]) -> None:
    """DataError naming the first folder or file under ``root`` whose name holds a control
    character (a newline, a tab, ...): as a class name it would break every table and log
    line, and HDF5 cuts a string at a NUL; a manifest's labels and paths are refused alike."""
    for rel in sorted(rels):
        parts = rel.split("/")
        for k, part in enumerate(parts):
            bad = _control_char(part)
            if bad is not None:
                what = "file" if k == len(parts) - 1 else "folder"
                where = "/".join(parts[:k + 1])
                raise DataError(f"{root}: the {what} name {where!r} holds the control character "
                                f"{bad!r}; rename the {what} (no class, split or file name may "
                                "hold one)")


def _space_notes(items: list[ImageRef]) -> list[str]:
    """A note per class or split folder whose name starts or ends with spaces: the name is
    kept as it is (a folder of that name exists, and renaming classes silently would hide
    them), but 'coat ' and 'coat' are then two classes that look alike in every table."""
    names = sorted({n for r in items for n in (r.label, r.split) if n and n != n.strip()})
    return [f"note: the folder name {n!r} starts or ends with spaces, kept in the class/split "
            f"name (a manifest's labels are stripped); rename the folder if they are a mistake"
            for n in names]


def _discover_folder(root: Path, layout: str) -> Discovery:
    files, ignored = _scan(root)
    _refuse_control_chars(root, [rel for rel, _ in files] + [rel for rel, _ in ignored])
    images: list[tuple[str, str]] = []
    for rel, path in files:
        ext = os.path.splitext(rel)[1].lower()
        if ext in IMAGE_EXTENSIONS:
            images.append((rel, path))
        else:
            ignored.append((rel, f"unsupported extension {ext}" if ext else "no file extension"))
    if not images:
        raise DataError(
            f"{root}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "point to a folder of images or a .csv manifest"
        )
    if layout == "auto":
        layout = _detect_layout(rel for rel, _ in images)
    items: list[ImageRef] = []
    layout_skipped: list[tuple[str, str]] = []
    for rel, path in images:
        label, split, reason = _label_split(rel, layout)
        if reason is None:
            items.append(ImageRef(Path(path), rel, label, split))
        else:
            layout_skipped.append((rel, reason))
    if not items:
        rel, reason = min(layout_skipped)
        raise DataError(
            f"{root}: no images usable as {layout} layout ({len(layout_skipped)} skipped, "
            f"e.g. {rel}: {reason}); pick another --layout"
        )
    disc = _discovery(root, layout, items, ignored + layout_skipped)
    disc.notes += _space_notes(items)
    return disc


def _scan(root: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """List (rel, path) of every non-hidden non-folder entry below root, following symlinks.

    Only folders are stat-ed (for symlink-loop detection); unreadable folders and loops are
    returned as (rel, reason) in the second list.
    """
    files: list[tuple[str, str]] = []
    ignored: list[tuple[str, str]] = []
    stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [("", str(root), frozenset())]
    while stack:
        rel_dir, dir_path, ancestors = stack.pop()
        try:
            st = os.stat(dir_path)
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                ignored.append((rel_dir, "symlinked folder loops back to a parent folder"))
                continue
            with os.scandir(dir_path) as it:
                entries = list(it)
        except OSError as e:
            if not rel_dir:
                raise DataError(f"{root}: cannot read folder ({e.strerror}); check permissions") from e
            ignored.append((rel_dir, f"unreadable folder: {e.strerror}"))
            continue
        ancestors = ancestors | {key}
        for entry in entries:
            name = display_name(entry.name)
            if name.startswith(".") or name == "__MACOSX":
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False  # reported as unreadable when read
            if is_dir:
                stack.append((rel, entry.path, ancestors))
            else:
                files.append((rel, entry.path))
    return files, ignored


def display_name(name: str) -> str:
    """A file name (or path) as valid UTF-8 text, one to one: each byte that is not UTF-8
    (which Python keeps as a lone surrogate, U+DC80..U+DCFF) is written ``\\xHH`` and a
    literal backslash is doubled, so ``caf`` + byte 0xE9 + ``.jpg`` is ``caf\\xe9.jpg`` while a
    file literally named ``caf\\xe9.jpg`` is ``caf\\\\xe9.jpg``. No two names give the same
    text, and :func:`fs_name` gives the name back. Stores, class names, CSVs and messages use
    this form; the file itself is opened by its real name.

    Stores written before this rule kept a literal backslash single: such a
    file is extracted again under its doubled path and the old row is reported as vanished
    (``extract --prune`` removes it).
    """
    if "\\" not in name:
        try:
            name.encode("utf-8")
            return name
        except UnicodeEncodeError:
            pass
    out = []
    for ch in name:
        if ch == "\\":
            out.append("\\\\")
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch)  # other lone surrogates cannot come from os.fsdecode on UTF-8
    return "".join(out)


def fs_name(text: str) -> str:
    """The inverse of :func:`display_name`: stored text → the name to open (a str with lone
    surrogates for bytes that are not UTF-8, as ``os`` functions take). A backslash not
    followed by a backslash or by ``x`` and two hex digits of a byte >= 0x80 is kept as it is
    (the text of a store written before display_name doubled backslashes)."""
    if "\\" not in text:
        return text
    out, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] == "\\":
            out.append("\\")
            i += 2
            continue
        if ch == "\\" and text[i + 1:i + 2] == "x":
            hex2 = text[i + 2:i + 4]
            try:
                byte = int(hex2, 16) if len(hex2) == 2 else -1
            except ValueError:
                byte = -1
            if byte >= 0x80:
                out.append(chr(0xDC00 + byte))
                i += 4
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def _detect_layout(rels: Iterable[str]) -> str:
    """'split-folders' if some split folder holds class folders, else 'class-folders' if any
    image sits in a subfolder, else 'unlabeled'."""
    nested = False
    for rel in rels:
        parts = rel.split("/", 2)
        if len(parts) == 3 and parts[0].lower() in SPLIT_ALIASES:
            return "split-folders"
        nested = nested or len(parts) > 1
    return "class-folders" if nested else "unlabeled"


def _label_split(rel: str, layout: str) -> tuple[str | None, str | None, str | None]:
    """(label, split, reason to ignore or None) of the image at `rel` under a folder layout."""
    if layout == "unlabeled":
        return None, None, None
    parts = rel.split("/", 2)
    if layout == "class-folders":
        if len(parts) == 1:
            return None, None, "image outside any class folder (use --layout unlabeled to include it)"
        return parts[0], None, None
    if len(parts) == 1:
        return None, None, "image outside any split folder (expected <split>/<class>/...)"
    split = SPLIT_ALIASES.get(parts[0].lower())
    if split is None:
        return None, None, (
            f"folder {parts[0]}/ is not a split folder (train/val/test); "
            "use --layout class-folders to treat top folders as classes"
        )
    if len(parts) == 2:
        return None, None, f"image directly under split folder {parts[0]}/, outside any class folder"
    return parts[1], split, None


def _discover_manifest(csv_path: Path) -> Discovery:
    root = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read CSV ({e}); save it as UTF-8 CSV") from e
    columns = {name.strip().lower(): i for i, name in enumerate(header or [])}
    if "path" not in columns:
        raise DataError(
            f"{csv_path}: no 'path' column; the first row must be a header like path,label[,split]"
        )

    def cell(row: list[str], column: str) -> str:
        i = columns.get(column)
        text = row[i].strip() if i is not None and i < len(row) else ""
        bad = _control_char(text)
        if bad is not None:
            # HDF5 strings end at a NUL (a label would be stored blank, for good), and no
            # path, class or split name holds control characters: refuse before any work
            raise DataError(f"{csv_path}: row {row_no}: the {column} {text!r} holds the control "
                            f"character {bad!r}; remove it from the manifest")
        return text

    items: list[ImageRef] = []
    seen: dict[str, int] = {}
    missing: list[str] = []
    for row_no, row in enumerate(rows, start=2):  # spreadsheet row numbers (header = 1)
        if not any(c.strip() for c in row):
            continue  # blank line
        written = cell(row, "path").replace("\\", "/")
        if not written:
            raise DataError(f"{csv_path}: row {row_no} has an empty path; fill it in or delete the row")
        rel = posixpath.normpath(written)
        if rel in seen:
            raise DataError(
                f"{csv_path}: duplicate path {rel} (rows {seen[rel]} and {row_no}); list each image once"
            )
        seen[rel] = row_no
        path = Path(rel) if posixpath.isabs(rel) else root / rel
        if not os.path.lexists(path):
            missing.append(rel)
        split = cell(row, "split")
        split = SPLIT_ALIASES.get(split.lower(), split)
        items.append(ImageRef(path, rel, cell(row, "label") or None, split or None))
    if missing:
        raise DataError(
            f"{csv_path}: {len(missing)} listed file(s) not found, e.g. {', '.join(missing[:3])} "
            f"(relative paths are resolved against {root}); fix or remove those rows"
        )
    if not items:
        raise DataError(f"{csv_path}: the manifest lists no images; add rows below the header")
    return _discovery(root, "manifest", items, [])


def _discovery(
    root: Path, layout: str, items: list[ImageRef], ignored: list[tuple[str, str]]
) -> Discovery:
    items.sort(key=lambda r: r.rel)
    labels = {r.label for r in items if r.label is not None}
    return Discovery(root, layout, items, sorted(labels), sorted(ignored))


# ---------------------------------------------------------------------------------------
# reading and decoding


def content_hash(data: bytes) -> str:
    """SHA-256 hex digest of the file bytes."""
    return hashlib.sha256(data).hexdigest()


def file_stat(path: str | Path) -> tuple[int, int] | None:
    """(mtime_ns, size) of the file a run reads, the key of its record in a store; None when
    nothing is there. A symlink whose target cannot be stat-ed (dangling, a loop) is keyed by
    the link itself (lstat), so its failure is recorded like any other and not retried until
    the link or its target changes."""
    try:
        st = os.stat(path)
    except OSError:
        try:
            st = os.lstat(path)
        except OSError:
            return None
    return st.st_mtime_ns, st.st_size


def read_file(path: Path) -> bytes:
    """Read a whole regular file; OS errors become DecodeError('unreadable: <reason>').

    The file is opened without blocking and must be a regular file: a named pipe or a device
    with an image extension (or a symlink to one) would otherwise block forever or never end.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DecodeError(f"unreadable: {e.strerror or e}") from e
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise DecodeError("unreadable: Is a directory")
        if not stat.S_ISREG(mode):
            kind = ("a named pipe" if stat.S_ISFIFO(mode) else
                    "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
            raise DecodeError(f"unreadable: {kind}, not a regular file")
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise DecodeError(f"unreadable: {e.strerror or e}") from e
    finally:
        os.close(fd)


def decode_image(
    data: bytes,
    *,
    min_size: tuple[int, int] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode image bytes to a fully loaded RGB image (first frame, EXIF orientation applied).

    `min_size` (w, h) lets JPEGs decode at 1/2, 1/4 or 1/8 scale while staying >= that size
    (after orientation). Images whose header declares more than `max_pixels` pixels are
    rejected before any pixel is decoded (None disables the limit).
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError("not an image (cannot identify format)") from None
    except Exception as e:  # plugins raise assorted errors on corrupt headers
        raise DecodeError(_corrupt_reason(e)) from e
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise DecodeError(bomb_reason(w, h, max_pixels))
    try:
        if min_size is not None and img.format == "JPEG":
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            mw, mh = min_size
            img.draft("RGB", (mh, mw) if orientation in _ROTATED_ORIENTATIONS else (mw, mh))
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img))
    except Exception as e:  # truncated data, broken streams, bad EXIF ...
        raise DecodeError(_corrupt_reason(e)) from e


def limit_aspect(img: Image.Image, max_aspect: int = MAX_ASPECT) -> Image.Image:
    """Centre-crop the longer side of an image to at most ``max_aspect`` times its shorter side
    (left = (width - new width) // 2, same for top); images within the limit are returned as
    they are (the same object).

    Every decode+resize path calls this before its first resize (backbones.make_transform,
    hence extract, serve, predict from images and finetune; export.preprocess): a resize that
    scales the shorter side to the model's size S then makes at most S x (max_aspect * S)
    pixels, whatever the geometry (a 1 x 65000 PNG: 16 x 1 before the resize). With a
    centre-crop preprocessing the model sees the central crop_pct * short side anyway, so
    the crop changes no pixel it would have seen (up to the rounding of the crop offset).
    """
    w, h = img.size
    if w > h * max_aspect:
        nw = h * max_aspect
        left = (w - nw) // 2
        return img.crop((left, 0, left + nw, h))
    if h > w * max_aspect:
        nh = w * max_aspect
        top = (h - nh) // 2
        return img.crop((0, top, w, top + nh))
    return img


def check_max_pixels(max_pixels: int | None, error: type[Exception]) -> None:
    """Raise ``error`` (one line with the fix) for a --max-pixels below 1; None (no limit)
    passes. The one check of extract and finetune."""
    if max_pixels is not None and max_pixels < 1:
        raise error(f"--max-pixels {max_pixels}: pass a positive number of pixels (default "
                    f"{DEFAULT_MAX_PIXELS})")


def bomb_reason(w: int, h: int, max_pixels: int) -> str:
    """The failure reason of an image of w x h pixels above ``max_pixels``. It records the
    limit it failed under, so a later run can tell whether its own limit lets the image
    through (:func:`passes_max_pixels`)."""
    return f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels} (raise --max-pixels)"


_BOMB_REASON = re.compile(r"decompression bomb: (\d+)x(\d+) = \d+ pixels > limit (\d+)")


def passes_max_pixels(reason: str, max_pixels: int | None) -> tuple[bool, str] | None:
    """For a failure ``reason`` recorded earlier: None when it does not depend on the pixel
    limit; else (whether an image of that size passes ``max_pixels`` now, the reason as this
    limit would word it)."""
    m = _BOMB_REASON.match(reason)
    if m is None:
        return None
    w, h, _ = map(int, m.groups())
    if max_pixels is None or w * h <= max_pixels:
        return True, reason
    return False, bomb_reason(w, h, max_pixels)


def load_image(
    path: str | Path,
    *,
    min_size: tuple[int, int] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """read_file + decode_image."""
    return decode_image(read_file(Path(path)), min_size=min_size, max_pixels=max_pixels)


def _corrupt_reason(e: Exception) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return f"truncated or corrupt image data: {msg}"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: alpha composited on white, high-bit gray scaled to 8 bit.

    Mode "I" is assumed to hold 16-bit-range data (as 16-bit PNG/TIFF often decode); "F" is
    taken as 0..255 unless its maximum is <= 1.0.
    """
    if img.mode in _HIGH_BIT_GRAY:
        a = np.asarray(img).astype(np.float64)
        return _gray8(np.clip(a, 0, 65535) / 257)  # 16-bit range: 65535 -> 255
    if img.mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.max() <= 1.0:
            a = a * 255
        return _gray8(np.clip(a, 0, 255))
    if img.has_transparency_data:
        rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")  # no La->RGBA in Pillow
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _gray8(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(a).astype(np.uint8)).convert("RGB")
