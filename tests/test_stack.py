"""Stacking the features of two stores of the same images (two backbones): `fit A B`, `cv A B`,
`predict HEAD --store A --store B` and end to end from images with both backbones."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from clitools import cli, ok, one_line_error, read_csv

from embedpipe.extract import ExtractOptions, run
from embedpipe.heads import artifacts
from embedpipe.store import open_store


@pytest.fixture(scope="module")
def pair(fmnist_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fmnist_store (Lite0, 250 images) and a bundled-Lite1 store of 100 of its images (train:
    5 per class, test: all 5 per class), plus the stacked logreg head fitted on both."""
    root = tmp_path_factory.mktemp("stack")
    src = root / "data"
    shutil.copytree(fmnist_store.parent / "data", src)
    for cls in (src / "train").iterdir():
        for extra in sorted(cls.iterdir())[5:]:
            extra.unlink()
    lite1 = root / "lite1.h5"
    summary = run(src, lite1, ExtractOptions(model="tf_efficientnet_lite1", precision="fp32"),
                  progress=False)
    assert summary.extracted == 100, summary.line()
    head = root / "stacked.skops"
    res = ok("fit", fmnist_store, lite1, "--head", "logreg", "-o", head)
    assert f"150 rows of {fmnist_store} are not in every stacked store" in res.output
    return {"a": fmnist_store, "b": lite1, "head": head, "src": fmnist_store.parent / "data",
            "root": root}


def test_fit_on_two_stores_trains_on_both_feature_sets_side_by_side(pair):
    head = artifacts.load(pair["head"])
    a, b = open_store(pair["a"]), open_store(pair["b"])
    assert a.dim == 1280 and b.dim == 1280
    assert head.identity["feature_dim"] == a.dim + b.dim
    assert [m["model"] for m in artifacts.members(head.identity)] == [
        "tf_efficientnet_lite0", "tf_efficientnet_lite1"]
    assert head.manifest["training"]["rows"] == 50  # the train rows both stores hold
    # the head is exactly logreg on [Lite0 | Lite1] features of the rows matched by path
    from embedpipe import heads

    def xy(split: str):
        rows = [p for p, s in zip(b.paths, b.splits) if s == split]
        ia, ib = {p: i for i, p in enumerate(a.paths)}, {p: i for i, p in enumerate(b.paths)}
        X = np.hstack([a.features[[ia[p] for p in rows]], b.features[[ib[p] for p in rows]]])
        return X, [a.label_names()[ia[p]] for p in rows]

    X, y = xy("train")
    params = heads.with_data_defaults("logreg", None, y, X.shape[1])  # its defaults for 50 rows
    manual = heads.build("logreg", params, seed=0).fit(X, y)
    Xt, _ = xy("test")
    np.testing.assert_array_equal(head.estimator.predict(Xt), manual.predict(Xt))
    assert head.estimator.n_features_in_ == 2560


def test_predict_needs_the_same_stores_in_the_same_order(pair):
    out = pair["root"] / "preds.csv"
    res = ok("predict", pair["head"], "--store", pair["a"], "--store", pair["b"],
             "--split", "test", "-o", out)
    rows = read_csv(out)
    assert len(rows) == 50
    acc = np.mean([r["predicted"] == r["label"] for r in rows])
    assert acc >= 0.5, res.output  # 10 classes: chance is 0.1
    one_line_error(cli("predict", pair["head"], "--store", pair["a"]),
                   "was fitted on features of tf_efficientnet_lite0 + tf_efficientnet_lite1",
                   "pass the 2 stores")
    # swapped: each store's features would land in the other's columns; the line names the
    # order to pass them in (it used to say "another backbone" of the first store)
    one_line_error(cli("predict", pair["head"], "--store", pair["b"], "--store", pair["a"]),
                   "given in another order", "tf_efficientnet_lite0 + tf_efficientnet_lite1",
                   f"pass --store {pair['a']} --store {pair['b']}")


def test_stores_of_one_backbone_stacked_in_another_order_are_refused(pair, tmp_path: Path):
    """Two stores of one backbone (same identity) of different images under the same paths
    (here: the images mirrored) stack into a head whose columns differ by store; given in the
    other order, predict used to concatenate them swapped without a word (the identities
    match). The head records its store files, and predict names the order to pass them in."""
    from PIL import Image, ImageOps

    mirrored = tmp_path / "mirrored"
    for f in sorted(pair["root"].joinpath("data").rglob("*.png")):
        dst = mirrored / f.relative_to(pair["root"] / "data")
        dst.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.mirror(Image.open(f)).save(dst)
    m = tmp_path / "mirrored.h5"
    assert run(mirrored, m, ExtractOptions(precision="fp32"), progress=False).extracted == 100
    assert open_store(m).identity == open_store(pair["a"]).identity
    head = tmp_path / "two-views.skops"
    ok("fit", pair["a"], m, "--head", "logreg", "-o", head, "-q")
    assert artifacts.load(head).manifest["training"]["stores"] == [
        str(pair["a"].resolve()), str(m.resolve())]
    out = tmp_path / "p.csv"
    line = one_line_error(cli("predict", head, "--store", m, "--store", pair["a"], "-o", out),
                          "given in another order", f"fitted on {pair['a'].name} + {m.name}",
                          f"pass --store {pair['a']} --store {m}")
    assert not out.exists(), line
    # in order it predicts; swapped columns would have predicted otherwise
    ok("predict", head, "--store", pair["a"], "--store", m, "--split", "test", "-o", out, "-q")
    est = artifacts.load(head).estimator
    a, b = open_store(pair["a"]), open_store(m)
    rows = [p for p, s in zip(b.paths, b.splits) if s == "test"]
    ia, ib = {p: i for i, p in enumerate(a.paths)}, {p: i for i, p in enumerate(b.paths)}
    fa, fb = a.features[[ia[p] for p in rows]], b.features[[ib[p] for p in rows]]
    right = dict(zip(rows, est.predict(np.hstack([fa, fb]))))
    assert {r["path"]: r["predicted"] for r in read_csv(out)} == right
    # the columns differ by store: swapped, the probabilities move
    gap = np.abs(est.predict_proba(np.hstack([fa, fb])) - est.predict_proba(np.hstack([fb, fa])))
    assert gap.max() > 0.01, gap.max()


def test_stacked_head_predicts_images_end_to_end_like_its_stores(pair, tmp_path: Path):
    via_stores = pair["root"] / "via_stores.csv"
    ok("predict", pair["head"], "--store", pair["a"], "--store", pair["b"], "--split", "test",
       "-o", via_stores)
    via_images = tmp_path / "via_images.csv"
    ok("predict", pair["head"], pair["src"] / "test", "-o", via_images, "-q",
       "--keep-store", tmp_path / "kept.h5")
    by_name = {Path(r["path"]).name: r for r in read_csv(via_stores)}
    rows = read_csv(via_images)
    assert len(rows) == 50
    for r in rows:
        mine = by_name[Path(r["path"]).name]
        assert r["predicted"] == mine["predicted"]
        assert abs(float(r["confidence"]) - float(mine["confidence"])) < 1e-3
    kept = sorted(p.name for p in tmp_path.glob("kept.*.h5"))  # one store per backbone
    assert kept == ["kept.1.h5", "kept.2.h5"]
    assert open_store(tmp_path / "kept.2.h5").meta["model"] == "tf_efficientnet_lite1"


def test_cv_scores_heads_on_stacked_stores(pair):
    res = ok("cv", pair["a"], pair["b"], "--head", "logreg", "--head", "centroid", "--folds",
             "3", "-q")
    assert "50 train rows" in res.output, res.output
    assert "logreg" in res.output and "centroid" in res.output


def test_stacking_refuses_stores_that_cannot_be_paired(pair, tmp_path: Path):
    one_line_error(cli("fit", pair["a"], pair["a"], "-o", tmp_path / "x.skops"),
                   "the same store is given twice")
    other = tmp_path / "other.h5"
    src = tmp_path / "other"
    (src / "x").mkdir(parents=True)
    (src / "y").mkdir()
    some = sorted((pair["src"] / "train").glob("*/*.png"))
    for i, f in enumerate(some[:4]):
        shutil.copy(f, src / ("x" if i % 2 else "y") / f"img{i}.png")
    run(src, other, ExtractOptions(precision="fp32"), progress=False)
    one_line_error(cli("fit", pair["a"], other, "-o", tmp_path / "x.skops"),
                   "share no image paths")
    assert not (tmp_path / "x.skops").exists()


def test_stacking_a_copy_of_a_store_is_refused_by_fit_and_noted_by_cv(pair, tmp_path: Path):
    """A copy (another file: not refused as the same store twice) holds the same features:
    stacking it repeated the columns without a word, then with a note; a head fitted on both
    could not be told which is which, nor predict images (each would be extracted alike), so
    fit refuses it (auto too) naming the fix; cv, which fits no head, keeps the note."""
    copy = tmp_path / "copy.h5"
    shutil.copy(pair["b"], copy)
    for head in ("logreg", "auto"):
        one_line_error(cli("fit", pair["b"], copy, "--head", head, "-o", tmp_path / "x.skops"),
                       f"error: {copy}: holds the same features as {pair['b']}",
                       f"pass {pair['b']} alone", "other extraction options")
    assert not (tmp_path / "x.skops").exists()
    res = ok("cv", pair["b"], copy, "--head", "centroid", "--folds", "2", "-q")
    assert f"note: {copy} holds the same features as {pair['b']}" in res.output, res.output
    res = ok("fit", pair["a"], pair["b"], "--head", "logreg", "-o", tmp_path / "y.skops")
    assert "holds the same features" not in res.output, res.output


def test_commands_of_one_backbone_refuse_a_stacked_head(pair, tmp_path: Path):
    one_line_error(cli("export", pair["head"], "-o", tmp_path / "m.onnx"),
                   "stacked features of 2 stores", "fit one on one store")


def test_streaming_heads_fit_and_predict_stacked_stores(pair, tmp_path: Path):
    head = tmp_path / "sgd.skops"
    ok("fit", pair["a"], pair["b"], "--head", "logreg-sgd", "-o", head, "-q")
    assert artifacts.load(head).estimator.n_features_in_ == 2560
    out = tmp_path / "p.csv"
    ok("predict", head, "--store", pair["a"], "--store", pair["b"], "--split", "test", "-o", out,
       "--chunk-rows", "7")
    rows = read_csv(out)
    assert len(rows) == 50
    # 50 training rows of 2560 dims: SGD is weak here, but well above chance (0.1)
    assert np.mean([r["predicted"] == r["label"] for r in rows]) >= 0.3
    whole = tmp_path / "whole.csv"  # chunks of 7 rows predict what one chunk does
    ok("predict", head, "--store", pair["a"], "--store", pair["b"], "--split", "test", "-o",
       whole)
    # the same predictions; probabilities up to float rounding (the matrix products of 7 rows
    # and of 50 may round the last bit differently, which can move the 6th decimal)
    got = read_csv(whole)
    labels = ("path", "label", "predicted", "top1", "top2", "top3")
    assert [[r[k] for k in labels] for r in got] == [[r[k] for k in labels] for r in rows]
    for k in ("confidence", "top1_prob", "top2_prob", "top3_prob"):
        np.testing.assert_allclose([float(r[k]) for r in got], [float(r[k]) for r in rows],
                                   atol=2e-6)


def _strip_store_id(store: Path) -> None:
    """Make ``store`` look written before stores had a store_id (the attribute removed)."""
    import h5py

    with h5py.File(store, "r+") as f:
        del f.attrs["store_id"]


def test_stores_of_one_backbone_renamed_and_swapped_are_refused(pair, tmp_path: Path):
    """Two stores of one identity (the images and their mirror images under the same paths),
    stacked into a head, then renamed and given swapped: the head told them apart by path
    only, so predict concatenated them swapped without a word. Every store now carries a
    store_id given at creation, which a rename keeps; the head records them and predict names
    the order to pass. Stores written before (no store_id) still predict, with a note that
    their order cannot be checked. From images such a head is refused: each store would be
    extracted alike."""
    from PIL import Image, ImageOps

    mirrored = tmp_path / "mirrored"
    for f in sorted(pair["root"].joinpath("data").rglob("*.png")):
        dst = mirrored / f.relative_to(pair["root"] / "data")
        dst.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.mirror(Image.open(f)).save(dst)
    views = {"plain": tmp_path / "plain.h5", "mirror": tmp_path / "mirror.h5"}
    shutil.copy(pair["a"], views["plain"])
    os.chmod(views["plain"], 0o644)
    assert run(mirrored, views["mirror"], ExtractOptions(precision="fp32"),
               progress=False).extracted == 100
    ids = [open_store(v).meta["store_id"] for v in views.values()]
    assert all(len(i) == 32 for i in ids) and ids[0] != ids[1]
    head = tmp_path / "views.skops"
    ok("fit", views["plain"], views["mirror"], "--head", "logreg", "-o", head, "-q")
    assert artifacts.load(head).manifest["training"]["store_ids"] == ids
    r1, r2 = tmp_path / "r1.h5", tmp_path / "r2.h5"
    views["plain"].rename(r1)
    views["mirror"].rename(r2)
    out = tmp_path / "p.csv"
    one_line_error(cli("predict", head, "--store", r2, "--store", r1, "-o", out),
                   "given in another order", "store_id, which a rename keeps",
                   f"pass --store {r1} --store {r2}")
    assert not out.exists()
    ok("predict", head, "--store", r1, "--store", r2, "-o", out, "-q")
    one_line_error(cli("predict", head, pair["src"] / "test", "-o", out),
                   "were made with the same backbone and extraction options",
                   "--store A --store B")
    # written before store_id: they still work, and the note says the order is unchecked
    for r in (r1, r2):
        _strip_store_id(r)
    old = tmp_path / "old.skops"
    ok("fit", r1, r2, "--head", "logreg", "-o", old, "-q")
    assert artifacts.load(old).manifest["training"]["store_ids"] == [None, None]
    res = ok("predict", old, "--store", r1, "--store", r2, "-o", out)
    assert "cannot be checked" not in res.output, res.output  # its own files, in order
    o1, o2 = tmp_path / "o1.h5", tmp_path / "o2.h5"
    r1.rename(o1)
    r2.rename(o2)
    res = ok("predict", old, "--store", o2, "--store", o1, "-o", out)
    assert (f"note: {o2}+{o1}: stores of one backbone and settings that were written before "
            "stores had a store_id, so the order they are given in cannot be checked: pass "
            "them in the order of the stores head") in res.output, res.output
    assert "(r1.h5 + r2.h5)" in res.output, res.output


def test_stacked_stores_differing_in_crop_pct_predict_images_like_their_stores(
        pair, tmp_path: Path):
    """A head stacked on two stores of the bundled backbone that differ only in --crop-pct:
    predicting images extracts them once per store with that store's own options (the kept
    stores say which), and predicts what the stores' own rows predict."""
    wide = tmp_path / "crop80.h5"
    assert run(pair["src"], wide, ExtractOptions(precision="fp32", crop_pct=0.8),
               progress=False).extracted == 250
    head = tmp_path / "crops.skops"
    ok("fit", pair["a"], wide, "--head", "logreg", "-o", head, "-q")
    via_stores = tmp_path / "stores.csv"
    ok("predict", head, "--store", pair["a"], "--store", wide, "--split", "test", "-o",
       via_stores, "-q")
    via_images = tmp_path / "images.csv"
    ok("predict", head, pair["src"] / "test", "-o", via_images, "-q", "--keep-store",
       tmp_path / "kept.h5")
    crops = [open_store(tmp_path / f"kept.{k}.h5").meta["data_config"]["crop_pct"]
             for k in (1, 2)]
    assert crops == [0.875, 0.8], crops
    assert open_store(tmp_path / "kept.1.h5").identity == open_store(pair["a"]).identity
    assert open_store(tmp_path / "kept.2.h5").identity == open_store(wide).identity
    by_name = {Path(r["path"]).name: r for r in read_csv(via_stores)}
    rows = read_csv(via_images)
    assert len(rows) == len(by_name) == 50
    for r in rows:
        mine = by_name[Path(r["path"]).name]
        assert r["predicted"] == mine["predicted"], (r, mine)
        assert abs(float(r["confidence"]) - float(mine["confidence"])) < 1e-3
