"""The power-normalisation step (heads/transforms.py, ``prep=sqrt+...``, every in-memory head's
default): its values, and the same probabilities through scikit-learn, the compact form
(`predict --store` without scikit-learn), the ONNX graph (`export`) and a saved head file, on
rows with negative values (other backbones' features) as on Lite0's non-negative ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from clitools import cli, ok, one_line_error

from embedpipe import heads
from embedpipe.heads import artifacts, compact
from embedpipe.heads.transforms import SignedSqrt
from embedpipe.store import open_store


def test_signed_sqrt_values_dtype_and_refusals():
    x = np.array([[4.0, -9.0, 0.0, 2.25]], np.float32)
    step = SignedSqrt().fit(x)
    got = step.transform(x)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [[2.0, -3.0, 0.0, 1.5]])
    assert step.transform(x.astype(np.float64)).dtype == np.float64
    assert np.array_equal(x, [[4.0, -9.0, 0.0, 2.25]])  # the input is left as it was
    with pytest.raises(ValueError, match="features"):
        step.transform(np.ones((1, 3)))  # another width than it was fitted on
    with pytest.raises(ValueError, match="NaN|infinity"):
        step.transform(np.array([[np.nan, 1.0, 1.0, 1.0]]))


def test_every_in_memory_head_power_normalises_by_default():
    for name, head in heads.HEADS.items():
        if not head.streaming:
            assert head.steps[0] == "sqrt", name
            assert type(heads.build(name).steps[0][1]) is SignedSqrt, name


@pytest.mark.parametrize("name,prep", [("logreg", None), ("svm", None), ("knn", None),
                                       ("centroid", None), ("ridge", None),
                                       ("svm", "sqrt+l2+scale"), ("mlp", "sqrt")])
def test_sqrt_heads_agree_through_compact_and_onnx_on_rows_with_negative_values(
        fmnist_store: Path, name: str, prep: str | None):
    """Features centred on their mean (half the values negative, as ViT or ConvNeXt features
    are): scikit-learn, the compact form and the ONNX graph give the same probabilities."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from embedpipe.export import head_graph

    s = open_store(fmnist_store)
    X = np.asarray(s.features, np.float32)
    X = X - X.mean(axis=0)
    y = np.asarray(s.labels)
    assert (X < 0).mean() > 0.3
    params = heads.with_data_defaults(name, {"prep": prep} if prep else None, y, X.shape[1])
    est = heads.build(name, params, data=heads.data_of(y, X.shape[1]))
    if not heads.get(name).native_proba:  # calibrated as `fit` calibrates it
        from sklearn.calibration import CalibratedClassifierCV

        est = CalibratedClassifierCV(est, method="temperature", ensemble=False, cv=3)
    est.fit(X, y)
    want = est.predict_proba(X)
    spec = compact.export(est)
    assert spec is not None, name
    form = compact.load(*spec)
    np.testing.assert_allclose(form.predict_proba(X), want, rtol=1e-5, atol=1e-6)
    assert np.array_equal(form.predict(X), est.predict(X))
    model = head_graph(est, X.shape[1])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    probs = sess.run(["probabilities"], {"features": X})[0]
    np.testing.assert_allclose(probs, want, atol=2e-5)


def test_a_saved_sqrt_head_loads_through_the_safe_loader_and_predicts_alike(
        fmnist_store: Path, tmp_path: Path):
    """`fit`'s head file names the step by its full name; the skops loader trusts it (and only
    it: the allow-list), and the file predicts the same through scikit-learn and compact."""
    out = tmp_path / "svm.skops"
    res = ok("fit", fmnist_store, "--head", "svm", "-o", out)
    assert "prep=sqrt+l2 " in res.stdout
    head = artifacts.load(out, compact=False)
    pipe = head.estimator
    while not hasattr(pipe, "steps"):
        pipe = pipe.estimator
    assert type(pipe.steps[0][1]) is SignedSqrt
    assert head.manifest["effective_params"]["prep"] == "sqrt+l2"
    X = np.asarray(open_store(fmnist_store).features, np.float32)
    fast = artifacts.load(out, compact=True)
    assert isinstance(fast.estimator, compact.CompactHead)
    np.testing.assert_allclose(fast.estimator.predict_proba(X), head.estimator.predict_proba(X),
                               rtol=1e-5, atol=1e-6)
    for p in ("sqrt", "sqrt+l2", "sqrt+scale", "sqrt+l2+lda", "sqrt+l2+scale", "l2", "none"):
        assert p in heads.PREP_CHOICES


def test_prep_without_the_square_root_is_still_available(fmnist_store: Path, tmp_path: Path):
    out = tmp_path / "svm.skops"
    res = ok("fit", fmnist_store, "--head", "svm", "--param", "prep=l2", "-o", out)
    assert "prep=l2 " in res.stdout
    pipe = artifacts.load(out, compact=False).estimator
    while not hasattr(pipe, "steps"):
        pipe = pipe.estimator
    assert [n for n, _ in pipe.steps] == ["l2", "pca", "clf"]
    one_line_error(cli("fit", fmnist_store, "--head", "svm", "--param", "prep=root", "-o",
                       tmp_path / "x.skops"), "prep=root", "sqrt+l2")


def test_heads_lists_the_power_normalisation(tmp_path: Path):
    res = ok("heads", "--json")
    rows = {r["head"]: r for r in json.loads(res.stdout)}
    assert rows["svm"]["preprocessing"][0].startswith("signed square root")
    # the streamed heads too (bench/results/sgd_large.md), then standardised
    assert rows["sgd"]["preprocessing"][0].startswith("signed square root")
    assert rows["sgd"]["preprocessing"][1] == "standardise each feature"
    assert [r["head"] for r in rows.values()
            if not r["preprocessing"][0].startswith("signed square root")] == []


def test_rows_of_tiny_norm_are_left_as_scikit_learn_leaves_them(fmnist_store: Path):
    """scikit-learn's Normalizer leaves a row whose norm is under 10 eps (1.2e-6 in float32) as
    it is; the compact form and the ONNX graph divided by it, and probabilities differed by up
    to 1.0 (helper-31's finding 4: features scaled by 1e-8 with prep=l2; with the square root
    in front, rows of about 1e-30)."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from embedpipe.export import head_graph

    s = open_store(fmnist_store)
    X = np.asarray(s.features, np.float32)
    y = np.asarray(s.labels)
    est = heads.build("logreg", {"prep": "l2"}).fit(X, y)
    Q = np.vstack([X[:8] * np.float32(1e-8), X[8:16], np.zeros((1, X.shape[1]), np.float32)])
    want = est.predict_proba(Q)
    form = compact.load(*compact.export(est))
    np.testing.assert_allclose(form.predict_proba(Q), want, rtol=1e-5, atol=1e-6)
    sess = ort.InferenceSession(head_graph(est, X.shape[1]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["probabilities"], {"features": Q})[0], want,
                               atol=2e-5)
