"""`embedpipe export`: backbone + head as one ONNX graph, checked with ONNX Runtime against
`embedpipe predict` on real Fashion-MNIST images (bundled EfficientNet-Lite0)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from clitools import cli, ok, one_line, one_line_error, read_csv
from imagegen import pattern

from embedpipe.data import load_image
from embedpipe.heads import artifacts, auto
from embedpipe.store import open_store

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")

FP32_ATOL = 1e-4  # |ONNX probability - embedpipe predict probability| (CSV has 6 decimals)
INT8_MIN_AGREEMENT = 0.6  # measured 0.76-0.84 on these 50 images (heads fitted on 200 rows)
INT8_MAX_MEAN_DP = 0.1  # measured ~0.04 mean |Δp| over all classes


@pytest.fixture(scope="module")
def work(fmnist_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four heads fitted via the CLI (logreg: native probabilities; ridge: temperature-
    calibrated; knn: its defaults, l2+lda rows and 1/distance weights, written in float64;
    auto: on these 200 rows the soft vote of every head's defaults, the default head of `fit`), and
    `embedpipe predict` CSVs (top 10) for the 50 test images."""
    d = tmp_path_factory.mktemp("export")
    images = Path(open_store(fmnist_store, features=False).runs[0]["source"]) / "test"
    out: dict = {"dir": d, "images": images}
    for head in ("logreg", "ridge", "knn", "auto"):
        ok("fit", fmnist_store, "--head", head, "-o", d / f"{head}.skops",
           "-q")
    kept = d / "kept.h5"
    ok("predict", d / "logreg.skops", images, "-o", d / "logreg.csv", "--top-k", "10",
       "--keep-store", kept, "-q")
    for head in ("ridge", "knn", "auto"):
        ok("predict", d / f"{head}.skops", "--store", kept, "-o", d / f"{head}.csv",
           "--top-k", "10")
    ok("export", d / "logreg.skops", "-o", d / "logreg.onnx", "-q")
    return out


def run_onnx(model: Path, paths: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Preprocess exactly as the sidecar says (export.preprocess: Pillow + numpy) and run."""
    from embedpipe.export import preprocess

    side = json.loads(Path(f"{model}.json").read_text(encoding="utf-8"))
    x = np.stack([preprocess(load_image(p), side["input"]) for p in paths])
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    probs, label = sess.run(["probabilities", "label"], {side["input"]["name"]: x})
    return probs, label, side


def csv_probs(rows: list[dict[str, str]], classes: list[str]) -> np.ndarray:
    p = np.zeros((len(rows), len(classes)))
    for i, r in enumerate(rows):
        for k in range(1, len(classes) + 1):
            p[i, classes.index(r[f"top{k}"])] = float(r[f"top{k}_prob"])
    return p


@pytest.mark.parametrize("head", ["logreg", "ridge", "knn", "auto"])
def test_onnx_fp32_equals_embedpipe_predict_on_real_images(work: dict, head: str):
    d = work["dir"]
    model = d / f"{head}.onnx"
    name = artifacts.load(d / f"{head}.skops").manifest["head"]
    if head == "auto":  # the vote's members, each written as ONNX ops, averaged in the graph
        assert len(name.split("+")) == len(auto.VOTE_ORDER), name
    if not model.exists():
        res = ok("export", d / f"{head}.skops", "-o", model)
        assert f"exported {name} head" in res.output and "fp32" in res.output
        # what the agreement was measured on; a knn's own training rows can differ more
        assert "on 64 sample feature rows" in res.output
        assert ("its own training rows a knn can differ more" in res.output) == (
            "knn" in name)
    rows = read_csv(d / f"{head}.csv")
    paths = [str(work["images"] / r["path"].split("/test/", 1)[-1])
             if not Path(r["path"]).is_file() else r["path"] for r in rows]
    assert len(rows) == 50
    probs, label, side = run_onnx(model, paths)
    classes = side["classes"]
    assert probs.shape == (50, len(classes)) and label.dtype == np.int64
    assert [classes[i] for i in label] == [r["predicted"] for r in rows]  # same top-1, all
    np.testing.assert_allclose(probs, csv_probs(rows, classes), atol=FP32_ATOL, rtol=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_sidecar_records_classes_input_spec_and_provenance(work: dict):
    d = work["dir"]
    side = json.loads((d / "logreg.onnx.json").read_text(encoding="utf-8"))
    head = artifacts.load(d / "logreg.skops")
    ident = head.identity
    cfg = json.loads(ident["data_config"]) if isinstance(ident["data_config"], str) \
        else ident["data_config"]
    assert side["classes"] == head.classes and side["head"] == "logreg"
    assert side["precision"] == "fp32" and side["int8"] is False and side["opset"] == 17
    spec = side["input"]
    assert spec["name"] == "image" and spec["shape"] == ["N", 3, *cfg["input_size"][1:]]
    assert spec["dtype"] == "float32" and spec["value_range"] == [0.0, 1.0]
    assert spec["normalisation"] == {"mean": cfg["mean"], "std": cfg["std"], "in_graph": True}
    assert spec["interpolation"] == cfg["interpolation"] and spec["crop_pct"] == cfg["crop_pct"]
    assert side["backbone"]["weights_sha256"] == ident["weights_sha256"]
    assert side["manifest"]["store_identity"]["weights_sha256"] == ident["weights_sha256"]
    assert set(side["outputs"]) == {"probabilities", "label"}
    assert side["notes"] == []  # an fp32 store: the graph reproduces its features
    from embedpipe.export import precision_notes

    bf16 = precision_notes({**ident, "precision": "bf16-openvino"})
    assert len(bf16) == 1 and "bf16-openvino features" in bf16[0] and "--precision fp32" in bf16[0]
    assert {"onnx", "onnxruntime", "torch", "scikit-learn"} <= set(side["versions"])


def test_preprocess_equals_the_extraction_transform(work: dict):
    """The sidecar's torch-free recipe gives the tensor embedpipe's own extraction feeds the
    backbone (before mean/std, which the graph applies)."""
    import torch

    from embedpipe.backbones import make_transform
    from embedpipe.export import input_spec, preprocess

    head = artifacts.load(work["dir"] / "logreg.skops")
    cfg = head.identity["data_config"]
    cfg = json.loads(cfg) if isinstance(cfg, str) else cfg
    tf = make_transform(cfg)
    spec = input_spec(cfg)
    from PIL import Image

    imgs = [load_image(p) for p in sorted(work["images"].rglob("*.png"))[:3]]
    imgs.append(Image.new("RGB", (300, 180), (10, 200, 30)))  # non-square, needs a crop
    # aspect-ratio bombs: both paths centre-crop them to 16:1 before the resize
    imgs += [Image.fromarray(pattern((5000, 1), seed=1)), Image.fromarray(pattern((2, 9000)))]
    for img in imgs:
        mine = torch.from_numpy(preprocess(img, spec))
        mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
        std = torch.tensor(cfg["std"]).view(3, 1, 1)
        assert torch.allclose((mine - mean) / std, tf(img), atol=1e-5)


def test_int8_static_stays_close_to_fp32(work: dict):
    d = work["dir"]
    res = ok("export", d / "logreg.skops", "--int8", "-o", d / "logreg.int8.onnx")
    assert "int8 static" in res.output and "calibrating" in res.output
    paths = [str(p) for p in sorted(work["images"].rglob("*.png"))]
    p32, l32, _ = run_onnx(d / "logreg.onnx", paths)
    p8, l8, side = run_onnx(d / "logreg.int8.onnx", paths)
    assert side["int8"] is True and side["precision"].startswith("int8 static")
    agree = float((l8 == l32).mean())
    mean_dp = float(np.abs(p8 - p32).mean())
    assert agree >= INT8_MIN_AGREEMENT and mean_dp <= INT8_MAX_MEAN_DP, (agree, mean_dp)
    assert (d / "logreg.int8.onnx").stat().st_size < 0.5 * (d / "logreg.onnx").stat().st_size
    one_line_error(cli("export", d / "logreg.skops", "--int8", "--int8-mode", "fast", "-o",
                       d / "x.onnx"), "--int8-mode fast", "static")


def test_unexportable_head_and_wrong_weights_are_one_line_errors(work: dict, tmp_path: Path):
    from sklearn.naive_bayes import GaussianNB
    from sklearn.pipeline import Pipeline

    head = artifacts.load(work["dir"] / "logreg.skops")
    store = open_store(artifacts.load(work["dir"] / "logreg.skops").manifest["training"]
                       ["store"])
    nb = Pipeline([("clf", GaussianNB())]).fit(store.features, store.labels)
    odd = artifacts.save(tmp_path / "nb.skops", nb, {**head.manifest, "head": "naive-bayes"})
    one_line_error(cli("export", odd, "-o", tmp_path / "nb.onnx"), "naive-bayes",
                   "cannot be exported", "logreg")
    assert not (tmp_path / "nb.onnx").exists()

    ident = {**head.identity, "weights_sha256": "0" * 64}
    moved = artifacts.save(tmp_path / "moved.skops", head.estimator,
                           {**head.manifest, "store_identity": ident})
    one_line_error(cli("export", moved, "-o", tmp_path / "moved.onnx"), "sha256",
                   "--weights")
    assert not (tmp_path / "moved.onnx").exists()


def test_export_never_writes_over_its_inputs_and_the_sidecar_never_over_the_model(
        work: dict, tmp_path: Path):
    """-o naming the head (or a link to it) is refused in one line before the backbone loads;
    -o x.json writes the model to x.json and the sidecar to x.json.json (before: the sidecar
    overwrote the model)."""
    import hashlib

    d = work["dir"]
    head = tmp_path / "h.skops"
    head.write_bytes((d / "logreg.skops").read_bytes())
    digest = hashlib.sha256(head.read_bytes()).hexdigest()
    (tmp_path / "alias.skops").symlink_to(head)
    for out in (head, tmp_path / "alias.skops"):
        one_line_error(cli("export", head, "-o", out, "-q"), f"--out {out}", "input")
    # a sidecar that would land on the head (m.json is a link to it) is refused too
    side_clash = tmp_path / "m"
    (tmp_path / "m.json").symlink_to(head)
    one_line_error(cli("export", head, "-o", side_clash, "-q"), "sidecar", "input")
    assert hashlib.sha256(head.read_bytes()).hexdigest() == digest

    out = tmp_path / "x.json"
    res = ok("export", head, "-o", out, "-q")
    assert f"sidecar {tmp_path / 'x.json.json'}" in res.output
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(str(out))  # the model, not JSON
    side = json.loads((tmp_path / "x.json.json").read_text(encoding="utf-8"))
    assert side["onnx"] == "x.json" and side["classes"] == artifacts.load(head).classes
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_full_disk_during_export_keeps_the_older_export(work: dict, tmp_path: Path,
                                                        monkeypatch):
    """ENOSPC while the ONNX file is written: one line naming it, exit 2; the valid export of
    an earlier run (model and sidecar) is unchanged and no temporary file is left."""
    import onnx

    d = work["dir"]
    out = tmp_path / "m.onnx"
    ok("export", d / "logreg.skops", "-o", out, "-q")
    older = out.read_bytes(), Path(f"{out}.json").read_bytes()
    real_save = onnx.save_model

    def full_save(model, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"\x08" * 1000)  # part of a model, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full_save)
    one_line_error(cli("export", d / "logreg.skops", "-o", out, "-q"), f"--out {out}",
                   "disk full", "free space")
    monkeypatch.setattr(onnx, "save_model", real_save)
    assert (out.read_bytes(), Path(f"{out}.json").read_bytes()) == older
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]


def test_uncalibrated_head_is_refused_naming_only_heads_exportable_from_its_rows(
        fmnist_store: Path, tmp_path: Path):
    """A centroid head fitted on 2 images per class is uncalibrated (calibration needs 3):
    export refuses in one line that says so, and names only heads that are exportable when
    fitted on the same rows (svm is, centroid and sgd are not); with 3 per class it exports."""
    from clitools import copy_rows

    s = open_store(fmnist_store, features=False)
    classes = s.classes[:3]

    def small(per_class: int) -> Path:
        keep = [i for c in classes
                for i in [j for j in range(len(s.paths)) if s.classes[s.labels[j]] == c
                          and s.splits[j] == "train"][:per_class]]
        return copy_rows(fmnist_store, tmp_path / f"k{per_class}.h5", keep)

    k2 = small(2)
    ok("fit", k2, "--head", "centroid", "-o", tmp_path / "c2.skops", "-q")
    line = one_line_error(cli("export", tmp_path / "c2.skops", "-o", tmp_path / "c2.onnx"),
                          str(tmp_path / "c2.skops"), "centroid head has uncalibrated scores",
                          "at least 3 of every class", "(2 in the smallest class)")
    listed = line.split("export one of ", 1)[1].split(" on these training rows")[0]
    names = [n.split(" (")[0] for n in listed.split(", ")]
    assert names == ["logreg", "knn", "mlp", "logreg-sgd", "svm", "linear-svm", "ridge"], line
    assert not (tmp_path / "c2.onnx").exists()
    ok("fit", k2, "--head", "svm", "-o", tmp_path / "svm.skops", "-q")  # listed: it exports
    ok("export", tmp_path / "svm.skops", "-o", tmp_path / "svm.onnx", "-q")
    ok("fit", k2, "--head", "sgd", "-o", tmp_path / "sgd.skops", "-q")  # not listed: it doesn't
    one_line_error(cli("export", tmp_path / "sgd.skops", "-o", tmp_path / "sgd.onnx"),
                   "sgd head has uncalibrated scores", "at least 4 of every class")
    ok("fit", small(3), "--head", "centroid", "-o", tmp_path / "c3.skops", "-q")
    ok("export", tmp_path / "c3.skops", "-o", tmp_path / "c3.onnx", "-q")  # 3 per class do


@pytest.mark.slow  # ~22 s, with an auto fit
def test_two_class_heads_export_exactly(fmnist_store: Path, tmp_path: Path):
    """Binary heads: ridge's coef_ is 1-D, svm's skl2onnx scores are already (-d, d), and the
    centroid's decision is score_1 - score_0 (each once crashed export or was refused), alone
    and inside the vote `fit` chooses by default. The graph equals predict_proba on the
    store's own features; auto's vote goes through the whole `export`."""
    from clitools import copy_rows

    from embedpipe.export import check_head, head_graph

    s = open_store(fmnist_store)
    keep = [i for i in range(len(s.paths)) if s.classes[s.labels[i]] in ("shirt", "t-shirt_top")]
    two = copy_rows(fmnist_store, tmp_path / "two.h5", keep)
    X = np.asarray(open_store(two).features, dtype=np.float32)
    for head in ("ridge", "svm", "centroid", "linear-svm", "sgd", "knn", "logreg+ridge"):
        ok("fit", two, "--head", head, "-o", tmp_path / f"{head}.skops", "-q")
        h = artifacts.load(tmp_path / f"{head}.skops")
        assert len(h.classes) == 2
        err = check_head(head_graph(h.estimator, X.shape[1], head_name=head), h.estimator, X,
                         head)
        assert err < 1e-4, (head, err)
    ok("fit", two, "-o", tmp_path / "auto.skops", "-q")  # the default head: auto
    res = ok("export", tmp_path / "auto.skops", "-o", tmp_path / "auto.onnx")
    assert "exported" in res.output and (tmp_path / "auto.onnx").is_file()


def test_int8_dynamic_keeps_the_head_in_fp32(work: dict):
    """`--int8-mode dynamic` quantizes the backbone only, as static does: quantize_dynamic of the
    whole graph had turned the head's MatMuls into MatMulInteger (knn's probabilities moved by
    up to 0.27)."""
    import onnx

    d = work["dir"]
    ok("export", d / "logreg.skops", "-o", d / "dyn.onnx", "--int8", "--int8-mode", "dynamic",
       "-q")
    nodes = onnx.load(str(d / "dyn.onnx")).graph.node
    quantized = {"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QLinearMatMul"}
    assert any(n.op_type in quantized for n in nodes)  # the backbone is quantized
    head = [(n.name, n.op_type) for n in nodes if n.name.startswith("head/")]
    assert head and not [h for h in head if h[1] in quantized], head


def test_int8_names_where_it_looked_for_calibration_images_before_any_work(
        fmnist_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A head fitted on a store given by a relative path, exported with --int8 from another
    working directory: the calibration images (the store's training images) are not found;
    one line names the store as recorded, each path tried and the fixes, before the head's
    "ONNX equals" line or any output. `--calib STORE.h5` (the store itself) then works."""
    monkeypatch.chdir(fmnist_store.parent)
    head = tmp_path / "heads" / "logreg.skops"
    ok("fit", fmnist_store.name, "--head", "logreg", "-o", head, "-q")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = cli("export", head, "--int8", "-o", tmp_path / "x.onnx")
    one_line(res.output, res.exit_code, f"the head's store {fmnist_store.name}",
             f"not at {elsewhere / fmnist_store.name} nor {head.parent / fmnist_store.name}",
             "--calib FOLDER", "--calib STORE.h5", "where `fit` ran", "--int8-mode dynamic")
    assert not list(tmp_path.glob("x.onnx*"))
    res = ok("export", head, "--int8", "--calib", fmnist_store, "--calib-count", "8", "-o",
             tmp_path / "x.onnx")
    assert "calibrating int8 ranges on 8 images" in res.output, res.output
    side = json.loads((tmp_path / "x.onnx.json").read_text(encoding="utf-8"))
    assert side["precision"].startswith("int8 static") and "over 8 calibration" in \
        side["precision"]


def test_head_on_stacked_stores_is_refused_before_any_work(fmnist_store: Path, tmp_path: Path):
    """export needs one backbone; a head fitted on stacked stores was refused only after the
    head's graph was built and "ONNX equals predict_proba" printed: now the one line is all.
    The second store holds the same images cropped otherwise (fit refuses stacking a copy)."""
    from embedpipe.extract import ExtractOptions, run

    twin = tmp_path / "crop80.h5"
    assert run(fmnist_store.parent / "data", twin, ExtractOptions(precision="fp32", crop_pct=0.8),
               progress=False).extracted == 250
    head = tmp_path / "stacked.skops"
    ok("fit", fmnist_store, twin, "--head", "logreg", "-o", head, "-q")
    res = cli("export", head, "-o", tmp_path / "s.onnx")
    one_line(res.output, res.exit_code, "stacked.skops", "stacked features of 2 stores",
             "fit one on one store")
    assert not list(tmp_path.glob("s.onnx*"))


def test_a_calib_without_images_is_refused_for_what_it_is_before_any_work(
        work: dict, fmnist_store: Path, tmp_path: Path):
    """Each --calib that cannot give calibration images is refused in one line before any
    work (no "ONNX equals" line, no file written), saying what it is: a store of imported
    features once got "the images of imp.h5 are not in feats.npz", a text file was found only
    after the ONNX model was written and checked, and a damaged store's reason was cut off
    mid-word. A features file or a head file given as --calib is named for what it is."""
    head = work["dir"] / "logreg.skops"
    feats, imported = tmp_path / "feats.npz", tmp_path / "imp.h5"
    ok("export-features", fmnist_store, "-o", feats)
    ok("import-features", feats, "-o", imported)
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(fmnist_store.read_bytes()[:4096])
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    cases = [
        (imported, ["imp.h5 is a store of imported features", "by `embedpipe import-features`",
                    "holds no images", "--calib IMAGE_FOLDER",
                    "a store extracted from images"]),
        (text, [f"--calib {text}: not an image", "--calib FOLDER"]),
        (damaged, [f"calibration images of {damaged}: the store is damaged",
                   "--calib FOLDER"]),
        (feats, [f"--calib {feats} is a features file", "holds features, not the images",
                 "--calib IMAGE_FOLDER"]),
        (head, [f"--calib {head} is a head file", "--calib IMAGE_FOLDER"]),
    ]
    for calib, needles in cases:
        res = cli("export", head, "--int8", "--calib", calib, "-o", out)
        line = one_line(res.output, res.exit_code, *needles)
        assert line.endswith("(no calibration)"), line  # the whole line, nothing cut off
        assert not list(out.parent.iterdir()), calib


def test_calibration_images_that_fail_to_decode_are_told_before_any_work(work: dict,
                                                                         tmp_path: Path):
    """Truncated images (header valid, pixel data cut: a JPEG and a PNG) in --calib passed the
    header check and were found only when calibrating, after the ONNX model was written and
    checked, with no reason given; a few among good ones were dropped without a word. Now the
    picked images are decoded first: a folder where fewer than half decode is refused in one
    line naming a file and why, before any work (no "ONNX equals" line, nothing written);
    a folder where most decode is exported on those, with one note naming the skipped ones."""
    from PIL import Image

    head = work["dir"] / "logreg.skops"
    good = sorted(work["images"].rglob("*.png"))[:6]

    def cut(src: Path, dst: Path) -> Path:
        if dst.suffix == ".jpg":
            buf = tmp_path / "whole.jpg"
            Image.open(src).convert("RGB").save(buf, quality=95)
            data = buf.read_bytes()
            end = data.index(b"\xff\xda") + 40  # a few bytes into the scan data
        else:
            data = src.read_bytes()
            end = len(data) // 2  # inside IDAT
        dst.write_bytes(data[:end])
        with Image.open(dst) as im:  # the header still reads: only decoding fails
            assert im.size == (28, 28)
        return dst

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    cut(good[0], bad_dir / "a.jpg")
    cut(good[1], bad_dir / "b.png")
    shutil.copy(good[2], bad_dir / "c.png")
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    res = cli("export", head, "--int8", "--calib", bad_dir, "-o", out)
    line = one_line(res.output, res.exit_code, "--calib: only 1 of the 3 calibration images "
                    f"decode (e.g. {bad_dir / 'a.jpg'}: truncated", "replace or remove the "
                    "damaged images", "--int8-mode dynamic")
    assert line.endswith("(no calibration)"), line
    assert not list(out.parent.iterdir())

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, p in enumerate(good):
        shutil.copy(p, mixed / f"{i}.png")
    cut(good[0], mixed / "cut-0.jpg")
    cut(good[1], mixed / "cut-1.png")
    res = ok("export", head, "--int8", "--calib", mixed, "-o", out, "-q")
    notes = [ln for ln in res.output.splitlines() if ln.startswith("note: calibrating")]
    assert len(notes) == 1 and "Traceback" not in res.output, res.output
    assert notes[0].startswith("note: calibrating int8 ranges on 6 of the 8 picked images: 2 "
                               "do not decode and are skipped: "), notes[0]
    assert str(mixed / "cut-0.jpg") in notes[0] and str(mixed / "cut-1.png") in notes[0], notes[0]
    side = json.loads(out.with_name("m.onnx.json").read_text(encoding="utf-8"))
    assert "over 6 calibration images" in side["precision"], side["precision"]
