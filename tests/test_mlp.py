"""The mlp head trains in float64 (embedpipe.heads.mlp): its weights do not turn subnormal, and
its head file, compact form and ONNX graph work as scikit-learn's MLP's did; head files written
with scikit-learn's own class (before) still load."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from clitools import ok

from embedpipe.heads import artifacts, compact
from embedpipe.heads.mlp import MLPClassifier
from embedpipe.store import open_store


def _subnormal(net) -> int:
    tiny = np.finfo(net.coefs_[0].dtype).tiny
    return sum(int(((np.abs(c) < tiny) & (c != 0)).sum()) for c in net.coefs_)


def test_float32_rows_train_float64_weights_that_never_turn_subnormal():
    """2,000 Adam steps on float32 rows with dead input channels (always 0, as ReLU-pooled
    features have): scikit-learn's network in float32 ends with ~16% of its first layer's
    weights subnormal (each product with them runs on the CPU's slow path); ours trains in
    float64 and has none. fit and partial_fit both cast; the rows passed in are not changed."""
    from sklearn.neural_network import MLPClassifier as SklearnMLP

    rng = np.random.default_rng(0)
    X = np.abs(rng.standard_normal((200, 64))).astype(np.float32)
    X[:, :16] = 0
    y = rng.integers(0, 4, 200)
    kw = dict(hidden_layer_sizes=(64,), alpha=1e-3, random_state=0, max_iter=2000, tol=0,
              n_iter_no_change=10**6, batch_size=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: max_iter on purpose
        before = SklearnMLP(**kw).fit(X, y)
        ours = MLPClassifier(**kw).fit(X, y)
    assert before.coefs_[0].dtype == np.float32 and _subnormal(before) > 0.1 * 64 * 64
    assert ours.n_iter_ == 2000
    assert all(c.dtype == np.float64 for c in [*ours.coefs_, *ours.intercepts_])
    assert _subnormal(ours) == 0
    assert X.dtype == np.float32  # the caller's rows are untouched
    np.testing.assert_array_equal(ours.predict(X), ours.predict(X.astype(np.float64)))

    step = MLPClassifier(hidden_layer_sizes=(8,), random_state=0)
    step.partial_fit(X, y, classes=np.arange(4))
    assert step.coefs_[0].dtype == np.float64
    assert not hasattr(MLPClassifier(solver="lbfgs"), "partial_fit")  # as scikit-learn's


def test_a_fitted_mlp_head_agrees_through_its_head_file_compact_form_and_onnx(
        fmnist_store: Path, tmp_path: Path):
    """`fit --head mlp` writes our float64 network; the safe loader trusts it by its full name;
    the compact form (torch- and scikit-learn-free predict) and the exported graph give the same
    probabilities as scikit-learn on the store's rows."""
    from embedpipe.export import check_head, head_graph

    out = tmp_path / "mlp.skops"
    ok("fit", fmnist_store, "--head", "mlp", "-o", out, "-q")
    head = artifacts.load(out, compact=False)
    net = head.estimator
    while not hasattr(net, "coefs_"):
        net = net.steps[-1][1] if hasattr(net, "steps") else net.estimator
    assert type(net) is MLPClassifier and net.coefs_[0].dtype == np.float64
    X = np.asarray(open_store(fmnist_store).features, np.float32)
    fast = artifacts.load(out, compact=True)
    assert isinstance(fast.estimator, compact.CompactHead)
    np.testing.assert_allclose(fast.estimator.predict_proba(X), head.estimator.predict_proba(X),
                               rtol=1e-5, atol=1e-6)
    err = check_head(head_graph(head.estimator, X.shape[1], head_name="mlp"), head.estimator, X,
                     "mlp")
    assert err < 1e-4, err


def test_a_head_file_with_scikit_learns_own_mlp_still_loads(fmnist_store: Path,
                                                               tmp_path: Path):
    """Head files written before the float64 network hold scikit-learn's MLPClassifier with
    float32 weights: they load through the safe loader and predict as they did."""
    from sklearn.neural_network import MLPClassifier as SklearnMLP

    new = tmp_path / "new.skops"
    ok("fit", fmnist_store, "--head", "mlp", "-o", new, "-q")
    head = artifacts.load(new, compact=False)
    pipe = head.estimator
    assert hasattr(pipe, "steps"), pipe  # the mlp head on these rows: its plain pipeline
    ours = pipe.steps[-1][1]
    plain = SklearnMLP(**ours.get_params())
    vars(plain).update(vars(ours))
    plain.coefs_ = [c.astype(np.float32) for c in ours.coefs_]
    plain.intercepts_ = [c.astype(np.float32) for c in ours.intercepts_]
    pipe.steps[-1] = ("clf", plain)
    old = tmp_path / "old.skops"
    X = np.asarray(open_store(fmnist_store).features, np.float32)
    artifacts.save(old, pipe, head.manifest, check_rows=X)  # with its compact form, as fit
    loaded = artifacts.load(old, compact=False)
    assert type(loaded.estimator.steps[-1][1]) is SklearnMLP
    np.testing.assert_allclose(loaded.estimator.predict_proba(X), pipe.predict_proba(X),
                               rtol=1e-6, atol=1e-7)
    ok("predict", old, "--store", fmnist_store, "-o", tmp_path / "p.csv", "-q")
    assert (tmp_path / "p.csv").read_text().count("\n") == len(X) + 1
