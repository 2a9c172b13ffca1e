"""Calibration of heads without native probabilities on many rows: above
fewshot.HOLDOUT_ABOVE training rows `fit` fits the head once and the temperature on a held-out
stratified sample (fewshot.holdout); above fewshot.REFIT_ABOVE it fits the head on 4/5 of the
rows, the temperature on the other fifth and the head again on all rows (fewshot.refit_split,
calibration.fit), instead of k-fold CV (k+1 fits). Real data: raw Fashion-MNIST pixels (784-d),
imported as features, enough rows to cross the thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clitools import ok, read_csv
from embedpipe.datasets import load_fashion_mnist
from embedpipe.heads import artifacts, calibration, fewshot, train
from embedpipe.heads.compact import class_scores

TRAIN = fewshot.HOLDOUT_ABOVE + 500
TEST = 300


MID = fewshot.REFIT_ABOVE + 1000  # train rows between the two thresholds


def _pixels(d: Path, train_rows: int) -> Path:
    """A store of ``train_rows`` train + TEST test rows of raw Fashion-MNIST pixels in [0, 1]."""
    img, lbl = load_fashion_mnist("train")
    n = train_rows + TEST
    X = img[:n].reshape(n, -1).astype(np.float32) / 255.0
    f = d / "pixels.npz"
    np.savez(f, features=X, path=np.array([f"img/{i:05d}.png" for i in range(n)]),
             label=np.array([f"c{v}" for v in lbl[:n]]),
             split=np.array(["train"] * train_rows + ["test"] * TEST))
    out = d / "pixels.h5"
    ok("import-features", f, "-o", out, "-q")
    return out


@pytest.fixture(scope="module")
def pixel_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pixels(tmp_path_factory.mktemp("pixels"), TRAIN)


@pytest.fixture(scope="module")
def mid_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pixels(tmp_path_factory.mktemp("mid"), MID)


def _store_rows(store: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    from embedpipe.heads.rows import select_rows, targets
    from embedpipe.store import open_store

    s = open_store(store)
    rows = select_rows(s)
    r = rows.train if split == "train" else rows.heldout[split]
    return s.features[r], targets(s, r)


def test_holdout_threshold() -> None:
    y = np.repeat(np.arange(10), (fewshot.HOLDOUT_ABOVE // 10))
    assert len(y) == fewshot.HOLDOUT_ABOVE and fewshot.holdout(y) is None
    split = fewshot.holdout(np.append(y, 0))
    assert type(split).__name__ == "StratifiedShuffleSplit"
    assert split.test_size == fewshot.HOLDOUT_ROWS and split.n_splits == 1
    # a class too small to sit on both sides of the split keeps the k folds
    few = np.append(np.repeat(np.arange(9), 3000), [9] * (fewshot.HOLDOUT_MIN_CLASS - 1))
    assert len(few) > fewshot.HOLDOUT_ABOVE and fewshot.holdout(few) is None


def test_refit_threshold() -> None:
    """A fifth held out (then refitted) from REFIT_ABOVE to HOLDOUT_ABOVE rows, every class
    with HOLDOUT_MIN_CLASS rows; k folds below, one held-out sample above."""
    y = np.repeat(np.arange(10), fewshot.REFIT_ABOVE // 10)
    assert fewshot.refit_split(y) is None
    split = fewshot.refit_split(np.append(y, 0))
    assert type(split).__name__ == "StratifiedShuffleSplit" and split.n_splits == 1
    assert split.test_size == -(-(fewshot.REFIT_ABOVE + 1) // 5)
    big = np.repeat(np.arange(10), fewshot.HOLDOUT_ABOVE // 10)
    assert fewshot.refit_split(big).test_size == fewshot.HOLDOUT_ABOVE // 5
    assert fewshot.refit_split(np.append(big, 0)) is None  # fewshot.holdout's from here
    few = np.append(np.repeat(np.arange(9), 1000), [9] * (fewshot.HOLDOUT_MIN_CLASS - 1))
    assert fewshot.refit_split(few) is None


def test_fit_between_the_thresholds_holds_a_fifth_out_then_refits(mid_store: Path,
                                                                   tmp_path: Path,
                                                                   monkeypatch) -> None:
    """ridge on 6,000 rows: the head fitted on 4/5, the temperature on the held-out fifth,
    the head refitted on all rows; no k-fold cross_val_predict. The temperature is what
    scikit-learn's own held-out calibration (ensemble=True on the same split) fits; the head
    is the one fitted on all rows, so it predicts the classes the 5-fold calibrated head
    does; predict reads the file."""
    import sklearn.calibration
    from sklearn.base import clone
    from sklearn.calibration import CalibratedClassifierCV
    from embedpipe.heads import registry as heads

    def refused(*a, **k):
        raise AssertionError("calibrated by k-fold cross_val_predict")

    monkeypatch.setattr(sklearn.calibration, "cross_val_predict", refused)
    head = tmp_path / "ridge.skops"
    res = ok("fit", mid_store, "--head", "ridge", "-o", head)
    held = -(-MID // 5)
    words = (f"temperature scaling on {held:,} held-out training rows, then the head "
             "refitted on all rows")
    assert f"probabilities: {words}" in res.output
    h = artifacts.load(head)
    est, manifest = h.estimator, h.manifest
    assert manifest["calibration"] == words and manifest["probabilities"] == "calibrated"
    assert len(est.calibrated_classifiers_) == 1
    fitted = est.calibrated_classifiers_[0].estimator
    assert fitted.named_steps["scale"].n_samples_seen_ == MID  # refitted on every row
    # the saved setting is 5 folds (scikit-learn can refit a clone), how it was fitted beside
    assert est.cv == 5 and getattr(est, fewshot.REFIT_HELD_OUT) == -(-MID // 5)
    monkeypatch.undo()
    X, y = _store_rows(mid_store, "train")
    X_test, y_test = _store_rows(mid_store, "test")
    classes = np.unique(y)
    y_enc = np.searchsorted(classes, y)
    # the temperature: scikit-learn's own fit on the head's 4/5 and the held-out fifth
    split = list(fewshot.refit_split(y).split(X, y_enc))
    own = CalibratedClassifierCV(heads.build("ridge"), method="temperature", ensemble=True,
                                 cv=split).fit(X, y)
    beta = est.calibrated_classifiers_[0].calibrators[0].beta_
    own_beta = own.calibrated_classifiers_[0].calibrators[0].beta_
    # (float32 features: scikit-learn fits it on float32 scores, we on float64)
    assert abs(beta - 1.0) > 1e-3 and beta == pytest.approx(own_beta, rel=1e-4)
    # the head: fitted on all rows, as the 5-fold calibration's final head is
    kfold = CalibratedClassifierCV(heads.build("ridge"), method="temperature", ensemble=False,
                                   cv=5).fit(X, y)
    np.testing.assert_allclose(
        fitted.decision_function(X_test),
        kfold.calibrated_classifiers_[0].estimator.decision_function(X_test), rtol=1e-6,
        atol=1e-8)
    p = est.predict_proba(X_test)
    assert (est.predict(X_test) == kfold.predict(X_test)).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    assert np.mean(est.predict(X_test) == y_test) > 0.7
    out = tmp_path / "p.csv"
    ok("predict", head, "--store", mid_store, "--split", "test", "-o", out, "-q")
    assert [r["predicted"] for r in read_csv(out)] == list(est.predict(X_test))
    # a user's scikit-learn refit of a clone of the loaded head: its own 5 folds
    again = clone(est).fit(X[:600], y[:600])
    assert again.cv == 5 and not hasattr(again, fewshot.REFIT_HELD_OUT)
    assert again.predict(X_test[:5]).shape == (5,)


def test_vote_members_between_the_thresholds_refit(mid_store: Path, tmp_path: Path,
                                                   monkeypatch) -> None:
    """A vote's calibrated member holds a fifth out and is refitted on all rows too (its
    own 3 folds before); behind a PCA of the vote's own, the members keep their folds (the
    vote is fitted by scikit-learn there) and the manifest says so."""
    import sklearn.calibration
    from sklearn.base import clone

    calls = []
    real = sklearn.calibration.cross_val_predict
    monkeypatch.setattr(sklearn.calibration, "cross_val_predict",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    head = tmp_path / "vote.skops"
    ok("fit", mid_store, "--head", "ridge+logreg-sgd", "-o", head, "-q")
    h = artifacts.load(head)
    held = -(-MID // 5)
    assert (f"ridge temperature-scaled on {held:,} held-out rows then refitted on all"
            in h.manifest["calibration"]), h.manifest["calibration"]
    assert "logreg-sgd native" in h.manifest["calibration"] and not calls
    ridge = h.estimator.steps[-1][1].named_estimators_["ridge"]
    assert ridge.calibrated_classifiers_[0].estimator.named_steps["scale"].n_samples_seen_ \
        == MID
    X_test, _ = _store_rows(mid_store, "test")
    scores, calibrated = class_scores(h.estimator, X_test)  # what predict reports
    assert calibrated and np.allclose(scores.sum(axis=1), 1.0, rtol=1e-12)
    X, y = _store_rows(mid_store, "train")
    again = clone(h.estimator).fit(X[:600], y[:600])  # scikit-learn refits a clone
    assert again.predict(X_test[:5]).shape == (5,)
    pca = tmp_path / "pca.skops"
    ok("fit", mid_store, "--head", "ridge+logreg-sgd", "--param", "pca=16", "-o", pca, "-q")
    m = artifacts.load(pca).manifest
    assert "ridge temperature-scaled (3-fold CV)" in m["calibration"], m["calibration"]
    assert calls  # scikit-learn's own k folds


def test_a_fitted_refit_calibration_is_decided_anew_for_other_rows(mid_store: Path) -> None:
    """The way is decided by the rows at each fit (calibration.refits), not stored in the
    head's settings: a clone of a head fitted the refit way holds a fifth out again on as many
    rows, takes its k folds on 300 rows, and scikit-learn's own fit fits it; fewshot.adapt
    leaves the folds as they are."""
    from sklearn.base import clone
    from sklearn.calibration import CalibratedClassifierCV
    from embedpipe.heads import registry as heads

    X, y = _store_rows(mid_store, "train")
    spec = CalibratedClassifierCV(heads.build("ridge"), method="temperature", ensemble=False,
                                  cv=3)
    fewshot.adapt(spec, y)
    assert spec.cv == 3 and calibration.refits(spec, y)
    fitted = calibration.fit(spec, X, y)
    assert fitted.cv == 3 and getattr(fitted, fewshot.REFIT_HELD_OUT) == -(-MID // 5)
    assert calibration.refits(clone(fitted), y) and not calibration.refits(fitted, y[:300])
    few = calibration.fit(clone(fitted), X[:300], y[:300])
    assert few.cv == 3 and not hasattr(few, fewshot.REFIT_HELD_OUT)
    assert fewshot.calibration_text(few) == "temperature scaling (3-fold)"
    assert clone(fitted).fit(X[:300], y[:300]).predict(X[:5]).shape == (5,)


def test_a_votes_params_record_no_calibration_object(mid_store: Path, pixel_store: Path,
                                                     tmp_path: Path) -> None:
    """A vote's manifest ``params`` and `cv --json` record what --param can set, not the way
    the rows made its members calibrate (a held-out sample's splitter object made `cv --json`
    fail after its whole run: 'not JSON serializable'); the members' 3 folds stay theirs."""
    for store in (mid_store, pixel_store):
        head = tmp_path / "vote.skops"
        ok("fit", store, "--head", "ridge+centroid", "-o", head, "-q")
        params = artifacts.load(head).manifest["params"]
        assert not any(k.endswith(("__cv", "__ensemble")) for k in params), params
        out = tmp_path / "cv.json"
        ok("cv", store, "--head", "ridge+centroid", "--folds", "2", "-q", "--json", out)
        report = json.loads(out.read_text())
        assert "ridge__cv" not in json.dumps(report)


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
    assert (f"above {fewshot.REFIT_ABOVE:,} rows on a held-out fifth, then refitted on all "
            "rows") in svm["probabilities"]


@pytest.mark.slow  # ~30 s
def test_auto_measures_training_accuracy_on_a_sample(pixel_store: Path, tmp_path: Path) -> None:
    head = tmp_path / "auto.skops"
    res = ok("fit", pixel_store, "--head", "auto", "--budget", "1", "-o", head)
    assert f"({train.TRAIN_ACCURACY_ROWS:,} of the rows)" in res.output
    training = artifacts.load(head).manifest["training"]
    assert training["train_accuracy_rows"] == train.TRAIN_ACCURACY_ROWS
    assert training["rows"] == TRAIN and 0.7 < training["train_accuracy"] <= 1.0
