"""`embedpipe audit` on a real planted image set: duplicates across splits, flipped labels and
foreign photos among Fashion-MNIST images, features from the bundled Lite0."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clitools import cli, one_line_error, read_csv
from embedpipe.datasets import write_planted_fashion_mnist

class _Ran:
    """What a finished `embedpipe` subprocess printed (stdout + stderr) and its exit code."""

    def __init__(self, proc: subprocess.CompletedProcess):
        self.output, self.exit_code = proc.stdout + proc.stderr, proc.returncode


def audit_ok(*args: object) -> _Ran:
    """`embedpipe audit ARGS...` in its own process, which must succeed. A real `audit` never
    has torch or OpenVINO loaded; this test process does (other tests extract), and numba's
    threads (UMAP) beside their OpenMP runtimes crashed the test process once (SIGSEGV)."""
    proc = subprocess.run([sys.executable, "-m", "embedpipe.cli", "audit", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    res = _Ran(proc)
    assert res.exit_code == 0, res.output
    return res


CLASSES, TRAIN, TEST = 4, 20, 5  # 4 classes x (20 train + 5 test) Fashion-MNIST images


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """(image folder, store, truth): 100 Fashion-MNIST images in train/test class folders with
    6 train images copied into test (exact, JPEG-re-encoded, upscaled), 4 train labels
    flipped (5%) and 3 foreign photos; extracted in fp32 with the bundled Lite0. Read-only."""
    from embedpipe.extract import ExtractOptions, run

    root = tmp_path_factory.mktemp("audit")
    data = root / "data"
    truth = write_planted_fashion_mnist(data, splits={"train": TRAIN, "test": TEST},
                                        classes=CLASSES, duplicates=6, flip_fraction=0.05,
                                        foreign=3, seed=0)
    store = root / "planted.h5"
    summary = run(data, store, ExtractOptions(precision="fp32"), progress=False)
    assert summary.extracted == 109 and not summary.failed, summary.line()
    os.chmod(store, 0o444)
    return data, store, truth


def _folder_digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                               p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def audited(planted: tuple[Path, Path, dict], tmp_path_factory: pytest.TempPathFactory):
    """The audit of the planted store through the CLI, with --fix-plan: (output, folder,
    audit.json content, fix plan rows, images digest before, after)."""
    data, store, _ = planted
    out = tmp_path_factory.mktemp("audit-out") / "report"
    before = _folder_digest(data)
    res = audit_ok(store, "--out", out, "--fix-plan")
    after = _folder_digest(data)
    report = json.loads((out / "audit.json").read_text())
    return res.output, out, report, read_csv(out / "fix_plan.csv"), before, after


def test_finds_every_planted_duplicate_as_a_train_test_leak(planted, audited):
    _, _, truth = planted
    output, out, report, _, _, _ = audited
    groups = report["duplicates"]["groups"]
    member_sets = [{m["path"] for m in g["members"]} for g in groups]
    for original, copy, kind in truth["duplicates"]:
        hits = [g for g, ms in zip(groups, member_sets) if {original, copy} <= ms]
        assert len(hits) == 1, (kind, original, copy, member_sets)
        g = hits[0]
        assert g["leak"] and g["splits"] == ["test", "train"] and not g["conflict"]
        assert g["exact"] == (kind == "exact")
        kept = next(m for m in g["members"] if m["row"] == g["keep"])
        assert kept["split"] == "train"
    # no more than one unplanted group (Fashion-MNIST has a few genuine near duplicates)
    planted_sets = [{a, b} for a, b, _ in truth["duplicates"]]
    extra = [ms for ms in member_sets if not any(p <= ms for p in planted_sets)]
    assert len(extra) <= 1, extra
    s = report["summary"]
    assert s["leak_groups"] >= len(truth["duplicates"])
    assert s["exact_duplicate_groups"] == sum(k == "exact" for *_, k in truth["duplicates"])
    assert f"{s['duplicate_groups']} duplicate groups" in output
    assert str(out / "report.html") in output


def test_ranks_flipped_labels_and_suggests_the_true_class(planted, audited):
    _, _, truth = planted
    _, _, report, _, _, _ = audited
    lab = report["label_issues"]
    assert "skipped" not in lab and lab["folds"] == 5 and lab["head"] == "logreg"
    top = {it["path"]: it for it in lab["issues"][:2 * len(truth["flipped"]) + len(
        truth["foreign"])]}
    found = [p for p, true, given in truth["flipped"] if p in top]
    assert len(found) >= 3, (truth["flipped"], list(top))
    for p, true, given in truth["flipped"]:
        if p in top:
            assert top[p]["label"] == given
    assert sum(top[p]["suggested_label"] == true for p, true, _ in truth["flipped"]
               if p in top) >= 3
    sc = [it["self_confidence"] for it in lab["issues"]]
    assert sc == sorted(sc)  # ranked by self-confidence, lowest first


def test_foreign_photos_are_the_top_outliers(planted, audited):
    _, _, truth = planted
    _, _, report, _, _, _ = audited
    out = report["outliers"]
    top5 = [it["path"] for it in out["overall"][:5]]
    assert sum(p in top5 for p in truth["foreign"]) >= 2, (top5, truth["foreign"])
    flagged = {it["path"] for it in out["flagged"]}
    assert flagged and sum(p in flagged for p in truth["foreign"]) >= 2, flagged
    assert out["reference"] == "train" and out["k"] == 5
    d = [it["distance"] for it in out["overall"]]
    assert d == sorted(d, reverse=True)
    assert set(out["per_class"]) == set(report["balance"]["classes"])


def test_json_schema_and_balance(planted, audited):
    _, store, truth = planted
    _, _, report, _, _, _ = audited
    assert report["schema"] == "embedpipe.audit/1"
    assert report["store"] == str(store) and report["rows"] == 109 and report["dim"] == 1280
    assert set(report) >= {"summary", "balance", "duplicates", "label_issues", "outliers",
                           "map", "notes", "options", "files", "images_root"}
    bal = report["balance"]
    assert bal["splits"] == ["train", "test"]
    assert sum(bal["counts"]["test"].values()) == CLASSES * TEST + len(truth["duplicates"])
    assert sum(bal["counts"]["train"].values()) == CLASSES * TRAIN + len(truth["foreign"])
    assert report["map"]["rows"] == 109 and not report["map"]["sampled"]
    assert report["map"]["method"] in ("UMAP (umap-learn)", "t-SNE (scikit-learn)")


def test_fix_plan_lists_actions_and_nothing_is_touched(planted, audited):
    data, _, truth = planted
    _, _, report, plan, before, after = audited
    assert after == before  # no image file was changed, moved or deleted
    assert plan and list(plan[0]) == ["path", "action", "reason", "suggested_label", "score"]
    drops = {r["path"] for r in plan if r["action"] == "drop-duplicate"}
    assert {copy for _, copy, _ in truth["duplicates"]} <= drops  # the test-split copies
    assert not drops & {orig for orig, _, _ in truth["duplicates"]}
    review = {r["path"]: r for r in plan if r["action"] == "review-label"}
    assert {it["path"] for it in report["label_issues"]["issues"]} <= set(review)
    outl = [r for r in plan if r["action"] == "review-outlier"]
    assert len(outl) == len(report["outliers"]["flagged"])
    assert all(r["action"] in ("drop-duplicate", "review-label", "review-outlier")
               for r in plan)
    assert all(0.0 <= float(r["score"]) <= 2.0 for r in plan)


def test_report_is_self_contained_html_with_every_section(audited):
    from embedpipe.audit.report import SECTIONS

    _, out, _, _, _, _ = audited
    text = (out / "report.html").read_text()
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in text
    assert "<script" not in text and "http://" not in text.replace(
        'xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    assert text.count("data:image/jpeg;base64,") >= 20  # thumbnails inline
    assert '<svg id="map-svg"' in text


def test_missing_image_files_show_as_missing_and_images_option(planted, tmp_path):
    data, store, truth = planted
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    gone = truth["duplicates"][0][1]
    (moved / gone).unlink()
    audit_ok(store, "--out", tmp_path / "a", "--images", moved, "--no-map", "-q")
    text = (tmp_path / "a" / "report.html").read_text()
    assert f'<div class="missing" title="{gone}">missing file</div>' in text
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert report["images_root"] == str(moved) and report["map"] == {"skipped": "--no-map"}
    assert '<section id="map">' in text
    # the images moved and no --images: the report has no thumbnails, and the terminal says
    # so even with -q (an attack's finding 12: only the HTML said it)
    res = audit_ok(store, "--out", tmp_path / "b", "--images", tmp_path / "elsewhere",
                   "--no-map", "-q")
    assert (f"note: image folder {tmp_path / 'elsewhere'} not found: thumbnails are missing "
            "(pass --images DIR if the images moved)") in res.output, res.output


_BLOCKED_RUN = """
import sys
BLOCKED = sys.argv.pop(1).split(",")
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(name + " is not installed on this machine (test)")
sys.meta_path.insert(0, _Block())
from embedpipe.cli import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("IMPORTED=" + ",".join(sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))),
      file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("blocked", [pytest.param("torch", marks=pytest.mark.slow),  # ~24 s
                                     "torch,cleanlab,umap"])
def test_audit_runs_without_torch_and_without_the_optional_extra(planted, tmp_path, blocked):
    """torch is never imported; without cleanlab and umap-learn the audit falls back to its
    own confident-learning ranking and t-SNE and still finds the flipped labels."""
    _, store, truth = planted
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_RUN, blocked, "audit", str(store),
                           "--out", str(tmp_path / "r"), "--fix-plan", "-q"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED=\n" in proc.stderr + "\n", proc.stderr[-500:]
    assert (tmp_path / "r" / "report.html").is_file()
    assert (tmp_path / "r" / "fix_plan.csv").is_file()
    rep = json.loads((tmp_path / "r" / "audit.json").read_text())
    if "cleanlab" in blocked:
        assert "cleanlab not installed" in rep["label_issues"]["method"]
        assert rep["map"]["method"] == "t-SNE (scikit-learn)"
        top = {it["path"] for it in rep["label_issues"]["issues"][:2 * len(
            truth["flipped"]) + len(truth["foreign"])]}
        assert sum(p in top for p, *_ in truth["flipped"]) >= 3, top


def test_bad_inputs_give_one_line_errors(planted, tmp_path):
    _, store, _ = planted
    one_line_error(cli("audit", tmp_path / "nope.h5"), "nope.h5", "embedpipe extract")
    one_line_error(cli("audit", store, "--threshold", "1.5", "-o", tmp_path / "x"),
                   "--threshold 1.5")
    one_line_error(cli("audit", store, "-k", "0", "-o", tmp_path / "x"), "-k 0")
    one_line_error(cli("audit", store, "--folds", "1", "-o", tmp_path / "x"), "--folds 1")
    one_line_error(cli("audit", store, "--head", "nohead", "-o", tmp_path / "x"), "nohead")
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_error(cli("audit", store, "-o", blocker / "sub"), "--out")
    not_a_store = tmp_path / "x.h5"
    not_a_store.write_text("hello")
    one_line_error(cli("audit", not_a_store, "-o", tmp_path / "y"), "x.h5")


def _small_store(planted, tmp_path: Path, name: str, files: list[str], flat: bool) -> Path:
    """A store of a few of the planted images: in one flat folder (unlabeled) or in one
    class folder (a single class)."""
    from embedpipe.extract import ExtractOptions, run

    data = planted[0]
    folder = tmp_path / name
    for rel in files:
        dst = folder / Path(rel).name if flat else folder / "one" / Path(rel).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / rel, dst)
    store = tmp_path / f"{name}.h5"
    run(folder, store, ExtractOptions(precision="fp32"), progress=False)
    return store


def test_unlabeled_one_class_and_tiny_stores_skip_label_errors_with_a_note(planted, tmp_path):
    data, _, truth = planted
    files = sorted(p.relative_to(data).as_posix() for p in (data / "train").rglob("train_*"))
    # an unlabeled store: duplicates and outliers still work, label errors are skipped
    orig, copy, _ = truth["duplicates"][0]
    unl = _small_store(planted, tmp_path, "flat", files[:6] + [orig, copy], flat=True)
    res = audit_ok(unl, "-o", tmp_path / "u", "-q")
    assert "label errors skipped" in res.output
    rep = json.loads((tmp_path / "u" / "audit.json").read_text())
    assert "no labels" in rep["label_issues"]["skipped"]
    assert rep["summary"]["duplicate_groups"] >= 1 and rep["balance"]["unlabeled"] == 8
    assert any("label errors skipped" in n for n in rep["notes"])
    assert '<section id="label-issues">' in (tmp_path / "u" / "report.html").read_text()
    # one class
    one = _small_store(planted, tmp_path, "one", files[:5], flat=False)
    res = audit_ok(one, "-o", tmp_path / "o", "-q", "--fix-plan")
    rep = json.loads((tmp_path / "o" / "audit.json").read_text())
    assert "at least 2 classes" in rep["label_issues"]["skipped"]
    assert (tmp_path / "o" / "fix_plan.csv").read_text().startswith("path,action,")
    # a single image
    single = _small_store(planted, tmp_path, "single", files[:1], flat=False)
    res = audit_ok(single, "-o", tmp_path / "s", "-q")
    rep = json.loads((tmp_path / "s" / "audit.json").read_text())
    assert rep["rows"] == 1 and rep["summary"]["duplicate_groups"] == 0
    assert any("one row" in n for n in rep["notes"])


_CHECK_JS = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const b = document.body;
  b.setAttribute("data-images", imgs.length);
  b.setAttribute("data-bad-images", imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length);
  b.setAttribute("data-circles", document.querySelectorAll("#map-svg circle").length);
  b.setAttribute("data-sections", [...document.querySelectorAll("section[id]")]
    .filter(s => s.getBoundingClientRect().height > 0).map(s => s.id).join(","));
});
</script>"""


@pytest.mark.slow
def test_report_renders_in_headless_chromium_without_console_errors(audited, tmp_path):
    """Load report.html in Debian's chromium (headless): every section is laid out, every
    thumbnail decodes, the map has its dots, and the console stays silent. A copy of the
    report gets a small probe script (the report itself has none)."""
    import re

    from embedpipe.audit.report import SECTIONS

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run does)")
    _, out, report, _, _, _ = audited
    page = tmp_path / "probe.html"
    page.write_text((out / "report.html").read_text().replace("</body>", _CHECK_JS + "</body>"))
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stdout[:500]
    attrs = dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', body.group(1)))
    assert attrs["data-sections"].split(",") == list(SECTIONS), attrs
    assert int(attrs["data-images"]) >= 20 and attrs["data-bad-images"] == "0", attrs
    assert int(attrs["data-circles"]) >= report["map"]["rows"], attrs


def test_blockwise_search_equals_the_full_similarity_matrix(planted):
    """The bounded-memory scan (7-row blocks here) finds exactly what the full N x N matrix
    gives: the same pairs above the threshold, the same kNN distances."""
    import numpy as np

    from embedpipe.audit import neighbors
    from embedpipe.store import open_store

    s = open_store(planted[1])
    Xn, Xd = neighbors.normalize(s.features), neighbors.duplicate_view(s.features)
    ref = np.asarray(s.splits) == "train"
    n = len(Xn)
    sc = neighbors.scan(Xn, Xd, s.labels, ref, threshold=0.9, k=3, block_bytes=7 * 4 * n)
    D = Xd @ Xd.T
    i, j = np.nonzero(np.triu(D >= 0.9, 1))
    assert {tuple(p) for p in sc.pairs.tolist()} == set(zip(i.tolist(), j.tolist()))
    S = Xn @ Xn.T
    np.fill_diagonal(S, -np.inf)
    top = -np.sort(-S[:, ref], axis=1)[:, :3]
    np.testing.assert_allclose(sc.knn_all, (1 - top).mean(axis=1), atol=1e-5)
    c = s.labels[0]
    mine = ref & (s.labels == c)
    topc = -np.sort(-S[0, mine])[:3]
    assert abs(sc.knn_class[0] - (1 - topc).mean()) < 1e-5


def test_every_fitting_part_runs_under_the_blas_thread_rule_of_cv(tmp_path, monkeypatch):
    """audit's label search (and its neighbour blocks and map) fit with one BLAS thread on a
    small store, the rule of cv and fit (heads.fit.blas_threads): without it a busy 2-core
    machine spin-waited 40 s on 400 rows instead of 0.6 s. Checked inside the fits themselves
    (threadpoolctl's view of the BLAS pools), not by timing."""
    import numpy as np
    from threadpoolctl import threadpool_info

    from clitools import ok
    from embedpipe import heads
    from embedpipe.audit import embedmap, neighbors

    rng = np.random.default_rng(0)
    n, classes = 120, 3
    y = np.arange(n) % classes
    X = (rng.normal(size=(n, 16)) + 3 * np.eye(16)[y]).astype(np.float32)
    src = tmp_path / "f.npz"
    np.savez(src, path=np.array([f"c{c}/{i}.png" for i, c in enumerate(y)]),
             label=np.array([f"c{c}" for c in y]), split=np.array(["train"] * n),
             features=X)
    store = tmp_path / "s.h5"
    ok("import-features", src, "-o", store, "-q")

    seen: dict[str, list[int]] = {"fit": [], "scan": [], "map": []}

    def blas() -> int:
        pools = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        assert pools, "no BLAS pool visible to threadpoolctl"
        return max(pools)

    build = heads.build

    def spying_build(*a, **kw):
        est = build(*a, **kw)
        fit = est.fit

        def fit_and_look(*fa, **fkw):
            seen["fit"].append(blas())
            return fit(*fa, **fkw)

        est.fit = fit_and_look
        return est

    scan, draw = neighbors.scan, embedmap.build
    monkeypatch.setattr(heads, "build", spying_build)
    monkeypatch.setattr(neighbors, "scan",
                        lambda *a, **kw: seen["scan"].append(blas()) or scan(*a, **kw))
    monkeypatch.setattr(embedmap, "build",
                        lambda *a, **kw: seen["map"].append(blas()) or draw(*a, **kw))
    ok("audit", store, "--out", tmp_path / "a", "--images", tmp_path)
    assert len(seen["fit"]) == 5 and seen["scan"] and seen["map"], seen
    assert set(seen["fit"]) | set(seen["scan"]) | set(seen["map"]) == {1}, seen
    got = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert got["label_issues"]["folds"] == 5 and got["label_issues"]["rows"] == n
