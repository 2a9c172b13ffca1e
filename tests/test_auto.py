"""`fit --head auto` / `cv --head auto`: the head chosen by cross-validation within --budget,
on a small real store (Fashion-MNIST, bundled Lite0 features)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from clitools import cli, ok, one_line_error, read_csv
from embedpipe.heads import artifacts, auto, calibration, fewshot
from embedpipe.heads import registry as heads

NAN = re.compile(r"\bnan\b", re.IGNORECASE)  # "nan", "NaN", "nan ± nan" as a word


@pytest.fixture(scope="module")
def auto_fit(fmnist_store, tmp_path_factory):
    """`embedpipe fit STORE -o auto.skops --budget 10000` (no --head: auto) on the fixture's
    store, once for the tests that read it (read-only): (the head file, the command's output)."""
    out = tmp_path_factory.mktemp("auto") / "auto.skops"
    res = ok("fit", fmnist_store, "-o", out, "--budget", "10000")
    return out, res.output


def test_fit_auto_is_the_default_and_records_its_choice(auto_fit, fmnist_store,
                                                         tmp_path):
    out, output = auto_fit
    assert "auto chose" in output and "fitted auto → " in output
    m = artifacts.load(out).manifest
    rec = m["auto"]
    names = [c["name"] for c in rec["candidates"]]
    assert len(names) >= 2
    # the table is ranked by inner-CV score, and the head saved is the choice
    means = [c["mean"] for c in rec["candidates"]]
    assert means == sorted(means, reverse=True)
    assert m["head"] == rec["head"] and m["params"] == rec["params"]
    assert rec["folds"] == 5 and rec["metric"] == "accuracy"
    # 200 rows (20 per class): the choice is the soft vote of every head's defaults for this
    # data, whatever the vote's own rank, its members in the defaults' order (not by CV, which
    # differs from fold to fold of `cv --head auto`: one vote read as several)
    order = [auto.describe(h, p) for h, p in auto.defaults(20, 1280)]
    assert len(set(order)) == len(auto.VOTE_ORDER) == 7
    top = sorted((c for c in rec["candidates"] if not c.get("members") and c["name"] in order),
                 key=lambda c: order.index(c["name"]))
    assert {c["head"] for c in top} == set(auto.VOTE_ORDER)
    assert rec["choice"] == " + ".join(c["name"] for c in top) and rec["choice"] in names
    assert rec["members"] == [{"head": c["head"], "params": c["params"]} for c in top]
    assert m["head"] == "+".join(c["head"] for c in top)
    assert any(n.startswith("200 rows: the choice is the soft vote of every head's defaults "
                            "(7 heads), not the best inner-CV score") for n in rec["notes"])
    # its probabilities are said to be what they are: the mean of the members' own or
    # temperature-scaled probabilities, not "native"; the temperatures fitted on the
    # out-of-fold decision values of auto's own 5 folds (calibrated_from_oof)
    how = [f"{c['head']} native" if heads.get(c["head"]).native_proba
           else f"{c['head']} temperature-scaled (5-fold CV)" for c in top]
    assert m["probabilities"] == "vote"
    assert m["calibration"] == ("soft vote (equal weights) of its members' probabilities: "
                                + ", ".join(how))
    assert f"probabilities: {m['calibration']} → {out}" in output
    # and the summary names each member's parameters as fitted, as the manifest records them
    assert set(m["effective_params"]) == {c["head"] for c in top}
    assert f"fitted auto → {m['head']} ({heads.format_params(m['effective_params'])}) on " \
        in output
    table = [line for line in output.splitlines() if line.startswith("  ") and " s  " in line]
    assert len(table) == len(names) and [line.strip().startswith("→") for line in table] == [
        n == rec["choice"] for n in names]  # the arrow marks the choice, not the top row
    # predict loads it and classifies the held-out rows
    csv_path = tmp_path / "p.csv"
    ok("predict", out, "--store", fmnist_store, "--split", "test", "-o", csv_path)
    rows = read_csv(csv_path)
    assert len(rows) == 50
    assert sum(r["label"] == r["predicted"] for r in rows) >= 30, rows[:5]
    res = ok("predict", out, "--store", fmnist_store, "--split", "test", "-o", csv_path)
    assert "no calibrated probabilities" not in res.output  # a vote's are probabilities


def test_tiny_budget_still_gives_a_valid_head_and_says_so(fmnist_store, tmp_path):
    out = tmp_path / "tiny.skops"
    res = ok("fit", fmnist_store, "--head", "auto", "--budget", "0.001", "-o", out)
    assert "budget" in res.output and "cut the search" in res.output
    rec = artifacts.load(out).manifest["auto"]
    assert len(rec["candidates"]) == 1  # only the first candidate ran
    # it ran past the budget (the first candidate is always scored) and says why
    assert any(re.match(r"the budget \(0\.001 s\) cut the search after 1 of \d+ candidates; "
                        r"the first alone took [\d.]+ s, more than the budget \(auto always "
                        r"scores one\); not scored: ", n) for n in rec["notes"]), rec["notes"]
    ok("predict", out, "--store", fmnist_store, "-o", tmp_path / "p.csv")


def test_a_budget_that_scores_fewer_heads_than_the_vote_takes_chooses_the_best_row(
        fmnist_store, tmp_path, monkeypatch):
    """A budget that lets auto score only 2 heads built a "vote" of those 2, which the bench
    found no better than the best CV row (bench/results/auto_policy.md: the vote of every
    head's defaults is). With fewer than MIN_VOTERS heads' defaults scored the choice is the
    best CV row, and the note and the table say so. The clock is auto's own, ticking one second per reading, so
    where the budget cuts does not depend on the machine's speed."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(auto, "time", type("Clock", (), {
        "perf_counter": staticmethod(lambda: float(next(ticks)))}))
    out = tmp_path / "cut.skops"
    res = ok("fit", fmnist_store, "--head", "auto", "--budget", "40", "-o", out)
    rec = artifacts.load(out).manifest["auto"]
    scored = {c["head"] for c in rec["candidates"] if not c.get("members")}
    assert 2 <= len(scored) < auto.MIN_VOTERS, rec["candidates"]
    assert any("cut the search" in n for n in rec["notes"])
    best = rec["candidates"][0]
    note = (f"200 rows: only {len(scored)} heads' defaults could be scored and voted, so "
            "there is no vote of every head's defaults (it takes at least 4: on the benches a "
            "vote of whichever 2 or 3 heads' defaults there are did not beat the best CV row, "
            "bench/results/auto_policy.md); the choice is the best row of the table")
    if best.get("members"):  # a greedy ensemble: the note says so, and it is what was fitted
        note += (f", here a greedy soft-voting ensemble of {len(best['members'])} heads: "
                 "unlike that vote, its members were added one at a time, each only because it "
                 "raised the CV score on the same folds")
        assert f"fitted auto → {'+'.join(m['head'] for m in best['members'])} " in res.output
        singles = [c for c in rec["candidates"] if not c.get("members")]
        assert best["mean"] > max(c["mean"] for c in singles)
    else:
        assert f"fitted auto → {best['head']} (" in res.output
    assert rec["notes"][-1] == note and f"  note: {note}" in res.output.splitlines()
    assert rec["choice"] == best["name"]  # the best row, marked in the table
    table = [ln for ln in res.output.splitlines() if ln.startswith("  ") and " s  " in ln]
    assert table[0].strip().startswith("→") and not any("→" in ln for ln in table[1:])
    assert f"auto chose {rec['choice']}" in res.output


def test_cv_head_auto_is_nested(fmnist_store, tmp_path):
    report = tmp_path / "r.json"
    res = ok("cv", fmnist_store, "--head", "auto", "--head", "centroid", "--folds", "2",
             "--budget", "2", "--json", report, "-q")
    r = json.loads(report.read_text())
    assert {h["head"] for h in r["heads"]} == {"auto", "centroid"}
    auto = next(h for h in r["heads"] if h["head"] == "auto")
    assert len(auto["folds"]) == 2 and 0.0 <= auto["accuracy"]["mean"] <= 1.0
    assert "auto" in res.output


@pytest.mark.parametrize("args,needle", [
    (["--budget", "abc"], "--budget abc"),
    (["--budget", "0"], "--budget 0"),
    (["--budget", "-5"], "--budget -5"),
    (["--budget", "nan"], "--budget nan"),
    (["--head", "logreg", "--budget", "5"], "only --head auto"),
    (["--head", "auto", "--param", "C=10"], "auto chooses"),
])
def test_bad_budget_or_params_are_one_line_errors(fmnist_store, tmp_path, args, needle):
    one_line_error(cli("fit", fmnist_store, "-o", tmp_path / "x.skops", *args), needle)
    assert not (tmp_path / "x.skops").exists()


def test_cv_bad_budget_is_one_line_error(fmnist_store):
    one_line_error(cli("cv", fmnist_store, "--head", "auto", "--budget", "x"), "--budget x")
    one_line_error(cli("cv", fmnist_store, "--budget", "5"), "only --head auto")


def test_heads_lists_auto_and_the_prep_parameter(fmnist_store, tmp_path):
    res = ok("heads")
    assert "auto" in res.output and "--budget" in res.output
    out = tmp_path / "l2.skops"
    ok("fit", fmnist_store, "--head", "svm", "--param", "prep=l2", "-o", out)
    assert artifacts.load(out).manifest["params"]["prep"] == "l2"
    one_line_error(cli("fit", fmnist_store, "--head", "svm", "--param", "prep=x", "-o", out),
                   "prep=x")


def test_search_with_auto_is_refused_and_a_head_file_is_not_a_store(fmnist_store, auto_fit,
                                                                   tmp_path):
    """--search on auto (fit's default head) was accepted and ignored, with a note: auto
    searches by itself. Now refused before any work, naming how to search one head."""
    out = tmp_path / "a.skops"
    copy = shutil.copy(fmnist_store, tmp_path / "copy.h5")
    for cmd in (["fit", fmnist_store, "-o", out, "--budget", "5"],
                ["fit", fmnist_store, "--head", "auto", "-o", out],
                ["cv", fmnist_store, "--head", "auto"],
                ["cv", fmnist_store, "--head", "svm", "--head", "auto"],
                ["compare", fmnist_store, copy, "--head", "auto"]):
        one_line_error(cli(*cmd, "--search"), "--search", "--head auto already searches",
                       "--head svm --search")
    assert not out.exists()
    out = auto_fit[0]
    # a head file where a store belongs: one line that says what it is, for every command
    for cmd in (["info", out], ["fit", out, "-o", tmp_path / "b.skops"], ["cv", out]):
        one_line_error(cli(*cmd), str(out), "is a head file", "embedpipe predict")


def test_auto_shows_each_fold_on_large_stores(fmnist_store, monkeypatch):
    """Above LARGE_ROWS a candidate's folds take many seconds each: each one gets a line."""
    from embedpipe.heads import auto
    from embedpipe.heads.rows import select_rows, targets
    from embedpipe.store import open_store

    s = open_store(fmnist_store)
    rows = select_rows(s).train
    said = []
    monkeypatch.setattr(auto, "LARGE_ROWS", 10)  # the fixture's 200 rows count as large
    auto.select(s.features[rows], targets(s, rows), budget=5, say=said.append)
    first = said[0].removeprefix("auto: scoring ")
    assert said[:3] == [f"auto: scoring {first}", f"auto: scoring {first}, fold 2/3",
                        f"auto: scoring {first}, fold 3/3"], said[:4]


def test_large_stores_are_scored_on_a_stratified_sample_and_fitted_on_all_rows(
        fmnist_store, tmp_path, monkeypatch):
    """Above SELECT_ROWS rows the candidates are scored on a sample (a whole large store does
    not fit the budget: 60k rows cut the search after its first candidate), and the choice is
    fitted on every row; the note says so. The fixture's 200 rows stand in for a large store."""
    from embedpipe.heads import fewshot

    monkeypatch.setattr(auto, "SELECT_ROWS", 100)
    monkeypatch.setattr(auto, "SAMPLE_MIN_PER_CLASS", 5)
    fitted = []  # the rows of every fit: each candidate's folds, then the choice's refit
    adapt = fewshot.adapt
    monkeypatch.setattr(fewshot, "adapt", lambda est, y, *a, **k: (
        fitted.append(len(y)), adapt(est, y, *a, **k))[1])
    out = tmp_path / "a.skops"
    res = ok("fit", fmnist_store, "-o", out, "--budget", "10000")
    note = "200 rows: candidates scored on a stratified sample of 100 of them (seed 0); " \
           "the choice is fitted on all 200"
    assert f"note: {note}" in res.output
    m = artifacts.load(out).manifest
    assert note in m["auto"]["notes"]
    assert m["training"]["rows"] == 200
    assert len(fitted) > 5 and set(fitted[:-1]) == {80}  # 4/5 of the sample in each fold
    assert fitted[-1] == 200  # the choice: every row


def test_score_sample_keeps_each_class_share_and_small_classes_whole(monkeypatch):
    import numpy as np

    monkeypatch.setattr(auto, "SELECT_ROWS", 1000)
    y = np.array(["a"] * 9000 + ["b"] * 1000 + ["c"] * 30 + ["d"] * 300)
    s = auto.score_sample(y, seed=0)
    got = dict(zip(*np.unique(y[s], return_counts=True)))
    # shares of 1000 rows: a 871, b 97, c all 30 (under SAMPLE_MIN_PER_CLASS), d 29 -> 50
    assert got == {"a": 871, "b": 97, "c": 30, "d": 50}, got
    assert np.all(np.diff(s) > 0)  # sorted, no row twice
    assert np.array_equal(s, auto.score_sample(y, seed=0))  # seeded
    assert not np.array_equal(s, auto.score_sample(y, seed=1))
    assert auto.score_sample(y[:1000], seed=0) is None  # up to SELECT_ROWS: every row


def test_a_class_of_one_image_fits_the_first_candidate_and_says_why(
        fmnist_store, tmp_path):
    """auto with a class of 1 training image cannot cross-validate: it used to print a table
    "scored by 0-fold CV" with "nan ± nan" (and keep NaN in the manifest). Like every named
    head, auto still fits (it is fit's default, and fit works at 1 image per class), with one
    line naming the class, what it fitted and the fix; `cv` refuses such a store, as before. In
    cv on 2 images per class each fold's training part has 1: a note says auto could not
    choose there. No "nan" anywhere."""
    from clitools import copy_rows

    from embedpipe.store import open_store

    s = open_store(fmnist_store)
    train = [i for i in range(len(s)) if s.splits[i] == "train"]
    first = s.classes[s.labels[train[0]]]
    mine = [i for i in train if s.classes[s.labels[i]] == first]

    one = copy_rows(fmnist_store, tmp_path / "one.h5",
                    [i for i in train if i not in mine[1:]])  # 1 row of `first`
    out = tmp_path / "auto.skops"
    res = ok("fit", one, "-o", out)
    assert not NAN.search(res.output), res.output
    said = [ln for ln in res.output.splitlines() if ln.startswith("auto: class")]
    assert said == [f"auto: class {first!r} has 1 training image, too few to cross-validate "
                    "(auto needs 2 per class), so it fitted logreg prep=sqrt+l2 without "
                    "choosing; add images of that class (or drop it) for auto to choose by CV, "
                    "or pass a named --head"], res.output
    assert "scored by" not in res.output and "fitted auto → logreg (prep=sqrt+l2 C=10" in res.output
    m = artifacts.load(out).manifest
    assert m["auto"]["folds"] == 0 and not NAN.search(json.dumps(m))
    assert [set(c) for c in m["auto"]["candidates"]] == [{"name", "head", "params",
                                                          "fit_seconds"}]
    one_line_error(cli("cv", one, "--head", "auto"), "single training image")

    two = copy_rows(fmnist_store, tmp_path / "two.h5",
                    [i for i in train if i not in mine[2:]])  # 2 rows: folds of 1
    report = tmp_path / "cv.json"
    res = cli("cv", two, "--head", "auto", "--head", "logreg", "--json", report, "-q")
    assert res.exit_code == 0, res.output
    assert not NAN.search(res.output) and not NAN.search(report.read_text()), res.output
    assert f"note: auto: class {first!r} has 1 training image, too few to cross-validate" \
        in res.output, res.output


def test_above_large_rows_a_member_joins_only_past_the_paired_standard_error(monkeypatch):
    """Greedy ensembles on large stores: a member whose vote gains less than one standard error
    of the paired difference is left out (its fit costs as much as the rest: 60k rows, a vote
    that joined on a tie took 16 minutes against svm's 3.5); on few rows any gain counts."""
    import numpy as np

    n = 6000
    y = np.array(["a", "b"] * (n // 2))
    classes = np.array(["a", "b"])
    right = np.where(y == "a", 0, 1)

    def scores_right_except(wrong):  # N x 2 class scores, right on every row but ``wrong``
        p = np.full((n, 2), 0.2)
        p[np.arange(n), right] = 0.8
        p[wrong] = p[wrong][:, ::-1]
        return p

    best = scores_right_except(np.arange(600))
    # one row fixed and none lost: +1/6000, under one standard error (sqrt(1)/6000 -> equal)
    # ten rows fixed: +10/6000 against a standard error of sqrt(10)/6000
    for fixed, joins in ((1, False), (10, True)):
        vote = scores_right_except(np.arange(fixed, 600))
        assert auto.paired_se(best, vote, y, classes, "accuracy") == pytest.approx(
            np.sqrt(fixed) / n)
        singles = [{"name": "svm", "head": "svm", "params": {}, "mean": 0.9, "oof": best},
                   {"name": "knn", "head": "knn", "params": {}, "mean": 0.85, "oof": best}]
        monkeypatch.setattr(auto, "_with_calibrated", lambda rows, y_idx: rows)
        monkeypatch.setattr(auto, "_vote_row", lambda members, *a, v=vote, f=fixed: {
            "name": "svm + knn", "mean": 0.9 + f / n, "oof": v, "members": members})
        X = np.arange(n, dtype=float)[:, None]  # distinct rows: knn can vote
        out = auto._ensembles(singles, X, y, right, classes, [], "accuracy", None)
        assert bool(out) is joins, (fixed, out)
        monkeypatch.setattr(auto, "LARGE_ROWS", n + 1)  # few rows: any gain joins
        assert auto._ensembles(singles, X, y, right, classes, [], "accuracy", None)
        monkeypatch.setattr(auto, "LARGE_ROWS", 5000)
    # class-balanced metrics weigh each row by 1/(K * its class's rows)
    vote = scores_right_except(np.arange(10, 600))
    assert auto.paired_se(best, vote, y, classes, "balanced_accuracy") == pytest.approx(
        np.sqrt(10) / n)


def test_budget_is_checked_before_each_fold_not_only_each_candidate(monkeypatch):
    """A candidate whose folds are slower than the candidates before it was finished past the
    budget (a fold started while seconds were left ran to its end): 40 s asked, 47 s spent in
    an attack. With a clock that only moves when a head is fitted (1 s per logreg fold, 10 s per
    ridge fold, 5 folds), budget 20: logreg takes 5 s; ridge is expected at 5 s, starts, and
    its first fold ends at 15 s. Its second fold is expected to end at 25 s, so it is not
    started: the search stops at 15 s, within the budget, ridge dropped with a note."""
    from embedpipe.heads import auto
    from embedpipe.heads import registry

    clock = {"t": 0.0}
    seconds = {"logreg": 1.0, "ridge": 10.0}
    real_build = registry.build

    def build(head, params=None, **kw):
        est = real_build(head, params, **kw)
        fit = est.fit

        def timed_fit(X, y, **k):
            clock["t"] += seconds[head]
            return fit(X, y, **k)

        est.fit = timed_fit
        return est

    monkeypatch.setattr(auto, "time", type("Clock", (), {
        "perf_counter": staticmethod(lambda: clock["t"])}))
    monkeypatch.setattr(registry, "build", build)
    monkeypatch.setattr(auto, "candidates", lambda n, d: [("logreg", {}), ("ridge", {})])
    rng = np.random.default_rng(0)
    y = np.repeat(np.array(["a", "b", "c"]), 20)
    X = rng.normal(size=(60, 8)) + np.repeat(np.eye(3, 8) * 3, 20, axis=0)
    sel = auto.select(X, y, budget=20)
    assert sel.seconds == 15.0 <= sel.budget
    assert [r["head"] for r in sel.table] == ["logreg"]
    assert any("cut the search during candidate 2" in n for n in sel.notes), sel.notes


def test_the_vote_leaves_knn_out_when_an_image_is_under_two_classes(fmnist_store, auto_fit,
                                                                    tmp_path):
    """The same image in two class folders: knn's neighbours tie at that point, so a knn head
    has no exact numpy-only or ONNX form, and since the vote holds every head's defaults the
    default head of `fit` could not be exported (helper-32's attack). The vote leaves knn out
    and says why; the head has its compact form (numpy-only `predict --store`)."""
    from embedpipe.heads import compact
    from embedpipe.store import open_store
    from clitools import copy_rows

    s = open_store(fmnist_store)
    train = [i for i in range(len(s)) if s.splits[i] == "train"]
    a = train[0]
    b = next(i for i in train if s.labels[i] != s.labels[a])
    X = np.array(s.features, copy=True)
    X[b] = X[a]  # row b: row a's image, under another class
    dup = copy_rows(fmnist_store, tmp_path / "dup.h5", list(range(len(s))), features=X)
    out = tmp_path / "dup.skops"
    res = ok("fit", dup, "-o", out)
    head = artifacts.load(out)
    rec = head.manifest["auto"]
    assert [m["head"] for m in rec["members"]] == head.manifest["head"].split("+")
    assert "knn" not in head.manifest["head"]
    assert len(rec["members"]) == len(auto.VOTE_ORDER) - 1
    assert ("knn prep=sqrt+l2+lda is not in it: some training rows are the same image under "
            "two classes") in res.output
    assert compact.export(head.estimator) is not None
    # the same store without the duplicate votes with knn
    assert "knn" in artifacts.load(auto_fit[0]).manifest["head"].split("+")


def test_the_report_counts_candidates_apart_from_their_vote_and_names_each_reason(
        fmnist_store, tmp_path, monkeypatch):
    """helper-34's attack: the header counted the vote as a candidate ("13 candidates scored",
    12 exist; "5 scored" beside "cut during candidate 5"); centroid was left out of the vote
    because its class of 2 rows was "too few to calibrate it (3 folds)", right before notes
    that other members were calibrated on 2 folds of that class (centroid needs 3 rows of every
    class); a default the budget cut was "not scored (the budget, or it failed to fit)"."""
    from clitools import copy_rows

    from embedpipe.store import open_store

    s = open_store(fmnist_store)
    classes = sorted(set(s.labels.tolist()))[:4]
    keep = [i for c in classes for i in
            [j for j in range(len(s)) if s.labels[j] == c and s.splits[j] == "train"]
            [:(2 if c == classes[0] else 6)]]
    small = copy_rows(fmnist_store, tmp_path / "small.h5", keep)
    short = s.classes[classes[0]]
    res = ok("fit", small, "--head", "auto", "--budget", "10000", "-o", tmp_path / "a.skops")
    n = len(auto.candidates(2, 1280))
    assert f"auto: {n} candidates and 1 combination of them scored" in res.output, res.output
    assert (f"its calibration for the vote needs 3 training rows of every class, and class "
            f"{short!r} has 2") in res.output, res.output
    # the others take their temperatures from auto's 2 folds of that class (the out-of-fold
    # values of its CV): nothing was lowered, so no "calibrated on 2 folds instead of 3" note
    assert "instead of" not in res.output and "temperature-scaled (2-fold CV)" in res.output
    # the budget: a clock ticking one second per reading cuts after a few candidates
    ticks = iter(range(10**6))
    monkeypatch.setattr(auto, "time", type("Clock", (), {
        "perf_counter": staticmethod(lambda: float(next(ticks)))}))
    res = ok("fit", small, "--head", "auto", "--budget", "40", "-o", tmp_path / "b.skops")
    cut = re.search(r"cut the search (?:during candidate (\d+)|after (\d+)) of", res.output)
    scored = re.search(r"auto: (\d+) candidates?( and 1 combination of them)? scored",
                       res.output)
    assert cut and scored, res.output
    done = int(cut.group(1)) - 1 if cut.group(1) else int(cut.group(2))
    assert int(scored.group(1)) == done, res.output
    assert "not scored (the budget)" in res.output and "or it failed" not in res.output


def _train_rows(store):
    from embedpipe.heads.rows import select_rows, targets
    from embedpipe.store import open_store

    s = open_store(store)
    rows = select_rows(s)
    return (s.features[rows.train].astype(np.float64), targets(s, rows.train),
            s.features[rows.heldout["test"]].astype(np.float64))


@pytest.mark.parametrize("head", ["svm", "ridge", "centroid"])
@pytest.mark.parametrize("n_classes", [10, 2])
def test_calibrated_from_oof_equals_scikit_learns_own_fit(fmnist_store, head, n_classes):
    """The final fit's temperature scaling from auto's out-of-fold decision values is what
    CalibratedClassifierCV's own fit gives on the same folds (it fits the head k+1 times; this
    once): the same probabilities on held-out rows, binary and multiclass. Fails when
    scikit-learn's internals that calibrated_from_oof rebuilds change."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    X, y, X_test = _train_rows(fmnist_store)
    keep = np.isin(y, np.unique(y)[:n_classes])
    X, y = X[keep], y[keep]
    splits = list(StratifiedKFold(3, shuffle=True, random_state=1).split(X, y))
    y_enc = np.searchsorted(np.unique(y), y)
    decision = cross_val_predict(heads.build(head), X, y_enc, cv=splits,
                                 method="decision_function")
    assert decision.ndim == (1 if n_classes == 2 else 2)
    expected = CalibratedClassifierCV(heads.build(head), method="temperature",
                                      ensemble=False, cv=splits).fit(X, y)
    got = calibration.calibrated_from_oof(CalibratedClassifierCV(
        heads.build(head), method="temperature", ensemble=False, cv=3), X, y, decision)
    assert list(got.classes_) == list(expected.classes_)
    assert got.cv == 3  # the folds the manifest names
    p, q = got.predict_proba(X_test), expected.predict_proba(X_test)
    assert p.shape == (len(X_test), n_classes)
    np.testing.assert_allclose(p, q, rtol=1e-7, atol=1e-10)
    # a temperature was fitted (not the identity): the probabilities differ from T = 1
    beta = got.calibrated_classifiers_[0].calibrators[0].beta_
    assert abs(beta - 1.0) > 1e-3
    assert (got.predict(X_test) == expected.predict(X_test)).all()


def test_auto_final_fit_calibrates_from_its_own_cv_not_again(fmnist_store, tmp_path,
                                                               monkeypatch):
    """The vote's members without probabilities (svm, linear-svm, ridge, centroid) and a
    chosen single head are temperature-scaled on the out-of-fold decision values auto's CV
    already computed: no cross_val_predict of their own in the final fit, each fitted once
    there; the head file loads and predicts calibrated probabilities."""
    import sklearn.calibration

    def refused(*a, **k):
        raise AssertionError("the final fit cross-validated a member again")

    monkeypatch.setattr(sklearn.calibration, "cross_val_predict", refused)
    # these 200 rows in the range where a calibration holds a fifth out and refits
    # (fewshot.refit_split): auto's own out-of-fold values still win (one fit, every row)
    monkeypatch.setattr(fewshot, "REFIT_ABOVE", 100)
    out = tmp_path / "vote.skops"
    ok("fit", fmnist_store, "-o", out, "--budget", "10000")
    loaded = artifacts.load(out)
    m = loaded.manifest
    assert m["probabilities"] == "vote" and "temperature-scaled (5-fold CV)" in m["calibration"]
    X, y, X_test = _train_rows(fmnist_store)
    p = loaded.estimator.predict_proba(X_test)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-9)
    assert (np.asarray(loaded.estimator.classes_)[p.argmax(axis=1)]
            == loaded.estimator.predict(X_test)).all()
    # a single chosen head without probabilities: svm alone
    monkeypatch.setattr(auto, "candidates", lambda n, d: [("svm", {})])
    monkeypatch.setattr(auto, "defaults", lambda n, d: [("svm", {})])
    one = tmp_path / "one.skops"
    ok("fit", fmnist_store, "-o", one, "--budget", "10000")
    loaded = artifacts.load(one)
    m = loaded.manifest
    assert m["head"] == "svm" and m["probabilities"] == "calibrated"
    assert m["calibration"] == "temperature scaling (5-fold)"
    p = loaded.estimator.predict_proba(X_test)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-9)


@pytest.mark.parametrize("smallest, joins", [(2, False), (3, True)])
def test_a_greedy_ensemble_takes_only_members_that_can_be_calibrated(monkeypatch, smallest,
                                                                     joins):
    """The greedy ensembles (above LARGE_ROWS rows, or fewer than MIN_VOTERS defaults scored)
    draw members only from configurations that can vote on these rows, as the vote of the
    defaults does: centroid, whose calibration needs 3 rows of every class, used to join on
    a class of 2 and the final fit then refused the store after the whole selection
    (helper-35's finding 1)."""
    y = np.array(["a"] * 20 + ["b"] * smallest)
    classes = np.array(["a", "b"])
    right = np.searchsorted(classes, y)
    best = np.eye(2)[right] * 0.6 + 0.2
    singles = [{"name": "svm", "head": "svm", "params": {}, "mean": 0.9, "oof": best},
               {"name": "centroid", "head": "centroid", "params": {}, "mean": 0.85,
                "oof": best}]
    monkeypatch.setattr(auto, "_with_calibrated", lambda rows, y_idx: rows)
    monkeypatch.setattr(auto, "_vote_row", lambda members, *a: {
        "name": " + ".join(m["name"] for m in members), "mean": 0.95, "oof": best,
        "members": members})
    X = np.arange(len(y), dtype=float)[:, None]
    out = auto._ensembles(singles, X, y, right, classes, [], "accuracy", None)
    assert [r["name"] for r in out] == (["svm + centroid"] if joins else [])
    why = auto._cannot_vote(singles[1], X, y)
    assert bool(why) is not joins
    if not joins:
        assert why == "its calibration for the vote needs 3 training rows of every class, " \
                      "and class 'b' has 2"


def test_a_vote_on_a_class_of_two_names_the_folds_its_temperatures_came_from(
        fmnist_store, tmp_path):
    """On a class of 2 training images auto cross-validates in 2 folds, and the vote's
    calibrated members take their temperatures from those folds' out-of-fold values: the
    manifest says 2-fold, and no note claims a member was 'calibrated on 2 folds instead of
    3' (the 3 of a calibration it no longer runs; helper-35's finding 3)."""
    from clitools import copy_rows

    from embedpipe.store import open_store

    s = open_store(fmnist_store)
    train = [i for i in range(len(s)) if s.splits[i] == "train"]
    first = s.classes[s.labels[train[0]]]
    mine = [i for i in train if s.classes[s.labels[i]] == first]
    two = copy_rows(fmnist_store, tmp_path / "two.h5", [i for i in train if i not in mine[2:]])
    out = tmp_path / "two.skops"
    res = ok("fit", two, "-o", out)
    assert "instead of" not in res.output, res.output
    m = artifacts.load(out).manifest
    assert m["auto"]["folds"] == 2 and m["probabilities"] == "vote", m["calibration"]
    calibrated = [c for c in m["auto"]["members"] if not heads.get(c["head"]).native_proba]
    assert calibrated and all(f"{c['head']} temperature-scaled (2-fold CV)" in m["calibration"]
                              for c in calibrated), m["calibration"]


def _train_features(fmnist_store):
    """(train rows' features as stored (float32), their labels) of the fixture's store."""
    from embedpipe.heads.rows import select_rows, targets
    from embedpipe.store import open_store

    s = open_store(fmnist_store)
    rows = select_rows(s).train
    return np.asarray(s.features[rows]), targets(s, rows)


def test_folds_in_worker_processes_give_the_same_selection_as_one_after_another(
        fmnist_store, monkeypatch):
    """Above PARALLEL_ROWS auto fits score_workers folds at once in worker processes: the same
    table
    (every candidate's mean CV score to the last digit), choice and out-of-fold decision
    values (what the final fit's temperature comes from) as one fold after another."""
    X, y = _train_features(fmnist_store)
    real = auto.candidates
    monkeypatch.setattr(auto, "candidates", lambda n, d: real(n, d)[:5])
    got = {}
    for workers in (1, 3):
        monkeypatch.setattr(auto, "score_workers", lambda rows, w=workers: w)
        got[workers] = auto.select(X, y, budget=10000)
    one, three = got[1], got[3]
    assert [(r["name"], r["mean"], r["std"]) for r in one.table] == \
        [(r["name"], r["mean"], r["std"]) for r in three.table]
    assert one.choice["name"] == three.choice["name"] and one.notes == three.notes
    assert one.decisions.keys() == three.decisions.keys() and one.decisions
    for name, d in one.decisions.items():
        np.testing.assert_allclose(three.decisions[name], d, rtol=1e-9, atol=1e-12)


def test_a_fold_failing_in_a_worker_leaves_its_candidate_out_and_other_errors_are_raised(
        fmnist_store, monkeypatch):
    """A candidate whose fit raises a ValueError in a worker process (here a PCA larger than
    the fold's rows, as scikit-learn says it) is left out with that note, the others scored,
    as in one process; any other exception in a worker (here registry.build refusing C=-1)
    reaches the caller as itself, with its message."""
    X, y = _train_features(fmnist_store)
    monkeypatch.setattr(auto, "score_workers", lambda rows: 2)
    monkeypatch.setattr(auto, "candidates", lambda n, d: [
        ("logreg", {}), ("svm", {"pca": 5000}), ("ridge", {})])
    sel = auto.select(X, y, budget=10000)
    assert sorted(r["head"] for r in sel.table if not r.get("members")) == ["logreg", "ridge"]
    svm = auto.describe("svm", {"pca": 5000})
    assert (f"{svm} failed to fit on these rows (n_components=5000 must be between 0 and "
            "min(n_samples, n_features)=160 with svd_solver='full'); left out") in sel.notes, \
        sel.notes

    monkeypatch.setattr(auto, "candidates", lambda n, d: [("logreg", {}), ("svm", {"C": -1.0})])
    with pytest.raises(heads.HeadError, match="C"):
        auto.select(X, y, budget=10000)


def test_workers_keep_the_budget_and_always_score_the_first_candidate(fmnist_store,
                                                                      monkeypatch):
    """With folds in worker processes a budget too small for anything still scores the first
    candidate on every fold, and no other: the next candidate is expected to end past it."""
    X, y = _train_features(fmnist_store)
    monkeypatch.setattr(auto, "score_workers", lambda rows: 2)
    sel = auto.select(X, y, budget=0.001)
    first = auto.describe(*auto.candidates(20, X.shape[1])[0])
    assert [r["name"] for r in sel.table] == [first]
    assert sel.folds == 5
    assert any(n.startswith("the budget (0.001 s) cut the search after 1 of ") for n in
               sel.notes), sel.notes


def test_ctrl_c_stops_auto_with_folds_in_worker_processes(monkeypatch):
    """Ctrl-C while worker processes fit folds raises errors.Interrupted in the caller at once
    (the workers still fitting are stopped, not waited for), and Python's own SIGINT handler
    is back afterwards."""
    import os
    import signal
    import threading
    import time

    from embedpipe.errors import Interrupted

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4).astype(str), 1500)
    X = rng.normal(size=(len(y), 256)) + np.repeat(np.eye(4, 256), 1500, axis=0)
    monkeypatch.setattr(auto, "score_workers", lambda rows: 2)
    monkeypatch.setattr(auto, "candidates", lambda n, d: [("svm", {})] * 4)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(Interrupted):
        auto.select(X, y, budget=10000)
    assert time.perf_counter() - t0 < 60
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_score_workers_one_per_core_above_parallel_rows_capped_by_omp_num_threads(
        monkeypatch):
    """Folds run one per usable core above PARALLEL_ROWS rows, at most MAX_WORKERS, and at most
    OMP_NUM_THREADS where it is set (joblib sets it in its workers: cv --jobs N), else 1."""
    from embedpipe import env

    monkeypatch.setattr(env, "usable_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert auto.score_workers(auto.PARALLEL_ROWS) == 1
    assert auto.score_workers(auto.PARALLEL_ROWS + 1) == auto.MAX_WORKERS == 8
    monkeypatch.setattr(env, "usable_cores", lambda: 2)
    assert auto.score_workers(10_000) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert auto.score_workers(10_000) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert auto.score_workers(10_000) == 2


def test_workers_blas_threads_add_up_to_the_cores_auto_may_use(monkeypatch):
    """Each worker's BLAS/OpenMP threads: 1 up to fit.ONE_BLAS_THREAD_ROWS rows (fit's rule),
    else the cores shared out, OMP_NUM_THREADS included: 4 workers under OMP_NUM_THREADS=4 on
    16 cores get 1 thread each (4 in all), not 16 // 4 (an attack measured 16)."""
    from embedpipe import env
    from embedpipe.heads.fit import ONE_BLAS_THREAD_ROWS

    monkeypatch.setattr(env, "usable_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert auto.worker_blas_threads(ONE_BLAS_THREAD_ROWS, 8) == 1
    assert auto.worker_blas_threads(ONE_BLAS_THREAD_ROWS + 1, 8) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    workers = auto.score_workers(10_000)
    assert workers == 4 and auto.worker_blas_threads(10_000, workers) == 1


class _Host:
    """The ``os`` module as joblib's loky sees it on a 64-core machine whose cgroup files are
    ``files`` (path → content; the rest of /sys/fs/cgroup is absent)."""

    def __init__(self, files: dict[str, str], affinity: int = 64):
        import types

        self.files, self.affinity = files, affinity
        self.path = types.SimpleNamespace(exists=lambda p: p in files)

    def __getattr__(self, name: str):
        import os

        return getattr(os, name)

    def cpu_count(self) -> int:
        return 64

    def sched_getaffinity(self, pid: int) -> set[int]:
        return set(range(self.affinity))


def _on_host(monkeypatch, files: dict[str, str], affinity: int = 64) -> None:
    """Make loky's cpu_count read ``files`` as the cgroup files of a 64-core machine."""
    import io

    from joblib.externals.loky.backend import context

    host = _Host(files, affinity)
    monkeypatch.setattr(context, "os", host)
    monkeypatch.setattr(context, "open", lambda p, *a, **k: io.StringIO(host.files[p]),
                        raising=False)


def test_a_container_cpu_quota_sets_the_usable_cores_and_auto_workers(monkeypatch):
    """`docker --cpus 2` on a 64-core machine (cgroup v2 cpu.max "200000 100000"): 2 usable
    cores, so auto fits 2 folds at once with 1 BLAS thread each and extract starts 1 loader
    worker, not 8 and 8 (usable_cores read only the affinity mask). A fractional quota is
    rounded up (1.5 CPUs: 2), cgroup v1's cfs quota counts the same, "max" or -1 is no quota,
    and an affinity mask smaller than the quota wins."""
    from embedpipe import env
    from embedpipe.extract.loader import default_workers

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOKY_MAX_CPU_COUNT", raising=False)
    v2, quota, period = ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
                         "/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    _on_host(monkeypatch, {})
    assert env.usable_cores() == 64
    assert auto.score_workers(10_000) == auto.MAX_WORKERS == 8 and default_workers() == 8
    _on_host(monkeypatch, {v2: "200000 100000\n"})
    assert env.usable_cores() == 2
    assert auto.score_workers(10_000) == 2 and auto.worker_blas_threads(10_000, 2) == 1
    assert default_workers() == 1
    _on_host(monkeypatch, {v2: "150000 100000\n"})
    assert env.usable_cores() == 2 and auto.score_workers(10_000) == 2
    _on_host(monkeypatch, {v2: "50000 100000\n"})
    assert env.usable_cores() == 1 and auto.score_workers(10_000) == 1
    _on_host(monkeypatch, {v2: "max 100000\n"})
    assert env.usable_cores() == 64
    _on_host(monkeypatch, {quota: "300000\n", period: "100000\n"})
    assert env.usable_cores() == 3 and auto.score_workers(10_000) == 3
    _on_host(monkeypatch, {quota: "-1\n", period: "100000\n"})
    assert env.usable_cores() == 64
    _on_host(monkeypatch, {v2: "800000 100000\n"}, affinity=3)
    assert env.usable_cores() == 3


def test_usable_cores_follow_the_affinity_mask_in_a_real_process(tmp_path):
    """taskset -c 0: one usable core, whatever the machine has (a real process, no patching)."""
    import os
    import subprocess
    import sys

    if shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"):
        pytest.skip("needs taskset (util-linux) and sched_getaffinity")
    code = ("from embedpipe.env import usable_cores; from embedpipe.heads import auto; "
            "print(usable_cores(), auto.score_workers(10_000))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "LOKY_MAX_CPU_COUNT")}
    res = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1", "1"]


def test_a_worker_process_that_dies_is_a_one_line_error_naming_the_fix(fmnist_store,
                                                                       monkeypatch):
    """A worker process killed mid-fit (the OOM killer, say) breaks the pool: one line naming
    the candidate and the fix (OMP_NUM_THREADS=1: one fold at a time, in-process), no
    traceback of loky's."""
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    from embedpipe.heads.rows import EvaluateError

    X, y = _train_features(fmnist_store)
    monkeypatch.setattr(auto, "score_workers", lambda rows: 2)
    monkeypatch.setattr(auto, "candidates", lambda n, d: [("logreg", {})])

    def died(self, key, fn, *args):
        self.done.put((key, None, TerminatedWorkerError("A worker process managed by the "
                                                        "executor was unexpectedly terminated.")))

    monkeypatch.setattr(auto._Workers, "submit", died)
    with pytest.raises(EvaluateError) as e:
        auto.select(X, y, budget=10000)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"auto: a worker process died while it fitted {auto.describe('logreg', {})} (A worker")
    assert msg.endswith("rerun with OMP_NUM_THREADS=1 (one fold at a time, in this process)")
