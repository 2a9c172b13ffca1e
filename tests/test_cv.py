"""`embedpipe cv`: stratified (nested) cross-validation of heads on real embeddings."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from clitools import cli
from PIL import Image
from sklearn.metrics import accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_score

from embedpipe import heads
from embedpipe.heads.fit import fit_configuration
from embedpipe.heads.source import Labeled
from embedpipe.heads.rows import select_rows, targets
from embedpipe.store import StoreWriter, open_store, read_identity


def cv_ok(*args: object) -> tuple[str, dict]:
    """Run `embedpipe cv ... --json` and return (text output, report)."""
    args_ = [str(a) for a in args]
    out = Path(args_[args_.index("--json") + 1])
    res = cli("cv", *args_)
    assert res.exit_code == 0, res.output
    return res.stdout, json.loads(out.read_text())


def one_line_error(res, *words: str) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def train_xy(store_path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    s = open_store(store_path)
    rows = select_rows(s)
    return s.features[rows.train], targets(s, rows.train), [s.paths[i] for i in rows.train]


def fold_scores(report: dict, head: str, metric: str = "accuracy") -> list[float]:
    (entry,) = [e for e in report["heads"] if e["head"] == head]
    return [f[metric] for f in entry["folds"]]


def copy_store(src: Path, dst: Path, train_per_class: dict[str, int] | None = None,
               unlabel: bool = False) -> Path:
    """A new store with the rows of ``src``; ``train_per_class`` keeps only that many train
    rows of the named classes; ``unlabel`` stores every row as unlabeled."""
    s = open_store(src)
    keep, seen = [], {}
    for i, (label, split) in enumerate(zip(s.labels, s.splits)):
        name = s.classes[label]
        if split == "train" and name in (train_per_class or {}):
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > train_per_class[name]:
                continue
        keep.append(i)
    with StoreWriter.open(dst, read_identity(src), versions={}) as w:
        ids = w.class_ids(s.classes)
        w.append(s.features[keep], paths=[s.paths[i] for i in keep],
                 labels=[-1 if unlabel else ids[s.classes[s.labels[i]]] for i in keep],
                 hashes=[s.hashes[i] for i in keep], splits=[s.splits[i] for i in keep],
                 mtime_ns=[0] * len(keep), size=[0] * len(keep))
    return dst


@pytest.fixture(scope="module")
def logreg_cv(fmnist_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """`cv --head logreg` with the defaults (5 folds, seed 0) on the real store, run once
    (in 2 worker processes: its fold scores must not depend on that)."""
    out = tmp_path_factory.mktemp("cv") / "logreg.json"
    return cv_ok(fmnist_store, "--head", "logreg", "--jobs", "2", "--json", out, "--quiet")


def test_logreg_on_embeddings_beats_chance_and_raw_pixels(fmnist_store: Path, logreg_cv):
    text, report = logreg_cv
    acc = report["heads"][0]["accuracy"]["mean"]
    assert report["chance"]["majority_accuracy"] == pytest.approx(0.1)
    assert acc > 0.6  # 10 balanced classes: chance is 0.1
    assert re.search(rf"^ +logreg +{acc:.3f} ± ", text, re.M), text

    # the same head on the raw pixels of the same images, with the same folds
    _, y, paths = train_xy(fmnist_store)
    source = Path(open_store(fmnist_store, features=False).runs[0]["source"])
    pixels = np.stack([np.asarray(Image.open(source / p).convert("L"), dtype=np.float32).ravel()
                       for p in paths])
    assert pixels.shape == (200, 28 * 28)
    raw = cross_val_score(heads.build("logreg", seed=0), pixels, y, n_jobs=2,
                          cv=StratifiedKFold(5, shuffle=True, random_state=0))
    assert acc > raw.mean() + 0.02, (acc, raw.mean())


def test_fold_scores_equal_cross_val_score(fmnist_store: Path, logreg_cv):
    _, report = logreg_cv
    assert report["splitter"] == "StratifiedKFold(n_splits=5, shuffle=True, random_state=0)"
    X, y, _ = train_xy(fmnist_store)
    # the pipeline cv fits: logreg with its defaults (power- and L2-normalised rows, C=10; no
    # data rule)
    assert heads.with_data_defaults("logreg", None, y, X.shape[1]) == {}
    pipe = heads.build("logreg", seed=0)
    assert [type(s).__name__ for _, s in pipe.steps[:2]] == ["SignedSqrt", "Normalizer"]
    assert pipe[-1].C == 10.0
    expected = cross_val_score(pipe, X, y,
                               cv=StratifiedKFold(5, shuffle=True, random_state=0))
    assert fold_scores(report, "logreg") == expected.tolist()
    entry = report["heads"][0]
    assert entry["accuracy"]["mean"] == pytest.approx(expected.mean())
    assert entry["accuracy"]["std"] == pytest.approx(expected.std())
    assert all(f["fit_seconds"] > 0 for f in entry["folds"])


def test_heldout_split_and_misclassified_files(fmnist_store: Path, logreg_cv):
    text, report = logreg_cv
    store = open_store(fmnist_store, features=False)
    held = report["heldout"]
    assert held["head"] == "logreg"
    test = held["splits"]["test"]
    assert test["rows"] == 50 and 0.5 < test["accuracy"] <= 1
    cm = np.array(test["confusion_matrix"]["matrix"])
    assert cm.sum() == 50 and np.trace(cm) == round(test["accuracy"] * 50)
    assert test["confusion_matrix"]["labels"] == store.classes
    assert "test: 50 rows, accuracy" in text

    best = report["best"]
    oof = np.array(best["confusion_matrix"]["matrix"])
    assert oof.sum() == 200 and oof.sum(axis=1).tolist() == [20] * 10
    assert [r["support"] for r in best["per_class"]] == [20] * 10
    errors = best["top_errors"]
    assert len(errors) == 10 and np.trace(oof) <= 190
    label_of = dict(zip(store.paths, store.label_names()))
    for e in errors:
        assert e["path"].startswith("train/") and e["path"] in label_of
        assert label_of[e["path"]] == e["true"] != e["predicted"]
        assert e["path"] in text
    conf = [e["confidence"] for e in errors]
    assert conf == sorted(conf, reverse=True) and 0 < conf[-1] <= 1
    assert "predict_proba" in best["confidence"]  # logreg has real probabilities


def test_search_is_nested_and_reports_chosen_params(fmnist_store: Path, tmp_path: Path):
    text, report = cv_ok(fmnist_store, "--head", "ridge", "--search", "--folds", "3",
                         "--json", tmp_path / "r.json", "-q")
    folds = report["heads"][0]["folds"]
    assert report["search"] and len(folds) == 3
    grid = heads.HEADS["ridge"].grid["alpha"]
    assert all(f["params"]["alpha"] in grid for f in folds)
    assert re.search(r"chosen per fold: .*alpha=", text), text  # (with prep=l2: small data)

    # fold 1 by hand: the search sees only the outer training part
    X, y, _ = train_xy(fmnist_store)
    train, test = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))[1]
    est, chosen = fit_configuration(Labeled.in_memory(X[train], y[train]), "ridge", {},
                                    search=True, seed=0)
    assert folds[1]["params"] == chosen
    assert folds[1]["accuracy"] == accuracy_score(y[test], est.predict(X[test]))
    # ridge has no predict_proba: the confidence of its errors is said to be uncalibrated
    assert "uncalibrated" in report["best"]["confidence"]
    assert report["heldout"]["searched"] and "alpha" in report["heldout"]["params"]


def test_small_class_reduces_folds_and_single_image_class_fails(fmnist_store: Path,
                                                                  tmp_path: Path):
    few = copy_store(fmnist_store, tmp_path / "few.h5", {"bag": 3})
    res = cli("cv", few, "--head", "centroid", "--json", tmp_path / "few.json", "-q")
    assert res.exit_code == 0, res.output
    assert "warning: class 'bag' has only 3 training images: using 3 folds instead of 5" \
        in res.stderr
    report = json.loads((tmp_path / "few.json").read_text())
    assert report["folds"] == 3 and report["folds_requested"] == 5
    assert len(report["heads"][0]["folds"]) == 3

    one = copy_store(fmnist_store, tmp_path / "one.h5", {"bag": 1})
    one_line_error(cli("cv", one, "--head", "centroid", "-q"), str(one), "'bag'",
                   "single training image", "add images")


def _rounded(v):
    if isinstance(v, float):
        return round(v, 5)
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return v


def test_jobs_repeats_plots_and_json(fmnist_store: Path, tmp_path: Path):
    args = [fmnist_store, "--head", "ridge", "--head", "centroid", "--folds", "3",
            "--repeats", "2", "-q"]
    _, one = cv_ok(*args, "--jobs", "1", "--json", tmp_path / "1.json")
    res = cli("cv", *args, "--jobs", "2", "--json", tmp_path / "2.json",
              "--plots", tmp_path / "plots")
    assert res.exit_code == 0, res.output
    two = json.loads((tmp_path / "2.json").read_text())

    assert one["splitter"].startswith("RepeatedStratifiedKFold(n_splits=3, n_repeats=2")
    for head in ("ridge", "centroid"):
        for m in ("accuracy", "balanced_accuracy", "f1_macro"):
            assert fold_scores(one, head, m) == fold_scores(two, head, m)
        assert len(fold_scores(one, head)) == 6
    # equal up to float32 rounding: worker processes run BLAS with other thread counts, which
    # changes the order of sums in ridge's solve on L2-normalised rows (its small-data default)
    assert _rounded(one["best"]) == _rounded(two["best"])
    assert _rounded(one["heldout"]) == _rounded(two["heldout"])
    # the out-of-fold report covers the first repeat: each train row once
    assert np.array(one["best"]["confusion_matrix"]["matrix"]).sum() == 200
    assert json.loads(json.dumps(two)) == two

    for name in ("confusion_matrix.png", "scores.png"):
        with Image.open(tmp_path / "plots" / name) as im:
            im.load()
            assert im.format == "PNG" and im.width > 300 and im.height > 300


def test_plots_without_matplotlib_fail_before_any_work(fmnist_store: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    res = cli("cv", fmnist_store, "--head", "logreg", "--plots", tmp_path / "p")
    one_line_error(res, "pip install 'embedpipe[plots]'")
    assert "fits on" not in res.output and not (tmp_path / "p").exists()


def test_convergence_warnings_are_counted_not_printed(fmnist_store: Path, tmp_path: Path):
    res = cli("cv", fmnist_store, "--head", "logreg", "--param", "max_iter=5", "--folds", "2",
              "--json", tmp_path / "r.json", "-q")
    assert res.exit_code == 0, res.output
    assert "Warning:" not in res.stderr and "warnings.warn" not in res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["heads"][0]["convergence_warnings"] == 2
    assert report["heads"][0]["folds_with_convergence_warnings"] == 2
    assert "2 ConvergenceWarning(s) in 2 of 2 folds" in res.stdout
    assert "logreg:max_iter=N" in res.stdout


@pytest.mark.parametrize("args, words", [
    (["--metric", "auc"], ["--metric auc", "f1_macro"]),
    (["--folds", "1"], ["--folds 1", "at least 2"]),
    (["--head", "nope"], ["--head nope", "logreg"]),
    (["--param", "n_estimators=3"], ["n_estimators", "embedpipe heads"]),
    (["--head", "ridge", "--param", "svm:C=1"], ["svm:C=1", "--head svm"]),
])
def test_bad_options_fail_in_one_line(fmnist_store: Path, args: list[str], words: list[str]):
    one_line_error(cli("cv", fmnist_store, *args, "-q"), *words)


def test_bad_stores_fail_in_one_line(fmnist_store: Path, tmp_path: Path):
    missing = tmp_path / "missing.h5"
    one_line_error(cli("cv", missing), str(missing), "embedpipe extract")
    unlabeled = copy_store(fmnist_store, tmp_path / "unlabeled.h5", unlabel=True)
    one_line_error(cli("cv", unlabeled), str(unlabeled), "no labeled rows")
