"""Heads, head files and prediction, on a real store (Fashion-MNIST, bundled EfficientNet-Lite0)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from clitools import cli, ok, one_line, one_line_error, read_csv

from embedpipe import heads
from embedpipe.heads import artifacts
from embedpipe.heads.rows import select_rows, targets
from embedpipe.store import open_store


@pytest.fixture(scope="module")
def logreg_head(fmnist_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("heads") / "logreg.skops"
    ok("fit", fmnist_store, "--head", "logreg", "--param", "C=0.1", "-o", out, "-q")
    return out


def test_heads_lists_every_head_with_defaults_and_grid():
    res = ok("heads", "--json")
    rows = {r["head"]: r for r in json.loads(res.output)}
    assert {"svm", "linear-svm", "logreg", "knn", "ridge", "centroid", "mlp"} <= set(rows)
    assert rows["svm"]["grid"]["C"] and rows["knn"]["defaults"]["metric"] == "euclidean"
    assert rows["knn"]["preprocessing"][-1].startswith("project onto the classes' linear")
    rules = {r["params"]["prep"]: r["rule"] for r in rows["centroid"]["data_rules"]}
    assert "fewer than 5 training rows" in rules["sqrt+l2+scale"]  # too few rows for the lda step
    text = ok("heads").output
    assert "search grid" in text and "linear-svm" in text


@pytest.mark.parametrize("head", list(heads.HEADS))
def test_every_head_fits_and_round_trips_without_manual_trust(head: str, fmnist_store: Path,
                                                              tmp_path: Path):
    out = tmp_path / f"{head}.skops"
    res = ok("fit", fmnist_store, "--head", head, "-o", out)
    assert "fitted" in res.output and out.is_file()
    loaded = artifacts.load(out)  # no trusted= argument from the caller
    store = open_store(fmnist_store)
    rows = select_rows(store)
    X = store.features[rows.heldout["test"]]
    pred = loaded.estimator.predict(X)
    acc = float((pred == targets(store, rows.heldout["test"])).mean())
    assert acc > 0.4, (head, acc)  # 10 classes: chance is 0.1
    probs = loaded.estimator.predict_proba(X)  # every saved head gives probabilities
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    m = loaded.manifest
    assert m["head"] == head and m["classes"] == sorted(store.classes)
    ident = m["store_identity"]
    assert ident["model"] == "tf_efficientnet_lite0" and ident["feature_dim"] == 1280
    assert ident["weights_sha256"] == store.meta["weights_sha256"]
    assert ident["data_config"]["input_size"] == [3, 224, 224]
    assert ident["pool"] and ident["precision"] == "fp32"
    assert m["training"]["rows"] == 200 and set(m["training"]["per_class"].values()) == {20}
    assert {"embedpipe", "scikit-learn", "numpy", "skops"} <= set(m["versions"])


def test_the_fit_summary_names_every_heads_parameters_as_the_manifest_records_them(
        fmnist_store: Path, tmp_path: Path):
    """`fit --head svm` said "(defaults)": the summary line names the key parameters as fitted
    (prep, the head's own defaults and grid parameters, its data rules), for every head, and
    the manifest records the same (``effective_params``); they are those of the pipeline."""
    lines = {}
    for head in heads.HEADS:
        out = tmp_path / f"{head}.skops"
        res = ok("fit", fmnist_store, "--head", head, "-o", out, "-q")
        m = artifacts.load(out).manifest
        shown = heads.format_params(m["effective_params"])
        assert f"fitted {head} ({shown}) on " in res.stdout and "defaults" not in res.stdout
        pipe = artifacts.load(out).estimator
        while not hasattr(pipe, "steps"):  # calibrated: the pipeline inside
            pipe = pipe.estimator
        got = pipe[-1].get_params()
        for k, v in m["effective_params"].items():
            if k != "prep":
                assert json.loads(json.dumps(got[k])) == v, (head, k)
        lines[head] = res.stdout.strip()
    assert re.fullmatch(r"fitted svm \(prep=sqrt\+l2 C=3 gamma=scale\) on 200 rows, 10 classes in "
                        r"[0-9.]+ s; training accuracy [0-9.]+; probabilities: temperature "
                        r"scaling \(5-fold\) → " + re.escape(str(tmp_path / "svm.skops")),
                        lines["svm"]), lines["svm"]
    assert "(prep=sqrt+l2+lda algorithm=brute metric=euclidean n_neighbors=10 weights=distance)" \
        in lines["knn"]
    assert "(prep=sqrt+l2 alpha=1)" in lines["ridge"]  # its small-data rule


def test_fit_options_params_search_and_errors(fmnist_store: Path, tmp_path: Path):
    out = tmp_path / "svm.skops"
    res = ok("fit", fmnist_store, "--head", "svm", "--param", "C=30", "--param", "pca=32",
             "--class-weight", "balanced", "-o", out, "-q")
    assert "(prep=sqrt+l2 C=30 gamma=scale class_weight=balanced pca=32)" in res.output, res.output
    m = artifacts.load(out).manifest
    # the user's parameters, over the svm's defaults (L2 rows and C=3: no data rule)
    assert m["params"] == {"C": 30, "pca": 32} and m["class_weight"] == "balanced"
    pipe = artifacts.load(out).estimator
    while not hasattr(pipe, "steps"):  # calibrated: the pipeline inside
        pipe = pipe.estimator
    assert [n for n, _ in pipe.steps] == ["sqrt", "l2", "pca", "clf"] and pipe["clf"].C == 30
    assert m["calibration"].startswith("temperature")
    ok("fit", fmnist_store, "--head", "ridge", "--search", "-o", tmp_path / "r.skops", "-q")
    assert "alpha" in artifacts.load(tmp_path / "r.skops").manifest["params"]
    one_line_error(cli("fit", fmnist_store, "--head", "logreg", "--param", "k=3", "-o",
                       tmp_path / "x.skops"), "--param k", "logreg", "C")
    one_line_error(cli("fit", fmnist_store, "--head", "knn", "--class-weight", "balanced",
                       "-o", tmp_path / "x.skops"), "knn", "class weights")
    one_line_error(cli("fit", fmnist_store, "--head", "forest", "-o", tmp_path / "x.skops"),
                   "forest", "logreg")
    # inf is a number (scikit-learn's messages name ranges up to inf), not the text 'inf'
    assert heads.parse_value("inf") == float("inf") and heads.parse_value("-Inf") < 0
    one_line_error(cli("fit", fmnist_store, "--head", "logreg", "--param", "C=-inf", "-o",
                       tmp_path / "x.skops"), "C")
    one_line_error(cli("fit", tmp_path / "nope.h5", "-o", tmp_path / "x.skops"), "nope.h5")
    assert not (tmp_path / "x.skops").exists()


def test_predict_store_csv_matches_the_fitted_pipeline(logreg_head: Path, fmnist_store: Path,
                                                       tmp_path: Path):
    out = tmp_path / "preds.csv"
    res = ok("predict", logreg_head, "--store", fmnist_store, "-o", out, "--top-k", "10")
    assert "accuracy on the 250 labeled" in res.output
    rows = read_csv(out)
    store = open_store(fmnist_store)
    est = artifacts.load(logreg_head).estimator
    assert [r["path"] for r in rows] == store.paths
    assert [r["label"] for r in rows] == store.label_names()
    assert [r["predicted"] for r in rows] == list(est.predict(store.features))
    probs = est.predict_proba(store.features)
    for r, p in zip(rows, probs):
        tops = [float(r[f"top{i}_prob"]) for i in range(1, 11)]
        assert tops == sorted(tops, reverse=True) and abs(sum(tops) - 1) < 1e-4
        assert r["top1"] == r["predicted"] and float(r["confidence"]) == pytest.approx(p.max(),
                                                                                    abs=1e-6)
    test_only = tmp_path / "test.csv"
    ok("predict", logreg_head, "--store", fmnist_store, "--split", "test", "-o", test_only)
    assert len(read_csv(test_only)) == 50
    one_line_error(cli("predict", logreg_head, "--store", fmnist_store, "--split", "val"),
                   "val", "test")


_BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed on this machine (test)")
sys.meta_path.insert(0, _Block())
"""

_RUN_CLI = """
from embedpipe.cli import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("TORCH_IMPORTED=" + str(any(m == "torch" or m.startswith("torch.") for m in sys.modules)),
      file=sys.stderr)
sys.exit(code)
"""


def _run_py(code: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_predict_store_runs_where_torch_cannot_be_imported(logreg_head: Path,
                                                           fmnist_store: Path, tmp_path: Path):
    out = tmp_path / "preds.csv"
    proc = _run_py("import sys\n" + _BLOCK_TORCH + _RUN_CLI, "predict", logreg_head, "--store",
                   fmnist_store, "-o", out)
    assert proc.returncode == 0, proc.stderr
    est = artifacts.load(logreg_head).estimator
    store = open_store(fmnist_store)
    assert [r["predicted"] for r in read_csv(out)] == list(est.predict(store.features))
    # and where torch is installed, the store path still never imports it
    proc = _run_py("import sys\n" + _RUN_CLI, "predict", logreg_head, "--store", fmnist_store,
                   "-o", tmp_path / "again.csv")
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_IMPORTED=False" in proc.stderr


def test_head_refuses_a_store_of_another_backbone(logreg_head: Path, fmnist_store: Path,
                                                  tmp_path: Path):
    src = Path(open_store(fmnist_store, features=False).runs[0]["source"]) / "test" / "bag"
    other = tmp_path / "random.h5"
    ok("extract", src, "-o", other, "--random-init", "--precision", "fp32", "-q")
    msg = one_line_error(cli("predict", logreg_head, "--store", other), "weights_sha256",
                         str(other), str(logreg_head))
    assert open_store(other).meta["weights_sha256"] in msg or "..." in msg


def test_predict_images_end_to_end_equals_predict_from_the_store(logreg_head: Path,
                                                                  fmnist_store: Path,
                                                                  tmp_path: Path):
    data = Path(open_store(fmnist_store, features=False).runs[0]["source"])
    folder = tmp_path / "photos"
    shutil.copytree(data / "test", folder)
    (folder / "notes.txt").write_text("not an image")
    (folder / "coat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    kept = tmp_path / "kept.h5"
    out = tmp_path / "images.csv"
    res = ok("predict", logreg_head, folder, "-o", out, "--keep-store", kept, "-q")
    assert "skipped" in res.output and "broken.png" in res.output
    by_image = {r["path"]: r for r in read_csv(out)}
    assert len(by_image) == 50
    ok("predict", logreg_head, "--store", fmnist_store, "--split", "test", "-o",
       tmp_path / "store.csv")
    for r in read_csv(tmp_path / "store.csv"):
        mine = by_image[folder.as_posix() + "/" + r["path"].removeprefix("test/")]
        assert mine["predicted"] == r["predicted"] and mine["label"] == r["label"]
        assert float(mine["confidence"]) == pytest.approx(float(r["confidence"]), abs=1e-4)
    # the kept store is a normal store for the same backbone: predict --store works on it
    ok("predict", logreg_head, "--store", kept, "-o", tmp_path / "kept.csv")
    # single files work too
    one = next((folder / "bag").iterdir())
    ok("predict", logreg_head, one, "-o", tmp_path / "one.csv", "-q")
    assert [r["path"] for r in read_csv(tmp_path / "one.csv")] == [one.as_posix()]


def test_predict_argument_errors(logreg_head: Path, fmnist_store: Path, tmp_path: Path):
    one_line_error(cli("predict", logreg_head), "IMAGES", "--store")
    one_line_error(cli("predict", logreg_head, tmp_path / "missing.jpg"), "missing.jpg")
    one_line_error(cli("predict", tmp_path / "nohead.skops", "--store", fmnist_store),
                   "nohead.skops", "embedpipe fit")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_head_files_that_could_run_code_or_are_damaged_are_refused(logreg_head: Path,
                                                                  fmnist_store: Path,
                                                                  tmp_path: Path):
    marker = tmp_path / "pwned"
    # 1. a plain pickle whose unpickling runs a shell command
    evil = tmp_path / "evil.skops"
    evil.write_bytes(pickle.dumps({"estimator": _Payload(marker)}))
    one_line_error(cli("predict", evil, "--store", fmnist_store), "evil.skops",
                   "not a readable head file")
    # 2. a skops archive that names a function which could run code
    sio = artifacts._skops_io()
    funcs = tmp_path / "funcs.skops"
    sio.dump({"format": artifacts.FORMAT, "format_version": 1, "manifest": {},
              "estimator": os.system}, funcs)
    one_line_error(cli("predict", funcs, "--store", fmnist_store), "funcs.skops",
                   "does not trust", "system")
    # 3. a real head whose schema was edited to build an untrusted type
    edited = tmp_path / "edited.skops"
    with zipfile.ZipFile(logreg_head) as zin, zipfile.ZipFile(edited, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "schema.json":
                data = data.replace(b'"LogisticRegression"', b'"Popen"').replace(
                    b'"sklearn.linear_model._logistic"', b'"subprocess"')
            zout.writestr(item, data)
    one_line_error(cli("predict", edited, "--store", fmnist_store), "edited.skops",
                   "subprocess.Popen")
    # 4. truncated and bit-flipped copies of a real head
    blob = logreg_head.read_bytes()
    trunc = tmp_path / "trunc.skops"
    trunc.write_bytes(blob[: len(blob) // 2])
    one_line_error(cli("predict", trunc, "--store", fmnist_store), "trunc.skops", "fit")
    flipped = tmp_path / "flipped.skops"
    raw = bytearray(blob)
    with zipfile.ZipFile(logreg_head) as z:
        arrays = [i for i in z.infolist() if i.filename.endswith(".npy")]
        big = max(arrays, key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", blob[big.header_offset + 26:big.header_offset + 30])
    raw[big.header_offset + 30 + name_len + extra_len + big.compress_size // 2] ^= 0x10
    flipped.write_bytes(bytes(raw))
    one_line_error(cli("predict", flipped, "--store", fmnist_store), "flipped.skops")
    # 5. a skops file that is not a head
    other = tmp_path / "other.skops"
    sio.dump({"hello": [1, 2, 3]}, other)
    one_line_error(cli("predict", other, "--store", fmnist_store), "not an embedpipe head")
    assert not marker.exists()


def test_quickstart_runs_the_whole_pipeline_offline(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "embedpipe.cli", "quickstart", "--per-class",
                           "3", "--test-per-class", "1"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for step in ("1/4", "2/4", "3/4", "4/4", "heads, best first", "held-out splits",
                 "predicted 10 images"):
        assert step in out, out
    cache = tmp_path / "cache"
    assert len(open_store(cache / "quickstart.h5")) == 40
    heads_written = list(cache.glob("quickstart__*.skops"))
    assert len(heads_written) == 1 and artifacts.load(heads_written[0]).manifest["training"][
        "rows"] == 30
    rows = read_csv(cache / "quickstart__predictions.csv")
    assert len(rows) == 10 and all(r["label"] and r["predicted"] for r in rows)


@pytest.mark.filterwarnings("ignore:.*within_class_std_dev_")
def test_uncalibrated_scores_rank_rather_than_saturate(fmnist_store: Path):
    store = open_store(fmnist_store)
    rows = select_rows(store)
    est = heads.build("centroid").fit(store.features[rows.train], targets(store, rows.train))
    scores, calibrated = heads.class_scores(est, store.features[rows.heldout["test"]],
                                            use_proba=False)
    assert not calibrated
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-9)
    top = scores.max(axis=1)
    assert np.median(top) < 0.99 and len(np.unique(top.round(6))) > 10


@pytest.mark.slow  # ~33 s; the auto vote's tests fit and predict soft votes in the default job
def test_soft_voting_ensemble_fits_predicts_and_scores_in_cv_next_to_its_members(
        fmnist_store: Path, tmp_path: Path):
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    out = tmp_path / "ens.skops"
    ok("fit", fmnist_store, "--head", "ridge", "--head", "logreg", "--ensemble", "soft", "-o",
       out, "-q")
    head = artifacts.load(out)  # the ensemble's types load without manual trust
    assert head.manifest["head"] == "ridge+logreg"
    store = open_store(fmnist_store)
    rows = select_rows(store)
    X = store.features[rows.heldout["test"]]
    voting = head.estimator.named_steps["clf"]
    members = [est.predict_proba(X) for est in voting.estimators_]
    np.testing.assert_allclose(head.estimator.predict_proba(X), np.mean(members, axis=0),
                               atol=1e-9)
    ok("predict", out, "--store", fmnist_store, "--split", "test", "-o", tmp_path / "p.csv")
    assert [r["predicted"] for r in read_csv(tmp_path / "p.csv")] == list(
        head.estimator.predict(X))

    report = tmp_path / "cv.json"
    ok("cv", fmnist_store, "--head", "ridge", "--head", "centroid", "--ensemble", "soft",
       "--folds", "3", "--json", report, "-q")
    rep = json.loads(report.read_text())
    scored = {h["head"]: [f["accuracy"] for f in h["folds"]] for h in rep["heads"]}
    assert set(scored) == {"ridge", "centroid", "ridge+centroid"}
    Xtr, ytr = store.features[rows.train], targets(store, rows.train)
    # members with their data rules for these rows (13-14 per class in each fold's training
    # part: the same rules as the 20 of all train rows)
    expected = cross_val_score(heads.build("ridge+centroid", seed=0,
                                           data=heads.registry.data_of(ytr, Xtr.shape[1])),
                               Xtr, ytr,
                               cv=StratifiedKFold(3, shuffle=True, random_state=0))
    assert scored["ridge+centroid"] == pytest.approx(list(expected), abs=1e-12)

    one_line_error(cli("fit", fmnist_store, "--head", "svm", "--head", "knn", "-o",
                       tmp_path / "x.skops"), "--ensemble soft")
    one_line_error(cli("fit", fmnist_store, "--head", "svm+svm", "-o", tmp_path / "x.skops"),
                   "two or more different heads")
    one_line_error(cli("cv", fmnist_store, "--head", "svm+forest"), "forest")


def test_prep_none_means_no_preprocessing_and_grids_follow_the_preprocessing(
        fmnist_store: Path, tmp_path: Path):
    """`--param prep=none` fits on the raw features (it was read as "the head's own" and the
    default Normalizer/StandardScaler stayed), and a --search grid is the one for the rows'
    preprocessing: svm on L2 rows (its default) never tries the standardised grid's
    gamma=0.0002, which makes the kernel nearly constant there."""
    for head in ("logreg", "linear-svm", "svm"):
        out = tmp_path / f"{head}.skops"
        ok("fit", fmnist_store, "--head", head, "--param", "prep=none", "-o", out, "-q")
        loaded = artifacts.load(out)
        pipe = loaded.estimator
        while not hasattr(pipe, "steps"):  # a calibrated head wraps its pipeline
            pipe = pipe.estimator
        names = [type(step).__name__ for _, step in pipe.steps]
        assert names[-1] in ("LogisticRegression", "LinearSVC", "SVC"), names
        assert "Normalizer" not in names and "StandardScaler" not in names, (head, names)
        assert loaded.manifest["params"]["prep"] == "none"
    grid = heads.param_grid("svm", prep="l2")
    assert 0.0002 not in grid["clf__gamma"] and "scale" in grid["clf__gamma"]
    assert heads.param_grid("svm")["clf__gamma"] == ["scale", 0.5, 2.0]  # L2 rows, its default
    assert heads.param_grid("svm", prep="scale")["clf__gamma"] == ["scale", 0.0002, 0.002]
    assert heads.param_grid("logreg", prep="l2+scale")["clf__C"] == [0.01, 0.1, 1.0, 10.0]
    assert heads.param_grid("logreg")["clf__C"] == [1.0, 10.0, 100.0]
    out = tmp_path / "svm-search.skops"
    ok("fit", fmnist_store, "--head", "svm", "--search", "-o", out, "-q")
    params = artifacts.load(out).manifest["params"]
    assert "prep" not in params and params["gamma"] in ("scale", 0.5, 2.0)  # its own: L2


@pytest.mark.slow  # ~31 s of searches
def test_the_lda_step_is_fitted_once_per_fold_in_a_search_and_never_saved_with_its_cache(
        fmnist_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """knn's grid used to refit the lda step (about 0.5 s at 1280-d) at every grid point.
    Inside registry.lda_cache each fold's fitted preprocessing is reused: with n_neighbors
    searched (4 values, 3 inner folds) 3 + 1 fits instead of 12 + 1. The cache is a temporary
    directory gone after the fit, and a head file never holds a Pipeline that refers to it."""
    import tempfile

    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from embedpipe.heads.fit import fit_configuration
    from embedpipe.heads.source import Labeled

    s = open_store(fmnist_store)
    rows = select_rows(s).train
    X, y = s.features[rows], targets(s, rows)
    fits = []
    real = LinearDiscriminantAnalysis.fit
    monkeypatch.setattr(LinearDiscriminantAnalysis, "fit",
                        lambda self, *a, **k: (fits.append(1), real(self, *a, **k))[1])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the cache goes
    orphan = tmp_path / "embedpipe-lda-999999999-abc"  # left by a killed process (no such pid)
    (orphan / "joblib").mkdir(parents=True)
    mine = tmp_path / f"embedpipe-lda-{os.getpid()}-x"  # this process's own: not an orphan
    mine.mkdir()
    fixed = {"metric": "euclidean", "weights": "distance"}
    est, chosen = fit_configuration(Labeled.in_memory(X, y), "knn", fixed, search=True)
    assert len(fits) == 3 + 1, len(fits)
    assert est.memory is None and chosen["n_neighbors"] in (1, 5, 10, 20)
    assert list(tmp_path.glob("embedpipe-lda-*")) == [mine]  # its own gone, the orphan too
    fits.clear()
    monkeypatch.setattr(heads.registry, "LDA_CACHE_MAX_ROWS", 0)  # the cache off: as before
    fit_configuration(Labeled.in_memory(X, y), "knn", fixed, search=True)
    assert len(fits) == 4 * 3 + 1, len(fits)
    fits.clear()  # too little free space for it: the same fit without the cache
    monkeypatch.setattr(heads.registry, "LDA_CACHE_MAX_ROWS", 5000)
    monkeypatch.setattr(heads.registry, "LDA_CACHE_MIN_FREE", 1 << 62)
    fit_configuration(Labeled.in_memory(X, y), "knn", fixed, search=True)
    assert len(fits) == 4 * 3 + 1, len(fits)
    monkeypatch.setattr(heads.registry, "LDA_CACHE_MIN_FREE", 0)

    # a pipeline fitted inside the cache (as cv's and auto's are) saves without it
    monkeypatch.setattr(heads.registry, "LDA_CACHE_MAX_ROWS", 5000)
    with heads.registry.lda_cache(len(y)):
        pipe = heads.build("centroid")
        assert pipe.memory is not None
        pipe.fit(X, y)
    out = artifacts.save(tmp_path / "c.skops", pipe, {"head": "centroid"})
    loaded = artifacts.load(out)
    assert loaded.estimator.memory is None and pipe.memory is None
    np.testing.assert_array_equal(loaded.estimator.predict(X), pipe.predict(X))


def test_an_ensembles_members_take_their_data_rules_as_alone(fmnist_store: Path,
                                                             tmp_path: Path):
    """`--head ridge+mlp` on 20 rows per class: each member is built as `--head ridge` and
    `--head mlp` would be on these rows (their small-data rules: L2 rows and alpha=1 for ridge,
    no early stopping for mlp), not with the registry defaults chosen on 10k rows; the
    manifest's parameters rebuild the same members."""
    out = tmp_path / "e.skops"
    ok("fit", fmnist_store, "--head", "ridge+mlp", "-o", out, "-q")
    head = artifacts.load(out)
    vote = head.estimator.named_steps["clf"]
    ridge = vote.named_estimators_["ridge"].estimator  # calibrated: the pipeline inside
    mlp = vote.named_estimators_["mlp"]
    assert [n for n, _ in ridge.steps] == ["sqrt", "l2", "pca", "clf"]
    assert ridge["clf"].alpha == 1.0
    assert mlp["clf"].early_stopping is False
    for name in ("ridge", "mlp"):  # alone, the same settings
        alone = tmp_path / f"{name}.skops"
        ok("fit", fmnist_store, "--head", name, "-o", alone, "-q")
        est = artifacts.load(alone).estimator
        while not hasattr(est, "steps"):
            est = est.estimator
        member = ridge if name == "ridge" else mlp
        assert [n for n, _ in est.steps] == [n for n, _ in member.steps]
        assert repr(est["clf"].get_params()) == repr(member["clf"].get_params())
    assert not any(k.startswith(("ridge__", "mlp__")) for k in head.manifest["params"]), \
        head.manifest["params"]  # nothing differs from what the ensemble builds on this data


def test_param_shorthand_reaches_an_ensembles_members_and_shows_as_fitted(fmnist_store: Path,
                                                                          tmp_path: Path):
    """`--param knn:weights=uniform` sets knn's weights inside svm+knn, a plain `C=1` every
    member that has C (svm), `pca=20` the PCA before the vote; the fit line, the manifest's
    effective_params and cv show them (they used to be refused, and pca was not shown). A
    member or a parameter that is not there is refused in one line naming what is."""
    out = tmp_path / "e.skops"
    res = ok("fit", fmnist_store, "--head", "svm+knn", "--param", "knn:weights=uniform",
             "--param", "C=1", "--param", "pca=20", "-o", out, "-q")
    line = res.output.strip().splitlines()[-1]
    assert "(pca=20; svm: prep=sqrt+l2 C=1 gamma=scale; knn: prep=sqrt+l2+lda " in line, line
    assert "weights=uniform)" in line, line
    head = artifacts.load(out)
    pipe = head.estimator
    assert pipe.named_steps["pca"].n_components == 20
    vote = pipe.named_steps["clf"]
    assert vote.named_estimators_["knn"]["clf"].weights == "uniform"
    assert vote.named_estimators_["svm"].estimator["clf"].C == 1  # calibrated: inside
    eff = head.manifest["effective_params"]
    assert eff["pca"] == 20 and eff["svm"]["C"] == 1 and eff["knn"]["weights"] == "uniform"
    assert eff["knn"]["n_neighbors"] == 10  # the rest as the member alone

    bad = tmp_path / "x.skops"
    one_line_error(cli("fit", fmnist_store, "--head", "svm+knn", "-p", "logreg:C=1", "-o",
                       bad), "logreg is not a member of svm+knn", "svm, knn")
    one_line_error(cli("fit", fmnist_store, "--head", "svm+knn", "-p", "knn:C=1", "-o", bad),
                   "knn has no parameter C", "n_neighbors")
    one_line_error(cli("fit", fmnist_store, "--head", "svm+knn", "-p", "alpha=1", "-o", bad),
                   "no member of svm+knn has a parameter alpha", "MEMBER:NAME=VALUE")
    assert not bad.exists()

    report = tmp_path / "cv.json"
    ok("cv", fmnist_store, "--head", "knn", "--head", "svm+knn", "-p", "knn:n_neighbors=3",
       "-p", "C=1", "--folds", "2", "--json", report, "-q")
    got = {h["head"]: h["effective_params"] for h in json.loads(report.read_text())["heads"]}
    assert got["knn"]["n_neighbors"] == 3 and got["svm+knn"]["knn"]["n_neighbors"] == 3
    assert got["svm+knn"]["svm"]["C"] == 1

    # the convergence note names the member's parameter the same way, and it takes effect
    res = ok("fit", fmnist_store, "--head", "logreg+knn", "-p", "logreg:max_iter=2", "-o",
             out)
    assert "try a larger --param logreg:max_iter=N" in res.output, res.output
    vote = artifacts.load(out).estimator.named_steps["clf"]
    assert vote.named_estimators_["logreg"]["clf"].max_iter == 2


def test_fit_takes_head_colon_name_for_the_head_it_fits_and_refuses_another_head(
        fmnist_store: Path, tmp_path: Path):
    """cv takes `--param HEAD:NAME=VALUE`; fit refused it on the head it fits (`logreg has no
    such parameter`). It sets NAME on that head; another head's prefix is refused in one line
    naming the head being fitted and both fixes."""
    out = tmp_path / "l.skops"
    line = ok("fit", fmnist_store, "--head", "logreg", "--param", "logreg:C=2", "-o", out,
              "-q").output.strip().splitlines()[-1]
    assert line.startswith("fitted logreg (prep=sqrt+l2 C=2 "), line
    m = artifacts.load(out).manifest
    assert m["params"]["C"] == 2 and m["effective_params"]["C"] == 2
    bad = tmp_path / "x.skops"
    one_line_error(cli("fit", fmnist_store, "--head", "logreg", "--param", "svm:C=2", "-o",
                       bad), "--param svm:C=2: svm is not the head being fitted (logreg)",
                   "pass --param C=2 to set it on logreg, or --head svm to fit svm")
    one_line_error(cli("fit", fmnist_store, "--head", "auto", "--param", "svm:C=2", "-o", bad),
                   "svm is not the head being fitted (auto", "--head svm")
    assert not bad.exists()


def test_knn_shows_p_only_where_its_metric_uses_it(fmnist_store: Path, tmp_path: Path):
    """knn's p is the Minkowski power: with the euclidean or cosine metric it does nothing, and
    `fit` used to print `p=1` next to `metric=euclidean`; the same for svm's gamma with a
    linear kernel."""
    out = tmp_path / "k.skops"
    line = ok("fit", fmnist_store, "--head", "knn", "-p", "p=1", "-o", out,
              "-q").output.strip().splitlines()[-1]
    assert "metric=euclidean" in line and " p=" not in line, line
    assert "p" not in artifacts.load(out).manifest["effective_params"]
    line = ok("fit", fmnist_store, "--head", "knn", "-p", "p=1", "-p", "metric=minkowski", "-o",
              out, "-q").output.strip().splitlines()[-1]
    assert "metric=minkowski" in line and " p=1" in line, line
    line = ok("fit", fmnist_store, "--head", "svm", "-p", "kernel=linear", "-o", out,
              "-q").output.strip().splitlines()[-1]
    assert "kernel=linear" in line and "gamma" not in line, line


@pytest.mark.parametrize("head,given,note", [
    ("knn", ["p=1"], ("p=1 does nothing with metric=euclidean; pass --param metric=minkowski "
     "to use it")),
    ("svm", ["degree=5"], ("degree=5 does nothing with kernel=rbf; pass --param kernel=poly to "
     "use it")),
    ("svm", ["kernel=linear", "gamma=0.5"], ("gamma=0.5 does nothing with kernel=linear; pass "
     "--param kernel=rbf to use it")),
    ("sgd", ["l1_ratio=0.5"], ("l1_ratio=0.5 does nothing with penalty=l2; pass --param "
     "penalty=elasticnet to use it")),
    # 20 rows per class: mlp's data rule turns early stopping off
    ("mlp", ["validation_fraction=0.3", "max_iter=20"], ("validation_fraction=0.3 does nothing "
     "with early_stopping=False; pass --param early_stopping=true to use it")),
    ("svm+knn", ["p=1", "svm:degree=3"], ("knn:p=1 does nothing with knn:metric=euclidean; pass "
     "--param knn:metric=minkowski to use it")),
])
def test_a_given_parameter_that_does_nothing_gets_one_note_naming_the_fix(
        fmnist_store: Path, tmp_path: Path, head: str, given: list[str], note: str):
    """The fit line leaves out a parameter the estimator ignores (knn's p with the euclidean
    metric); when the user gave it, `fit` says so in one note naming why and the fix (it used
    to vanish without a word), for an ensemble's members too."""
    args = [a for g in given for a in ("--param", g)]
    res = ok("fit", fmnist_store, "--head", head, *args, "-o", tmp_path / "h.skops")
    notes = _unused_notes(res.output)
    assert f"note: {note}" in notes, res.output
    if head == "svm+knn":
        assert "note: svm:degree=3 does nothing with svm:kernel=rbf; pass --param "\
               "svm:kernel=poly to use it" in notes and len(notes) == 2, notes
    else:
        assert len(notes) == 1, notes
    name = note.split("=", 1)[0].rsplit(":", 1)[-1]
    assert f" {name}=" not in res.output.strip().splitlines()[-1]  # still hidden in the line
    # the fix the note names makes it count, and then there is no note
    governs = note.rsplit("--param ", 1)[1].split(" ", 1)[0]
    res = ok("fit", fmnist_store, "--head", head, *args, "--param", governs, "-o",
             tmp_path / "h.skops")
    assert "does nothing" not in res.output.replace("svm:degree=3 does nothing", ""), res.output


def _unused_notes(output: str) -> list[str]:
    """The `note: NAME=VALUE does nothing ...` lines of a command's output."""
    return [ln for ln in output.splitlines() if ln.startswith("note:") and "does nothing" in ln]


def test_cv_and_compare_note_a_given_parameter_that_does_nothing(fmnist_store: Path,
                                                                 tmp_path: Path):
    """cv and compare say the same note as fit, the parameter named HEAD:NAME as their --param
    takes it, once for a head and an ensemble's member alike, and keep it in the report."""
    note = ("note: knn:p=1 does nothing with knn:metric=euclidean; pass --param "
            "knn:metric=minkowski to use it")
    report = tmp_path / "cv.json"
    res = ok("cv", fmnist_store, "--head", "knn", "--head", "logreg+knn", "-p", "p=1",
             "--folds", "2", "--json", report)
    assert _unused_notes(res.output) == [note], res.output
    assert note.removeprefix("note: ") in json.loads(report.read_text())["warnings"]  # and
    assert f"warning  {note.removeprefix('note: ')}" in res.output  # in the report's warnings
    other = tmp_path / "b.h5"
    shutil.copy(fmnist_store, other)
    res = ok("compare", fmnist_store, other, "--head", "svm", "-p", "degree=5", "--folds", "2")
    assert _unused_notes(res.output) == [(
        "note: svm:degree=5 does nothing with svm:kernel=rbf; pass --param svm:kernel=poly to "
        "use it")], res.output


def test_ctrl_c_stops_a_fit_even_inside_an_mlp(fmnist_store: Path, tmp_path: Path):
    """scikit-learn's MLPClassifier catches KeyboardInterrupt and returns the half-trained
    model, which `fit` then saved with exit 0 (and `cv` scored). Inside a head's fit Ctrl-C
    raises errors.Interrupted instead: in process, the fit raises; from the CLI, exit 130,
    the one "interrupted" line and no head file."""
    import signal
    import threading
    import time

    from sklearn.neural_network import MLPClassifier

    from embedpipe.errors import Interrupted
    from embedpipe.heads.fit import _Quiet

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((400, 64)), rng.integers(0, 4, 400)
    mlp = MLPClassifier(max_iter=100000, tol=0, n_iter_no_change=100000, random_state=0)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(Interrupted), _Quiet():
        mlp.fit(X, y)
    assert time.perf_counter() - t0 < 60
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored

    out = tmp_path / "mlp.skops"
    from clitools import EMBEDPIPE

    proc = subprocess.Popen([*EMBEDPIPE, "fit", fmnist_store, "--head", "mlp", "--param",
                             "max_iter=100000", "--param", "tol=0", "--param",
                             "n_iter_no_change=100000", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = ""
    while "fitting mlp" not in line:  # the fit has started (its progress lines: stderr)
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "fit ended before it started fitting"
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout, stderr)
    assert "interrupted: rerun the same command (nothing was written" in stderr, stderr
    assert "Traceback" not in stderr and not out.exists()


def test_fit_refuses_options_the_head_would_ignore(fmnist_store: Path, tmp_path: Path):
    """--jobs (the parallel fits of --search) and --chunk-rows (a streaming head's chunks) were
    accepted and ignored where they do nothing: on auto, without --search, on an in-memory
    head. Each is one line naming the option and the fix, and nothing is written."""
    out = tmp_path / "x.skops"
    cases = [(["--head", "svm", "--jobs", "2"], ["--jobs 2", "add --search"]),
             (["--head", "auto", "--jobs", "2"], ["--jobs 2", "--head auto", "leave it out"]),
             (["--head", "sgd", "--search", "--jobs", "2"], ["--jobs 2", "streaming head sgd"]),
             (["--head", "svm", "--chunk-rows", "64"], ["--chunk-rows 64", "--head svm",
                                                         "into memory"]),
             (["--chunk-rows", "64"], ["--chunk-rows 64", "--head auto"])]
    for args, words in cases:
        one_line_error(cli("fit", fmnist_store, *args, "-o", out), *words)
    one_line_error(cli("cv", fmnist_store, "--head", "svm", "--head", "knn", "--chunk-rows",
                       "64"), "--chunk-rows 64", "svm, knn load the rows into memory")
    assert not out.exists()
    ok("fit", fmnist_store, "--head", "ridge", "--search", "--jobs", "2", "-o", out, "-q")
    assert artifacts.load(out).manifest["search"]


def test_centroid_without_shrinkage_lists_no_shrink_threshold(fmnist_store: Path,
                                                              tmp_path: Path):
    """centroid's fit line and manifest said shrink_threshold=None: scikit-learn's None
    there means no shrinkage, a setting left off, which the reports leave out (like a
    parameter the head does not use); a value the user sets is shown."""
    out = tmp_path / "c.skops"
    res = ok("fit", fmnist_store, "--head", "centroid", "-o", out)
    line = next(ln for ln in res.output.splitlines() if ln.startswith("fitted centroid"))
    assert line.startswith("fitted centroid (prep=sqrt+l2+lda) on 200 rows"), line
    assert artifacts.load(out).manifest["effective_params"] == {"prep": "sqrt+l2+lda"}
    res = ok("fit", fmnist_store, "--head", "centroid", "--param", "shrink_threshold=0.1",
             "-o", out)
    assert "fitted centroid (prep=sqrt+l2+lda shrink_threshold=0.1) on" in res.output, res.output


# --param values scikit-learn takes one at a time but refuses inside fit, with the heads'
# defaults or the training rows (10 classes): each is our line (HeadError) naming the value
# and the fix, before any work, instead of scikit-learn's text after loading the store.
CONFLICTS = [
    ("logreg", ["l1_ratio=0.5"], ["--param l1_ratio=0.5", "solver saga", "solver=saga"]),
    ("logreg", ["l1_ratio=1"], ["--param l1_ratio=1", "saga or liblinear"]),
    ("logreg", ["dual=true"], ["--param dual=True", "liblinear"]),
    ("logreg", ["solver=liblinear"], ["fmnist.h5: --param solver=liblinear",
                                      "two classes only", "have 10"]),
    ("logreg", ["solver=liblinear", "C=inf"], ["--param solver=liblinear C=inf", "finite C"]),
    ("linear-svm", ["penalty=l1", "loss=hinge"], ["--param penalty=l1 loss=hinge",
                                                   "squared_hinge"]),
    ("linear-svm", ["penalty=l1", "dual=true"], ["--param penalty=l1 dual=True", "dual=false"]),
    ("linear-svm", ["loss=hinge", "dual=false"], ["--param loss=hinge dual=False", "dual=true"]),
    ("svm", ["kernel=precomputed"], ["--param kernel=precomputed", "kernel=rbf"]),
    ("knn", ["metric=pyfunc"], ["--param metric=pyfunc", "euclidean"]),
    ("knn", ["metric=precomputed"], ["--param metric=precomputed", "feature rows"]),
    ("ridge", ["solver=lbfgs"], ["--param solver=lbfgs", "positive=true"]),
    ("ridge", ["positive=true", "solver=svd"], ["--param positive=True solver=svd", "lbfgs"]),
    ("mlp", ["validation_fraction=0", "early_stopping=true"],
     ["--param validation_fraction=0 early_stopping=True", "0.1"]),
    ("sgd", ["alpha=0"], ["--param alpha=0", "learning_rate=optimal", "alpha=0.0001"]),
    ("logreg-sgd", ["learning_rate=pa1"], ["--param learning_rate=pa1", "loss=hinge",
                                           "log_loss"]),
    ("sgd", ["early_stopping=true"], ["--param early_stopping=True", "partial_fit"]),
    # found by the sweep over combined parameters (below)
    ("logreg", ["penalty=elasticnet", "solver=saga", "l1_ratio=none"],
     ["--param penalty=elasticnet l1_ratio=None", "l1_ratio=0.5"]),
    ("logreg", ["solver=saga", "C=inf", "l1_ratio=none"],
     ["--param l1_ratio=None C=inf solver=saga", "l1_ratio=0"]),
    ("sgd", ["penalty=elasticnet", "l1_ratio=none"],
     ["--param penalty=elasticnet l1_ratio=None", "l1_ratio=0.15"]),
    ("knn", ["metric=minkowski", "p=none"], ["--param p=None metric=minkowski", "p=2"]),
]


@pytest.mark.parametrize(("head", "params", "words"), CONFLICTS,
                         ids=[f"{h}-{'-'.join(p)}" for h, p, _ in CONFLICTS])
def test_a_param_scikit_learn_refuses_in_fit_is_our_one_line(fmnist_store: Path,
                                                              tmp_path: Path, head: str,
                                                              params: list[str],
                                                              words: list[str]):
    out = tmp_path / "x.skops"
    given = [a for p in params for a in ("--param", p)]
    line = one_line_error(cli("fit", fmnist_store, "--head", head, *given, "-o", out), *words)
    assert "Solver" not in line and "Unsupported set of arguments" not in line, line
    # cv refuses it the same way (HEAD:NAME picks the head among several), before any fit
    # cv refuses it the same way (HEAD:NAME picks the head among several), before any fit,
    # naming each parameter as HEAD:NAME there
    line = one_line_error(cli("cv", fmnist_store, "--head", head, "--head", "centroid",
                              *[a for p in params for a in ("--param", f"{head}:{p}")]))
    named = words[0].partition("--param ")[2].split()
    assert "--param " + " ".join(f"{head}:{n}" for n in named) in line, line
    assert all(f"{head}:" in fix for fix in re.findall(r"--param \S+", line)), line
    assert not out.exists()


def test_early_stopping_is_refused_only_where_partial_fit_runs(fmnist_store: Path,
                                                               tmp_path: Path):
    """sgd alone is fitted chunk by chunk (partial_fit refuses early stopping: refused in one
    line, CONFLICTS); as an ensemble's member it is fitted in memory inside the vote, where
    early stopping works, so the same --param is taken there."""
    out = tmp_path / "vote.skops"
    ok("fit", fmnist_store, "--head", "sgd+logreg", "--param", "sgd:early_stopping=true",
       "-o", out, "-q")
    assert artifacts.load(out).manifest["effective_params"]["sgd"]["early_stopping"] is True


def _sweep_rows(store: Path) -> tuple[np.ndarray, np.ndarray]:
    """The sweeps' rows: 30 real training rows of 3 classes of ``store``, their first 64
    feature columns (the refusals do not depend on the width, and the lda step of knn and
    centroid costs about 0.5 s a fit at 1280-d: an eigendecomposition)."""
    s = open_store(store)
    rows = select_rows(s).train
    y_all = targets(s, rows)
    keep = np.concatenate([np.flatnonzero(y_all == c)[:10] for c in np.unique(y_all)[:3]])
    return s.features[rows[keep], :64], y_all[keep]


def _allowed(constraints, *, edges: bool = False):
    """Values scikit-learn's parameter ``constraints`` allow: every option, a few numbers in
    range, both booleans; with ``edges`` also inf (in a float range) and None (if allowed)."""
    from sklearn.utils._param_validation import Interval, Options, StrOptions

    floats = (0.0, 0.5, 1.0, 2.0) + ((float("inf"),) if edges else ())
    for c in constraints:
        if isinstance(c, (StrOptions, Options)):
            yield from sorted(c.options - getattr(c, "deprecated", set()), key=repr)
        elif isinstance(c, Interval):
            yield from (v for v in ((0, 1, 2) if c.type is int else floats)
                        if c.is_satisfied_by(v))
        elif c in ("boolean", bool):
            yield from (True, False)
        elif c is None and edges:
            yield None


def _refused_or_fits(name: str, params: dict, X: np.ndarray, y: np.ndarray) -> str | None:
    """None when head ``name`` with ``params`` is refused by build or check_for_data
    (HeadError: the CLI's one line) or fits on ``X``, ``y``; else scikit-learn's error, which
    `fit` would pass on as its own text."""
    import warnings

    from embedpipe.heads import registry

    try:
        pipe = registry.build(name, params)
        registry.check_for_data(name, params, y, X.shape[1])
    except registry.HeadError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pipe.fit(X, y)
        except Exception as e:  # noqa: BLE001 - any of them reaches the user
            return f"{name} {params}: {type(e).__name__}: {e}"
    return None


def test_every_single_param_value_either_fits_or_is_refused_in_one_line(fmnist_store: Path):
    """The sweep behind CONFLICTS, kept: every head, every parameter scikit-learn's constraints
    list, each of its options (and a few numbers in its range), one at a time, on 30 real rows
    of 3 classes (_sweep_rows). build or check_for_data refuses it (HeadError: the CLI's one
    line), or it fits: no scikit-learn error is left for `fit` to pass on as its own text."""
    from embedpipe.heads import registry

    X, y = _sweep_rows(fmnist_store)
    skip = {"random_state", "verbose", "n_jobs", "warm_start", "class_weight", "max_iter",
            "batch_size", "hidden_layer_sizes"}  # no conflicts; or slow (max_iter=2 ...)
    failed = [f for name, head in registry.HEADS.items()
              for param, cons in type(head.make(0))._parameter_constraints.items()
              if param not in skip
              for v in dict.fromkeys(_allowed(cons))
              for f in [_refused_or_fits(name, {param: v}, X, y)] if f]
    assert not failed, "\n".join(failed)


# The parameters users combine, swept together (every combination of their values, as in the
# one-at-a-time sweep): a head's tuples below. Found logreg penalty=elasticnet without
# l1_ratio, logreg sag/saga with C=inf and l1_ratio=none, sgd elasticnet without l1_ratio and
# knn minkowski without p, which fitted into scikit-learn's own text (or a TypeError).
COMBINED = {
    "logreg": [("penalty", "solver", "l1_ratio"), ("solver", "C", "l1_ratio"),
               ("dual", "solver", "penalty")],
    "linear-svm": [("penalty", "loss", "dual"), ("fit_intercept", "intercept_scaling")],
    "sgd": [("loss", "penalty", "learning_rate"), ("penalty", "l1_ratio"),
            ("learning_rate", "eta0", "alpha")],
    "logreg-sgd": [("penalty", "learning_rate", "alpha")],
    "mlp": [("solver", "learning_rate", "early_stopping"),
            ("early_stopping", "validation_fraction")],
    "knn": [("metric", "p", "weights"), ("metric", "algorithm")],
    "centroid": [("metric", "shrink_threshold", "priors")],
    "ridge": [("solver", "positive", "fit_intercept")],
    "svm": [("kernel", "gamma", "degree"),
            ("probability", "decision_function_shape", "break_ties")],
}


def test_every_combination_of_params_users_combine_fits_or_is_refused_in_one_line(
        fmnist_store: Path):
    """The sweep of COMBINED: every combination of the values scikit-learn's constraints allow
    (inf and None included) for parameters that are set together (logreg's penalty, solver and
    l1_ratio, linear-svm's penalty, loss and dual, ...), on the rows of _sweep_rows: refused by
    build or check_for_data (the CLI's one line, before any work), or it fits."""
    import itertools

    from embedpipe.heads import registry

    X, y = _sweep_rows(fmnist_store)
    failed, tried = [], 0
    for name, groups in COMBINED.items():
        cons = type(registry.get(name).make(0))._parameter_constraints
        for group in groups:
            assert set(group) <= set(cons), (name, group)
            for combo in itertools.product(*(list(dict.fromkeys(_allowed(cons[p], edges=True)))
                                             for p in group)):
                tried += 1
                found = _refused_or_fits(name, dict(zip(group, combo)), X, y)
                if found:
                    failed.append(found)
    assert not failed, "\n".join(failed)
    assert tried > 1000, tried  # the sweep ran through


def test_an_ensemble_members_parameter_is_named_as_member_colon_name(fmnist_store: Path,
                                                                     tmp_path: Path):
    """`--param logreg:l1_ratio=1` on logreg+knn was refused as `--param l1_ratio=1 ... add
    --param solver=saga`: a plain solver=saga goes to every member that has a solver, and the
    line did not name what the user wrote. Every refusal of a member's parameter (conflicts,
    bad values, knn's tree search, pca, prep) now names it MEMBER:NAME, fix included; cv names
    a head's parameter HEAD:NAME, as it takes them."""
    out = tmp_path / "x.skops"
    for given, words in [
            ("logreg:l1_ratio=1", ["--param logreg:l1_ratio=1:", "--param logreg:solver=saga"]),
            ("logreg:l1_ratio=0.5", ["--param logreg:l1_ratio=0.5:", "logreg:solver=saga",
                                     "pass logreg:l1_ratio=0"]),
            ("knn:n_neighbors=-1", ["--param knn:n_neighbors=-1: knn: The 'n_neighbors'"]),
            ("knn:algorithm=kd_tree", ["--param knn:algorithm=kd_tree:",
                                       "leave knn:algorithm out"]),
            ("knn:pca=-3", ["--param knn:pca=-3:"]),
            ("knn:prep=foo", ["--param knn:prep=foo:", "knn:prep= one of sqrt+l2, sqrt+scale"]),
            ("knn:metric=precomputed", ["--param knn:metric=precomputed:",
                                        "pass knn:metric=euclidean"])]:
        line = one_line_error(cli("fit", fmnist_store, "--head", "logreg+knn", "--param", given,
                                  "-o", out), *words)
        assert not re.search(r"--param (?!logreg:|knn:)", line), line
    one_line_error(cli("cv", fmnist_store, "--head", "logreg", "--head", "knn", "--param",
                       "logreg:l1_ratio=1"),
                   "--param logreg:l1_ratio=1:", "add --param logreg:solver=saga")
    one_line_error(cli("cv", fmnist_store, "--head", "logreg", "--head", "knn", "--param",
                       "n_neighbors=-1"), "--param knn:n_neighbors=-1:")
    # fit of one head: the plain names it was given
    one_line_error(cli("fit", fmnist_store, "--head", "logreg", "--param", "l1_ratio=1", "-o",
                       out), "--param l1_ratio=1:", "add --param solver=saga")
    assert not out.exists()
    # the notes too: what few-shot adaptation lowered, and what a member ignores
    res = ok("fit", fmnist_store, "--head", "logreg+knn", "--param", "knn:n_neighbors=500",
             "--param", "knn:p=1", "-o", out)
    assert ("note: logreg+knn member knn: knn:n_neighbors lowered from 500 to 200 (only 200 "
            "training rows)") in res.output, res.output
    assert "knn:p=1 does nothing with knn:metric=euclidean" in res.output, res.output


def test_a_plain_prep_goes_to_every_member_of_an_ensemble(fmnist_store: Path, tmp_path: Path):
    """`cv --head svm+knn --param prep=l2` said "none of the heads svm+knn has a parameter
    prep", and fit refused it too ("an ensemble's members keep their own preprocessing"):
    prep is a parameter of every member's pipeline, so a plain prep=... now goes to every
    member, like any plain NAME=VALUE; MEMBER:prep=... wins for that member."""
    out = tmp_path / "vote.skops"
    ok("fit", fmnist_store, "--head", "svm+knn", "--param", "prep=scale", "-o", out, "-q")
    eff = artifacts.load(out).manifest["effective_params"]
    assert eff["svm"]["prep"] == "scale" and eff["knn"]["prep"] == "scale", eff
    ok("fit", fmnist_store, "--head", "svm+knn", "--param", "prep=scale", "--param",
       "knn:prep=l2", "-o", out, "-q")
    eff = artifacts.load(out).manifest["effective_params"]
    assert eff["svm"]["prep"] == "scale" and eff["knn"]["prep"] == "l2", eff
    res = ok("cv", fmnist_store, "--head", "svm+knn", "--head", "logreg", "--param", "prep=l2",
             "--folds", "2", "-q")
    (vote,) = [ln for ln in res.stdout.splitlines() if ln.startswith("  svm+knn ")]
    assert "svm: prep=l2 " in vote and "knn: prep=l2 " in vote, vote
    (single,) = [ln for ln in res.stdout.splitlines() if ln.startswith("  logreg ")]
    assert "prep=l2 " in single, single
    copy = tmp_path / "copy.h5"
    shutil.copy(fmnist_store, copy)
    res = ok("compare", fmnist_store, copy, "--head", "svm+knn", "--param", "prep=l2",
             "--folds", "2", "-q")
    (vote,) = [ln for ln in res.stdout.splitlines()
               if ln.startswith("  svm+knn ") and "prep=" in ln]
    assert "knn: prep=l2 " in vote, res.stdout
    one_line_error(cli("fit", fmnist_store, "--head", "svm+knn", "--param", "prep=foo", "-o",
                       out), "prep=foo", "one of sqrt+l2, sqrt+scale")


def test_classes_of_identical_rows_are_refused_in_one_line_for_what_they_are(
        fmnist_store: Path, tmp_path: Path):
    """Every row of a class the same (real Lite0 rows, each repeated): the lda step of knn and
    centroid meets a singular within-class covariance. That was 'unexpected LinAlgError ... a
    bug in embedpipe' (exit 1), or, with any --param, a line blaming that --param; now one
    line naming the data and the fix, which then fits."""
    from embedpipe.store import open_store

    st = open_store(fmnist_store)
    labels = np.asarray(st.label_names())
    first = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)[:4]]
    rows = np.repeat(first, 5)
    f = tmp_path / "same.npz"
    np.savez(f, features=np.asarray(st.features)[rows],
             path=np.array([f"img/{i:03d}.png" for i in range(len(rows))]),
             label=labels[rows])
    store = tmp_path / "same.h5"
    ok("import-features", f, "-o", store, "-q")
    for head, extra in (("knn", ()), ("centroid", ()), ("knn", ("--param", "n_neighbors=3"))):
        res = cli("fit", store, "--head", head, *extra, "-o", tmp_path / "h.skops", "-q")
        one_line(res.output, res.exit_code, "same.h5", f"{head} cannot be fitted on these rows",
                 "singular matrix", "--param prep=l2")
        assert not (tmp_path / "h.skops").exists()
    ok("fit", store, "--head", "knn", "--param", "prep=l2", "-o", tmp_path / "h.skops", "-q")


def test_prep_keeps_its_text_for_a_member_and_from_the_api():
    """``MEMBER:prep=none`` is no preprocessing for that member (parse_value made it None, the
    member's own preprocessing, silently), and the API's quoted ``prep='sqrt'``
    (api._param_items writes repr) is the choice sqrt, not the unknown "'sqrt'" (found by
    helper-31's attack)."""
    from embedpipe.api import _param_items

    got = heads.parse_params(["knn:prep=none", "svm:prep=SQRT+L2", "prep=None"])
    assert got == {"knn:prep": "none", "svm:prep": "sqrt+l2", "prep": "none"}
    assert heads.parse_params(_param_items({"prep": "sqrt", "logreg:prep": "l2"})) == {
        "prep": "sqrt", "logreg:prep": "l2"}
    assert heads.parse_params(["knn:prep='l2'", "C=10"]) == {"knn:prep": "l2", "C": 10}
    _, per = heads.member_params(heads.get("svm+knn"), got)
    assert heads.prep_steps(heads.get("knn"), per["knn"]["prep"]) == ()
