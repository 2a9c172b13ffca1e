"""The command line as a user meets it: every bad argument fails in one line with the fix (exit 2), and an unexpected error exits 1 with one line (`--debug` shows the traceback)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import EMBEDPIPE, cli, copy_rows, one_line, run, runner
from imagegen import encode

from embedpipe.cli import app
from embedpipe.store import open_store

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
    np.save(d / "feats.npy", np.zeros((2, 4), np.float32))
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
    (["extract", "{dir}", "-o", "{dir}/junk.h5"], ["junk.h5", "not an HDF5 file",
                                                   "move this file aside"]),
    (["extract", "{dir}", "-o", "{dir}/text.txt/s.h5"], ["cannot create this folder",
                                                       "pass a store path"]),
    (["extract", "{dir}", "--batch-size", "many"], ["--batch-size", "extract --help"]),
    (["extract"], ["Missing argument", "extract --help"]),
    # info, merge, models, heads
    (["info", "{dir}/nope.h5"], ["no such store", "embedpipe extract"]),
    (["info", "{dir}/empty"], ["is a folder", ".h5"]),
    (["info", "{dir}/junk.h5"], ["junk.h5 is not an HDF5 file", "made by `embedpipe extract`"]),
    # an image or a features file where a store belongs: what it is and the command to use
    (["info", "{dir}/one.png"], ["one.png is an image, not a feature store",
                                 "embedpipe extract FOLDER", "embedpipe predict HEAD"]),
    (["fit", "{dir}/feats.npy"], ["feats.npy is a features file", "embedpipe import-features"]),
    (["info"], ["Missing argument", "info --help"]),
    (["merge", "{dir}/m.h5", "{dir}/nope.h5"], ["nope.h5", "no such store"]),
    (["merge", "{dir}/m.h5", "{dir}/junk.h5"], ["junk.h5", "not an HDF5 file"]),
    (["merge", "{dir}/m.h5"], ["Missing argument", "merge --help"]),
    (["models", "--all"], ["No such option", "models --help"]),
    (["heads", "--head", "svm"], ["No such option", "heads --help"]),
    (["bogus"], ["No such command", "--help"]),
    # fit
    (["fit", "{dir}/nope.h5"], ["no such store", "embedpipe extract"]),
    (["fit", "{store}", "--head", "forest"], ["--head forest", "logreg"]),
    (["fit", "{store}", "--head", "logreg", "--param", "C"], ["--param C", "NAME=VALUE"]),
    (["fit", "{store}", "--head", "logreg", "--param", "=3"], ["--param =3", "NAME=VALUE"]),
    (["fit", "{store}", "--head", "logreg", "--param", "gamma=2"], ["--param gamma", "logreg has no such"]),
    (["fit", "{store}", "--head", "logreg", "--param", "C=abc", "-o", "{dir}/x.skops"], ["C", "abc"]),
    (["fit", "{store}", "--head", "logreg", "--param", "C=-1", "-o", "{dir}/x.skops"], ["C", "-1"]),
    (["fit", "{store}", "--head", "knn", "--param", "n_neighbors=0", "-o", "{dir}/x.skops"],
     ["n_neighbors", "0"]),
    (["fit", "{store}", "--head", "logreg", "--param", "pca=2.5"], ["pca=2.5", "variance fraction"]),
    (["fit", "{store}", "--head", "logreg", "--class-weight", "heavy"], ["--class-weight heavy", "balanced"]),
    (["fit", "{one_class}", "-o", "{dir}/x.skops"], ["one class", "at least two"]),
    # an ensemble's vote settings (voting=hard and weights summing to 0 once crashed)
    (["fit", "{store}", "--head", "knn+logreg", "--param", "voting=hard", "-o", "{dir}/x.skops"],
     ["--param voting=hard", "soft", "leave voting out"]),
    (["fit", "{store}", "--head", "knn+logreg", "--param", "weights=1,-1", "-o",
      "{dir}/x.skops"], ["--param weights=1,-1", "2 non-negative numbers", "weights=1,1"]),
    # not numbers: the member that has weights of its own (knn: uniform/distance) is named
    (["fit", "{store}", "--head", "svm+knn", "--param", "weights=distance", "-o",
      "{dir}/x.skops"], ["--param weights=distance", "2 non-negative numbers", "weights=1,1",
                         "to set a member's own weights, pass --param knn:weights=distance"]),
    (["cv", "{store}", "--head", "svm+knn", "--param", "weights=distance"],
     ["--param weights=distance", "--param knn:weights=distance"]),
    (["fit", "{store}", "--head", "knn+logreg", "--param", "weights=0,0", "-o",
      "{dir}/x.skops"], ["--param weights=0,0", "not all 0"]),
    (["fit", "{store}", "--head", "knn+logreg", "--param", "weights=1", "-o", "{dir}/x.skops"],
     ["--param weights=1", "one per member"]),
    (["fit", "{store}", "--head", "knn+logreg", "--search", "-o", "{dir}/x.skops"],
     ["--search", "knn+logreg is an ensemble", "--head knn --search", "--head auto"]),
    (["cv", "{store}", "--head", "svm+ridge", "--search"],
     ["--search", "svm+ridge is an ensemble", "--head auto"]),
    (["fit", "{one_image}", "--head", "logreg", "--search", "-q", "-o", "{dir}/x.skops"],
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
    # options that mean nothing for the input given are refused, not silently ignored
    (["predict", "{head}", "{dir}/one.png", "--split", "test"],
     ["--split only applies to --store rows", "leave --split out"]),
    (["predict", "{head}", "{dir}/one.png", "--chunk-rows", "8"],
     ["--chunk-rows only applies to --store rows"]),
    (["predict", "{head}", "--store", "{store}", "--batch-size", "8"],
     ["--batch-size only applies when classifying images", "leave --batch-size out"]),
    (["predict", "{head}", "--store", "{store}", "--device", "cpu"], ["--device only applies"]),
    (["predict", "{head}", "--store", "{store}", "--runtime", "torch"],
     ["--runtime only applies"]),
    (["predict", "{head}", "--store", "{store}", "--workers", "0"], ["--workers only applies"]),
    (["predict", "{head}", "--store", "{store}", "--keep-store", "{dir}/k.h5"],
     ["--keep-store only applies"]),
    (["predict", "{head}", "--store", "{store}", "--weights", "{dir}/tiny.pth"],
     ["--weights only applies"]),
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
    # export's int8 options without --int8 (or --calib with dynamic int8) once did nothing
    (["export", "{head}", "-o", "{dir}/x.onnx", "--calib", "{dir}"],
     ["--calib only applies to int8", "add --int8"]),
    (["export", "{head}", "-o", "{dir}/x.onnx", "--calib-count", "8"],
     ["--calib-count only applies to int8"]),
    (["export", "{head}", "-o", "{dir}/x.onnx", "--int8-mode", "dynamic"],
     ["--int8-mode only applies to int8", "add --int8"]),
    (["export", "{head}", "-o", "{dir}/x.onnx", "--int8", "--int8-mode", "dynamic", "--calib",
      "{dir}"], ["--calib is for --int8-mode static", "leave --calib out"]),
    (["export", "{head}", "-o", "{dir}/x.onnx", "--int8", "--calib-count", "0"],
     ["--calib-count 0", "1 or more"]),
    # another embedpipe file where a head file belongs: said for what it is, with the command
    # that makes a head (export once said "not a readable head file (BadZipFile)")
    (["export", "{store}", "-o", "{dir}/x.onnx"],
     ["fmnist.h5 is an embedpipe feature store", "not a head file",
      "`embedpipe fit {store} --head logreg -o fmnist.skops`"]),
    (["predict", "{store}", "--store", "{store}"],
     ["is an embedpipe feature store", "`embedpipe fit {store}", "--store STORE"]),
    (["serve", "{store}"], ["is an embedpipe feature store", "`embedpipe fit {store}"]),
    (["export", "{dir}/tiny.pth", "-o", "{dir}/x.onnx"],
     ["tiny.pth is a PyTorch file", "--weights {dir}/tiny.pth", "embedpipe fit STORE.h5"]),
    (["predict", "{dir}/empty", "--store", "{store}"], ["empty is a folder", "embedpipe fit"]),
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
    one_line(res.output, res.exit_code, *[n.format(**values) for n in needles])


def test_debug_shows_the_traceback_and_unexpected_errors_exit_nonzero(tmp_path: Path,
                                                                      monkeypatch):
    res = run(*EMBEDPIPE, "info", tmp_path / "nope.h5")
    one_line(res.stdout + res.stderr, res.returncode, "no such store")
    res = run(*EMBEDPIPE, "--debug", "info", tmp_path / "nope.h5")
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "StoreError: " in res.stderr and "no such store" in \
        res.stderr

    def bug(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("embedpipe.store.report.open_store", bug)
    res = cli("info", tmp_path / "nope.h5")
    one_line(res.output, res.exit_code, "unexpected ZeroDivisionError", "division by zero",
                   "--debug", expect=1)
    res = runner.invoke(app, ["--debug", "info", str(tmp_path / "nope.h5")])
    assert res.exit_code == 1 and isinstance(res.exception, ZeroDivisionError)


def test_python_dash_m_embedpipe_is_the_same_command_line(tmp_path: Path):
    import subprocess
    import sys

    ok_run = subprocess.run([sys.executable, "-m", "embedpipe", "heads"], capture_output=True,
                            text=True, timeout=120)
    assert ok_run.returncode == 0 and ok_run.stdout.startswith("logreg"), ok_run.stderr
    bad = subprocess.run([sys.executable, "-m", "embedpipe", "info", str(tmp_path / "no.h5")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no.h5" in bad.stderr
