"""Tests for embedpipe.data: discovery layouts, manifests, reading and decoding."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from clitools import cli, ok
from imagegen import (
    GREEN,
    RED,
    bomb_png,
    encode,
    exif_rotated_jpeg,
    header_only_png,
    make_class_folders,
    make_hostile_folder,
    make_messy_folder,
    pattern,
    save,
    strip_png,
)
from PIL import Image

from embedpipe import data
from embedpipe import data as data_mod
from embedpipe.data import (
    DataError,
    DecodeError,
    content_hash,
    decode_image,
    discover,
    load_image,
    read_file,
)
from embedpipe.store import open_store

WHITE = (255, 255, 255)


def touch_png(path: Path, color: tuple[int, int, int] = RED) -> None:
    save(Image.new("RGB", (4, 4), color), path)


def assert_one_line_error(exc: pytest.ExceptionInfo[DataError], *needles: object) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    for needle in needles:
        assert str(needle) in msg, msg


def pixels(img: Image.Image) -> list[tuple[int, ...]]:
    return [tuple(p) for p in np.asarray(img).reshape(-1, 3).tolist()]


def close(pixel: tuple[int, ...], expected: tuple[int, ...], tol: int = 6) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    root = tmp_path_factory.mktemp("messy")
    return root, make_messy_folder(root)


# ---------------------------------------------------------------------------------------
# discovery: folder layouts


def test_class_folders_with_nested_subfolders(messy: tuple[Path, dict[str, str | None]]) -> None:
    root, expected = messy
    d = discover(root)
    assert d.layout == "class-folders"
    assert d.root == root
    assert d.class_names == ["cats", "dogs"]
    images = sorted(rel for rel, why in expected.items() if why != "unsupported extension")
    assert [r.rel for r in d.items] == images  # sorted; hidden files and __MACOSX skipped
    for r in d.items:
        assert r.label == r.rel.split("/")[0] and r.split is None
        assert r.path == root / r.rel and r.path.is_absolute()
    assert d.ignored == [("notes.txt", "unsupported extension .txt")]
    assert discover(str(root)) == d  # deterministic, accepts str


def test_messy_files_decode_or_fail_with_reason(messy: tuple[Path, dict[str, str | None]]) -> None:
    root, expected = messy
    for r in discover(root).items:
        if expected[r.rel] is None:
            img = load_image(r.path)
            assert img.mode == "RGB" and min(img.size) > 0, r.rel
        else:
            with pytest.raises(DecodeError, match=expected[r.rel]):
                load_image(r.path)


def test_loose_root_images_are_reported_not_dropped(tmp_path: Path) -> None:
    touch_png(tmp_path / "cats/a.png")
    touch_png(tmp_path / "loose.png")
    (tmp_path / "README").write_text("x")
    d = discover(tmp_path)
    assert d.layout == "class-folders"
    assert [r.rel for r in d.items] == ["cats/a.png"]
    assert d.ignored == [
        ("README", "no file extension"),
        ("loose.png", "image outside any class folder (use --layout unlabeled to include it)"),
    ]


def test_unlabeled_auto_and_forced(tmp_path: Path, messy: tuple[Path, dict[str, str | None]]) -> None:
    touch_png(tmp_path / "b.PNG")
    touch_png(tmp_path / "a.png")
    (tmp_path / "empty_sub").mkdir()
    d = discover(tmp_path)
    assert d.layout == "unlabeled" and d.class_names == []
    assert [(r.rel, r.label, r.split) for r in d.items] == [("a.png", None, None), ("b.PNG", None, None)]

    root, expected = messy
    forced = discover(root, layout="unlabeled")
    assert forced.layout == "unlabeled" and forced.class_names == []
    assert len(forced.items) == len(expected) - 1  # everything but notes.txt, recursively
    assert all(r.label is None for r in forced.items)


def make_split_tree(root: Path) -> None:
    for rel in ["train/cats/a.png", "train/dogs/b.png", "valid/cats/c.png", "Test/dogs/deep/d.png",
                "train/stray.png", "extra/cats/e.png", "top.png"]:  # fmt: skip
        touch_png(root / rel)


def test_split_folders(tmp_path: Path) -> None:
    make_split_tree(tmp_path)
    d = discover(tmp_path)
    assert d.layout == "split-folders"
    assert [(r.rel, r.label, r.split) for r in d.items] == [
        ("Test/dogs/deep/d.png", "dogs", "test"),
        ("train/cats/a.png", "cats", "train"),
        ("train/dogs/b.png", "dogs", "train"),
        ("valid/cats/c.png", "cats", "val"),
    ]
    assert d.class_names == ["cats", "dogs"]
    reasons = dict(d.ignored)
    assert [rel for rel, _ in d.ignored] == ["extra/cats/e.png", "top.png", "train/stray.png"]
    assert "not a split folder" in reasons["extra/cats/e.png"]
    assert "outside any split folder" in reasons["top.png"]
    assert "directly under split folder train/" in reasons["train/stray.png"]


def test_forced_class_folders_on_split_tree(tmp_path: Path) -> None:
    make_split_tree(tmp_path)
    d = discover(tmp_path, layout="class-folders")
    assert d.class_names == ["Test", "extra", "train", "valid"]
    assert [rel for rel, _ in d.ignored] == ["top.png"]


def test_split_names_without_class_subfolders_are_classes(tmp_path: Path) -> None:
    touch_png(tmp_path / "train/a.png")
    touch_png(tmp_path / "val/b.png")
    d = discover(tmp_path)
    assert d.layout == "class-folders" and d.class_names == ["train", "val"]


def test_forced_layout_without_matching_images(tmp_path: Path) -> None:
    touch_png(tmp_path / "a.png")
    with pytest.raises(DataError) as exc:
        discover(tmp_path, layout="split-folders")
    assert_one_line_error(exc, tmp_path, "a.png", "--layout")


def test_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    touch_png(outside / "ext.png")
    root = tmp_path / "data"
    touch_png(root / "cats/a.png")
    (root / "cats/link.png").symlink_to(outside / "ext.png")
    (root / "cats/gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (root / "dogs").symlink_to(outside, target_is_directory=True)
    (root / "cats/loop").symlink_to(root, target_is_directory=True)
    d = discover(root)
    assert [(r.rel, r.label) for r in d.items] == [
        ("cats/a.png", "cats"),
        ("cats/gone.jpg", "cats"),
        ("cats/link.png", "cats"),
        ("dogs/ext.png", "dogs"),
    ]
    assert d.ignored == [("cats/loop", "symlinked folder loops back to a parent folder")]
    assert load_image(d.items[2].path).getpixel((0, 0)) == RED
    with pytest.raises(DecodeError, match=r"^unreadable: No such file"):
        load_image(d.items[1].path)


def test_unreadable_subfolder_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch_png(tmp_path / "cats/a.png")
    touch_png(tmp_path / "locked/b.png")
    real_scandir = os.scandir

    def scandir(path: str) -> object:
        if path.endswith("locked"):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    d = discover(tmp_path)
    assert [r.rel for r in d.items] == ["cats/a.png"]
    assert d.ignored == [("locked", "unreadable folder: Permission denied")]


def test_make_class_folders_is_deterministic(tmp_path: Path) -> None:
    written = make_class_folders(tmp_path / "a", 3, ["x", "y"], size=(8, 8), seed=1)
    make_class_folders(tmp_path / "b", 3, ["x", "y"], size=(8, 8), seed=1)
    d = discover(tmp_path / "a")
    assert {r.rel: r.label for r in d.items} == written and len(written) == 6
    for rel in written:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


# ---------------------------------------------------------------------------------------
# discovery: manifests


def test_manifest(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere/abs.png"
    touch_png(elsewhere)
    root = tmp_path / "ds"
    for rel in ["cats/a, b.png", "dogs/c.png", "dogs/d.png", "e.png"]:
        touch_png(root / rel)
    csv_path = root / "list.csv"
    csv_path.write_text(
        "Path,label,split,extra\n"
        '"cats/a, b.png",cat,train,x\n'
        "./dogs/c.png,dog,valid,y\n"
        "dogs\\d.png,dog,holdout\n"
        f"{elsewhere},cat,,\n"
        "\n"
        "e.png,,\n",
        encoding="utf-8",
    )
    d = discover(csv_path)
    assert d.layout == "manifest" and d.root == root and d.ignored == []
    assert d.class_names == ["cat", "dog"]
    assert [(r.rel, r.path, r.label, r.split) for r in d.items] == sorted([
        ("cats/a, b.png", root / "cats/a, b.png", "cat", "train"),
        ("dogs/c.png", root / "dogs/c.png", "dog", "val"),
        ("dogs/d.png", root / "dogs/d.png", "dog", "holdout"),
        (str(elsewhere), elsewhere, "cat", None),
        ("e.png", root / "e.png", None, None),
    ])  # fmt: skip
    assert discover(csv_path, layout="manifest") == d


@pytest.mark.parametrize("column, value", [("label", "ba\0g"), ("label", "a\tb"),
                                           ("split", "tr\0ain"), ("path", "a\0.png")])
def test_manifest_cells_with_control_characters_are_refused_naming_the_row(
        tmp_path: Path, column: str, value: str) -> None:
    """A NUL in a label used to be stored as a blank class name, for good, after the model had
    loaded; every cell with a control character is refused by discovery, before any work."""
    touch_png(tmp_path / "a.png")
    row = {"path": "a.png", "label": "bag", "split": "train", column: value}
    (tmp_path / "m.csv").write_text("path,label,split\n" + ",".join(
        row[k] for k in ("path", "label", "split")) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        discover(tmp_path / "m.csv")
    assert "row 2" in str(e.value) and f"the {column}" in str(e.value)


def test_the_store_never_keeps_a_blank_or_nul_class_name(tmp_path: Path) -> None:
    from embedpipe.store import StoreError, StoreWriter

    ident = {"model": "m", "weights_source": "random", "weights_sha256": "0" * 64,
             "data_config": "{}", "pool": "avg", "precision": "fp32", "dtype": "float32",
             "feature_dim": 4}
    for name in ("", "ba\0g"):
        with StoreWriter.open(tmp_path / "s.h5", ident, versions={}) as w:
            with pytest.raises(StoreError, match="empty or holds a NUL"):
                w.class_ids([name, "coat"])
            assert w.classes == []


def test_manifest_path_column_only(tmp_path: Path) -> None:
    touch_png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path\na.png\n")
    d = discover(tmp_path / "m.csv")
    assert [(r.rel, r.label, r.split) for r in d.items] == [("a.png", None, None)]
    assert d.class_names == []


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("file,label\na.png,x\n", ["no 'path' column", "header"]),
        ("", ["no 'path' column"]),
        ("path,label\n", ["lists no images"]),
        ("path\na.png\n./a.png\n", ["duplicate path a.png", "rows 2 and 3"]),
        ("path,label\na.png,x\n,y\n", ["row 3 has an empty path"]),
        (
            "path\na.png\nm1.png\nm2.png\nm3.png\nm4.png\nm5.png\n",
            ["5 listed file(s) not found", "e.g. m1.png, m2.png, m3.png ("],
        ),
        (b"path\n\xff\xfe.png\n", ["cannot read CSV", "UTF-8"]),
    ],
)  # fmt: skip
def test_manifest_errors(tmp_path: Path, content: str | bytes, needles: list[str]) -> None:
    touch_png(tmp_path / "a.png")
    csv_path = tmp_path / "m.csv"
    if isinstance(content, bytes):
        csv_path.write_bytes(content)
    else:
        csv_path.write_text(content)
    with pytest.raises(DataError) as exc:
        discover(csv_path)
    assert_one_line_error(exc, csv_path, *needles)
    assert "m4.png" not in str(exc.value)


# ---------------------------------------------------------------------------------------
# discovery: bad sources


def test_discover_errors(tmp_path: Path) -> None:
    cases: list[tuple[Path, str, list[str]]] = []
    cases.append((tmp_path / "nope", "auto", ["no such file or folder"]))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "auto", ["no images found"]))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts/a.txt").write_text("x")
    touch_png(tmp_path / "texts/.hidden.png")
    cases.append((tmp_path / "texts", "auto", ["no images found"]))
    cases.append((tmp_path / "texts", "sideways", ["unknown layout 'sideways'", "class-folders"]))
    cases.append((tmp_path / "texts", "manifest", ["needs a .csv file"]))
    cases.append((tmp_path / "texts/a.txt", "auto", ["not a folder"]))
    (tmp_path / "m.csv").write_text("path\n")
    cases.append((tmp_path / "m.csv", "class-folders", ["--layout manifest"]))
    for source, layout, needles in cases:
        with pytest.raises(DataError) as exc:
            discover(source, layout=layout)
        assert_one_line_error(exc, source, *needles)


# ---------------------------------------------------------------------------------------
# reading and hashing


def test_read_file_errors(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").mkdir()
    with pytest.raises(DecodeError, match=r"^unreadable: Is a directory$"):
        read_file(tmp_path / "x.jpg")
    with pytest.raises(DecodeError, match=r"^unreadable: No such file or directory$"):
        read_file(tmp_path / "missing.jpg")


def test_content_hash() -> None:
    payload = b"\x89PNG fake bytes"
    assert content_hash(payload) == hashlib.sha256(payload).hexdigest()


def test_import_does_not_pull_torch() -> None:
    code = "import embedpipe.data, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ---------------------------------------------------------------------------------------
# decoding


def test_rgba_composited_on_white() -> None:
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 0, 0))
    img.putpixel((2, 0), (0, 0, 0, 128))
    out = decode_image(encode(img, "PNG"))
    assert out.mode == "RGB"
    assert [out.getpixel((x, 0)) for x in range(3)] == [RED, WHITE, (127, 127, 127)]


def test_la_and_palette_transparency_on_white() -> None:
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (10, 255))
    assert pixels(decode_image(encode(la, "PNG"))) == [WHITE, (10, 10, 10)]

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    out = decode_image(encode(pal, "PNG", transparency=0))
    assert pixels(out) == [WHITE, GREEN]
    gif = decode_image(encode(pal, "GIF", transparency=0))
    assert pixels(gif) == [WHITE, GREEN]


@pytest.mark.parametrize(
    ("mode", "fmt", "dtype"),
    [("I;16", "PNG", "<u2"), ("I;16", "TIFF", "<u2"), ("I;16B", "TIFF", ">u2"), ("I", "TIFF", "<i4")],
)
def test_high_bit_gray_scaled_to_8bit(mode: str, fmt: str, dtype: str) -> None:
    img = Image.fromarray(np.array([[65535, 32768, 257, 0]], dtype=dtype))
    assert img.mode == mode
    out = decode_image(encode(img, fmt))
    assert [out.getpixel((x, 0)) for x in range(4)] == [(255,) * 3, (128,) * 3, (1,) * 3, (0,) * 3]


@pytest.mark.parametrize(
    ("values", "expected"), [([1.0, 0.5, 0.0], [255, 128, 0]), ([300.0, 127.6, -5.0], [255, 128, 0])]
)
def test_float_gray(values: list[float], expected: list[int]) -> None:
    img = Image.fromarray(np.array([values], dtype=np.float32))
    assert img.mode == "F"
    out = decode_image(encode(img, "TIFF"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == expected


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("CMYK", (255, 0, 0, 0), (0, 255, 255)),  # cyan
        ("CMYK", (0, 0, 0, 255), (0, 0, 0)),
        ("La", (64, 128), (191, 191, 191)),  # premultiplied 64 at 50% alpha + 50% white
        ("RGBa", (0, 0, 0, 0), WHITE),
        ("PA", (0, 0), WHITE),
        ("HSV", (0, 255, 255), RED),
        ("YCbCr", (76, 85, 255), RED),
        ("LAB", (255, 128, 128), WHITE),
        ("1", (1,), WHITE),
        ("L", (7,), (7, 7, 7)),
    ],
)
def test_mode_conversion(mode: str, color: tuple[int, ...], expected: tuple[int, int, int]) -> None:
    out = data._to_rgb(Image.new(mode, (2, 2), color))
    assert out.mode == "RGB" and close(out.getpixel((1, 1)), expected), out.getpixel((1, 1))


def test_cmyk_jpeg_to_rgb() -> None:
    img = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    img.paste((0, 0, 0, 0), (8, 0, 16, 16))
    out = decode_image(encode(img, "JPEG", quality=95))
    assert close(out.getpixel((2, 8)), (0, 255, 255), tol=12)
    assert close(out.getpixel((13, 8)), WHITE, tol=12)


@pytest.mark.parametrize(
    ("orientation", "size", "red_corner"),
    [(1, (60, 40), (2, 2)), (3, (60, 40), (57, 37)), (6, (40, 60), (37, 2)), (8, (40, 60), (2, 57))],
)
def test_exif_orientation(orientation: int, size: tuple[int, int], red_corner: tuple[int, int]) -> None:
    out = decode_image(exif_rotated_jpeg((60, 40), orientation))
    assert out.size == size
    assert close(out.getpixel(red_corner), RED, tol=30)
    w, h = size
    for corner in {(2, 2), (w - 3, 2), (2, h - 3), (w - 3, h - 3)} - {red_corner}:
        assert not close(out.getpixel(corner), RED, tol=30)


def test_first_frame_of_multiframe_images() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN)]
    for fmt, params in (("GIF", {}), ("TIFF", {}), ("WEBP", {"lossless": True})):
        blob = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
        assert Image.open(io.BytesIO(blob)).n_frames == 2
        assert decode_image(blob).getpixel((4, 4)) == RED, fmt


def test_jpeg_draft_reduced_decoding() -> None:
    blob = encode(Image.new("RGB", (1024, 768), (90, 120, 150)), "JPEG")
    assert decode_image(blob).size == (1024, 768)
    small = decode_image(blob, min_size=(256, 256))
    assert small.size == (512, 384) and small.mode == "RGB"
    assert decode_image(blob, min_size=(100, 90)).size == (128, 96)
    png = encode(Image.new("RGB", (1024, 768)), "PNG")
    assert decode_image(png, min_size=(256, 256)).size == (1024, 768)


def test_jpeg_draft_respects_exif_rotation() -> None:
    blob = exif_rotated_jpeg((1024, 512), 6)  # displayed as 512x1024
    assert decode_image(blob, min_size=(256, 512)).size == (256, 512)


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"", r"^empty file \(0 bytes\)$"),
        (b"hello, I am text\n", r"^not an image \(cannot identify format\)$"),
        (
            encode(Image.effect_noise((64, 64), 50), "JPEG")[:1500],
            r"^truncated or corrupt image data: image file is truncated",
        ),
        (encode(Image.effect_noise((64, 64), 50), "PNG")[:2000], r"^truncated or corrupt image data: "),
    ],
)
def test_undecodable(blob: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_image(blob)


def test_decompression_bomb_is_rejected_before_decoding_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DecodeError) as exc:
            decode_image(bomb_png((20000, 20000)))
        assert str(exc.value) == (
            "decompression bomb: 20000x20000 = 400000000 pixels > limit 89478485 (raise --max-pixels)"
        )
        expected = r"^decompression bomb: 12000x12000 = 144000000 pixels > limit 10000000 "
        with pytest.raises(DecodeError, match=expected):
            decode_image(bomb_png((12000, 12000)), max_pixels=10_000_000)
        small = encode(Image.new("RGB", (100, 100)), "PNG")
        with pytest.raises(DecodeError, match="decompression bomb"):
            decode_image(small, max_pixels=9_999)
        assert decode_image(small, max_pixels=None).size == (100, 100)


# ---------------------------------------------------------------------------------------------
# 3. hostile images

# Runs the CLI with reads of files named dogs/locked.png failing with EACCES, as they do for a
# user without read permission (chmod 000 does not stop root, which runs these tests).
_UNREADABLE_AS_ROOT = r"""
import errno, os, sys
_open = os.open
def fake_open(path, flags, *a, **k):
    if os.fsdecode(path).endswith("/dogs/locked.png") and os.geteuid() == 0:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    return _open(path, flags, *a, **k)
os.open = fake_open
from embedpipe.cli import main
main()
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    root = tmp_path_factory.mktemp("hostile") / "data"
    return root, make_hostile_folder(root, seed=6)


def test_hostile_folder_every_decodable_image_extracted_every_other_file_named(
        hostile: tuple[Path, dict[str, str | None]], tmp_path: Path):
    """Truncated, random, empty, bomb, animated, multi-page, 16-bit, CMYK, palette+alpha, all
    EXIF orientations, unreadable, symlink loops, a FIFO, /dev/zero, non-UTF-8 names, spaces and
    unicode in class names: one subprocess run extracts every decodable image, lists every
    other file with its reason (in its output and in `embedpipe info`), and its peak memory
    stays far below what decoding the bomb would take."""
    root, expected = hostile
    good = sorted(p for p, why in expected.items() if why is None)
    bad = {p: why for p, why in expected.items() if why is not None}
    out = tmp_path / "hostile.h5"
    code, peak_mib, text = _extract_peak_rss(root, out)
    assert code == 0, text
    plain = tmp_path / "plain"
    shutil.copytree(root / "big cats", plain / "a", ignore=lambda d, names: [
        n for n in names if n != "fine.png"])
    _, baseline_mib, _ = _extract_peak_rss(plain, tmp_path / "plain.h5")
    print(f"hostile folder: peak RSS {peak_mib:.0f} MiB (one plain image: {baseline_mib:.0f})")
    assert "Traceback" not in text
    store = open_store(out)
    assert sorted(store.paths) == good
    assert np.isfinite(store.features).all()
    assert {"big cats", "chats été 猫", "caf\\xe9s", "cats", "dogs"} == set(store.classes)
    errors = dict(store.errors)
    assert set(errors) == set(bad)
    for path, keyword in bad.items():
        assert keyword in errors[path], (path, errors[path])
    named = [p for p in bad if f"skipped {p}: " in text]  # the run names the first 20 ...
    assert len(named) == min(20, len(bad))
    assert f"... and {len(bad) - 20} more (see `embedpipe info {out}`)" in text  # ... and counts
    info = ok("info", out, "--show", "100").output
    for path, keyword in bad.items():
        assert f"  {path}: " in info and keyword in info, path
    report = json.loads(ok("info", out, "--json").output)
    assert {d["path"]: d["reason"] for d in report["skipped"]} == errors
    # Decoding the 20000x20000 bomb takes 400 MB, converting it to RGB 1.2 GB more.
    assert peak_mib < baseline_mib + 500, (peak_mib, baseline_mib)
    # A rerun reads nothing, retries nothing and adds no row: names are stable.
    res = ok("extract", root, "-o", out, "--workers", "0", "-q")
    assert f"0 extracted, {len(good)} already in store" in res.output
    assert len(open_store(out, features=False)) == len(good)


def _extract_peak_rss(data: Path, out: Path) -> tuple[int, float, str]:
    """Extract in a subprocess; (exit code, peak RSS in MiB of it and its loader worker, output)."""
    log = out.with_suffix(".log")
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", _UNREADABLE_AS_ROOT, "extract",
                                 str(data), "-o", str(out), "--workers", "1", "--batch-size",
                                 "8", "--precision", "fp32", "-q"], stdout=f, stderr=f)
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of the child and what it reaped
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, log.read_bytes().decode("utf-8", "replace")


def test_bombs_are_refused_from_the_header_before_any_pixel_is_decoded(monkeypatch):
    """Decode time per image is bounded structurally: the pixel count is checked from the
    header, before Pillow allocates or decodes anything; multi-frame files decode frame 0."""
    import io

    from PIL import GifImagePlugin, Image, ImageFile, TiffImagePlugin

    loads: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: loads.append(self.size) or real_load(self))
    data_mod.decode_image(encode(Image.new("RGB", (5, 4)), "PNG"))
    assert loads and set(loads) == {(5, 4)}  # the probe sees PNG pixel decoding
    loads.clear()
    for blob in (header_only_png((60000, 60000)), bomb_png((20000, 20000))):
        with pytest.raises(data_mod.DecodeError, match="decompression bomb"):
            data_mod.decode_image(blob)
    assert loads == []  # refused before a single pixel was decoded

    seeks: list[int] = []
    for plugin in (GifImagePlugin.GifImageFile, TiffImagePlugin.TiffImageFile):
        real_seek = plugin._seek  # where both plugins go to another frame

        def _seek(self, frame, *a, _real=real_seek, **k):
            seeks.append(frame)
            return _real(self, frame, *a, **k)

        monkeypatch.setattr(plugin, "_seek", _seek)
    frames = [Image.fromarray(pattern((32, 24), seed=i)) for i in range(5)]
    for fmt in ("GIF", "TIFF"):
        blob = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
        assert Image.open(io.BytesIO(blob)).n_frames == 5 and max(seeks) >= 4  # probe works
        seeks.clear()
        assert data_mod.decode_image(blob).size == (32, 24)
        assert not [f for f in seeks if f > 0], (fmt, seeks)  # only frame 0 is decoded


def test_max_pixels_bounds_what_is_decoded(tmp_path: Path):
    """The largest image extract decodes has --max-pixels pixels: one more is refused."""
    from PIL import Image

    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    Image.fromarray(pattern((64, 64))).save(data / "a/exact.png")  # 4096 pixels
    Image.fromarray(pattern((65, 64))).save(data / "a/over.png")  # 4160 pixels
    out = tmp_path / "s.h5"
    res = ok("extract", data, "-o", out, "--max-pixels", "4096", "--workers", "0", "-q")
    assert "skipped a/over.png: decompression bomb: 65x64 = 4160 pixels > limit 4096 " \
           "(raise --max-pixels)" in res.output
    assert open_store(out).paths == ["a/exact.png"]
@pytest.mark.parametrize("size, kept, box", [
    ((65000, 1), (16, 1), (32492, 0, 32508, 1)),
    ((1, 65000), (1, 16), (0, 32492, 1, 32508)),
    ((1000, 10), (160, 10), (420, 0, 580, 10)),
    ((161, 10), (160, 10), (0, 0, 160, 10)),
])
def test_limit_aspect_centre_crops_elongated_images_to_16_to_1(size, kept, box) -> None:
    """The one rule every decode+resize path applies before resizing (a 1 x 65000 PNG of a
    few hundred bytes would otherwise become 256 x 16.6 million pixels)."""
    blob = strip_png(size)
    assert len(blob) < 1000
    img = data.decode_image(blob)
    out = data.limit_aspect(img)
    assert out.size == kept
    assert np.array_equal(np.asarray(out), np.asarray(img.crop(box)))


@pytest.mark.parametrize("size", [(160, 10), (10, 160), (28, 28), (6000, 400), (1, 1)])
def test_limit_aspect_leaves_ordinary_images_alone(size) -> None:
    img = Image.new("RGB", size)
    assert data.limit_aspect(img) is img


def test_non_utf8_name_and_its_escape_text_are_two_paths_that_round_trip(tmp_path: Path) -> None:
    """`caf` + byte 0xE9 + `.jpg` beside a file literally named `caf\\xe9.jpg`: before, both
    were stored as the text `caf\\xe9.jpg`."""
    c = os.fsencode(tmp_path / "c")
    os.mkdir(c)
    with open(c + b"/caf\xe9.jpg", "wb") as f:
        f.write(encode(Image.new("RGB", (20, 20), RED), "JPEG"))
    with open(c + b"/caf\\xe9.jpg", "wb") as f:
        f.write(encode(Image.new("RGB", (20, 20), GREEN), "JPEG"))
    with open(c + b"/back\\slash.jpg", "wb") as f:
        f.write(encode(Image.new("RGB", (20, 20), WHITE), "JPEG"))
    disc = discover(tmp_path)
    rels = [r.rel for r in disc.items]
    assert rels == ["c/back\\\\slash.jpg", "c/caf\\\\xe9.jpg", "c/caf\\xe9.jpg"]
    for ref in disc.items:
        rel = ref.rel.encode("utf-8")  # every stored path is valid UTF-8 text
        assert os.fsencode(tmp_path / data.fs_name(ref.rel)) == os.fsencode(ref.path), rel
    colours = {r.rel: data.load_image(tmp_path / data.fs_name(r.rel)).getpixel((10, 10))
               for r in disc.items}
    assert colours["c/caf\\xe9.jpg"][0] > 200 and colours["c/caf\\\\xe9.jpg"][1] > 200


@pytest.mark.parametrize("raw", [b"caf\xe9.jpg", b"caf\\xe9.jpg", b"a\\\\b", b"\\", b"x\\",
                                 b"\xff\\x41\\xe9", "été 猫.png".encode(), b"plain.png"])
def test_display_name_is_one_to_one_and_fs_name_inverts_it(raw: bytes) -> None:
    name = os.fsdecode(raw)
    text = data.display_name(name)
    text.encode("utf-8")
    assert data.fs_name(text) == name


def test_display_names_of_distinct_byte_strings_differ() -> None:
    raws = [bytes(t) for t in ([0x5C], [0x5C, 0x5C], [0x5C, 0x78, 0x65, 0x39], [0xE9],
                               [0x5C, 0xE9], [0xC3, 0xA9], [0x5C, 0x78, 0x63, 0x33])]
    texts = [data.display_name(os.fsdecode(r)) for r in raws]
    assert len(set(texts)) == len(raws), texts


def test_fs_name_reads_the_single_backslash_text_of_older_stores() -> None:
    assert data.fs_name("a\\b.jpg") == "a\\b.jpg"
    assert data.fs_name("caf\\x41.jpg") == "caf\\x41.jpg"  # not a byte >= 0x80: literal


def _geometry_cases():
    """(source w, h, Resize size, crop, interpolation): a sweep over the shapes users meet
    (squares, photos both ways, panoramas, Fashion-MNIST's 28 px, sizes below the crop) and
    timm's geometries (shorter side or squash, bicubic, bilinear, lanczos)."""
    import random

    from torchvision.transforms import InterpolationMode

    rng = random.Random(7)
    cases = [(224, 224, 256, 224, InterpolationMode.BICUBIC),
             (28, 28, 256, 224, InterpolationMode.BICUBIC),
             (1024, 768, 256, 224, InterpolationMode.BICUBIC),
             (500, 375, 236, 224, InterpolationMode.BILINEAR),
             (256, 256, 320, 224, InterpolationMode.BILINEAR),
             (100, 60, 256, 224, InterpolationMode.BICUBIC),
             (640, 256, 320, 224, InterpolationMode.BILINEAR)]
    for _ in range(60):
        cases.append((rng.choice([rng.randint(20, 1500), 224, 256, 512, 28]),
                      rng.choice([rng.randint(20, 1500), 224, 256, 384, 28]),
                      rng.choice([256, 232, 248, 292, 146, (256, 256), (240, 300)]),
                      rng.choice([224, 240, 128, 256]),
                      rng.choice([InterpolationMode.BICUBIC, InterpolationMode.BILINEAR,
                                  InterpolationMode.LANCZOS])))
    return cases


def test_fused_resize_and_centre_crop_gives_the_two_steps_pixels_exactly() -> None:
    """The loader's ResizeCenterCrop (PIL passes on the crop's source box where that is exact)
    against torchvision's Resize then CenterCrop, pixel for pixel: uniform noise (where any
    rounding difference shows) and a real Fashion-MNIST image at each size."""
    from torchvision.transforms import CenterCrop, Compose, Resize

    from embedpipe.backbones import ResizeCenterCrop
    from embedpipe.datasets import load_fashion_mnist

    real = Image.fromarray(load_fashion_mnist("test")[0][0]).convert("RGB")
    rng = np.random.default_rng(0)
    boxed = 0
    for w, h, size, crop, interpolation in _geometry_cases():
        two = Compose([Resize(size, interpolation=interpolation), CenterCrop(crop)])
        fused = ResizeCenterCrop.fuse(two)
        step = fused.transforms[0]
        assert isinstance(step, ResizeCenterCrop)
        rw, rh = step.resized_size(w, h)
        boxed += crop <= min(rw, rh) and (step._box_exact(w, rw, rw) or step._box_exact(h, rh, rh))
        for img in (Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
                    real.resize((w, h), Image.BICUBIC)):
            want, got = np.asarray(two(img)), np.asarray(fused(img))
            assert want.shape == got.shape and np.array_equal(want, got), (w, h, size, crop)
    assert boxed >= 20  # the sweep exercises the box path, not only the fallbacks


def test_the_uint8_tensor_resize_runs_only_where_it_gives_pils_pixels() -> None:
    """ResizeCenterCrop.pixels takes torchvision's uint8 resize where a per-geometry probe on
    noise says it equals PIL's pixels, else PIL: over the whole sweep, on noise and on a real
    image, its pixels equal torchvision's two PIL steps exactly; the fast path is taken for
    the geometries that qualify (224-px images to Lite0's input among them) and refused for
    one that does not (a 640×480 photo: 640 → 341 is no binary fraction)."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

    from embedpipe.backbones import ResizeCenterCrop
    from embedpipe.datasets import load_fashion_mnist

    real = Image.fromarray(load_fashion_mnist("test")[0][0]).convert("RGB")
    rng = np.random.default_rng(3)
    fast = 0
    for w, h, size, crop, interpolation in _geometry_cases():
        two = Compose([Resize(size, interpolation=interpolation), CenterCrop(crop)])
        step = ResizeCenterCrop.fuse(two).transforms[0]
        fast += step.tensor_exact(w, h)
        for img in (Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
                    real.resize((w, h), Image.BICUBIC)):
            want, got = np.asarray(two(img)), step.pixels(img).numpy()
            assert want.shape == got.shape and np.array_equal(want, got), (w, h, size, crop)
    assert fast >= 3  # (4 of the sweep's 67 with this seed)
    lite0 = ResizeCenterCrop.fuse(Compose([Resize(256, interpolation=InterpolationMode.BICUBIC),
                                           CenterCrop(224)])).transforms[0]
    assert lite0.tensor_exact(224, 224) and lite0.tensor_exact(512, 512)
    assert not lite0.tensor_exact(640, 480)
    calls: list[int] = []
    lite0._tensor_pixels = lambda img: calls.append(1) or ResizeCenterCrop._tensor_pixels(
        lite0, img)
    lite0.pixels(Image.new("RGB", (224, 224)))
    lite0.pixels(Image.new("RGB", (640, 480)))
    assert calls == [1]  # the 224-px image took the tensor path, the photo PIL's


def test_the_views_transform_uses_the_fused_geometry_and_leaves_tta_crops_alone() -> None:
    from embedpipe import backbones

    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3,
           "std": (0.5,) * 3, "crop_pct": 0.875, "crop_mode": "center"}
    geometry = backbones._split_normalize(cfg)[0]
    fused = backbones.ResizeCenterCrop.fuse(geometry)
    assert [type(t).__name__ for t in fused.transforms][1:] == ["ResizeCenterCrop"]
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), np.uint8))
    views = backbones.make_views_transform(cfg)(img)
    assert views.shape == (1, 224, 224, 3)
    assert np.array_equal(views[0].numpy(), np.asarray(geometry(img)))
    crops = backbones.make_views_transform({**cfg, "tta": "crops"})(img)
    assert crops.shape == (5, 224, 224, 3)
    assert np.array_equal(crops[0].numpy(), views[0].numpy())  # the centre view first
    squash = {**cfg, "crop_mode": "squash"}
    assert np.array_equal(backbones.make_views_transform(squash)(img)[0].numpy(),
                          np.asarray(backbones._split_normalize(squash)[0](img)))


@pytest.mark.parametrize("name, what", [
    ("line\nbreak/a.png", "folder name 'line\\nbreak'"),
    ("tab\tx/a.png", "folder name 'tab\\tx'"),
    ("train/co\x7fat/a.png", "folder name 'train/co\\x7fat'"),
    ("bag/new\nline.png", "file name 'bag/new\\nline.png'"),
    ("bag/notes\t.txt", "file name 'bag/notes\\t.txt'"),
])
def test_folder_and_file_names_with_control_characters_are_refused(
        fmnist: Path, tmp_path: Path, name: str, what: str) -> None:
    """A class folder named 'line\\nbreak' was stored as a class that broke `info`'s table and
    every log line (h42 #13), while a manifest label holding one is refused. Folder names follow
    the manifest's rule: `extract` refuses in one line naming the folder (or file), before any
    work, and writes no store."""
    (fmnist / name).parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".png"):
        touch_png(fmnist / name)
    else:
        (fmnist / name).write_text("not an image")
    out = tmp_path / "s.h5"
    res = cli("extract", fmnist, "-o", out, "-q")
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith(f"error: {fmnist}: the {what} holds the control character")
    assert "rename the" in lines[0] and not out.exists()


def test_a_class_folder_with_outer_spaces_is_kept_with_a_note(fmnist: Path, tmp_path: Path):
    """' bag ' is a valid folder name, so the class keeps it (a rename would hide which folder
    it is), but it looks like 'bag' in every table: extract says so, even with -q."""
    (fmnist / "bag").rename(fmnist / " bag ")
    out = tmp_path / "s.h5"
    res = ok("extract", fmnist, "-o", out, "-q")
    notes = [ln for ln in res.output.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "' bag '" in notes[0] and "starts or ends with spaces" in notes[0]
    assert " bag " in open_store(out, features=False).classes
