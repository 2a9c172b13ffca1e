"""`embedpipe compare`: the same heads on the same folds over several stores of the same images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from clitools import cli, copy_rows, ok, one_line_error

from embedpipe.store import StoreWriter, open_store, read_identity


def derived_store(src: Path, dst: Path, *, dtype: str = "float16", keep_every: int = 1,
                  relabel: dict[str, str] | None = None) -> Path:
    """A second store of (a subset of) the same images: ``src``'s real features stored as
    ``dtype`` (a store another run could have made with ``--dtype``)."""
    s = open_store(src)
    keep = list(range(0, len(s), keep_every))
    identity = {**read_identity(src), "dtype": dtype}
    with StoreWriter.open(dst, identity, versions={}) as w:
        names = [(relabel or {}).get(c, c) for c in s.classes]
        ids = w.class_ids(names)
        w.append(s.features[keep], paths=[s.paths[i] for i in keep],
                 labels=[ids[names[s.labels[i]]] for i in keep],
                 hashes=[s.hashes[i] for i in keep], splits=[s.splits[i] for i in keep],
                 mtime_ns=[0] * len(keep), size=[0] * len(keep))
    return dst


def test_compare_uses_the_folds_of_cv_for_every_store(fmnist_store: Path, tmp_path: Path):
    half = derived_store(fmnist_store, tmp_path / "half.h5")
    out = tmp_path / "cmp.json"
    res = cli("compare", fmnist_store, half, "--head", "ridge", "--head", "centroid",
              "--json", out, "-q")
    assert res.exit_code == 0, res.output
    assert "[A]" in res.stdout and "[B]" in res.stdout and "B − A (paired)" in res.stdout
    report = json.loads(out.read_text())
    assert report["rows"] == 200 and len(report["stores"]) == 2
    assert report["stores"][1]["path"] == str(half)
    # the cells of store A are exactly what `cv` reports for A alone (same folds, same heads)
    res = cli("cv", fmnist_store, "--head", "ridge", "--head", "centroid", "--json",
              tmp_path / "cv.json", "-q")
    assert res.exit_code == 0, res.output
    cv = {h["head"]: [f["accuracy"] for f in h["folds"]]
          for h in json.loads((tmp_path / "cv.json").read_text())["heads"]}
    for row in report["heads"]:
        assert row["stores"][0]["accuracy"]["folds"] == cv[row["head"]]
        d = row["difference"]
        a, b = (np.array(s["accuracy"]["folds"]) for s in row["stores"])
        assert d["folds"] == pytest.approx((b - a).tolist())
        # float16 copies of the same features: the heads barely notice
        assert abs(d["mean"]) < 0.05


def test_compare_matches_rows_by_path_and_reports_what_is_left_out(fmnist_store: Path,
                                                                   tmp_path: Path):
    third = derived_store(fmnist_store, tmp_path / "third.h5", keep_every=3)
    res = cli("compare", fmnist_store, third, "--head", "centroid", "--folds", "3", "-q")
    assert res.exit_code == 0, res.output
    n_common = sum(1 for p in open_store(third).paths if p.startswith("train/"))
    assert f"{n_common} train rows common to all stores" in res.stdout
    assert f"{200 - n_common} train rows of {fmnist_store} are not in every store" in res.output


def test_compare_refuses_stores_it_cannot_compare(fmnist_store: Path, tmp_path: Path):
    other = derived_store(fmnist_store, tmp_path / "renamed.h5", relabel={"bag": "handbag"})
    res = cli("compare", fmnist_store, other, "--head", "centroid")
    first = sorted(p for p in open_store(other).paths if p.startswith("train/bag/"))[0]
    assert one_line_error(res) == (f"error: {first}: labeled bag in {fmnist_store}, handbag in "
                                   f"{other}; compare stores of the same labeled data (extract "
                                   "each from the same folders)")
    res = cli("compare", fmnist_store, "--head", "centroid")
    assert res.exit_code == 2 and "at least two stores" in res.output


@pytest.mark.slow  # ~32 s; the other compare tests stay in the default job
def test_compare_shows_per_fold_values_of_what_varies_and_member_params(fmnist_store: Path,
                                                                        tmp_path: Path):
    """compare's parameter section named the parameters that differ across folds (`per
    search: n_neighbors`) but not their values; it now prints them fold by fold for each
    store, as cv does, and `--param knn:NAME=VALUE` reaches knn inside an ensemble."""
    half = derived_store(fmnist_store, tmp_path / "half.h5")
    out = tmp_path / "cmp.json"
    res = cli("compare", fmnist_store, half, "--head", "knn", "--search", "--folds", "3",
              "--json", out, "-q")
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text())["heads"][0]
    lines = res.stdout.splitlines()
    for letter, store in zip("AB", row["stores"]):
        chosen = store["effective_params"]
        assert len(chosen) == 3 and all("n_neighbors" in p for p in chosen), chosen
        (line,) = [ln for ln in lines if f"[{letter}] chosen per fold: " in ln]
        cells = line.split("chosen per fold: ")[1].split(" | ")
        assert len(cells) == 3, line
        for cell, p in zip(cells, chosen):
            assert f"n_neighbors={p['n_neighbors']}" in cell.split(), (cell, p)
            assert f"weights={p['weights']}" in cell.split(), (cell, p)

    res = cli("compare", fmnist_store, half, "--head", "svm+knn", "--folds", "2", "-p",
              "knn:n_neighbors=3", "-p", "pca=16", "-q")
    assert res.exit_code == 0, res.output
    (line,) = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("svm+knn  pca=16;")]
    assert "knn: prep=sqrt+l2+lda" in line and "n_neighbors=3" in line and "per fold" not in line


def test_compare_refuses_search_as_cv_does_before_any_fit(fmnist_store: Path, tmp_path: Path):
    """compare --search used to fit an ensemble unsearched (it has no grid) where cv refuses
    it, and to fail inside a fit when a fold's training part kept 1 image of a class; both are
    now cv's one-line refusals, before any fit."""
    half = derived_store(fmnist_store, tmp_path / "half.h5")
    one_line_error(cli("compare", fmnist_store, half, "--head", "logreg", "--head", "svm+knn",
                       "--search", "-q"), "svm+knn is an ensemble", "--param svm:NAME=VALUE")
    s = open_store(fmnist_store)
    train = [i for i in range(len(s)) if s.splits[i] == "train"]
    first = [i for i in train if s.labels[i] == s.labels[train[0]]]
    two = copy_rows(fmnist_store, tmp_path / "two.h5", [i for i in train if i not in first[2:]])
    one_line_error(cli("compare", two, half, "--head", "knn", "--search", "-q"),
                   f"{two}, {half}: --search: class", "keeps only 1 image(s)")


def test_a_value_fixed_by_param_is_not_listed_as_chosen_by_the_search(fmnist_store: Path,
                                                                      tmp_path: Path):
    """`compare --search --param n_neighbors=3` listed n_neighbors=3 under "chosen per fold",
    as if the search had chosen it; a fixed value is not searched (the grid leaves it out),
    so it is shown once with the settings every fold shares, in compare and in cv."""
    half = derived_store(fmnist_store, tmp_path / "half.h5")
    # prep=l2: knn without its lda step (0.5 s a fit at 1280-d), its grid metric x weights
    # (a plain --param prep=... was refused by cv and compare: "none of the heads has prep")
    res = cli("compare", fmnist_store, half, "--head", "knn", "--search", "--param",
              "n_neighbors=3", "--param", "prep=l2", "--folds", "2", "-q")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    (knn,) = [ln for ln in lines if ln.startswith("  knn ") and "prep=" in ln]
    assert "n_neighbors=3;" in knn.split(), knn  # shared by every fold: before the ";"
    chosen = [ln for ln in lines if "chosen per fold:" in ln]
    assert len(chosen) == 2, res.stdout  # [A] and [B]
    assert not any("n_neighbors" in ln for ln in chosen), chosen
    assert all("weights=" in ln for ln in chosen), chosen  # what the search did choose
    out = tmp_path / "cv.json"
    res = cli("cv", fmnist_store, "--head", "knn", "--search", "--param", "n_neighbors=3",
              "--param", "weights=uniform", "--param", "prep=l2", "--folds", "2", "--json",
              out, "-q")
    assert res.exit_code == 0, res.output
    (row,) = json.loads(out.read_text())["heads"]
    assert row["effective_params"]["n_neighbors"] == 3
    assert all("n_neighbors" not in f["effective_params"] and "weights" not in
               f["effective_params"] for f in row["folds"]), row["folds"]
    (line,) = [ln for ln in res.stdout.splitlines() if "chosen per fold:" in ln]
    assert "n_neighbors" not in line and "weights" not in line and "metric=" in line, line


def test_a_value_fixed_by_param_and_lowered_in_some_folds_says_so(fmnist_store: Path,
                                                                   tmp_path: Path):
    """`--param n_neighbors=172` on 200 train rows in 7 folds (171 or 172 training rows a
    fold): fewshot.adapt lowers it to 171 in four folds, and the value showed under "chosen per
    fold" (with --search) as if the search had chosen it. It has a line of its own now, naming
    the --param value and that it was lowered to the fold's rows, with what each fold fitted;
    the searched parameters stay under "chosen per fold"; the JSON keeps each fold's value."""
    out = tmp_path / "cv.json"
    res = ok("cv", fmnist_store, "--head", "knn", "--param", "n_neighbors=172", "--param",
             "prep=l2", "--folds", "7", "--json", out, "-q")
    lines = res.stdout.splitlines()
    (row,) = [ln for ln in lines if ln.startswith("  knn ")]
    assert "n_neighbors=172 (--param) lowered to fit the folds' rows" in row, row
    (low,) = [ln for ln in lines if "--param n_neighbors=172, lowered to the fold's" in ln]
    per_fold = low.partition("see the notes): ")[2].split(" | ")
    assert sorted(per_fold) == ["n_neighbors=171"] * 4 + ["n_neighbors=172"] * 3, low
    assert not any("per fold:" in ln for ln in lines), res.stdout  # nothing else varies
    folds = json.loads(out.read_text())["heads"][0]["folds"]
    assert sorted(f["effective_params"]["n_neighbors"] for f in folds) == [171] * 4 + [172] * 3
    # with --search: not under "chosen per fold"
    res = ok("cv", fmnist_store, "--head", "knn", "--search", "--param", "n_neighbors=172",
             "--param", "prep=l2", "--folds", "7", "-q")
    (chosen,) = [ln for ln in res.stdout.splitlines() if "chosen per fold:" in ln]
    assert "n_neighbors" not in chosen and "metric=" in chosen, chosen
    assert "--param n_neighbors=172, lowered to the fold's training rows" in res.stdout
    half = derived_store(fmnist_store, tmp_path / "half.h5")
    res = ok("compare", fmnist_store, half, "--head", "knn", "--search", "--param",
             "n_neighbors=172", "--param", "prep=l2", "--folds", "7", "-q")
    chosen = [ln for ln in res.stdout.splitlines() if "chosen per fold:" in ln]
    assert len(chosen) == 2 and not any("n_neighbors" in ln for ln in chosen), res.stdout
    low = [ln for ln in res.stdout.splitlines() if "--param n_neighbors=172, lowered" in ln]
    assert [ln.split()[0] for ln in low] == ["[A]", "[B]"], res.stdout


def test_compare_refuses_the_same_store_file_twice_and_notes_a_copy(fmnist_store: Path,
                                                                     tmp_path: Path):
    """`compare S.h5 S.h5` (or another spelling of the path, a symlink, a hard link) printed
    two identical columns without a word: compare scores one store against another, so the
    same file twice is refused, naming it. A copy is another file (compare runs), with a note
    that its features are the same."""
    link = tmp_path / "link.h5"
    link.symlink_to(fmnist_store)
    spelled = fmnist_store.parent / ".." / fmnist_store.parent.name / fmnist_store.name
    for twin, words in ((fmnist_store, ["the same store is given twice ([A] and [B])"]),
                        (spelled, ["[B] is the same store file as [A]"]),
                        (link, [f"{link}: [B] is the same store file as [A] {fmnist_store}"])):
        one_line_error(cli("compare", fmnist_store, twin, "--head", "centroid", "-q"),
                       *words, f"embedpipe cv {fmnist_store}")
    half = derived_store(fmnist_store, tmp_path / "half.h5")
    one_line_error(cli("compare", fmnist_store, half, link, "--head", "centroid", "-q"),
                   f"{link}: [C] is the same store file as [A]")
    copy = tmp_path / "copy.h5"
    shutil.copy(fmnist_store, copy)
    res = cli("compare", fmnist_store, copy, "--head", "centroid", "--folds", "2", "-q")
    assert res.exit_code == 0, res.output
    assert (f"note: [A] {fmnist_store} and [B] {copy} hold features of the same images made "
            "the same way") in res.output, res.output
    res = cli("compare", fmnist_store, half, "--head", "centroid", "--folds", "2", "-q")
    assert res.exit_code == 0 and "made the same way" not in res.output, res.output  # float16
