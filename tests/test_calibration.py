"""Calibration of heads without native probabilities on many rows: above
fewshot.HOLDOUT_ABOVE training rows `fit` fits the head once and the temperature on a held-out
stratified sample (fewshot.holdout), instead of k-fold CV (k+1 fits). Real data: raw
Fashion-MNIST pixels (784-d), imported as features, enough rows to cross the threshold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clitools import ok, read_csv
from embedpipe.datasets import load_fashion_mnist
from embedpipe.heads import artifacts, fewshot, train

TRAIN = fewshot.HOLDOUT_ABOVE + 500
TEST = 300


@pytest.fixture(scope="module")
def pixel_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of TRAIN train + TEST test rows of raw Fashion-MNIST pixels in [0, 1]."""
    d = tmp_path_factory.mktemp("pixels")
    img, lbl = load_fashion_mnist("train")
    n = TRAIN + TEST
    X = img[:n].reshape(n, -1).astype(np.float32) / 255.0
    f = d / "pixels.npz"
    np.savez(f, features=X, path=np.array([f"img/{i:05d}.png" for i in range(n)]),
             label=np.array([f"c{v}" for v in lbl[:n]]),
             split=np.array(["train"] * TRAIN + ["test"] * TEST))
    out = d / "pixels.h5"
    ok("import-features", f, "-o", out, "-q")
    return out


def test_holdout_threshold() -> None:
    y = np.repeat(np.arange(10), (fewshot.HOLDOUT_ABOVE // 10))
    assert len(y) == fewshot.HOLDOUT_ABOVE and fewshot.holdout(y) is None
    split = fewshot.holdout(np.append(y, 0))
    assert type(split).__name__ == "StratifiedShuffleSplit"
    assert split.test_size == fewshot.HOLDOUT_ROWS and split.n_splits == 1
    # a class too small to sit on both sides of the split keeps the k folds
    few = np.append(np.repeat(np.arange(9), 3000), [9] * (fewshot.HOLDOUT_MIN_CLASS - 1))
    assert len(few) > fewshot.HOLDOUT_ABOVE and fewshot.holdout(few) is None


def test_fit_calibrates_on_held_out_rows(pixel_store: Path, tmp_path: Path) -> None:
    head = tmp_path / "ridge.skops"
    res = ok("fit", pixel_store, "--head", "ridge", "-o", head)
    words = (f"temperature scaling on {fewshot.HOLDOUT_ROWS:,} held-out training rows "
             "(not trained on)")
    assert f"probabilities: {words}" in res.output
    h = artifacts.load(head)
    est, manifest = h.estimator, h.manifest
    assert manifest["calibration"] == words
    # training accuracy on an even sample of the rows: predicting all can cost more than the fit
    assert f"({train.TRAIN_ACCURACY_ROWS:,} of the rows)" in res.output
    assert manifest["training"]["train_accuracy_rows"] == train.TRAIN_ACCURACY_ROWS
    # fitted once, on all but the held-out rows (the scaler saw them), one temperature
    assert len(est.calibrated_classifiers_) == 1
    scaler = est.calibrated_classifiers_[0].estimator.named_steps["scale"]
    assert scaler.n_samples_seen_ == TRAIN - fewshot.HOLDOUT_ROWS
    out = tmp_path / "p.csv"
    ok("predict", head, "--store", pixel_store, "--split", "test", "-o", out, "-q")
    rows = read_csv(out)
    assert len(rows) == TEST
    # ridge on raw pixels is about 0.80 on Fashion-MNIST; calibrated confidences in (0, 1]
    assert np.mean([r["label"] == r["predicted"] for r in rows]) > 0.7
    conf = np.array([float(r["confidence"]) for r in rows])
    assert 0.0 < conf.min() and conf.max() <= 1.0 and conf.min() < 0.99


def test_vote_members_calibrate_on_held_out_rows(pixel_store: Path, tmp_path: Path) -> None:
    head = tmp_path / "vote.skops"
    ok("fit", pixel_store, "--head", "ridge+logreg-sgd", "-o", head, "-q")
    manifest = artifacts.load(head).manifest
    assert (f"ridge temperature-scaled on {fewshot.HOLDOUT_ROWS:,} held-out rows"
            in manifest["calibration"]), manifest["calibration"]
    assert "logreg-sgd native" in manifest["calibration"]


def test_heads_says_the_rule() -> None:
    rows = json.loads(ok("heads", "--json").output)
    svm = next(r for r in rows if r["head"] == "svm")
    assert f"above {fewshot.HOLDOUT_ABOVE:,} rows" in svm["probabilities"]


@pytest.mark.slow  # ~30 s
def test_auto_measures_training_accuracy_on_a_sample(pixel_store: Path, tmp_path: Path) -> None:
    head = tmp_path / "auto.skops"
    res = ok("fit", pixel_store, "--head", "auto", "--budget", "1", "-o", head)
    assert f"({train.TRAIN_ACCURACY_ROWS:,} of the rows)" in res.output
    training = artifacts.load(head).manifest["training"]
    assert training["train_accuracy_rows"] == train.TRAIN_ACCURACY_ROWS
    assert training["rows"] == TRAIN and 0.7 < training["train_accuracy"] <= 1.0
