"""The mlp head trains in float64 when its fit may be long enough for float32 weights to turn
subnormal (embedpipe.heads.mlp), in float32 when it cannot be; either way its head file, compact
form and ONNX graph work as scikit-learn's MLP's did; head files written with scikit-learn's
own class (before) still load."""

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


def test_a_fit_too_short_to_reach_subnormal_weights_stays_float32():
    """float64 costs 1.45-1.7x per epoch: a fit of at most FLOAT32_MAX_STEPS Adam steps (batches
    per epoch x max_iter, known before it starts) keeps float32 weights; one step more, float64.
    The bound counts early stopping's validation split and the batch size as scikit-learn
    does."""
    from embedpipe.heads.mlp import FLOAT32_MAX_STEPS

    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 16)).astype(np.float32)
    y = rng.integers(0, 3, 500)
    assert FLOAT32_MAX_STEPS == 1000
    short = MLPClassifier(hidden_layer_sizes=(8,), early_stopping=False, max_iter=333)
    assert short.max_steps(500) == 999  # 3 batches of at most 200 rows x 333 epochs
    long = MLPClassifier(hidden_layer_sizes=(8,), early_stopping=False, max_iter=334)
    assert long.max_steps(500) == 1002
    # early stopping holds out 10%: 450 rows, 3 batches; batch_size=50: 9 (of 450) per epoch
    assert MLPClassifier(early_stopping=True, max_iter=100).max_steps(500) == 300
    assert MLPClassifier(early_stopping=True, batch_size=50, max_iter=100).max_steps(500) == 900
    assert MLPClassifier(solver="lbfgs").max_steps(10) > FLOAT32_MAX_STEPS  # not Adam: float64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning of a short fit
        assert short.set_params(max_iter=5).fit(X, y).coefs_[0].dtype == np.float32
        long.set_params(max_iter=5, batch_size=1)  # 500 batches x 5 epochs
        assert long.fit(X, y).coefs_[0].dtype == np.float64


def test_a_fitted_mlp_head_agrees_through_its_head_file_compact_form_and_onnx(
        fmnist_store: Path, tmp_path: Path):
    """`fit --head mlp` writes our network (float32 here: 1 batch of 200 rows x 300 epochs are
    300 steps at most; batches of 4 rows x 25 epochs are 1,250, float64); the safe loader trusts it by its full name;
    the compact form (torch- and scikit-learn-free predict) and the exported graph give the same
    probabilities as scikit-learn on the store's rows, in either dtype."""
    from embedpipe.export import check_head, head_graph

    X = np.asarray(open_store(fmnist_store).features, np.float32)
    for extra, dtype in (([], np.float32), (["--param", "batch_size=4", "--param",
                                             "max_iter=25"], np.float64)):
        out = tmp_path / "mlp.skops"
        ok("fit", fmnist_store, "--head", "mlp", *extra, "-o", out, "-q")
        head = artifacts.load(out, compact=False)
        net = head.estimator
        while not hasattr(net, "coefs_"):
            net = net.steps[-1][1] if hasattr(net, "steps") else net.estimator
        assert type(net) is MLPClassifier and net.coefs_[0].dtype == dtype
        fast = artifacts.load(out, compact=True)
        assert isinstance(fast.estimator, compact.CompactHead)
        np.testing.assert_allclose(fast.estimator.predict_proba(X),
                                   head.estimator.predict_proba(X), rtol=1e-5, atol=1e-6)
        err = check_head(head_graph(head.estimator, X.shape[1], head_name="mlp"),
                         head.estimator, X, "mlp")
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


def test_head_files_leave_out_training_state_and_solver_sgd_saves(fmnist_store: Path,
                                                                  tmp_path: Path):
    """A head file held Adam's two moment arrays and the best-loss weights besides the weights
    (a float64 network: 10.9 MB, 3/4 of it training state), and `--param solver=sgd` fitted,
    then was refused when saved (the loader did not trust scikit-learn's SGDOptimizer) with
    "make the head again with embedpipe fit" (helper-34's F4, F11). Now neither is saved; the
    network predicts the same after loading."""
    import pickle

    X = np.asarray(open_store(fmnist_store).features, np.float32)
    for extra in ([], ["--param", "solver=sgd"], ["--param", "max_iter=2000"]):
        out = tmp_path / "h.skops"
        ok("fit", fmnist_store, "--head", "mlp", *extra, "-o", out, "-q")
        est = artifacts.load(out).estimator
        net = est[-1]
        assert isinstance(net, MLPClassifier)
        assert not hasattr(net, "_optimizer")
        assert getattr(net, "_best_coefs", net.coefs_) is net.coefs_ or all(
            np.array_equal(a, b) for a, b in zip(net._best_coefs, net.coefs_))
        again = pickle.loads(pickle.dumps(est))
        np.testing.assert_array_equal(again.predict_proba(X), est.predict_proba(X))
    # pickling a network in training leaves it as it was (its optimizer, its best weights)
    fresh = MLPClassifier(hidden_layer_sizes=(8,), max_iter=5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning
        fresh.fit(X[:60], np.arange(60) % 3)
    before = set(vars(fresh))
    pickle.dumps(fresh)
    assert set(vars(fresh)) == before and hasattr(fresh, "_optimizer")
    # float64 weights (max_iter=2000): about the weights' size, not 4x it
    weights = sum(c.nbytes + b.nbytes for c, b in zip(net.coefs_, net.intercepts_))
    assert net.coefs_[0].dtype == np.float64 and out.stat().st_size < 1.5 * weights


def test_the_network_fits_what_scikit_learns_fits(fmnist_store: Path):
    """Sparse matrices (len() is ambiguous), torch tensors (their dtype has no .kind) and
    float32 DataFrames (cast by the step rule too) fit as with scikit-learn's class; a
    network partial_fit starts is float64 (helper-34's F6)."""
    import pandas as pd
    import torch
    from scipy import sparse
    from sklearn.neural_network import MLPClassifier as SklearnMLP

    s = open_store(fmnist_store)
    X = np.asarray(s.features[:120], np.float32)
    y = np.asarray(s.labels[:120])
    kw = dict(hidden_layer_sizes=(16,), max_iter=400, random_state=0)  # 400 steps x 1 batch
    long_kw = dict(kw, max_iter=1200)  # > FLOAT32_MAX_STEPS: float64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning
        for given in (sparse.csr_matrix(X), torch.from_numpy(X), pd.DataFrame(X)):
            short = MLPClassifier(**kw).fit(given, y)  # the dtype scikit-learn's validation
            assert short.coefs_[0].dtype == SklearnMLP(**kw).fit(given, y).coefs_[0].dtype  # picks
            long = MLPClassifier(**long_kw).fit(given, y)
            assert long.coefs_[0].dtype == np.float64, type(given)
            assert (long.predict(X) == MLPClassifier(**long_kw).fit(X, y).predict(X)).all()
        grown = MLPClassifier(**kw).partial_fit(X, y, classes=np.unique(y))
        assert grown.coefs_[0].dtype == np.float64
