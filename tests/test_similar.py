"""`embedpipe similar`: nearest stored neighbours of stored paths and of new images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clitools import cli, ok, one_line_error, read_csv
from embedpipe import similar as sim
from embedpipe.store import open_store


def _brute(X: np.ndarray, q: np.ndarray, k: int, skip: int | None) -> tuple[list[int], np.ndarray]:
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    s = Xn @ (q / np.linalg.norm(q))
    if skip is not None:
        s[skip] = -np.inf
    order = np.argsort(-s, kind="stable")[:k]
    return order.tolist(), s[order]


def test_stored_paths_match_brute_force(fmnist_store: Path, tmp_path: Path) -> None:
    st = open_store(fmnist_store)
    queries = [st.paths[3], st.paths[120], st.paths[249]]
    out = tmp_path / "nn.json"
    res = ok("similar", fmnist_store, *queries, "-k", 7, "--format", "json", "-o", out, "-q")
    assert "3 queries" in res.output
    got = json.loads(out.read_text())
    assert got["method"] == "exact"
    assert [q["query"] for q in got["queries"]] == queries
    for q in got["queries"]:
        row = st.paths.index(q["query"])
        want, sims = _brute(st.features.astype(np.float64), st.features[row].astype(np.float64),
                            7, row)
        paths = [n["path"] for n in q["neighbours"]]
        assert q["query"] not in paths  # a stored query is not its own neighbour
        assert paths == [st.paths[i] for i in want]
        np.testing.assert_allclose([n["similarity"] for n in q["neighbours"]], sims, atol=1e-5)
        assert [n["label"] for n in q["neighbours"]] == [st.label_names()[i] for i in want]
    # real features: the nearest neighbours of an image are mostly of its class
    labels = st.label_names()
    hits = [n["label"] == labels[st.paths.index(q["query"])]
            for q in got["queries"] for n in q["neighbours"][:3]]
    assert sum(hits) >= 6, hits


def test_blocked_search_equals_in_memory(fmnist_store: Path) -> None:
    """Exact search reading the store in 7-row blocks from disk gives the same neighbours as
    one block from memory."""
    full = open_store(fmnist_store)
    lazy = open_store(fmnist_store, features=False)
    assert not lazy.features_loaded
    Q = full.features[[0, 50, 100, 200]].astype(np.float32)
    a = sim.exact_search(lazy, Q, 10, exclude=[0, 50, 100, 200], block_rows=7)
    b = sim.exact_search(full, Q, 10, exclude=[0, 50, 100, 200], block_rows=10_000)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    assert all(r not in row for r, row in zip([0, 50, 100, 200], a[0].tolist()))


def test_csv_and_table_output(fmnist_store: Path, tmp_path: Path) -> None:
    st = open_store(fmnist_store, features=False)
    out = tmp_path / "nn.csv"
    ok("similar", fmnist_store, st.paths[10], "-k", 4, "--format", "csv", "-o", out, "-q")
    rows = read_csv(out)
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert {r["query"] for r in rows} == {st.paths[10]}
    sims = [float(r["similarity"]) for r in rows]
    assert sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 for s in sims)
    res = ok("similar", fmnist_store, st.paths[10], "-k", 2, "-q")
    lines = res.output.strip().splitlines()
    assert lines[0].split() == ["query", "rank", "similarity", "label", "split", "path"]
    assert len(lines) == 3 and lines[1].split()[0] == st.paths[10]


def test_new_image_finds_its_stored_copy(fmnist_store: Path, tmp_path: Path) -> None:
    """A new file (a copy of a stored image under another name) is embedded with the store's
    backbone; its nearest stored row is the original, at cosine similarity ~1."""
    st = open_store(fmnist_store, features=False)
    data = fmnist_store.parent / "data"
    target = st.paths[42]
    copy = tmp_path / "query.png"
    shutil.copy(data / target, copy)
    out = tmp_path / "nn.json"
    res = ok("similar", fmnist_store, copy, st.paths[7], "-k", 3, "--format", "json", "-o", out,
             "-q")
    # said, so that a user does not take its own copy for a near-duplicate (an attack's #16)
    assert f"1 query is the same file as a stored image ({copy} is {target})" in res.output
    got = json.loads(out.read_text())["queries"]
    kinds = {q["kind"]: q for q in got}
    assert set(kinds) == {"stored", "image"}
    first = kinds["image"]["neighbours"][0]
    assert first["path"] == target and first["similarity"] > 0.999, first


def test_hnsw_index_is_cached_and_agrees(fmnist_store: Path, tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    store = tmp_path / "s.h5"
    shutil.copy(fmnist_store, store)
    st = open_store(store, features=False)
    qs = st.paths[:20]
    exact = tmp_path / "exact.json"
    hnsw = tmp_path / "hnsw.json"
    ok("similar", store, *qs, "-k", 5, "--format", "json", "-o", exact, "-q")
    ok("similar", store, *qs, "-k", 5, "--format", "json", "-o", hnsw, "--index", "hnsw", "-q")
    cached = list(tmp_path.glob("s.h5.*.hnsw"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    ok("similar", store, *qs, "-k", 5, "--format", "json", "-o", hnsw, "--index", "hnsw", "-q")
    assert cached[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    a = json.loads(exact.read_text())["queries"]
    b = json.loads(hnsw.read_text())["queries"]
    recall = np.mean([len({n["path"] for n in x["neighbours"]} & {n["path"] for n in y["neighbours"]}) / 5
                      for x, y in zip(a, b)])
    assert recall >= 0.95, recall
    assert json.loads(hnsw.read_text())["method"] == "hnsw"


def test_bad_inputs_one_line(fmnist_store: Path, tmp_path: Path) -> None:
    st = open_store(fmnist_store, features=False)
    one_line_error(cli("similar", fmnist_store, "no/such.png"), "no/such.png",
                   "neither a path stored")
    one_line_error(cli("similar", fmnist_store, st.paths[0], "-k", 0), "-k 0")
    one_line_error(cli("similar", fmnist_store, st.paths[0], "--format", "xml"), "--format xml")
    one_line_error(cli("similar", fmnist_store, st.paths[0], "--index", "kd"), "--index kd")
    one_line_error(cli("similar", tmp_path / "none.h5", st.paths[0]), "none.h5")


def test_stored_queries_never_import_torch(fmnist_store: Path, tmp_path: Path) -> None:
    st = open_store(fmnist_store, features=False)
    code = ("import sys; sys.modules['torch'] = None; sys.modules['timm'] = None\n"
            "from embedpipe.cli import main; sys.argv = ['embedpipe'] + sys.argv[1:]; main()")
    res = subprocess.run([sys.executable, "-c", code, "similar", str(fmnist_store),
                          st.paths[5], "-k", "3", "--format", "csv", "-q"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.strip().splitlines()) == 4
