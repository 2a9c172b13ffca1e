"""Outputs are checked before the work (a new user's attack, findings 2 and 9): a head, CSV,
ONNX, JSON or features file is never written over a feature store (a typo in -o must not
destroy hours of extraction), and an output that is a folder or in a folder that cannot be
written is refused before fitting, cross-validating or exporting, in one line (exit 2)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from clitools import cli, ok, one_line_error, sha


@pytest.fixture
def head(lite0_head: Path) -> Path:
    """A head to predict and export with (the session's centroid head)."""
    return lite0_head


@pytest.fixture
def other_store(store_copy: Path) -> Path:
    """A second store: the finished extraction a typo in -o would have destroyed."""
    return store_copy


def commands(store: Path, head: Path, out: Path) -> list[tuple[str, tuple]]:
    """(the output flag, the command) of every command that writes a file other than a store."""
    return [("--out", ("fit", store, "--head", "logreg", "-o", out, "-q")),
            ("--out", ("fit", store, "-o", out, "-q")),  # --head auto, the default
            ("--out", ("predict", head, "--store", store, "-o", out, "-q")),
            ("--json", ("cv", store, "--head", "centroid", "--json", out)),
            ("--json", ("compare", store, store, "--head", "centroid", "--json", out)),
            ("--out", ("export", head, "-o", out)),
            ("-o", ("export-features", store, "-o", out))]


def test_no_command_writes_over_a_feature_store(fmnist_store: Path, head: Path,
                                                other_store: Path, tmp_path: Path):
    before = sha(other_store)
    for flag, args in commands(fmnist_store, head, other_store):
        if args[0] == "export-features":  # its suffix decides the format: .h5 is refused first
            continue
        one_line_error(cli(*args), f"{flag} {other_store}", "is a feature store",
                       "another path")
    # a store under a name that does not look like one is recognised by its bytes
    for name in ("store.csv", "store.npz"):
        disguised = tmp_path / name
        os.replace(other_store, disguised)
        args = (("predict", head, "--store", fmnist_store, "-o", disguised, "-q")
                if name.endswith(".csv") else ("export-features", fmnist_store, "-o", disguised))
        one_line_error(cli(*args), str(disguised), "is a feature store")
        assert sha(disguised) == before
        other_store = disguised


def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the work of each command by a function that fails the test: its output checks
    must come first."""
    import embedpipe.evaluate.cv as cv_mod
    import embedpipe.features_io as fio
    import embedpipe.heads.auto as auto_mod
    import embedpipe.heads.train as train_mod
    import embedpipe.predict as predict_mod

    def no_work(*a, **k):
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(auto_mod, "fit", no_work)
    monkeypatch.setattr(train_mod, "open_stores", no_work)
    monkeypatch.setattr(predict_mod, "iter_store", no_work)
    monkeypatch.setattr(cv_mod, "run_cv", no_work)
    monkeypatch.setattr(cv_mod, "run_compare", no_work)
    monkeypatch.setattr(fio, "open_store", no_work)


def test_an_output_that_is_a_folder_is_refused_before_any_work(
        fmnist_store: Path, head: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _no_work(monkeypatch)
    folder = tmp_path / "a-folder.npz"  # a suffix export-features takes
    folder.mkdir()
    for flag, args in commands(fmnist_store, head, folder):
        one_line_error(cli(*args), f"{flag} {folder}", "is a folder", "file name such as")
    assert list(folder.iterdir()) == []


@pytest.fixture
def read_only_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every folder refuses new files at check_writable's probe (EROFS), as a read-only mount
    does: tests may run as root, whom chmod does not stop."""
    real_open = os.open

    def read_only(path, flags, *a):
        if ".probe." in os.fspath(path):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", read_only)


def test_an_unwritable_folder_is_refused_before_any_work(
        fmnist_store: Path, head: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        read_only_folders: None):
    _no_work(monkeypatch)
    out = tmp_path / "ro" / "x.npz"
    out.parent.mkdir()
    for flag, args in commands(fmnist_store, head, out):
        one_line_error(cli(*args), f"{flag} {out}", "cannot write there", "writable folder")
    assert list(out.parent.iterdir()) == []


def test_keep_store_in_an_unwritable_folder_names_keep_store(
        fmnist_store: Path, head: Path, tmp_path: Path, read_only_folders: None):
    """Finding 10: it said "pass an --out" where the option to change is --keep-store."""
    image = next(Path(fmnist_store).parent.rglob("*.png"), None) or tmp_path / "x.png"
    kept = tmp_path / "ro" / "k.h5"
    kept.parent.mkdir()
    one_line_error(cli("predict", head, image, "--keep-store", kept, "-q"),
                   f"--keep-store {kept}", "cannot write there")


def test_an_image_inside_an_input_folder_and_a_head_are_not_overwritten(
        fmnist_store: Path, head: Path, tmp_path: Path):
    """A second attack's findings: `predict HEAD FOLDER -o FOLDER/img.png` (and similar's -o)
    replaced that image with the CSV, exit 0; `cv --json HEAD` replaced a head with JSON."""
    from embedpipe.store import open_store

    image = next(Path(open_store(fmnist_store, features=False).runs[0]["source"]).rglob("*.png"))
    folder = tmp_path / "q"
    folder.mkdir()
    target = folder / image.name
    target.write_bytes(image.read_bytes())
    before = sha(target)
    one_line_error(cli("predict", head, folder, "-o", target, "-q"), f"--out {target}",
                   "one of the images given", "another output path")
    one_line_error(cli("similar", fmnist_store, folder, "-o", target, "-q"), f"-o {target}",
                   "one of the images given")
    assert sha(target) == before
    held = sha(head)
    one_line_error(cli("cv", fmnist_store, "--head", "centroid", "--json", head),
                   f"--json {head}", "is a head file")
    assert sha(head) == held


def test_an_output_through_a_symlink_writes_the_file_it_names(fmnist_store: Path, head: Path,
                                                              tmp_path: Path):
    """`-o link.csv` replaced the symlink with a regular file and left its target stale."""
    real = tmp_path / "real.csv"
    real.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    ok("predict", head, "--store", fmnist_store, "-o", link, "-q")
    assert link.is_symlink() and real.read_text().startswith("path,")
