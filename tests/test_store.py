""""""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import h5py
import numpy as np
import pytest
from clitools import EMBEDPIPE, cli, copy_images, ok, one_line, one_line_error, run, wait_rows

from embedpipe.datasets import write_fashion_mnist_folder
from embedpipe.store import StoreWriter, open_store, read_identity
from embedpipe.store import write as store_write
from embedpipe.store.schema import StoreFull

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


def test_full_disk_stops_in_one_line_keeps_every_committed_batch_and_resumes(
        small_disk: Path, fmnist_src: Path, tmp_path: Path):
    data = copy_images(fmnist_src, tmp_path / "data", 8)
    store = small_disk / "s.h5"
    ok("extract", data, "-o", store, "--precision", "fp32", "-b", "4", "--workers", "0", "-q")
    before = open_store(store)
    copy_images(fmnist_src, data, 12, start=8)
    filler = _fill(small_disk)
    res = run(*EMBEDPIPE, "extract", data, "-o", store, "--precision", "fp32", "-b", "4",
              "--workers", "0", "-q")
    one_line(res.stdout + res.stderr, res.returncode, str(store), "disk full",
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
    data = copy_images(fmnist_src, tmp_path / "data", 8)
    store = small_disk / "s.h5"
    filler = _fill(small_disk, leave=256 << 10)  # room for a new store, not for its first chunk
    res = run(sys.executable, "-c", _NO_SPACE_RESERVE, "extract", data, "-o", store,
              "--precision", "fp32", "-b", "4", "--workers", "0", "-q")
    one_line(res.stdout + res.stderr, res.returncode, str(store), "disk full",
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
    data = copy_images(fmnist_src, tmp_path / "data", 20)
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
    one_line(res.output, res.exit_code, str(store), "disk full",
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
        one_line(res.output, res.exit_code, str(store), "another process is writing",
                       "wait for it to finish")
        res = cli("merge", store, store)
        one_line(res.output, res.exit_code, "another process is writing")
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
        one_line(res.output, res.exit_code, str(trunc), "extract")
    # extract into it: damaged, not "open in another process" (HDF5's message names
    # "sblock", which a test for "lock" took for a lock held by another writer)
    res = cli("extract", fmnist_src, "-o", trunc)
    one_line(res.output, res.exit_code, str(trunc), "damaged", "move it aside")
    assert "another process" not in res.output
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
        one_line(res.output, res.exit_code, str(feats), "damaged", "checksum",
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
            one_line(res.output, res.exit_code, str(meta), "extract", *needles)
    # a committed counter that claims more rows than the file holds
    counter = tmp_path / "counter.h5"
    shutil.copyfile(store_copy, counter)
    with h5py.File(counter, "r+") as f:
        f["committed"][0] = 10**6
    for args in (("info", counter), ("predict", lite0_head, "--store", counter)):
        res = cli(*args)
        one_line(res.output, res.exit_code, str(counter), "damaged", "committed")


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
                                                           fmnist_store: Path, tmp_path: Path):
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
        one_line(res.output, res.exit_code, str(store_copy), "edited", "extract")
    # edited consistently: the claim itself is refused by the head and by extract
    edit(True)
    res = cli("predict", lite0_head, "--store", store_copy)
    one_line(res.output, res.exit_code, str(store_copy), "another backbone", "resnet50")
    # the store's images and a new one (extract loads the backbone only when there is work):
    # the real backbone may not extend it
    data = tmp_path / "data"
    shutil.copytree(fmnist_store.parent / "data", data)
    shutil.copy(next((data / "test" / "bag").glob("*.png")), data / "test" / "bag" / "new.png")
    res = cli("extract", data, "-o", store_copy)
    one_line(res.output, res.exit_code, str(store_copy), "other settings", "resnet50")
    # a feature_dim the stored features contradict
    edit(True, model="tf_efficientnet_lite0", weights_source="bundled:efficientnet-lite0-"
         "pytorch-model", feature_dim=2048)
    res = cli("predict", lite0_head, "--store", store_copy)
    one_line(res.output, res.exit_code, str(store_copy), "damaged", "feature_dim")


# ---------------------------------------------------------------------------------------------
# one writer per file, whatever its name


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A Fashion-MNIST folder of 50 images, a folder of its first three classes (15 images)
    and a store of those: extracting the whole folder into the store extends it by 35 rows (a
    folder none of whose files is in the store is another dataset, refused)."""
    root = tmp_path_factory.mktemp("lock")
    both = write_fashion_mnist_folder(root / "both", per_class=5)
    first = root / "first"
    for cls in sorted(p.name for p in both.iterdir() if p.name < "d"):  # three classes
        shutil.copytree(both / cls, first / cls)
    store = root / "first.h5"
    ok("extract", first, "-o", store, "-q")
    return first, both, store


def _rows(path: Path) -> int:
    return len(open_store(path, features=False))


def _busy(res, path: Path) -> None:
    one_line_error(res, str(path), "another process is writing this store")


def test_a_writer_of_the_real_file_locks_out_its_symlinks_and_the_reverse(
        two_folders: tuple[Path, Path, Path], tmp_path: Path):
    """`extract -o alias.h5` (alias.h5 -> real.h5) while another writer holds real.h5 is refused,
    and the reverse; before, the first "recovered" the live store and renamed a copy over it,
    and the second reported "done" with rows missing."""
    first, grown, src = two_folders
    real = tmp_path / "real.h5"
    shutil.copy(src, real)
    n = _rows(real)
    alias = tmp_path / "alias.h5"
    alias.symlink_to("real.h5")
    (tmp_path / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    via_dir = tmp_path / "dirlink" / "real.h5"
    other = tmp_path / "other.h5"
    shutil.copy(src, other)

    for held, others in ((real, [alias, via_dir]), (alias, [real, via_dir]),
                         (via_dir, [real, alias])):
        with StoreWriter.open(held, read_identity(real), versions={}):
            for name in others:
                _busy(cli("extract", grown, "-o", name, "-q"), name)
                _busy(cli("merge", other, "-o", name), name)
                _busy(cli("extract", first, "-o", name, "--prune", "-q"), name)
        assert _rows(real) == n and alias.is_symlink()
    assert sorted(p.name for p in tmp_path.glob(".*.lock")) == [".real.h5.lock"]

    # with nobody writing, a write through the alias goes to the real file, the link stays
    res = ok("extract", grown, "-o", alias, "-q")
    assert alias.is_symlink() and os.readlink(alias) == "real.h5"
    assert _rows(real) == sum(1 for _ in grown.rglob("*.png")) > n, res.output
    assert sorted(p.name for p in tmp_path.glob(".*.lock")) == [".real.h5.lock"]


def test_a_store_with_hard_links_is_not_written(two_folders: tuple[Path, Path, Path],
                                                tmp_path: Path):
    """A hard link is another name the lock beside one name cannot see: refused in one line,
    the store untouched."""
    _, grown, src = two_folders
    real = tmp_path / "real.h5"
    shutil.copy(src, real)
    n = _rows(real)
    link = tmp_path / "link.h5"
    os.link(real, link)
    for name in (real, link):
        one_line_error(cli("extract", grown, "-o", name, "-q"), str(name), "2 hard links")
        one_line_error(cli("merge", src, "-o", name), str(name), "2 hard links")
    assert _rows(real) == n
    link.unlink()
    ok("extract", grown, "-o", real, "-q")
    assert _rows(real) > n
# the free-space check says what is free and what is needed

IDENT = {"model": "m", "weights_source": "random", "weights_sha256": "0" * 64,
         "data_config": "{}", "pool": "avg", "precision": "fp32", "dtype": "float32",
         "feature_dim": 1280}


def test_too_little_free_space_names_free_and_needed_and_keeps_committed_rows(
        tmp_path: Path, monkeypatch):
    path = tmp_path / "s.h5"
    batch = dict(labels=[-1] * 4, hashes=["h"] * 4, splits=[""] * 4, mtime_ns=[0] * 4,
                 size=[0] * 4)
    X = np.ones((4, 1280), np.float32)
    usage = namedtuple("usage", "total used free")
    with StoreWriter.open(path, IDENT, versions={}) as w:
        w.append(X, paths=[f"a{i}.png" for i in range(4)], **batch)
        w._fallocate = False  # a file system without fallocate: free space is checked
        need = w._space_needed(4)
        monkeypatch.setattr(store_write.shutil, "disk_usage",
                            lambda p: usage(1 << 40, 0, need - (1 << 20)))
        with pytest.raises(StoreFull) as e:
            w.append(X, paths=[f"b{i}.png" for i in range(4)], **batch)
    text = str(e.value)
    assert "disk full" not in text and "not enough disk space" in text, text
    assert f"{(need - (1 << 20)) / 2**20:.1f} MiB free" in text, text
    assert f"up to {need / 2**20:.1f} MiB needed" in text, text
    assert "4 rows committed before are kept" in text
    monkeypatch.setattr(store_write.shutil, "disk_usage", shutil.disk_usage)
    assert len(open_store(path)) == 4
