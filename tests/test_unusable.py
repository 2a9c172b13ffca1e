"""Unusable feature values (NaN, inf, beyond ±1e12) in every row a command reads: the rows it
fits and the rows it scores, in memory or streamed, from one store or stacked ones, through the
CLI and the library. Each is refused before any fit in one line naming the rows (and, stacked,
the store holding them), exit 2, nothing written (helper-34's attack, findings 1-3, 5, 8)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from clitools import cli, copy_rows, ok, one_line_error

import embedpipe
from embedpipe.store import open_store


def _edited(src: Path, dst: Path, edit) -> tuple[Path, list[str], list[int], list[int]]:
    """A copy of store ``src`` whose features ``edit(X, train, test)`` changed in place;
    returns it, its paths and the train and test row indices."""
    s = open_store(src)
    X = s.features.copy()
    train = [i for i, sp in enumerate(s.splits) if sp == "train"]
    test = [i for i, sp in enumerate(s.splits) if sp == "test"]
    edit(X, train, test)
    copy_rows(src, dst, list(range(len(s))), features=X)
    return dst, list(s.paths), train, test


def test_a_streamed_fit_refuses_a_bad_row_held_out_to_calibrate_before_fitting(
        fmnist_store: Path, tmp_path: Path):
    """sgd holds out a sample of its training rows to calibrate after the fit; a NaN only there
    passed the fit's checks, and the calibration stopped with scikit-learn's ValueError ("a bug
    in embedpipe", exit 1) after the whole fit."""
    from embedpipe.heads import stream, train as train_mod
    from embedpipe.heads.rows import select_rows, targets

    s = open_store(fmnist_store)
    rows = select_rows(s)
    y = targets(s, rows.train)
    for chunk in (stream.DEFAULT_CHUNK_ROWS, 8):
        held = rows.train[train_mod._calibration_rows(y, chunk, 0)]
        assert len(held) and len(held) < len(rows.train)
        bad, paths, _, _ = _edited(fmnist_store, tmp_path / f"held{chunk}.h5",
                                   lambda X, tr, te: X.__setitem__((held[0], 3), np.nan))
        res = cli("fit", bad, "--head", "sgd", "--chunk-rows", str(chunk),
                  "-o", tmp_path / "h.skops")
        one_line_error(res, str(bad), "1 row(s) hold NaN", paths[held[0]])
        assert "fitted" not in res.output and "sgd pass" not in res.output, res.output
        assert not (tmp_path / "h.skops").exists()


@pytest.mark.parametrize("head", ["logreg", "sgd"])
def test_cv_refuses_a_bad_held_out_row_before_its_folds(fmnist_store: Path, tmp_path: Path,
                                                         head: str):
    """cv checked the train rows only, ran every fold, then met a NaN test row when it scored
    the held-out split: "a bug in embedpipe", exit 1, no report."""
    bad, paths, _, test = _edited(fmnist_store, tmp_path / "t.h5",
                                  lambda X, tr, te: X.__setitem__((te[7], 0), -np.inf))
    out = tmp_path / "cv.json"
    extra = ["--chunk-rows", "8"] if head == "sgd" else []
    res = cli("cv", bad, "--head", head, *extra, "--folds", "3", "--json", out)
    one_line_error(res, str(bad), "1 row(s) hold NaN or infinite", paths[test[7]])
    assert "fold" not in res.output.split("error:")[0].lower(), res.output
    assert not out.exists()


def test_head_predict_on_a_store_refuses_its_bad_rows_as_on_an_array(fmnist_store: Path,
                                                                      tmp_path: Path):
    """Head.predict checked arrays only: a store path or store object with a NaN row raised
    scikit-learn's ValueError (with a numpy warning for inf), and a 1e13 row was predicted."""
    head = tmp_path / "h.skops"
    ok("fit", fmnist_store, "--head", "logreg", "-o", head, "-q")
    h = embedpipe.load_head(head)
    for k, (value, cause) in enumerate(((np.nan, "overflowed"), (np.inf, "overflowed"),
                                        (1e13, "imported so"))):
        bad, paths, train, _ = _edited(fmnist_store, tmp_path / f"b{k}.h5",
                                       lambda X, tr, te: X.__setitem__((tr[4], 9), value))
        for given in (str(bad), embedpipe.open_store(bad)):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with pytest.raises(embedpipe.EmbedpipeError) as e:
                    h.predict_proba(given)
            msg = str(e.value)
            assert "1 row(s)" in msg and paths[train[4]] in msg and cause in msg, msg
            assert "\n" not in msg
    # a clean store predicts, and probabilities are float64 whatever the head computes in
    p = h.predict_proba(fmnist_store)
    assert p.dtype == np.float64 and p.shape == (250, 10)


def test_stacked_stores_name_the_store_holding_bad_values(fmnist_store: Path, tmp_path: Path):
    """With two stores stacked, the line named "a.h5+b.h5": which one to re-extract?"""
    from test_compare import derived_store

    good = derived_store(fmnist_store, tmp_path / "good.h5")  # float16: another identity
    bad, paths, train, _ = _edited(fmnist_store, tmp_path / "bad.h5",
                                   lambda X, tr, te: X.__setitem__((tr[2], 1), np.nan))
    line = one_line_error(cli("fit", good, bad, "--head", "logreg", "-o", tmp_path / "h.skops"),
                          f"{bad} (stacked as {good}+{bad}): 1 row(s)", paths[train[2]])
    assert f"error: {good}" not in line


def test_import_features_refuses_integer_values_beyond_the_limit(fmnist_store: Path,
                                                                  tmp_path: Path):
    """Integer features were not checked at import: 10**15 became a store every command then
    refused. Refused at import like float values, nothing written."""
    f = tmp_path / "feats.npz"
    ok("export-features", fmnist_store, "-o", f, "-q")
    data = dict(np.load(f, allow_pickle=True))
    key = "features"
    feats = (np.asarray(data[key]) * 1000).astype(np.int64)
    feats[3, 0] = 10 ** 15
    data[key] = feats
    np.savez(tmp_path / "ints.npz", **data)
    out = tmp_path / "s.h5"
    one_line_error(cli("import-features", tmp_path / "ints.npz", "-o", out),
                   "1 row(s) have NaN or infinite features, or values beyond ±1e+12",
                   str(data["path"][3]))
    assert not out.exists()
    feats[3, 0] = 10 ** 11  # large but within the limit: imported
    data[key] = feats
    np.savez(tmp_path / "ints.npz", **data)
    ok("import-features", tmp_path / "ints.npz", "-o", out, "-q")
    assert open_store(out).features[3, 0] == pytest.approx(1e11)


def test_audit_similar_and_export_features_refuse_bad_rows_before_any_output(
        fmnist_store: Path, tmp_path: Path):
    """helper-35's attack: audit stopped with "a bug in embedpipe" (exit 1) and left an empty
    folder; similar answered a NaN query with itself at similarity -inf and hid the bad row from
    other queries; export-features wrote a file import-features refuses. Each now refuses the
    store in the usual line, writing nothing."""
    from embedpipe import similar

    bad, paths, train, test = _edited(fmnist_store, tmp_path / "b.h5",
                                      lambda X, tr, te: X.__setitem__((te[-1], 4), -np.inf))
    name = paths[test[-1]]
    one_line_error(cli("audit", bad, "-o", tmp_path / "aud", "--no-map"), str(bad), name)
    assert not (tmp_path / "aud").exists()
    for query in (name, paths[train[0]]):  # the bad row as query, or any
        one_line_error(cli("similar", bad, query, "-k", "4"), str(bad), "1 row(s)", name)
    with pytest.raises(embedpipe.EmbedpipeError, match="1 row"):
        similar.build_index(open_store(bad))  # the approximate search's index
    from test_features_io import _formats

    for suffix in _formats():
        out = tmp_path / f"f.{suffix}"
        one_line_error(cli("export-features", bad, "-o", out), str(bad), name)
        assert not out.exists() and not list(tmp_path.glob(f"*f.{suffix}*"))
