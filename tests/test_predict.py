"""`embedpipe predict`: its CSV is written atomically, never over one of its inputs, and a
full or read-only disk, or features that are not finite, end in one line (exit 2)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from clitools import cli, copy_rows, ok, one_line_error, read_csv, sha
from embedpipe.store import open_store


@pytest.fixture(scope="module")
def head(fmnist_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("predict") / "logreg.skops"
    ok("fit", fmnist_store, "--head", "logreg", "-o", out, "-q")
    return out


@pytest.fixture
def store(store_copy: Path) -> Path:
    return store_copy


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_predict_refuses_to_write_over_its_own_inputs(head: Path, store: Path,
                                                      tmp_path: Path):
    """-o naming the store or the head (directly, through a symlink or a hard link), an input
    image, or a --keep-store naming the head: one line, exit 2, the input unchanged."""
    before = {store: sha(store), head: sha(head)}
    (tmp_path / "alias.h5").symlink_to(store)
    os.link(store, tmp_path / "hard.h5")
    for out in (store, tmp_path / "alias.h5", tmp_path / "hard.h5", head):
        one_line_error(cli("predict", head, "--store", store, "-o", out, "-q"),
                       f"--out {out}", "input of this command", "another output path")
    link = tmp_path / "head-link.skops"
    link.symlink_to(head)
    one_line_error(cli("predict", link, "--store", store, "-o", head, "-q"), "input")
    image = next(Path(open_store(store, features=False).runs[0]["source"]).rglob("*.png"))
    copy = tmp_path / "img.png"
    copy.write_bytes(image.read_bytes())
    png = sha(copy)
    one_line_error(cli("predict", head, copy, "-o", copy, "-q"), f"--out {copy}", "input")
    one_line_error(cli("predict", head, copy, "--keep-store", head, "-q"),
                   f"--keep-store {head}", "input")
    assert sha(copy) == png
    assert {p: sha(p) for p in before} == before
    assert leftovers(tmp_path) == []


def test_full_disk_keeps_the_older_csv_and_leaves_no_temporary(head: Path, store: Path,
                                                               tmp_path: Path, monkeypatch):
    """ENOSPC while the CSV is written (injected into the csv writer): one line naming the
    file and the fix, the CSV of an earlier run unchanged, no temporary file left."""
    import embedpipe.predict as pr

    out = tmp_path / "preds.csv"
    ok("predict", head, "--store", store, "-o", out, "-q")
    older = out.read_bytes()

    class FullWriter:
        def __init__(self, f):
            self.n = 0

        def writerow(self, row):
            self.n += 1
            if self.n > 3:
                raise OSError(errno.ENOSPC, "No space left on device")

    class FakeCsv:
        writer = FullWriter

    monkeypatch.setattr(pr, "csv", FakeCsv)
    res = cli("predict", head, "--store", store, "-o", out, "--top-k", "1", "-q")
    one_line_error(res, f"--out {out}", "disk full", "free space")
    assert out.read_bytes() == older
    assert leftovers(tmp_path) == []


def _mount(mnt: Path, options: str) -> None:
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); "
                    "test_full_disk_keeps_the_older_csv_and_leaves_no_temporary injects ENOSPC")


def test_real_full_and_read_only_disks_end_in_one_line(head: Path, store: Path,
                                                       tmp_path: Path):
    full, ro = tmp_path / "full", tmp_path / "ro"
    _mount(full, "size=64k")
    try:
        _mount(ro, "size=64k,ro")
        try:
            with open(full / "filler", "wb", buffering=0) as f:  # fill it up
                with pytest.raises(OSError) as e:
                    while True:
                        f.write(b"\0" * 4096)
                assert e.value.errno == errno.ENOSPC
            one_line_error(cli("predict", head, "--store", store, "-o", full / "p.csv", "-q"),
                           f"--out {full / 'p.csv'}", "disk full")
            assert leftovers(full) == [] and not (full / "p.csv").exists()
            one_line_error(cli("predict", head, "--store", store, "-o", ro / "p.csv", "-q"),
                           f"--out {ro / 'p.csv'}", "cannot write there", "writable folder")
        finally:
            subprocess.run(["umount", "-l", str(ro)], timeout=30)
    finally:
        subprocess.run(["umount", "-l", str(full)], timeout=30)


def test_stale_temporaries_of_killed_runs_are_cleaned_and_live_ones_kept(head: Path,
                                                                         store: Path,
                                                                         tmp_path: Path):
    out = tmp_path / "preds.csv"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".preds.csv.{dead.pid}.embedpipe.tmp"
        running = tmp_path / f".preds.csv.{live.pid}.embedpipe.tmp"
        other = tmp_path / f".other.csv.{dead.pid}.embedpipe.tmp"  # not this output's
        mine = tmp_path / ".preds.csv.tmp"  # not our pattern: someone else's file
        for p in (stale, running, other, mine):
            p.write_text("partial")
        ok("predict", head, "--store", store, "-o", out, "-q")
        assert not stale.exists()
        assert running.exists() and other.exists() and mine.exists()
        assert len(read_csv(out)) == len(open_store(store, features=False))
    finally:
        live.kill()
        live.wait()


def test_nonfinite_features_are_refused_naming_the_rows(head: Path, fmnist_store: Path,
                                                        tmp_path: Path):
    """A store with a NaN and an inf row: predict --store refuses in one line naming them
    (before: confidence `nan` in the CSV), writes no CSV; fit refuses the same way."""
    s = open_store(fmnist_store)
    X = s.features.copy()
    X[3, 7] = np.nan
    X[10, 0] = np.inf
    bad = tmp_path / "bad.h5"
    copy_rows(fmnist_store, bad, list(range(len(s))), features=X)
    out = tmp_path / "p.csv"
    for chunk in ([], ["--chunk-rows", "4"]):  # 4: the rows are in two chunks, both counted
        one_line_error(cli("predict", head, "--store", bad, "-o", out, "-q", *chunk), str(bad),
                       "2 row(s) hold NaN or infinite", s.paths[3], s.paths[10])
        assert not out.exists() and leftovers(tmp_path) == []


def test_features_far_beyond_any_embedding_are_refused_like_nan(fmnist_store: Path,
                                                                tmp_path: Path):
    """Finite values no backbone produces (1e17, 1e20: a damaged store or a bad import) went
    through: a knn head on standardised rows stopped with scikit-learn's raw ValueError ("a bug
    in embedpipe"), the others wrote confidences of 1.0 or nan (helper-32's F8). They are
    refused as NaN rows are, in fit, predict --store and Head.predict; 1e6 still predicts."""
    import embedpipe

    s = open_store(fmnist_store)
    knn = tmp_path / "knn.skops"
    ok("fit", fmnist_store, "--head", "knn", "--param", "prep=scale", "-o", knn, "-q")
    X = s.features.copy()
    test = [i for i, sp in enumerate(s.splits) if sp == "test"]
    X[test[0], :] = 1e17
    X[test[1], 3] = -1e20
    X[test[2], :] = 1e6  # large, still usable
    bad = tmp_path / "big.h5"
    copy_rows(fmnist_store, bad, list(range(len(s))), features=X)
    out = tmp_path / "p.csv"
    one_line_error(cli("predict", knn, "--store", bad, "-o", out, "-q"), str(bad),
                   "2 row(s) hold NaN or infinite features, or values beyond ±1e+12",
                   s.paths[test[0]], s.paths[test[1]])
    assert not out.exists()
    X[test[:2]] = s.features[test[:2]]
    train = [i for i, sp in enumerate(s.splits) if sp == "train"]
    X[train[4], 0] = 3e13
    copy_rows(fmnist_store, bad, list(range(len(s))), features=X)
    one_line_error(cli("fit", bad, "--head", "logreg", "-o", tmp_path / "h.skops", "-q"),
                   "1 row(s) hold NaN or infinite features, or values beyond ±1e+12",
                   s.paths[train[4]])
    head = embedpipe.load_head(knn)
    rows = np.asarray(X[test[2:5]], np.float32)
    assert len(head.predict(rows)) == 3  # the 1e6 row
    rows[1, 0] = 2e12
    with pytest.raises(embedpipe.EmbedpipeError, match=r"1 row\(s\) .* beyond ±1e\+12 "
                                                       r"\(the first: row 1\)"):
        head.predict(rows)


def test_float16_store_rows_holding_inf_are_refused(fmnist_store: Path, tmp_path: Path):
    """An fp16 store (`extract --dtype float16`): comparing its rows with the ±1e12 limit cast
    the limit to float16, i.e. inf (numpy's overflow warning in CI), so an inf row passed as
    usable. Its NaN and inf rows are refused as a float32 store's are, without a warning."""
    import warnings

    from test_compare import derived_store

    from embedpipe import checks

    half = derived_store(fmnist_store, tmp_path / "half.h5")
    s = open_store(half)
    X = np.asarray(s.features)
    assert X.dtype == np.float16
    train = [i for i, sp in enumerate(s.splits) if sp == "train"]
    X[train[1], 2] = np.inf
    X[train[3], 0] = -np.inf
    X[train[5], 7] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(checks.unusable_rows(X)) == [train[1], train[3], train[5]]
    bad = derived_store(fmnist_store, tmp_path / "bad.h5")
    with h5py.File(bad, "r+") as f:
        f["features"][...] = X
    one_line_error(cli("fit", bad, "--head", "ridge", "-o", tmp_path / "h.skops", "-q"),
                   "3 row(s) hold NaN or infinite features", s.paths[train[1]],
                   s.paths[train[3]])
    assert not (tmp_path / "h.skops").exists()


def test_embedpipe_files_where_a_head_or_images_belong_are_named_with_the_fix(
        head: Path, store: Path, fmnist_src: Path, tmp_path: Path):
    """A features file (`export-features`) given as the head once read "not a readable head
    file (KeyError ...): it is damaged"; given among the images, like a store or a head, it
    was skipped as "not an image" and predict exited 0 with 0 images. Each is now one line
    saying what the file is and what to do with it, nothing written."""
    feats = tmp_path / "feats.npz"
    ok("export-features", store, "-o", feats)
    image = next(fmnist_src.rglob("*.png"))
    csv_out = tmp_path / "p.csv"
    cases = [
        (["predict", feats, fmnist_src], [f"{feats} is a features file", "not a head file",
                                          f"embedpipe import-features {feats} -o",
                                          "embedpipe fit"]),
        (["predict", feats, "--store", store], [f"{feats} is a features file"]),
        (["predict", head, image, feats], [f"{feats} is a features file", "not an image",
                                           f"embedpipe import-features {feats} -o",
                                           "--store"]),
        (["predict", head, store], [f"{store} is an embedpipe feature store", "not an image",
                                    f"embedpipe predict HEAD --store {store}"]),
        (["predict", head, image, head], [f"{head} is a head file", "not an image",
                                          "pass one head first"]),
    ]
    for args, needles in cases:
        one_line_error(cli(*args, "-o", csv_out), *needles)
        assert not csv_out.exists(), args


def test_predict_on_the_store_a_head_was_fitted_on_says_its_training_rows_are_scored(
        fmnist_store: Path, tmp_path: Path):
    """helper-35's new-user pass: `predict HEAD --store STORE` (the README's example) printed
    "accuracy on the 250 labeled ones" over the 200 rows the head was fitted on too, with
    nothing saying so. A note counts them and names --split test; the test split alone, or
    a store of other images, gets none."""
    head = tmp_path / "h.skops"
    ok("fit", fmnist_store, "--head", "ridge", "-o", head, "-q")
    note = (f"note: 200 of the 250 labeled rows scored are images {head} was fitted on, so the "
            "accuracy over them overrates it; pass --split test to score rows it was not "
            "fitted on")
    res = ok("predict", head, "--store", fmnist_store, "-o", tmp_path / "a.csv")
    assert note in res.output, res.output
    res = ok("predict", head, "--store", fmnist_store, "--split", "test", "-o", tmp_path / "b.csv")
    assert "fitted on" not in res.output, res.output
    test_rows = [i for i, s in enumerate(open_store(fmnist_store).splits) if s == "test"]
    other = copy_rows(fmnist_store, tmp_path / "other.h5", test_rows)  # other images
    res = ok("predict", head, "--store", other, "-o", tmp_path / "c.csv")
    assert "fitted on" not in res.output, res.output


def test_when_no_image_given_can_be_read_predict_and_similar_fail_in_one_line(
        head: Path, store: Path, tmp_path: Path):
    """A new user's attack (finding 8): every input unusable exited 0 with an empty CSV or an
    empty table. Now one line naming the files, exit 2, no CSV; one good image among bad ones
    is still predicted (the bad ones skipped)."""
    zero, text = tmp_path / "zero.png", tmp_path / "not.jpg"
    zero.write_bytes(b"")
    text.write_text("hi\n")
    out = tmp_path / "p.csv"
    line = one_line_error(cli("predict", head, zero, text, "-o", out, "-q"),
                          "none of the 2 images given could be read", "zero.png",
                          "pass image files")
    assert "not.jpg" in line
    assert not out.exists()
    one_line_error(cli("similar", store, zero, "-q"), "none of the 1 image given could be read",
                   "zero.png")
    image = next(Path(open_store(store, features=False).runs[0]["source"]).rglob("*.png"))
    good = tmp_path / "good.png"
    good.write_bytes(image.read_bytes())
    res = ok("predict", head, zero, good, "-o", out, "-q")
    assert [Path(r["path"]).name for r in read_csv(out)] == ["good.png"], res.output


def test_the_unknown_classes_note_says_when_it_lists_only_some():
    """It named 5 of 8 unknown classes as if they were all (an attack's finding 17)."""
    from types import SimpleNamespace

    from embedpipe.predict import _notes

    head = SimpleNamespace(path="h.skops", classes=["a", "b"])
    (note,) = _notes(head, {"a", *"cdefghij"}, calibrated=True)
    assert "8 true class(es) are unknown to the head (c, d, e, f, g, ...)" in note
    (note,) = _notes(head, {"a", "c", "d"}, calibrated=True)
    assert "2 true class(es) are unknown to the head (c, d); " in note


def _append_rows(src: Path, dst: Path, keep: list[int]) -> None:
    """Rows ``keep`` of ``src`` appended to the store ``dst`` (as an incremental extract of
    new images into it would)."""
    from embedpipe.store import StoreWriter, read_identity

    s = open_store(src)
    with StoreWriter.open(dst, read_identity(dst), versions={}) as w:
        ids = w.class_ids({s.classes[s.labels[i]] for i in keep})
        w.append(s.features[keep], paths=[s.paths[i] for i in keep],
                 labels=[ids[s.classes[s.labels[i]]] for i in keep],
                 hashes=[s.hashes[i] for i in keep], splits=[s.splits[i] for i in keep],
                 mtime_ns=[0] * len(keep), size=[0] * len(keep))


def test_the_fitted_rows_note_counts_the_rows_the_head_was_fitted_on_by_image(
        fmnist_store: Path, tmp_path: Path):
    """helper-42's finding #6: the note counted the store's train split, not the rows the head
    was fitted on. After new train images were extracted into the store it said 470 where the
    head had been fitted on 300, and on a fresh store of the very training images it said
    nothing. A head now records its training rows by their images' sha256 and the note counts
    matching rows, in any store of them."""
    full = open_store(fmnist_store)
    train = [i for i, s in enumerate(full.splits) if s == "train"]
    test = [i for i, s in enumerate(full.splits) if s == "test"]
    grown = copy_rows(fmnist_store, tmp_path / "grown.h5", train[::2] + test)  # 100 + 50
    head = tmp_path / "g.skops"
    ok("fit", grown, "--head", "logreg", "-o", head, "-q")
    _append_rows(fmnist_store, grown, train[1::2])  # 100 new train images, after the fit
    assert len(open_store(grown)) == 250

    def note(res, n: int, total: int = 250) -> None:
        want = (f"note: {n} of the {total} labeled rows scored are images {head} was fitted "
                "on, so the accuracy over them overrates it")
        assert want in res.output, res.output
        assert res.output.count("was fitted on") == 1, res.output

    note(ok("predict", head, "--store", grown, "-o", tmp_path / "a.csv"), 100)
    # a fresh store of the same images (another file, another store_id): the same 100
    fresh = copy_rows(fmnist_store, tmp_path / "fresh.h5", list(range(len(full))))
    note(ok("predict", head, "--store", fresh, "-o", tmp_path / "b.csv"), 100)
    note(ok("predict", head, "--store", fresh, "--split", "train", "-o", tmp_path / "c.csv"),
         100, 200)
    res = ok("predict", head, "--store", fresh, "--split", "test", "-o", tmp_path / "d.csv")
    assert "fitted on" not in res.output, res.output


def test_fitted_rows_of_imported_and_stacked_stores_and_heads_without_a_record(
        fmnist_store: Path, tmp_path: Path):
    """Imported stores (row hashes from the file, or of the features when it has none) and
    stacked stores record and count their rows like any store; a head written before heads
    recorded their rows (no record) keeps the old by-split note and predicts as before."""
    import json
    import zipfile

    src = tmp_path / "f.npz"
    ok("export-features", fmnist_store, "-o", src, "-q")
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files if k != "hash"}  # no image hashes: features' sha256
    bare = tmp_path / "bare.npz"
    np.savez(bare, **arrays)
    imported = tmp_path / "imp.h5"
    ok("import-features", bare, "-o", imported, "-q")
    head = tmp_path / "imp.skops"
    ok("fit", imported, "--head", "logreg", "-o", head, "-q")
    res = ok("predict", head, "--store", imported, "-o", tmp_path / "a.csv")
    assert f"200 of the 250 labeled rows scored are images {head} was fitted" in res.output

    stacked = tmp_path / "st.skops"  # the extracted store beside the imported one
    ok("fit", fmnist_store, imported, "--head", "logreg", "-o", stacked, "-q")
    res = ok("predict", stacked, "--store", fmnist_store, "--store", imported, "-o",
             tmp_path / "b.csv")
    assert f"200 of the 250 labeled rows scored are images {stacked} was fitted" in res.output

    # the record is one member of the head file, 8 bytes a row, described in the manifest
    with zipfile.ZipFile(head) as z:
        keys = np.load(z.open("embedpipe/fitted_rows.npy"))
        manifest = json.loads(z.read("embedpipe/head.json"))["manifest"]
    assert keys.dtype == np.uint64 and len(keys) == 200 and (np.diff(keys) > 0).all()
    assert manifest["training"]["row_hashes"]["rows"] == 200

    from embedpipe.heads import artifacts

    # a head as fit wrote them before the record: the by-split rule on its own store
    mine = tmp_path / "mine.skops"
    ok("fit", fmnist_store, "--head", "logreg", "-o", mine, "-q")
    loaded = artifacts.load(mine)
    assert len(loaded.fitted_row_keys()) == 200
    training = {k: v for k, v in loaded.manifest["training"].items() if k != "row_hashes"}
    older = artifacts.save(tmp_path / "older.skops", loaded.estimator,
                           {**loaded.manifest, "training": training},
                           check_rows=open_store(fmnist_store).features[:32])
    assert artifacts.load(older).fitted_row_keys() is None
    res = ok("predict", older, "--store", fmnist_store, "-o", tmp_path / "c.csv")
    assert (f"note: 200 of these rows are the ones {older} was fitted on, so the accuracy "
            "over them overrates it; pass --split test") in res.output, res.output


def test_predicting_the_training_images_themselves_says_so(fmnist: Path, tmp_path: Path):
    """`predict HEAD IMAGES` on the images the head was fitted on (extracted again into a
    temporary store) said nothing before heads recorded their rows; now the note counts them."""
    store, head = tmp_path / "s.h5", tmp_path / "h.skops"
    ok("extract", fmnist, "-o", store, "--precision", "fp32", "-q")
    ok("fit", store, "--head", "logreg", "-o", head, "-q")
    res = ok("predict", head, fmnist, "-o", tmp_path / "p.csv")
    assert (f"note: 60 of the 60 labeled images scored are images {head} was fitted on, so "
            "the accuracy over them overrates it; predict images it was not fitted on"
            ) in res.output, res.output
