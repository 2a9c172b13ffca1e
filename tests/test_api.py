"""The Python API (embedpipe/__init__.py, api.py, embedder.py) on real Fashion-MNIST images and
the bundled EfficientNet-Lite0: what a script or notebook user sees."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from clitools import ok, read_csv

import embedpipe
from embedpipe.datasets import write_fashion_mnist_folder

PER_CLASS = 4  # 40 images: 4 of each of the 10 classes


def _python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(embedpipe.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 real Fashion-MNIST images in class folders (read-only: copy before changing)."""
    return write_fashion_mnist_folder(tmp_path_factory.mktemp("api") / "photos",
                                      per_class=PER_CLASS)


@pytest.fixture(scope="module")
def photos_store(photos: Path) -> Path:
    """``embedpipe.extract(photos, ...)``'s store (read-only: copy before changing)."""
    out = photos.parent / "photos.h5"
    store = embedpipe.extract(photos, out)
    assert len(store) == 10 * PER_CLASS
    os.chmod(out, 0o444)
    return out


def _paths(photos: Path) -> list[str]:
    return sorted(str(p) for p in photos.rglob("*.png"))


def _labels(paths: list[str]) -> np.ndarray:
    return np.array([Path(p).parent.name for p in paths])


def _no_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading a backbone (and any forward pass) fail the test."""
    from embedpipe import embedder
    from embedpipe.extract import runtime

    def refuse(*a, **k):
        raise AssertionError("the backbone was loaded or run")

    monkeypatch.setattr(embedder._Runtime, "__init__", refuse)
    monkeypatch.setattr(runtime, "embed", refuse)


# -- the front door -----------------------------------------------------------------------

def test_import_is_light_and_names_load_on_use():
    res = _python(
        "import sys, embedpipe\n"
        "heavy = ('torch', 'timm', 'sklearn', 'h5py', 'numpy', 'PIL')\n"
        "def loaded(): return sorted({m.split('.')[0] for m in sys.modules} & set(heavy))\n"
        "print(loaded())\n"
        "assert set(embedpipe.__all__) <= set(dir(embedpipe))\n"
        "for name in ('fit', 'cv', 'load_head', 'Head', 'CVReport', 'EmbedpipeError'):\n"
        "    getattr(embedpipe, name)\n"
        "print(loaded())\n"
        "embedpipe.open_store, embedpipe.Store, embedpipe.extract\n"
        "print(loaded())\n"
        "embedpipe.Embedder\n"
        "print(loaded())\n")
    assert res.returncode == 0, res.stderr
    bare, api, store, embedder = (json.loads(line.replace("'", '"'))
                                  for line in res.stdout.splitlines())
    assert bare == [] and api == []  # `import embedpipe` and the API functions: nothing heavy
    assert "torch" not in store and "sklearn" not in store  # stores: numpy + h5py only
    assert "torch" not in embedder  # the Embedder loads torch on its first transform


def test_public_names_are_documented_and_typed():
    import inspect

    root = Path(embedpipe.__file__).parent
    assert (root / "py.typed").is_file()
    for name in embedpipe.__all__:
        obj = getattr(embedpipe, name)
        if name.startswith("__") or name == "DEFAULT_MODEL":
            continue
        assert (obj.__doc__ or "").strip(), name
        if callable(obj) and not isinstance(obj, type):
            sig = inspect.signature(obj)
            assert sig.return_annotation is not inspect.Signature.empty, name
    assert embedpipe.extract is sys.modules["embedpipe.extract"]  # the package, callable
    assert "source" in inspect.signature(embedpipe.extract).parameters


# -- extract / open_store / cv / fit / load_head -------------------------------------------------

def test_extract_returns_the_store_and_reruns_do_nothing(photos, photos_store, tmp_path):
    store = embedpipe.open_store(photos_store)
    assert isinstance(store, embedpipe.Store)
    assert store.features.shape == (40, 1280) and store.features.dtype == np.float32
    assert sorted(store.class_counts().values()) == [PER_CLASS] * 10
    assert store.provenance["model"] == embedpipe.DEFAULT_MODEL
    assert store.provenance["weights_source"].startswith("bundled:")
    assert store.provenance["feature_dim"] == 1280 and store.provenance["created"]
    out = tmp_path / "again.h5"
    shutil.copy(photos_store, out)
    os.chmod(out, 0o644)
    again = embedpipe.extract(photos, out)  # the CLI's resumability: nothing new to do
    last = again.runs[-1]["summary"]
    assert (last["extracted"], last["unchanged"]) == (0, 40)
    np.testing.assert_array_equal(again.features, store.features)


def test_cv_fit_predict_and_the_cli_agree(photos_store, tmp_path):
    report = embedpipe.cv(photos_store, heads=["logreg", "centroid"], folds=4)
    d = report.to_dict()
    assert report.heads == [h["head"] for h in d["heads"]] and report.best == d["heads"][0]["head"]
    assert d["splitter"] == "StratifiedKFold(n_splits=4, shuffle=True, random_state=0)"
    frame = report.to_frame()
    assert list(frame["head"]) == report.heads
    assert frame.loc[0, "accuracy_mean"] == pytest.approx(report.score())
    assert report.score() > 0.3  # chance is 0.1 on 10 balanced classes
    assert "logreg" in str(report)
    d["heads"].clear()
    assert report.to_dict()["heads"]  # to_dict is a copy

    cli_json = tmp_path / "cv.json"
    ok("cv", photos_store, "--head", "logreg", "--head", "centroid", "--folds", "4", "--json",
       cli_json, "-q")
    cli_heads = json.loads(cli_json.read_text())["heads"]
    assert [(h["head"], h["accuracy"]) for h in cli_heads] == \
        [(h["head"], h["accuracy"]) for h in report.to_dict()["heads"]]

    store = embedpipe.open_store(photos_store)
    head = embedpipe.fit(store, "logreg", C=0.5)
    # the params the head used: the user's C over logreg's defaults (power- and L2-normalised
    # rows)
    assert head.path is None and head.manifest["params"] == {"C": 0.5}
    assert [type(s).__name__ for _, s in head.estimator.steps[:2]] == ["SignedSqrt",
                                                                       "Normalizer"]
    assert list(head.classes_) == sorted(store.classes)
    pred = head.predict(store)
    np.testing.assert_array_equal(pred, head.predict(store.features))
    np.testing.assert_array_equal(pred, head.predict(str(photos_store)))
    proba = head.predict_proba(store)
    assert proba.shape == (40, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(head.classes_[proba.argmax(axis=1)], pred)
    assert (pred == np.array(store.label_names())).mean() > 0.5  # its own training rows

    saved = head.save(tmp_path / "logreg.skops")
    loaded = embedpipe.load_head(saved)
    assert loaded.path == saved and loaded.manifest == head.manifest
    np.testing.assert_allclose(loaded.predict_proba(store.features), proba)
    csv_out = tmp_path / "preds.csv"  # the CLI takes the library's head file
    ok("predict", saved, "--store", photos_store, "-o", csv_out, "-q")
    assert [r["predicted"] for r in read_csv(csv_out)] == list(pred)

    written = embedpipe.fit(photos_store, "logreg", out=tmp_path / "cli-like.skops", C=0.5)
    assert written.path == tmp_path / "cli-like.skops"
    np.testing.assert_allclose(written.predict_proba(store.features), proba)


@pytest.mark.parametrize("head", ["logreg", "ridge", "logreg-sgd"])
def test_probabilities_of_float32_heads_sum_to_one_in_float64(photos_store, head):
    """Heads that compute in float32 on float32 features (logreg, logreg-sgd, ridge's
    temperature scaling) give float64 rows that sum to 1 within float64 rounding (they were
    2.4e-7 off, and scikit-learn's log_loss warned that they are not probabilities)."""
    import warnings

    from sklearn.metrics import log_loss

    store = embedpipe.open_store(photos_store)
    fitted = embedpipe.fit(store, head)
    proba = fitted.predict_proba(store)
    assert proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_loss(store.label_names(), proba, labels=fitted.classes_)


def test_library_errors_are_embedpipe_errors_not_exits(photos, photos_store, tmp_path):
    from embedpipe.api import Head

    def raises(fn, *needles):
        with pytest.raises(embedpipe.EmbedpipeError) as info:
            fn()
        text = str(info.value)
        assert "\n" not in text, text
        for n in needles:
            assert n in text, text
        return info.value

    raises(lambda: embedpipe.extract(tmp_path / "nope", tmp_path / "x.h5"), "nope")
    raises(lambda: embedpipe.extract(photos, tmp_path / "x.h5", img_sise=224), "img_sise",
           "img_size")
    raises(lambda: embedpipe.extract(photos, tmp_path / "x.h5", engine="spark"), "spark")
    raises(lambda: embedpipe.fit(photos_store, "forest"), "forest")
    raises(lambda: embedpipe.fit(photos_store, "logreg", C=-1), "C")
    raises(lambda: embedpipe.cv(photos_store, heads=["logreg"], folds=1), "folds")
    raises(lambda: embedpipe.load_head(tmp_path / "missing.skops"), "missing.skops")
    raises(lambda: embedpipe.load_head(photos_store), "is an embedpipe feature store",
           f"embedpipe fit {photos_store}")
    raises(lambda: embedpipe.fit(42), "int")
    head = embedpipe.fit(photos_store, "centroid")
    assert isinstance(head, Head)
    raises(lambda: head.predict(np.zeros((2, 7), dtype=np.float32)), "(2, 7)", "1280")
    raises(lambda: embedpipe.Embedder().transform("one.png"), "list")
    raises(lambda: embedpipe.Embedder().transform([1, 2]), "X[0]", "int")
    raises(lambda: embedpipe.Embedder(batch_size=0).fit(), "batch_size")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not an image at all")
    raises(lambda: embedpipe.Embedder(cache=tmp_path / "c.h5").transform([bad / "broken.png"]),
           "broken.png")
    raises(lambda: embedpipe.Embedder().transform([bad / "absent.png"]), "absent.png")


# -- Embedder ---------------------------------------------------------------------------------

def test_pipeline_cross_val_score_and_grid_search_read_the_cache(photos, tmp_path,
                                                                 monkeypatch, capsys):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
    from sklearn.pipeline import Pipeline

    paths, y = _paths(photos), _labels(_paths(photos))
    cache = tmp_path / "embeddings.h5"
    embed = embedpipe.Embedder(cache=cache)
    t0 = time.perf_counter()
    first = embed.transform(paths)
    t1 = time.perf_counter()
    second = embed.transform(paths)
    t2 = time.perf_counter()
    with capsys.disabled():
        print(f"\nEmbedder cache: first transform of {len(paths)} images {t1 - t0:.2f} s "
              f"(loads Lite0 and embeds), second {t2 - t1:.3f} s (reads the cache): "
              f"{(t1 - t0) / (t2 - t1):.0f}x")
    assert first.shape == (40, 1280) and first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    assert (embed.n_embedded_, embed.n_cached_) == (40, 40)  # the second ran nothing

    _no_backbone(monkeypatch)  # from here on, a backbone load or forward pass fails the test
    pipe = Pipeline([("embed", embedpipe.Embedder(cache=cache)),
                     ("clf", LogisticRegression(max_iter=1000))])
    folds = StratifiedKFold(n_splits=4, shuffle=True, random_state=0)
    scores = cross_val_score(pipe, paths, y, cv=folds)
    assert scores.shape == (4,) and scores.mean() > 0.3  # chance: 0.1
    # the same folds on the cached features directly: the pipeline adds nothing, loses nothing
    direct = cross_val_score(LogisticRegression(max_iter=1000), first, y, cv=folds)
    np.testing.assert_allclose(scores, direct)

    search = GridSearchCV(pipe, {"clf__C": [0.1, 1.0]}, cv=folds).fit(paths, y)
    assert search.best_params_["clf__C"] in (0.1, 1.0) and search.best_score_ > 0.3
    assert list(search.predict(paths[:3])) == list(search.best_estimator_.predict(paths[:3]))
    names = search.best_estimator_[:-1].get_feature_names_out()
    assert len(names) == 1280 and names[0] == "embedder0"


def test_extract_store_is_a_cache_keyed_by_content(photos, photos_store, tmp_path, monkeypatch):
    """Files are found by the sha256 of their bytes, under any path: a copy of the folder
    costs nothing, and the rows are exactly what `extract` stored."""
    cache = tmp_path / "cache.h5"
    shutil.copy(photos_store, cache)
    os.chmod(cache, 0o644)
    moved = tmp_path / "moved"
    shutil.copytree(photos, moved)
    _no_backbone(monkeypatch)
    embed = embedpipe.Embedder(cache=cache)
    X = embed.transform(_paths(moved)[::-1])
    store = embedpipe.open_store(photos_store)
    row = {p: i for i, p in enumerate(store.paths)}
    want = store.features[[row[str(Path(p).relative_to(moved))] for p in _paths(moved)[::-1]]]
    np.testing.assert_array_equal(X, want)
    assert (getattr(embed, "n_embedded_", 0), embed.n_cached_) == (0, 40)


def test_a_cache_of_other_options_is_checked_by_identity(photos, photos_store, tmp_path):
    """Options that differ from the store's last run (weights="bundled" vs the default) take
    the full check: the backbone is loaded and its identity compared; the same features are
    then read by hash, other features (another input size) are refused in one line."""
    cache = tmp_path / "cache.h5"
    shutil.copy(photos_store, cache)
    os.chmod(cache, 0o644)
    embed = embedpipe.Embedder(weights="bundled", cache=cache)
    X = embed.transform(_paths(photos))
    assert (getattr(embed, "n_embedded_", 0), embed.n_cached_) == (0, 40)
    store = embedpipe.open_store(photos_store)
    row = {p: i for i, p in enumerate(store.paths)}
    want = store.features[[row[str(Path(p).relative_to(photos))] for p in _paths(photos)]]
    np.testing.assert_array_equal(X, want)
    with pytest.raises(embedpipe.EmbedpipeError, match="another cache=") as info:
        embedpipe.Embedder(img_size=160, cache=cache).transform(_paths(photos)[:1])
    assert "data_config" in str(info.value) and "\n" not in str(info.value)
    assert len(embedpipe.open_store(cache)) == 40  # nothing was added


def test_cached_transform_in_a_fresh_process_never_imports_torch(photos, photos_store,
                                                                  tmp_path):
    cache = tmp_path / "cache.h5"
    shutil.copy(photos_store, cache)
    os.chmod(cache, 0o644)
    res = _python(
        "import sys, numpy as np, embedpipe\n"
        f"paths = {_paths(photos)!r}\n"
        f"X = embedpipe.Embedder(cache={str(cache)!r}).transform(paths)\n"
        f"np.save({str(tmp_path / 'X.npy')!r}, X)\n"
        "print('torch' in sys.modules, 'timm' in sys.modules)\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False"]
    store = embedpipe.open_store(photos_store)
    row = {p: i for i, p in enumerate(store.paths)}
    want = store.features[[row[str(Path(p).relative_to(photos))] for p in _paths(photos)]]
    np.testing.assert_array_equal(np.load(tmp_path / "X.npy"), want)


def test_no_cache_files_and_pil_images_match_extract(photos, photos_store):
    from PIL import Image

    paths = _paths(photos)[:3]
    embed = embedpipe.Embedder()
    with Image.open(paths[0]) as im:
        pil = im.copy()
    X = embed.transform([paths[0], pil, Path(paths[1]), paths[2]])
    assert X.shape == (4, 1280) and X.dtype == np.float32
    assert embed.n_embedded_ == 4 and getattr(embed, "n_cached_", 0) == 0
    store = embedpipe.open_store(photos_store)
    row = {p: i for i, p in enumerate(store.paths)}
    want = store.features[[row[str(Path(p).relative_to(photos))] for p in paths]]
    # same decoding, preprocessing, precision and forward pass as extract (batch size differs)
    np.testing.assert_allclose(X[[0, 2, 3]], want, rtol=0, atol=2e-2 * np.abs(want).max())
    np.testing.assert_allclose(X[1], X[0], rtol=0, atol=1e-6)  # a PIL image = its file
    assert embed.transform([]).shape == (0, 1280)


def test_embedder_clones_and_pickles_without_its_backbone(photos):
    from sklearn.base import clone

    embed = embedpipe.Embedder(batch_size=8, img_size=160, cache=None)
    assert clone(embed).get_params() == embed.get_params()
    X = embed.transform(_paths(photos)[:2])
    assert X.shape == (2, 1280)
    assert getattr(embed, "_runtime", None) is not None  # loaded for the transform
    twin = clone(embed)
    assert getattr(twin, "_runtime", None) is None and twin.get_params()["img_size"] == 160
    blob = pickle.dumps(embed)
    assert len(blob) < 20_000  # parameters only: the backbone's ~13 MB weights are not in it
    back = pickle.loads(blob)
    assert getattr(back, "_runtime", None) is None and back.get_params() == embed.get_params()
    np.testing.assert_array_equal(back.transform(_paths(photos)[:2]), X)
    assert repr(embed).startswith("Embedder(")


def test_a_head_predicts_zero_rows_and_refuses_non_finite_rows_in_one_line(fmnist_store: Path,
                                                                           tmp_path: Path):
    """``Head.predict`` on 0 rows gave scikit-learn's "Found array with 0 sample(s) ...
    Normalizer", and NaN rows a multi-line scikit-learn error (found by helper-30's attack):
    0 rows give 0 predictions, a non-finite row an EmbedpipeError naming it."""
    out = tmp_path / "logreg.skops"
    ok("fit", fmnist_store, "--head", "logreg", "-o", out, "-q")
    head = embedpipe.load_head(out)
    empty = np.zeros((0, 1280), np.float32)
    assert head.predict(empty).shape == (0,)
    assert head.predict_proba(empty).shape == (0, len(head.classes_))
    X = embedpipe.open_store(fmnist_store).features[:5].copy()
    X[3, 7] = np.nan
    with pytest.raises(embedpipe.EmbedpipeError) as e:
        head.predict(X)
    assert "1 row(s) with NaN or infinite values, or values beyond ±1e+12 (the first: row 3)" \
        in str(e.value)
    assert "\n" not in str(e.value)
    # what numpy turns into rows is taken as rows (a list of rows: the same predictions);
    # a non-numeric array, ragged rows and float64 beyond float32's range are refused in one
    # line (an object array gave a raw TypeError from np.isfinite; 1e300 a RuntimeWarning)
    good = np.asarray(embedpipe.open_store(fmnist_store).features[:5])
    assert list(head.predict(good.tolist())) == list(head.predict(good))
    huge = good.astype(np.float64)
    huge[2, 0] = 1e300
    for bad, needle in [(good.astype(object), "X has dtype object"),
                        (good.astype(complex), "X has dtype complex128"),
                        ([[1.0, 2.0], [3.0]], "X (list) is not an (n, D) array"),
                        (huge, "1 row(s) with NaN or infinite values, or values beyond "
                               "±1e+12 (the first: row 2)")]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no RuntimeWarning on the way
            with pytest.raises(embedpipe.EmbedpipeError) as e:
                head.predict(bad)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_head_predict_takes_ndarray_subclasses_tensors_and_no_rows(fmnist_store: Path,
                                                                    tmp_path: Path):
    """helper-32's attack: an np.matrix reached scikit-learn, which raised a raw TypeError; a
    masked array's masked NaN passed the finite check (np.isfinite skips masked entries) and
    scikit-learn raised a multi-line ValueError; a torch tensor that requires grad raised
    torch's raw RuntimeError from numpy.asarray, a bf16 one was refused as "not an (n, D)
    array", a meta one with a message cut mid-word; an empty list of rows was refused as a bad
    store while a (0, D) array gave 0 predictions. Now the matrix and every tensor (detached,
    on the CPU, as float32) predict as their arrays, the masked NaN is refused like any NaN,
    a meta tensor in one line, and no rows give no predictions."""
    import torch

    out = tmp_path / "logreg.skops"
    ok("fit", fmnist_store, "--head", "logreg", "-o", out, "-q")
    head = embedpipe.load_head(out)
    X = np.asarray(embedpipe.open_store(fmnist_store).features[:5], dtype=np.float32)
    want = list(head.predict(X))
    assert list(head.predict(np.matrix(X))) == want
    np.testing.assert_allclose(head.predict_proba(np.matrix(X)), head.predict_proba(X))
    bad = X.copy()
    bad[2, 5] = np.nan
    with pytest.raises(embedpipe.EmbedpipeError) as e:
        head.predict(np.ma.masked_invalid(bad))
    assert "1 row(s) with NaN or infinite values" in str(e.value) and "\n" not in str(e.value)
    t = torch.from_numpy(X)
    for tensor in (t.clone().requires_grad_(True), t.double(), t.half()):
        assert list(head.predict(tensor)) == want
    assert head.predict(t.bfloat16()).shape == (5,)  # bf16 rounds the features a little
    np.testing.assert_allclose(head.predict_proba(t.clone().requires_grad_(True)),
                               head.predict_proba(X))
    with pytest.raises(embedpipe.EmbedpipeError) as e:
        head.predict(torch.empty(2, X.shape[1], device="meta"))
    assert str(e.value) == ("X is a tensor on the meta device, which holds no values: pass "
                            "the features themselves")
    for none in ([], ()):
        assert head.predict(none).shape == (0,)
        assert head.predict_proba(none).shape == (0, len(head.classes_))
    # helper-34's F14: a scipy sparse matrix was refused as "store csr_matrix: pass a store
    # path"; image paths as "not a readable embedpipe store ... move it aside and extract
    # again". Now sparse rows predict as their dense array, and images are named as images
    import scipy.sparse
    from PIL import Image

    for sparse in (scipy.sparse.csr_matrix(X), scipy.sparse.coo_array(X)):
        assert list(head.predict(sparse)) == want
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    for given in (str(img), [img], [str(img), str(img)]):
        with pytest.raises(embedpipe.EmbedpipeError) as e:
            head.predict(given)
        assert str(e.value).startswith(f"{img} is an image; a head scores features")
        assert "embedpipe.Embedder('tf_efficientnet_lite0').transform(paths)" in str(e.value)
        assert "\n" not in str(e.value)


def test_head_predict_takes_pandas_as_users_hold_features(fmnist_store: Path, tmp_path: Path):
    """helper-32's attack: a nullable-dtype DataFrame (Float64, what pandas' readers give) was
    refused as "dtype object", a Series of per-row arrays by its shape, and the DataFrame
    `export-features` writes (a 'features' column of arrays beside path/label/split) as
    "dtype object". Now all three predict as their arrays; a missing value is refused as NaN,
    ragged rows and non-numeric columns in one line naming them."""
    pd = pytest.importorskip("pandas")
    out = tmp_path / "logreg.skops"
    ok("fit", fmnist_store, "--head", "logreg", "-o", out, "-q")
    head = embedpipe.load_head(out)
    X = np.asarray(embedpipe.open_store(fmnist_store).features[:5], dtype=np.float32)
    want = list(head.predict(X))
    nullable = pd.DataFrame(X).astype("Float64")
    assert list(head.predict(nullable)) == want
    np.testing.assert_array_equal(head.predict_proba(nullable), head.predict_proba(X))
    exported = pd.DataFrame({"path": [f"{i}.png" for i in range(5)], "label": ["x"] * 5,
                             "features": list(X)})
    assert list(head.predict(exported)) == want
    assert list(head.predict(pd.Series(list(X)))) == want
    nullable.iloc[2, 7] = pd.NA
    for bad, needle in [(nullable, "1 row(s) with NaN or infinite values"),
                        (pd.Series([X[0], X[1][:9]]), "X's Series: row 1 has shape (9,)"),
                        (exported.drop(columns="features").assign(f0=1.0),
                         "non-numeric columns (path, label)")]:
        with pytest.raises(embedpipe.EmbedpipeError) as e:
            head.predict(bad)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_head_predict_takes_every_pandas_layout_of_export_features_and_no_rows(
        fmnist_store: Path, tmp_path: Path):
    """helper-34's attack: export-features' parquet read with dtype_backend="pyarrow" (its
    'features' column a list<float> column) was refused with advice to pass what it was; an
    empty frame or Series was refused where an empty array gives 0 predictions; a complex column
    or tensor was cast (imaginary part dropped) and a timedelta column counted as numeric; a
    missing row was refused without saying which."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    import torch

    out = tmp_path / "logreg.skops"
    ok("fit", fmnist_store, "--head", "logreg", "-o", out, "-q")
    head = embedpipe.load_head(out)
    feats = tmp_path / "f.parquet"
    ok("export-features", fmnist_store, "-o", feats, "-q")
    X = np.asarray(embedpipe.open_store(fmnist_store).features, dtype=np.float32)
    want = list(head.predict(X))
    arrow = pd.read_parquet(feats, dtype_backend="pyarrow")
    assert "list<" in str(arrow["features"].dtype)  # fixed_size_list<element: float>[1280]
    assert list(head.predict(arrow)) == want
    assert list(head.predict(pd.read_parquet(feats))) == want
    for empty in (arrow.iloc[:0], pd.Series([], dtype=object), pd.DataFrame(X[:0])):
        assert head.predict(empty).shape == (0,)
        assert head.predict_proba(empty).shape == (0, 10)
    frame = pd.DataFrame({"features": list(X[:3])})
    frame.loc[1, "features"] = None
    timed = pd.DataFrame(X[:3]).assign(t=pd.to_timedelta([1, 2, 3], unit="s"))
    for bad, needle in [(pd.DataFrame(X[:3].astype(np.complex64)), "non-numeric columns (0, 1"),
                        (timed, "non-numeric columns (t)"),
                        (frame, "'features' column: row 1 is not a numeric array"),
                        (pd.DataFrame({"features": [X[0], pd.NA]}), "row 1 is not a numeric"),
                        (pd.concat([frame, frame], axis=1), "named more than once (features)"),
                        (torch.from_numpy(X[:3]).to(torch.complex64), "complex tensor")]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(embedpipe.EmbedpipeError) as e:
                head.predict(bad)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
