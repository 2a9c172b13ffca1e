"""Compact heads (compact.py): `predict --store` without scikit-learn gives what scikit-learn
gives, and a head without a usable compact form still predicts through scikit-learn."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from clitools import ok, read_csv

from embedpipe import heads
from embedpipe.heads import artifacts, compact
from embedpipe.store import open_store

COMPACT = ["logreg", "mlp", "ridge", "linear-svm", "logreg-sgd", "sgd", "svm", "knn",
           "centroid", "svm+knn", "logreg+mlp+centroid+ridge", "auto"]
# manhattan distance; cosine on the float32 rows as they are (knn's rule below 5 rows per
# class), whose distances scikit-learn rounds in float32: scikit-learn's own path
NOT_COMPACT = ["knn-minkowski-p1", "knn-cosine"]
SVM_KERNELS = ["poly", "sigmoid", "linear"]  # rbf is svm's default


@pytest.fixture(scope="module")
def fitted(fmnist_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Head files fitted by `embedpipe fit` on the real Lite0 store, by head name."""
    d = tmp_path_factory.mktemp("compact")
    out = {name: d / f"{name}.skops" for name in COMPACT + NOT_COMPACT + ["logreg-pca"]}
    for name in COMPACT:
        ok("fit", fmnist_store, "--head", name, "-o", out[name], "-q")
    ok("fit", fmnist_store, "--head", "knn", "--param", "metric=minkowski", "--param", "p=1",
       "-o", out["knn-minkowski-p1"], "-q")
    # knn's rule for fewer than 5 rows per class: cosine distance on the rows as they are
    out["knn-cosine"] = d / "knn-cosine.skops"
    ok("fit", fmnist_store, "--head", "knn", "--param", "prep=none", "--param", "metric=cosine",
       "--param", "n_neighbors=5", "--param", "weights=uniform", "-o", out["knn-cosine"], "-q")
    for kernel in SVM_KERNELS:
        out[f"svm-{kernel}"] = d / f"svm-{kernel}.skops"
        ok("fit", fmnist_store, "--head", "svm", "--param", f"kernel={kernel}", "-o",
           out[f"svm-{kernel}"], "-q")
    ok("fit", fmnist_store, "--head", "logreg", "--param", "pca=16", "-o", out["logreg-pca"],
       "-q")
    return out


def _has_compact(path: Path) -> bool:
    return compact.SPEC_MEMBER in zipfile.ZipFile(path).namelist()


def _predict(head: Path, store: Path, out: Path) -> list[dict[str, str]]:
    ok("predict", head, "--store", store, "-o", out, "--top-k", "10", "-q")
    return read_csv(out)


@pytest.mark.parametrize("name", COMPACT + ["logreg-pca"]
                         + [f"svm-{k}" for k in SVM_KERNELS])
def test_compact_head_predicts_like_scikit_learn(name: str, fitted: dict[str, Path],
                                                 fmnist_store: Path, tmp_path: Path):
    head = fitted[name]
    assert _has_compact(head)
    assert isinstance(artifacts.load(head, compact=True).estimator, compact.CompactHead)
    fast = _predict(head, fmnist_store, tmp_path / "fast.csv")
    slow = _predict(compact.strip(head, tmp_path / "plain.skops"), fmnist_store,
                    tmp_path / "slow.csv")
    assert len(fast) == len(slow) == 250
    for f, s in zip(fast, slow):
        assert [f[k] for k in ("path", "label", "predicted", "top1")] == \
               [s[k] for k in ("path", "label", "predicted", "top1")]
        for k in ["confidence"] + [f"top{i}_prob" for i in range(1, 11)]:
            assert float(f[k]) == pytest.approx(float(s[k]), abs=2e-6), (k, f, s)


@pytest.mark.parametrize("name", NOT_COMPACT)
def test_other_heads_have_no_compact_form_and_predict_through_scikit_learn(
        name: str, fitted: dict[str, Path], fmnist_store: Path, tmp_path: Path):
    head = fitted[name]
    assert not _has_compact(head)
    rows = _predict(head, fmnist_store, tmp_path / "p.csv")
    est = artifacts.load(head).estimator
    assert [r["predicted"] for r in rows] == \
           list(est.predict(open_store(fmnist_store).features))


@pytest.mark.parametrize("name", ["logreg", "svm", "auto"])
def test_predict_store_with_a_compact_head_imports_neither_sklearn_nor_torch(
        name: str, fitted: dict[str, Path], fmnist_store: Path, tmp_path: Path):
    code = ("import sys\nfrom embedpipe.cli import app\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'sklearn', 'scipy', 'skops', 'torch', 'pandas', 'timm'})\n"
            "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\nsys.exit(code)\n")
    out = tmp_path / "p.csv"
    proc = subprocess.run([sys.executable, "-c", code, "predict", str(fitted[name]),
                           "--store", str(fmnist_store), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stderr, proc.stderr
    assert len(read_csv(out)) == 250


def test_a_compact_form_this_version_cannot_read_falls_back_to_scikit_learn(
        fitted: dict[str, Path], fmnist_store: Path, tmp_path: Path):
    """A compact operation this version does not know (as a newer embedpipe might write, the
    file's digest matching): the head predicts through scikit-learn, with the same results;
    the same edit without the matching digest is damage, refused (tests/test_artifacts.py)."""
    import hashlib

    head = fitted["logreg"]
    want = _predict(head, fmnist_store, tmp_path / "want.csv")
    with zipfile.ZipFile(head) as src:
        parts = {n: src.read(n) for n in src.namelist()}
    spec = json.loads(parts[compact.SPEC_MEMBER])
    spec["ops"].append({"op": "exec", "code": "print('pwned')"})
    parts[compact.SPEC_MEMBER] = json.dumps(spec).encode()
    for reseal in (False, True):
        if reseal:
            h = hashlib.sha256()
            for name in sorted(parts):
                if name != compact.HEAD_MEMBER:
                    h.update(name.encode() + b"\0" + parts[name] + b"\0")
            sealed = json.loads(parts[compact.HEAD_MEMBER])
            parts[compact.HEAD_MEMBER] = json.dumps({**sealed, "sha256": h.hexdigest()}).encode()
        bad = tmp_path / f"bad{int(reseal)}.skops"
        with zipfile.ZipFile(bad, "w") as dst:
            for name, data in parts.items():
                dst.writestr(name, data)
        if not reseal:
            with pytest.raises(artifacts.ArtifactError, match="damaged"):
                artifacts.load_compact(bad)
            continue
        assert artifacts.load_compact(bad) is None
        assert not isinstance(artifacts.load(bad, compact=True).estimator, compact.CompactHead)
        assert _predict(bad, fmnist_store, tmp_path / "got.csv") == want


@pytest.mark.parametrize("name", ["logreg-pca", "svm", "logreg+mlp+centroid+ridge"])
def test_a_compact_form_holds_only_the_arrays_it_reads(name: str, fitted: dict[str, Path]):
    with zipfile.ZipFile(fitted[name]) as z:
        spec = json.loads(z.read(compact.SPEC_MEMBER))
        own = {n for n in z.namelist() if n.startswith(compact.ARRAY_PREFIX)}
    read = {compact.array_member(spec, n) for n in compact.array_names(spec)}
    assert own == {m for m in read if m.startswith(compact.ARRAY_PREFIX)}
    assert own, name


def test_an_svm_head_stores_its_support_vectors_once(fitted: dict[str, Path], tmp_path: Path):
    """The compact form of an SVC reads the support vectors the skops pipeline already holds
    (the same .npy bytes) instead of a second copy: the head file grows by its small arrays
    only (at 60k rows the support vectors alone are 184 MB)."""
    head = fitted["svm"]
    spec = json.loads(zipfile.ZipFile(head).read(compact.SPEC_MEMBER))
    sv = artifacts.load(head).estimator.calibrated_classifiers_[0].estimator[-1] \
        .support_vectors_
    assert sv.nbytes >= 1 << 16
    shared = spec["members"]
    assert len(shared) == 1 and not next(iter(shared.values())).startswith(compact.MEMBER_DIR)
    plain = compact.strip(head, tmp_path / "plain.skops")
    assert head.stat().st_size - plain.stat().st_size < sv.nbytes / 4


@pytest.mark.parametrize("name", ["logreg", "mlp", "ridge", "logreg-sgd", "sgd", "svm", "knn",
                                  "centroid"])
def test_binary_heads_export_and_agree(name: str, fmnist_store: Path):
    """Two classes: scikit-learn's one-column decision functions and probabilities."""
    from embedpipe.heads.source import Labeled
    from embedpipe.heads.train import _calibrated, _calibration_split

    store = open_store(fmnist_store)
    labels = np.asarray(store.label_names())
    keep = np.isin(labels, ["shirt", "t-shirt_top"])
    X, y = store.features[keep], labels[keep]
    est = heads.build(name, seed=0).fit(X, y)
    if not heads.get(name).native_proba:
        fit_on, held, k = _calibration_split(Labeled.in_memory(X, y), heads.get(name), 0)
        est, *_ = _calibrated(None, heads.build(name, seed=0), fit_on, held, k)
    exported = compact.export(est)
    assert exported is not None
    assert compact.agrees(est, compact.load(*exported), X)


@pytest.mark.parametrize("name", ["svm", "svm+knn"])
def test_agrees_tells_a_form_that_predicts_otherwise(name: str, fitted: dict[str, Path],
                                                     fmnist_store: Path):
    """A calibrated head and a soft vote (predict = argmax of predict_proba, which agrees
    scores once) are checked on their classes and their probabilities alike: a form whose
    probabilities move by 1e-3 on one row, or whose class differs on one of the
    ``classes_only`` rows, disagrees; the form itself agrees."""
    X = open_store(fmnist_store).features
    est = artifacts.load(fitted[name]).estimator
    assert compact._argmax_of_proba(est)
    form = compact.load(*compact.export(est))
    mids, rows = X[:100], X[100:]
    assert compact.agrees(est, form, mids, classes_only=rows)

    class Moved:
        def __init__(self, where: str):
            self.where = where

        def predict(self, Z):
            out = form.predict(Z).copy()
            if self.where == "class" and len(Z) > len(mids):
                out[len(mids) + 3] = next(c for c in est.classes_ if c != out[len(mids) + 3])
            return out

        def predict_proba(self, Z):
            p = form.predict_proba(Z).copy()
            if self.where == "proba":
                p[7] += 1e-3
            return p

    assert not compact.agrees(est, Moved("proba"), mids, classes_only=rows)
    assert not compact.agrees(est, Moved("class"), mids, classes_only=rows)
    assert compact.agrees(est, Moved("neither"), mids, classes_only=rows)


def test_saving_checks_training_rows_classes_only_for_a_knn(fitted: dict[str, Path],
                                                            fmnist_store: Path, tmp_path: Path,
                                                            monkeypatch):
    """artifacts.save checks the compact form on midpoints of the check rows, and the check
    rows' own classes too where the head holds a kNN (ill-conditioned on its training rows);
    an svm's training rows are scored as any row, not twice."""
    X = open_store(fmnist_store).features[:64]
    seen = {}
    real = compact.agrees

    def spy(est, form, mids, classes_only=None):
        seen["mids"], seen["classes_only"] = len(mids), classes_only
        return real(est, form, mids, classes_only=classes_only)

    monkeypatch.setattr(compact, "agrees", spy)
    for name, knn in (("svm", False), ("svm+knn", True), ("knn", True), ("logreg", False)):
        est = artifacts.load(fitted[name]).estimator
        assert compact.scores_training_rows_apart(est) is knn
        out = artifacts.save(tmp_path / f"{name}.skops", est, {"head": name}, check_rows=X)
        assert seen["mids"] == 63
        assert (seen["classes_only"] is not None) is knn, name
        if knn:
            assert len(seen["classes_only"]) == 64
        assert compact.SPEC_MEMBER in zipfile.ZipFile(out).namelist()


def test_svm_heads_score_many_rows_through_their_compact_form(fitted: dict[str, Path],
                                                              fmnist_store: Path, monkeypatch):
    """cv, auto's selection, fit's training accuracy, the API and the reject calibration score
    rows with compact.predict_scored / class_scores: for a head holding an SVC (libsvm sums
    each kernel value alone) they go through its compact form from FAST_ENTRIES kernel values
    (rows x support vectors), with the same classes and scores, and through scikit-learn when
    the form would not agree."""
    X = open_store(fmnist_store).features  # 250 rows
    default = compact.FAST_ENTRIES
    for name in ("svm", "svm+knn", "svm-poly"):
        monkeypatch.setattr(compact, "FAST_ENTRIES", default)
        est = artifacts.load(fitted[name]).estimator
        n_sv = compact._support_vectors(est)
        assert 0 < n_sv <= 200 and len(X) * n_sv < compact.FAST_ENTRIES
        assert compact.fast_form(est, X) is est  # a small head: as it is
        monkeypatch.setattr(compact, "FAST_ENTRIES", len(X) * n_sv)
        assert isinstance(compact.fast_form(est, X), compact.CompactHead), name
        assert compact.fast_form(est, X[:-1]) is est
        fast = compact.predict_scored(est, X)
        monkeypatch.setattr(compact, "FAST_ENTRIES", 10**12)  # scikit-learn's own scoring
        slow = compact.predict_scored(est, X)
        assert np.array_equal(fast[0], slow[0]) and fast[3] == slow[3]
        np.testing.assert_allclose(fast[1], slow[1], rtol=1e-5, atol=1e-6)
        monkeypatch.setattr(compact, "FAST_ENTRIES", 1)
        with monkeypatch.context() as m:  # a form that would not agree is not used
            m.setattr(compact, "agrees", lambda *a: False)
            assert compact.fast_form(est, X) is est
    for name in ("logreg", "knn"):  # no SVC inside
        est = artifacts.load(fitted[name]).estimator
        assert compact._support_vectors(est) == 0 and compact.fast_form(est, X) is est


def test_cv_of_an_svm_is_the_same_through_the_compact_form(fmnist_store: Path, monkeypatch):
    """`embedpipe cv --head svm` prints the same per-fold numbers whether its folds are scored
    through the compact form (FAST_ENTRIES lowered to 1) or by scikit-learn."""
    monkeypatch.setattr(compact, "FAST_ENTRIES", 1)
    fast = ok("cv", fmnist_store, "--head", "svm", "--folds", "3").output
    monkeypatch.setattr(compact, "FAST_ENTRIES", 10**12)
    slow = ok("cv", fmnist_store, "--head", "svm", "--folds", "3").output
    import re

    def untimed(out: str) -> list[str]:  # the table's fit seconds differ from run to run
        return [re.sub(r" +\d+\.\d+  (?=prep=)", " ", line) for line in out.splitlines()]

    assert untimed(fast) == untimed(slow)
    assert "most confidently misclassified" in fast and "test: 50 rows, accuracy" in fast


def test_svc_predict_follows_libsvm_on_exact_ties_and_break_ties():
    """libsvm gives a pair whose decision value is exactly 0 to its second class (the compact
    form gave it to the first), scikit-learn's binary predict is classes_[1] at 0, and
    ``break_ties=True`` predicts the argmax of the one-vs-rest decision function: the compact
    form predicts as scikit-learn in each case (found by helper-30's attack)."""
    from sklearn.svm import SVC

    eye = np.eye(3)
    far = np.array([[10.0, 10.0, 10.0], [0.9, 0.1, 0.0], [1.0, 0.0, 0.0]])  # row 0: all 0
    for break_ties in (False, True):
        m = SVC(gamma=100, break_ties=break_ties).fit(eye, ["a", "b", "c"])
        assert (m.decision_function(far[:1]) == [[2.0, 1.0, 0.0]]).all()  # a 3-way tie
        form = compact.load(*compact.export(m))
        assert list(form.predict(far)) == list(m.predict(far))
        assert m.predict(far[:1])[0] == ("a" if break_ties else "c")  # each case differs
    m = SVC(kernel="linear").fit(np.array([[-1.0, 0.0], [1.0, 0.0]]), ["a", "b"])
    origin = np.zeros((1, 2))
    assert m.decision_function(origin)[0] == 0 and m.predict(origin)[0] == "b"
    assert compact.load(*compact.export(m)).predict(origin)[0] == "b"


def test_cv_with_break_ties_is_the_same_through_the_compact_form(fmnist_store: Path,
                                                                 monkeypatch):
    """`cv --head svm --param break_ties=true` scored through the compact form predicted as
    plain svm (the setting was dropped): the same output either way."""
    import re

    def run(entries: int) -> list[str]:
        monkeypatch.setattr(compact, "FAST_ENTRIES", entries)
        out = ok("cv", fmnist_store, "--head", "svm", "--param", "break_ties=true",
                 "--folds", "3").output
        return [re.sub(r" +\d+\.\d+  (?=prep=)", " ", line) for line in out.splitlines()]

    assert run(1) == run(10**12)


def test_a_knn_with_identical_rows_under_different_classes_has_no_compact_form():
    """Which of several rows at one distance fill a query's last neighbour places is up to
    scikit-learn's partial sort (blank images in several class folders: probabilities 0.1
    apart between the two paths, found by helper-30's attack): such a knn predicts through
    scikit-learn; the same rows under one class keep the compact form."""
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 4))
    y = np.repeat(["a", "b", "c"], 20)
    X[[0, 25, 45]] = X[0]  # one point in every class
    for metric in ("euclidean", "cosine"):
        knn = KNeighborsClassifier(n_neighbors=5, metric=metric, algorithm="brute")
        assert compact.export(knn.fit(X, y)) is None
    X[[25, 45]] = rng.standard_normal((2, 4))
    X[[0, 1]] = X[0]  # the same point twice in one class
    assert compact.export(KNeighborsClassifier(n_neighbors=5, algorithm="brute").fit(X, y))
    X2 = X.copy()
    X2[30] = 2.0 * X2[0]  # the same direction in another class: cosine only
    assert compact.export(KNeighborsClassifier(n_neighbors=5, algorithm="brute").fit(X2, y))
    assert compact.export(KNeighborsClassifier(n_neighbors=5, algorithm="brute",
                                               metric="cosine").fit(X2, y)) is None
