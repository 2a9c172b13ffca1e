"""Hardening (issue 6): embedpipe under attack. Kills at random moments, Ctrl-C, hostile image
folders, full disks, concurrent writers and readers, tampered stores and weights, bad arguments.

Everything here runs real extractions with the bundled EfficientNet-Lite0 weights on real
Fashion-MNIST images. The kill storm is marked slow: `python -m pytest -m slow -s` runs it and
shows its seed and kill times.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from clitools import cli, ok, runner
from embedpipe import data as data_mod
from embedpipe.cli import app
from embedpipe.datasets import write_fashion_mnist_folder
from embedpipe.store import StoreWriter, open_store, read_identity

from imagegen import bomb_png, encode, header_only_png, make_hostile_folder, pattern

EMBEDPIPE = [sys.executable, "-m", "embedpipe.cli"]


def one_line_error(output: str, code: int, *needles: str, expect: int = 2) -> str:
    """The whole output is one `error: ...` line holding every needle; exit code ``expect``."""
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert code == expect, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def run(*args: object, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=timeout,
                          **kw)


def rows_now(store: Path) -> int | None:
    """Committed rows as a reader sees them now (None while the store cannot be read)."""
    try:
        return len(open_store(store, features=False))
    except Exception:  # noqa: BLE001 - not created yet, or being replaced by a recovery
        return None


def wait_rows(store: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the extraction ended too early"
        rows = rows_now(store)
        if rows is not None and rows >= n:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"{store}: {n} rows not committed in {timeout} s")


def copy_rows(src: Path, dst: Path, keep: list[int]) -> Path:
    """A new store (same identity) holding rows ``keep`` of ``src``."""
    s = open_store(src)
    with StoreWriter.open(dst, read_identity(src), versions={}) as w:
        ids = w.class_ids({s.classes[s.labels[i]] for i in keep})
        w.append(s.features[keep], paths=[s.paths[i] for i in keep],
                 labels=[ids[s.classes[s.labels[i]]] for i in keep],
                 hashes=[s.hashes[i] for i in keep], splits=[s.splits[i] for i in keep],
                 mtime_ns=[0] * len(keep), size=[0] * len(keep))
    return dst


# ---------------------------------------------------------------------------------------------
# 1. kill storm


def _peek(store: Path) -> tuple[int, int]:
    """(run records, committed rows) of a store being written: a light SWMR read, so that
    polling does not take CPU from the run (-1, -1 while it cannot be read)."""
    try:
        with h5py.File(store, "r", libver="latest", swmr=True, locking=False) as f:
            return f["runs"].shape[0], int(f["committed"][0])
    except Exception:  # noqa: BLE001 - missing, or being replaced by a recovery
        return -1, -1


def _kill_storm(src: Path, store: Path, total: int, rng: random.Random,
                target_kills: int) -> tuple[list[tuple[str, float, int]], int]:
    """Run `embedpipe extract SRC -o STORE` until the store holds all ``total`` rows, SIGKILLing
    each run at a random moment (start-up, recovery, extraction, commits). Kill times during
    extraction are drawn from a window sized by the extraction rate measured so far, so that
    about ``target_kills`` kills land before the work is done. After every kill, `embedpipe info`
    must read the store and show at least every row a reader saw committed before the kill.
    Returns the kills as (phase, seconds after launch, rows committed after the kill), and how
    many rows the killed runs committed (the last, unkilled run does the rest)."""
    cmd = [*EMBEDPIPE, "extract", str(src), "-o", str(store), "--precision", "fp32",
           "--batch-size", "4", "--workers", "0", "-q"]
    committed, kills = 0, []
    gained, busy = 0, 0.0  # rows gained and seconds spent after start-up, over killed runs
    for cycle in range(1, 81):
        after_startup = [k for k in kills if k[0] == "extracting"]
        if len(after_startup) >= 10:
            assert committed > 0, (f"{len(after_startup)} runs killed seconds into extraction "
                                   "kept no rows at all: finished batches are not committed")
        runs_before = _peek(store)[0]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        t0 = time.monotonic()
        seen = committed
        if rng.random() < 0.1:  # somewhere in imports, model loading or recovery
            phase, delay = "start-up", rng.uniform(0.2, 4.0)
            while time.monotonic() - t0 < delay and proc.poll() is None:
                time.sleep(0.02)
        else:
            # start-up ends when this run's record appears in the store (recovery, if any, and
            # the model are done; extraction starts right after)
            while _peek(store)[0] <= runs_before and proc.poll() is None:
                time.sleep(0.05)
            t_start = time.monotonic()
            remaining = total - committed
            left = max(1, target_kills - len(after_startup))
            rate = gained / busy if busy > 0 and gained > 0 else None
            # until a killed run has committed something, widen the window on each kill (a
            # loaded machine can take seconds per batch)
            window = (max(0.3, 2 * remaining / (left * rate)) if rate
                      else 3.0 * 2 ** min(5, len(after_startup)))
            phase, delay = "extracting", rng.uniform(0.0, window)
            while time.monotonic() - t_start < delay and proc.poll() is None:
                seen = max(seen, _peek(store)[1])
                time.sleep(0.1)
            delay = time.monotonic() - t0
        t_kill = time.monotonic()
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
        if not killed:
            assert proc.returncode == 0, stderr
        if store.exists():
            res = run(*EMBEDPIPE, "info", store, "--json")
            assert res.returncode == 0, f"info failed after kill {len(kills) + 1}: {res.stderr}"
            rows = json.loads(res.stdout)["rows"]
            assert rows >= committed, f"committed rows went down: {committed} -> {rows}"
            assert rows >= seen, f"a reader saw {seen} committed rows, after the kill {rows}"
            if phase == "extracting" and killed:
                gained += rows - committed
                busy += max(0.0, t_kill - t_start)
            committed = rows
        if killed:
            kills.append((phase, round(delay, 2), committed))
            print(f"  kill {len(kills):2d} ({phase:10s}) at {delay:5.2f} s after launch: "
                  f"{committed}/{total} rows committed")
        if committed == total:
            return kills, gained
    raise AssertionError(f"{store}: not done after {cycle} runs ({len(kills)} kills)")


@pytest.mark.slow
def test_kill_storm_random_sigkills_never_lose_a_committed_batch(tmp_path: Path):
    """SIGKILL `embedpipe extract` at random moments (start-up, recovery, extraction, commits),
    at least 20 times after start-up, rerunning until done. After every kill `embedpipe info`
    reads the store and shows at least every row a reader saw committed before the kill; the
    killed runs themselves get the work done; the final store equals an uninterrupted run.

    How many kills fit into one extraction depends on the machine's speed, so the storm runs in
    rounds, each on a fresh store of the same folder, until 20 kills have landed during
    extraction (at most 6 rounds); every round's final store is checked."""
    seed = int(os.environ.get("EMBEDPIPE_KILL_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    print(f"\nkill storm: seed {seed} (rerun with EMBEDPIPE_KILL_SEED={seed})")
    src = write_fashion_mnist_folder(tmp_path / "data", per_class=20, seed=2)
    total = 200

    from embedpipe.extract import ExtractOptions, run as extract_run

    clean = tmp_path / "clean.h5"
    extract_run(src, clean, ExtractOptions(precision="fp32", batch_size=4, workers=0),
                progress=False)
    b = open_store(clean)
    fb = dict(zip(b.paths, b.features))
    t_storm, kills = time.monotonic(), []
    for round_ in range(1, 7):
        store = tmp_path / f"killed-{round_}.h5"
        during = sum(k[0] == "extracting" for k in kills)
        print(f" round {round_} ({during} kills during extraction so far)")
        new, gained = _kill_storm(src, store, total, rng, target_kills=24 - during)
        kills += new
        # The killed runs must do the work: each keeps every batch it finished. (Without
        # per-batch commits they keep nothing, and only the last, unkilled run gets rows.)
        assert gained >= total // 4, (f"round {round_}: the {len(new)} killed runs kept "
                                      f"{gained} of {total} rows", new)
        a = open_store(store)
        assert len(a) == total and len(set(a.paths)) == total
        assert sorted(a.paths) == sorted(b.paths)
        assert not a.errors
        fa = dict(zip(a.paths, a.features))
        for p in b.paths:
            np.testing.assert_allclose(fa[p], fb[p], rtol=0, atol=1e-5)
        assert dict(zip(a.paths, a.label_names())) == dict(zip(b.paths, b.label_names()))
        assert not list(tmp_path.glob(f".{store.name}.*.tmp"))  # recoveries left no temp files
        if sum(k[0] == "extracting" for k in kills) >= 20:
            break
    during = sum(k[0] == "extracting" for k in kills)
    print(f"kill storm: {len(kills)} kills ({during} during extraction) in {round_} round(s), "
          f"{time.monotonic() - t_storm:.0f} s; seed {seed}")
    assert during >= 20, kills


# ---------------------------------------------------------------------------------------------
# 2. Ctrl-C (in the batch loop: tests/test_extract.py::test_ctrl_c_keeps_finished_batches_...)


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(fmnist_src: Path, tmp_path: Path):
    """Ctrl-C while the command is still starting (here: loading torch), before any batch."""
    proc = subprocess.Popen([*EMBEDPIPE, "extract", str(fmnist_src), "-o",
                             str(tmp_path / "s.h5"), "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with open(f"/proc/{proc.pid}/maps") as maps:  # the command has begun importing torch
            if "libtorch" in maps.read():
                break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert "interrupted" in stderr and "rerun the same command" in stderr


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


# ---------------------------------------------------------------------------------------------
# 4. full disk


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 MiB tmpfs (we run as root), unmounted afterwards; skips where mounting fails."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = run("mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", mnt, timeout=30)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); "
                    "test_disk_full_during_a_batch_write covers the write path in-process")
    try:
        yield mnt
    finally:
        run("umount", "-l", mnt, timeout=30)


def _fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` up, then give back ``leave`` bytes."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        block = b"\xa5" * (1 << 16)
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
        f.truncate(max(0, f.tell() - leave))
    return filler


def _images(src: Path, dst: Path, n: int, start: int = 0) -> Path:
    files = sorted(src.rglob("*.png"))[start:start + n]
    for f in files:
        (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst / f.parent.name / f.name)
    return dst


def test_full_disk_stops_in_one_line_keeps_every_committed_batch_and_resumes(
        small_disk: Path, fmnist_src: Path, tmp_path: Path):
    data = _images(fmnist_src, tmp_path / "data", 8)
    store = small_disk / "s.h5"
    ok("extract", data, "-o", store, "--precision", "fp32", "-b", "4", "--workers", "0", "-q")
    before = open_store(store)
    _images(fmnist_src, data, 12, start=8)
    filler = _fill(small_disk)
    res = run(*EMBEDPIPE, "extract", data, "-o", store, "--precision", "fp32", "-b", "4",
              "--workers", "0", "-q")
    one_line_error(res.stdout + res.stderr, res.returncode, str(store), "disk full",
                   "8 rows committed before are kept", "free space", "rerun the same command")
    info = run(*EMBEDPIPE, "info", store, "--json")  # readable, every committed row there
    assert info.returncode == 0 and json.loads(info.stdout)["rows"] == 8
    filler.unlink()
    res = ok("extract", data, "-o", store, "--precision", "fp32", "-b", "4", "--workers", "0")
    assert "12 extracted, 8 already in store" in res.output
    after = open_store(store)
    assert len(after) == 20 and len(set(after.paths)) == 20
    np.testing.assert_array_equal(after.features[:8], before.features)


_NO_SPACE_RESERVE = r"""
import embedpipe.store.write
embedpipe.store.write._SPACE_RESERVE = False
from embedpipe.cli import main
main()
"""


def test_disk_full_inside_hdf5_still_ends_in_one_line_and_the_store_recovers(
        small_disk: Path, fmnist_src: Path, tmp_path: Path):
    """Without the space reservation (a file system that fills up behind its back), HDF5
    itself runs out of space mid-flush and cannot close the file: the run still ends with the
    one-line error and exit 2 (not a crash), the store stays readable, and the next run
    recovers it and finishes."""
    data = _images(fmnist_src, tmp_path / "data", 8)
    store = small_disk / "s.h5"
    filler = _fill(small_disk, leave=256 << 10)  # room for a new store, not for its first chunk
    res = run(sys.executable, "-c", _NO_SPACE_RESERVE, "extract", data, "-o", store,
              "--precision", "fp32", "-b", "4", "--workers", "0", "-q")
    one_line_error(res.stdout + res.stderr, res.returncode, str(store), "disk full",
                   "free space", "rerun the same command")
    info = run(*EMBEDPIPE, "info", store, "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["rows"] == 0, info.stderr
    filler.unlink()
    res = ok("extract", data, "-o", store, "--precision", "fp32", "-b", "4", "--workers", "0")
    assert "8 extracted" in res.output
    assert len(open_store(store)) == 8


def test_disk_full_during_a_batch_write(fmnist_src: Path, tmp_path: Path, monkeypatch):
    """The write path raising ENOSPC in the middle of a run (no mount needed): one line, the
    batches committed before stay, the rerun continues."""
    data = _images(fmnist_src, tmp_path / "data", 20)
    store = tmp_path / "s.h5"
    real_setitem = h5py.Dataset.__setitem__
    calls = {"n": 0}

    def setitem(self, key, value):
        if self.name == "/features":
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, "Can't write data (file write failed: errno = 28, "
                                            "error message = 'No space left on device')")
        return real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)
    res = cli("extract", data, "-o", store, "--precision", "fp32", "-b", "4", "--workers", "0",
              "-q")
    one_line_error(res.output, res.exit_code, str(store), "disk full",
                   "8 rows committed before are kept", "rerun the same command")
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real_setitem)
    assert len(open_store(store)) == 8
    res = ok("extract", data, "-o", store, "--precision", "fp32", "-b", "4", "--workers", "0")
    assert "12 extracted, 8 already in store" in res.output
    assert len(set(open_store(store).paths)) == 20


# ---------------------------------------------------------------------------------------------
# 5. concurrency

# The CLI with a pause after every committed batch, and held at 40 rows while the file named
# by $EMBEDPIPE_TEST_HOLD exists: the test acts while the writer is alive and writing.
_SLOW_COMMITS = r"""
import os, time
import embedpipe.store as st
_append = st.StoreWriter.append
def append(self, *a, **k):
    _append(self, *a, **k)
    time.sleep(0.2)
    while self.n >= 40 and os.path.exists(os.environ["EMBEDPIPE_TEST_HOLD"]):
        time.sleep(0.05)
st.StoreWriter.append = append
from embedpipe.cli import main
main()
"""


def test_second_writer_is_refused_while_readers_use_the_live_store(fmnist_src: Path,
                                                                   tmp_path: Path):
    store = tmp_path / "live.h5"
    args = ["extract", str(fmnist_src), "-o", str(store), "--precision", "fp32", "-b", "4",
            "--workers", "0", "-q"]
    hold = tmp_path / "hold"
    hold.touch()
    writer = subprocess.Popen([sys.executable, "-c", _SLOW_COMMITS, *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True,
                              env={**os.environ, "EMBEDPIPE_TEST_HOLD": str(hold)})
    try:
        first = wait_rows(store, 12, writer)
        inode = store.stat().st_ino
        # a second writer (this process): refused in one line, before any model is loaded
        res = cli(*args)
        one_line_error(res.output, res.exit_code, str(store), "another process is writing",
                       "wait for it to finish")
        res = cli("merge", store, store)
        one_line_error(res.output, res.exit_code, "another process is writing")
        # readers, while the writer keeps committing
        res = run(*EMBEDPIPE, "info", store, "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["rows"] >= first
        head = tmp_path / "live.skops"
        ok("fit", store, "--head", "centroid", "-o", head, "-q")
        preds = tmp_path / "live.csv"
        res = ok("predict", head, "--store", store, "-o", preds)
        assert len(preds.read_text().splitlines()) - 1 >= first
        res = ok("cv", store, "--head", "centroid", "--folds", "2", "-q")
        assert "centroid" in res.output
        assert writer.poll() is None, "the writer ended while the readers ran"
        assert store.stat().st_ino == inode  # nobody replaced the file under the writer
        hold.unlink()
        wait_rows(store, 44, writer)  # and it goes on writing the same file
        assert store.stat().st_ino == inode
    finally:
        if writer.poll() is None:
            os.killpg(writer.pid, signal.SIGINT)
        stdout, stderr = writer.communicate(timeout=120)
    assert writer.returncode == 130 and "Traceback" not in stderr, stderr
    s = open_store(store)
    assert len(s) == len(set(s.paths)) >= 44
    # a reader that holds the store open (plain h5py, HDF5's default file locking) does not
    # stop the next writer (another process) from opening it
    with h5py.File(store, "r", libver="latest", swmr=True):
        res = run(sys.executable, "-c", "import sys\n"
                  "from embedpipe.store import StoreWriter, read_identity\n"
                  "StoreWriter.open(sys.argv[1], read_identity(sys.argv[1]), versions={})"
                  ".close()", store)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------------------------
# 6. tampered stores and weights


@pytest.fixture
def store_copy(fmnist_store: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.h5"
    shutil.copyfile(fmnist_store, dst)
    return dst


@pytest.fixture(scope="module")
def lite0_head(fmnist_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("head") / "centroid.skops"
    ok("fit", fmnist_store, "--head", "centroid", "-o", out, "-q")
    return out


def _flip(path: Path, offset: int, bit: int = 0x10) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ bit]))


def test_truncated_and_bit_flipped_stores_are_refused_in_one_line(store_copy: Path,
                                                                  lite0_head: Path,
                                                                  fmnist_src: Path,
                                                                  tmp_path: Path):
    blob = store_copy.read_bytes()
    # truncated: every command that opens it refuses it
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(blob[: len(blob) // 2])
    for args in (("info", trunc), ("predict", lite0_head, "--store", trunc),
                 ("fit", trunc, "-o", tmp_path / "x.skops"), ("cv", trunc),
                 ("merge", tmp_path / "m.h5", trunc)):
        res = cli(*args)
        one_line_error(res.output, res.exit_code, str(trunc), "extract")
    # a bit flipped in the feature data: the chunk's checksum fails, readers of features
    # refuse the store (info, which reads no features, still shows it)
    feats = tmp_path / "feats.h5"
    with h5py.File(store_copy, "r") as f:
        chunk = f["features"].id.get_chunk_info(0)
    _flip_copy = bytearray(blob)
    _flip_copy[chunk.byte_offset + chunk.size // 2] ^= 0x10
    feats.write_bytes(bytes(_flip_copy))
    for args in (("predict", lite0_head, "--store", feats),
                 ("fit", feats, "-o", tmp_path / "x.skops"), ("cv", feats),
                 ("merge", tmp_path / "m2.h5", feats)):
        res = cli(*args)
        one_line_error(res.output, res.exit_code, str(feats), "damaged", "checksum",
                       "extract")
    ok("info", feats)
    assert not (tmp_path / "x.skops").exists() and not (tmp_path / "m2.h5").exists()
    # a bit flipped in the metadata: in the object header of the features dataset (HDF5
    # checksums it), and in the model name among the root's attributes (HDF5 does not
    # checksum attribute values; the store's identity checksum does)
    with h5py.File(store_copy, "r") as f:
        header = h5py.h5o.get_info(f["features"].id).addr
    for name, offset, needles in (
            ("header.h5", header + 24, []),
            ("meta.h5", blob.index(b"tf_efficientnet_lite0") + 3, ["edited", "damaged"])):
        meta = tmp_path / name
        meta.write_bytes(blob)
        _flip(meta, offset)
        for args in (("info", meta), ("predict", lite0_head, "--store", meta),
                     ("fit", meta, "-o", tmp_path / "x.skops"),
                     ("extract", fmnist_src, "-o", meta)):
            res = cli(*args)
            one_line_error(res.output, res.exit_code, str(meta), "extract", *needles)
    # a committed counter that claims more rows than the file holds
    counter = tmp_path / "counter.h5"
    shutil.copyfile(store_copy, counter)
    with h5py.File(counter, "r+") as f:
        f["committed"][0] = 10**6
    for args in (("info", counter), ("predict", lite0_head, "--store", counter)):
        res = cli(*args)
        one_line_error(res.output, res.exit_code, str(counter), "damaged", "committed")


def test_recovery_after_a_kill_keeps_the_rows_before_a_torn_chunk(store_copy: Path):
    """A writer killed while rewriting a chunk can leave it torn (its checksum fails): the next
    writer's recovery keeps every row before that chunk and drops the rest, which the run then
    extracts again, instead of refusing the whole store."""
    before = open_store(store_copy)
    assert len(before) == 250
    res = run(sys.executable, "-c", "import os, signal, sys\n"
              "from embedpipe.store import StoreWriter, read_identity\n"
              "w = StoreWriter.open(sys.argv[1], read_identity(sys.argv[1]), versions={})\n"
              "os.kill(os.getpid(), signal.SIGKILL)", store_copy)
    assert res.returncode == -signal.SIGKILL
    with h5py.File(store_copy, "r", libver="latest", swmr=True) as f:
        rows_per_chunk = f["features"].chunks[0]
        chunk = f["features"].id.get_chunk_info(1)  # rows 204.. of 250
    _flip(store_copy, chunk.byte_offset + 100)
    said: list[str] = []
    with StoreWriter.open(store_copy, read_identity(store_copy), versions={},
                          progress=said.append):
        pass
    assert any(f"{250 - rows_per_chunk} committed rows" in m and "damaged chunk" in m
               for m in said), said
    after = open_store(store_copy)
    assert len(after) == rows_per_chunk
    assert after.paths == before.paths[:rows_per_chunk]
    np.testing.assert_array_equal(after.features, before.features[:rows_per_chunk])


def test_store_attributes_edited_to_claim_another_backbone(store_copy: Path, lite0_head: Path,
                                                           fmnist_src: Path):
    from embedpipe.store.schema import _identity_digest

    def edit(forge: bool, **attrs: object) -> None:
        with h5py.File(store_copy, "r+") as f:
            for k, v in attrs.items():
                f.attrs[k] = v
            if forge:  # whoever edits the attributes can also recompute their checksum
                f.attrs["identity_sha256"] = _identity_digest(f.attrs)

    # edited with h5py: the identity checksum no longer matches
    edit(False, model="resnet50", weights_source="hub:timm/resnet50.a1_in1k")
    for args in (("info", store_copy), ("predict", lite0_head, "--store", store_copy)):
        res = cli(*args)
        one_line_error(res.output, res.exit_code, str(store_copy), "edited", "extract")
    # edited consistently: the claim itself is refused by the head and by extract
    edit(True)
    res = cli("predict", lite0_head, "--store", store_copy)
    one_line_error(res.output, res.exit_code, str(store_copy), "another backbone", "resnet50")
    res = cli("extract", fmnist_src, "-o", store_copy)  # the real backbone may not extend it
    one_line_error(res.output, res.exit_code, str(store_copy), "other settings", "resnet50")
    # a feature_dim the stored features contradict
    edit(True, model="tf_efficientnet_lite0", weights_source="bundled:efficientnet-lite0-"
         "pytorch-model", feature_dim=2048)
    res = cli("predict", lite0_head, "--store", store_copy)
    one_line_error(res.output, res.exit_code, str(store_copy), "damaged", "feature_dim")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_with_wrong_shapes_or_a_pickle_payload_are_refused(fmnist_src: Path,
                                                                    tmp_path: Path):
    import timm

    data = fmnist_src / "bag"
    sd = timm.create_model("tf_efficientnet_lite0", num_classes=0).state_dict()
    sd["conv_head.weight"] = torch.zeros(10, 3, 1, 1)
    wrong = tmp_path / "wrong.pth"
    torch.save(sd, wrong)
    res = cli("extract", data, "-o", tmp_path / "w.h5", "--weights", wrong)
    one_line_error(res.output, res.exit_code, str(wrong), "do not fit tf_efficientnet_lite0",
                   "conv_head.weight", "--weights")
    assert not (tmp_path / "w.h5").exists()

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv_stem.weight": torch.zeros(1), "x": _Payload(marker)}, evil)
    torch.load(evil, weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()
    marker.unlink()
    res = run(*EMBEDPIPE, "extract", data, "-o", tmp_path / "e.h5", "--weights", evil)
    one_line_error(res.stdout + res.stderr, res.returncode, str(evil), "cannot read weights",
                   "state dict")
    res = cli("extract", data, "-o", tmp_path / "e.h5", "--weights", evil)
    one_line_error(res.output, res.exit_code, str(evil), "cannot read weights")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# 7. bad arguments


@pytest.fixture(scope="module")
def bad_inputs(fmnist_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stores and files for the bad-argument table (features copied, no model run)."""
    d = tmp_path_factory.mktemp("bad")
    s = open_store(fmnist_store, features=False)
    names = s.label_names()
    one_class = [i for i, n in enumerate(names) if n == "bag"]
    one_image = [i for i, n in enumerate(names) if n in ("bag", "coat") and s.splits[i] == "train"]
    one_image = [i for i in one_image if names[i] == "bag"] + \
        [i for i in one_image if names[i] == "coat"][:1]
    (d / "empty").mkdir()
    (d / "junk.h5").write_bytes(b"not an HDF5 file")
    (d / "text.txt").write_text("hello")
    (d / "one.png").write_bytes(encode(__import__("PIL.Image").Image.new("RGB", (8, 8)), "PNG"))
    sd = {"conv_stem.weight": torch.zeros(2, 2)}
    torch.save(sd, d / "tiny.pth")
    return {"dir": d, "store": fmnist_store,
            "one_class": copy_rows(fmnist_store, d / "one_class.h5", one_class),
            "one_image": copy_rows(fmnist_store, d / "one_image.h5", one_image)}


BAD_ARGS = [
    # extract
    (["extract", "{dir}/nope"], ["no such file or folder", "image folder"]),
    (["extract", "{dir}/text.txt"], ["not a folder", "image folder or a .csv"]),
    (["extract", "{dir}/empty", "-o", "{dir}/e.h5"], ["no images found", "folder of images"]),
    (["extract", "{dir}", "--model", "resnet9000"], ["resnet9000", "not a timm model name"]),
    (["extract", "{dir}", "--weights", "{dir}/missing.pth"], ["not found", "--weights"]),
    (["extract", "{dir}", "--weights", "{dir}/tiny.pth", "-o", "{dir}/t.h5"],
     ["do not fit", "--weights"]),
    (["extract", "{dir}", "--device", "tpu"], ["--device tpu", "cpu"]),
    (["extract", "{dir}", "--precision", "fp8"], ["--precision fp8", "fp32"]),
    (["extract", "{dir}", "--dtype", "int8"], ["--dtype int8", "float16"]),
    (["extract", "{dir}", "--batch-size", "0"], ["--batch-size 0", "positive"]),
    (["extract", "{dir}", "--max-pixels", "0"], ["--max-pixels 0", "positive"]),
    (["extract", "{dir}", "--shard", "3/2"], ["--shard 3/2", "K/N"]),
    (["extract", "{dir}", "--layout", "sideways"], ["unknown layout", "class-folders"]),
    (["extract", "{dir}", "--img-size", "3"], ["--img-size 3", "at least 8"]),
    (["extract", "{dir}", "--crop-pct", "2"], ["--crop-pct 2", "range"]),
    (["extract", "{dir}", "--pool", "median", "-o", "{dir}/p.h5"], ["--pool median", "avg"]),
    (["extract", "{dir}", "-o", "{dir}/empty"], ["is a folder", ".h5"]),
    (["extract", "{dir}", "-o", "{dir}/junk.h5"], ["junk.h5", "not a readable"]),
    (["extract", "{dir}", "-o", "{dir}/text.txt/s.h5"], ["cannot create this folder",
                                                       "--out"]),
    (["extract", "{dir}", "--batch-size", "many"], ["--batch-size", "extract --help"]),
    (["extract"], ["Missing argument", "extract --help"]),
    # info, merge, models, heads
    (["info", "{dir}/nope.h5"], ["no such store", "embedpipe extract"]),
    (["info", "{dir}/empty"], ["is a folder", ".h5"]),
    (["info", "{dir}/junk.h5"], ["not a readable embedpipe store", "extract again"]),
    (["info"], ["Missing argument", "info --help"]),
    (["merge", "{dir}/m.h5", "{dir}/nope.h5"], ["nope.h5", "no such store"]),
    (["merge", "{dir}/m.h5", "{dir}/junk.h5"], ["junk.h5", "not a readable"]),
    (["merge", "{dir}/m.h5"], ["Missing argument", "merge --help"]),
    (["models", "--all"], ["No such option", "models --help"]),
    (["heads", "--head", "svm"], ["No such option", "heads --help"]),
    (["bogus"], ["No such command", "--help"]),
    # fit
    (["fit", "{dir}/nope.h5"], ["no such store", "embedpipe extract"]),
    (["fit", "{store}", "--head", "forest"], ["--head forest", "logreg"]),
    (["fit", "{store}", "--param", "C"], ["--param C", "NAME=VALUE"]),
    (["fit", "{store}", "--param", "=3"], ["--param =3", "NAME=VALUE"]),
    (["fit", "{store}", "--param", "gamma=2"], ["--param gamma", "logreg has no such"]),
    (["fit", "{store}", "--param", "C=abc", "-o", "{dir}/x.skops"], ["C", "abc"]),
    (["fit", "{store}", "--param", "C=-1", "-o", "{dir}/x.skops"], ["C", "-1"]),
    (["fit", "{store}", "--head", "knn", "--param", "n_neighbors=0", "-o", "{dir}/x.skops"],
     ["n_neighbors", "0"]),
    (["fit", "{store}", "--param", "pca=2.5"], ["pca=2.5", "variance fraction"]),
    (["fit", "{store}", "--class-weight", "heavy"], ["--class-weight heavy", "balanced"]),
    (["fit", "{one_class}", "-o", "{dir}/x.skops"], ["one class", "at least two"]),
    (["fit", "{one_image}", "--search", "-q", "-o", "{dir}/x.skops"],
     ["coat", "1 training image", "drop --search"]),
    # predict
    (["predict", "{dir}/nope.skops", "--store", "{store}"], ["no such head file",
                                                             "embedpipe fit"]),
    (["predict", "{dir}/junk.h5", "--store", "{store}"], ["not a readable head file"]),
    (["predict", "{head}", "--store", "{dir}/nope.h5"], ["no such store", "extract"]),
    (["predict", "{head}", "{dir}/nope.jpg"], ["no such file or folder", "image files"]),
    (["predict", "{head}", "{dir}/empty"], ["no images found"]),
    (["predict", "{head}"], ["IMAGES", "--store"]),
    (["predict", "{head}", "--store", "{store}", "--top-k", "0"], ["--top-k 0", "1 or more"]),
    (["predict", "{head}", "--store", "{store}", "--split", "holdout"],
     ["holdout", "leave --split out"]),
    # cv
    (["cv", "{dir}/nope.h5"], ["no such store", "embedpipe extract"]),
    (["cv", "{store}", "--head", "forest"], ["forest", "logreg"]),
    (["cv", "{store}", "--param", "C=abc", "--head", "logreg"], ["C", "abc"]),
    (["cv", "{store}", "--folds", "1"], ["--folds 1", "at least 2"]),
    (["cv", "{one_class}"], ["one_class.h5", "class"]),
    (["cv", "{one_image}"], ["coat", "single training image"]),
    # compare, finetune, serve, export (newer commands, same contract)
    (["compare", "{dir}/nope.h5", "{store}"], ["no such store", "embedpipe extract"]),
    (["finetune", "{dir}/nope", "-o", "{dir}/ft.pt"], ["no such file or folder"]),
    (["serve", "{dir}/nope.skops"], ["no such head file", "embedpipe fit"]),
    (["export", "{dir}/nope.skops"], ["no such head file", "embedpipe fit"]),
    # quickstart
    (["quickstart", "--per-class", "0", "--folder", "{dir}/qs", "-o", "{dir}/qs.h5"],
     ["--per-class", "at least"]),
    (["quickstart", "--folder", "{dir}/text.txt", "-o", "{dir}/qs.h5"], ["text.txt"]),
]


@pytest.mark.parametrize(("args", "needles"), BAD_ARGS,
                         ids=[" ".join(a)[:60] for a, _ in BAD_ARGS])
def test_bad_arguments_fail_in_one_line_with_the_fix(args: list[str], needles: list[str],
                                                    bad_inputs: dict[str, Path],
                                                    lite0_head: Path):
    values = {**{k: str(v) for k, v in bad_inputs.items()}, "head": str(lite0_head)}
    res = cli(*[a.format(**values) for a in args])
    one_line_error(res.output, res.exit_code, *needles)


def test_debug_shows_the_traceback_and_unexpected_errors_exit_nonzero(tmp_path: Path,
                                                                      monkeypatch):
    res = run(*EMBEDPIPE, "info", tmp_path / "nope.h5")
    one_line_error(res.stdout + res.stderr, res.returncode, "no such store")
    res = run(*EMBEDPIPE, "--debug", "info", tmp_path / "nope.h5")
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "StoreError: " in res.stderr and "no such store" in \
        res.stderr

    def bug(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("embedpipe.store.read.open_store", bug)
    res = cli("info", tmp_path / "nope.h5")
    one_line_error(res.output, res.exit_code, "unexpected ZeroDivisionError", "division by zero",
                   "--debug", expect=1)
    res = runner.invoke(app, ["--debug", "info", str(tmp_path / "nope.h5")])
    assert res.exit_code == 1 and isinstance(res.exception, ZeroDivisionError)
