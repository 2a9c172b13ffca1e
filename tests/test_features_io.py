"""`embedpipe export-features` / `import-features`: embeddings out and in."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clitools import cli, ok, one_line_error, read_csv
from embedpipe.store import open_store


def _formats() -> list[str]:
    out = ["npz", "npy"]
    try:
        import pyarrow  # noqa: F401
        out.append("parquet")
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("fmt", _formats())
def test_round_trip(fmnist_store: Path, tmp_path: Path, fmt: str) -> None:
    f = tmp_path / f"feats.{fmt}"
    res = ok("export-features", fmnist_store, "-o", f, "-q")
    assert "exported 250 rows" in res.output
    out = tmp_path / "imported.h5"
    res = ok("import-features", f, "-o", out, "--model-name", "lite0-elsewhere", "-q")
    assert "imported 250 rows (10 classes, 1280-d)" in res.output
    a, b = open_store(fmnist_store), open_store(out)
    assert b.paths == a.paths
    assert b.label_names() == a.label_names()
    assert list(b.splits) == list(a.splits)
    assert b.features.dtype == a.features.dtype
    np.testing.assert_array_equal(b.features, a.features)
    # each row keeps its image's sha256; a store of other weights has no record, nor its import
    assert b.hashes == a.hashes and len(set(b.hashes)) > 1
    assert a.finetune_hashes is None and b.finetune_hashes is None
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    assert b.meta["model"] == "imported:lite0-elsewhere"
    assert b.meta["weights_source"] == f"imported:{sha}"
    assert b.meta["feature_dim"] == 1280
    info = json.loads(ok("info", out, "--json").output)
    assert info["rows"] == 250 and info["model"] == "imported:lite0-elsewhere"


def test_heads_and_cv_work_on_imported_features(fmnist_store: Path, tmp_path: Path) -> None:
    f = tmp_path / "feats.npz"
    ok("export-features", fmnist_store, "-o", f, "-q")
    store = tmp_path / "imported.h5"
    ok("import-features", f, "-o", store, "-q")
    head = tmp_path / "h.skops"
    ok("fit", store, "--head", "logreg", "-o", head, "-q")
    preds = tmp_path / "p.csv"
    res = ok("predict", head, "--store", store, "--split", "test", "-o", preds, "-q")
    rows = read_csv(preds)
    assert len(rows) == 50
    acc = np.mean([r["label"] == r["predicted"] for r in rows])
    assert acc >= 0.6, (acc, res.output)  # real Lite0 features of 10 Fashion-MNIST classes
    res = ok("cv", store, "--head", "centroid", "--folds", 3)
    assert "centroid" in res.output
    # images cannot be embedded for a head of imported features: one line, before torch
    img = fmnist_store.parent / "data" / open_store(store, features=False).paths[0]
    one_line_error(cli("predict", head, img), "imported", "--store")


def test_extract_into_an_imported_store_is_refused(fmnist_store: Path, tmp_path: Path) -> None:
    f = tmp_path / "feats.npz"
    ok("export-features", fmnist_store, "-o", f, "-q")
    store = tmp_path / "imported.h5"
    ok("import-features", f, "-o", store, "-q")
    before = store.read_bytes()
    data = tmp_path / "data"
    shutil.copytree(fmnist_store.parent / "data", data)  # the store's own images
    one_line_error(cli("extract", data, "-o", store, "-q"), str(store), "other settings")
    assert store.read_bytes() == before
    # and a second import over it is refused too: a store never mixes features
    one_line_error(cli("import-features", f, "-o", store, "-q"), "already exists")


def _npz(dest: Path, **cols: object) -> Path:
    np.savez(dest, **cols)
    return dest


def test_bad_inputs_one_line(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 8)).astype(np.float32)
    paths = np.array([f"img{i}.png" for i in range(6)])
    labels = np.array(["a", "b", "a", "b", "a", ""])
    out = tmp_path / "s.h5"

    def err(f: Path, *needles: str) -> None:
        line = one_line_error(cli("import-features", f, "-o", out, "-q"), str(f), *needles)
        assert not out.exists(), line

    err(_npz(tmp_path / "nolabel.npz", path=paths, features=X), "no 'label' column")
    err(_npz(tmp_path / "nofeat.npz", path=paths, label=labels), "no 'features' column")
    bad = X.copy()
    bad[2, 3] = np.nan
    err(_npz(tmp_path / "nan.npz", path=paths, label=labels, features=bad), "NaN",
        "img2.png")
    dup = paths.copy()
    dup[4] = dup[1]
    err(_npz(tmp_path / "dup.npz", path=dup, label=labels, features=X), "img1.png",
        "more than once")
    err(_npz(tmp_path / "intlabel.npz", path=paths, label=np.arange(6), features=X),
        "'label' has dtype", "strings")
    err(_npz(tmp_path / "strfeat.npz", path=paths, label=labels,
             features=X.astype(str)), "'features' has dtype")
    err(_npz(tmp_path / "short.npz", path=paths[:5], label=labels, features=X),
        "'path' has shape")
    np.save(tmp_path / "plain.npy", X)
    err(tmp_path / "plain.npy", "structured array")
    digests = np.array([hashlib.sha256(bytes([i])).hexdigest() for i in range(6)])
    upper = digests.copy()
    upper[3] = upper[3].upper()
    err(_npz(tmp_path / "badhash.npz", path=paths, label=labels, hash=upper, features=X),
        "'hash' holds", "not a sha256", "64 lowercase hex")
    err(_npz(tmp_path / "nohash.npz", path=paths, label=labels, features=X,
             finetune_train_hash=digests[:2]), "fine-tuning record", "no 'hash' column")
    err(_npz(tmp_path / "badrec.npz", path=paths, label=labels, hash=digests, features=X,
             finetune_train_hash=np.array(["not a digest"])), "'finetune_train_hash' holds",
        "not a sha256")
    # a file of our own columns without a record imports without one; with one, it is kept
    ok("import-features", _npz(tmp_path / "rec.npz", path=paths, label=labels, hash=digests,
                               features=X, finetune_train_hash=digests[[4, 1]]), "-o", out,
       "-q")
    s = open_store(out)
    assert s.hashes == list(digests)
    assert s.finetune_hashes.astype(str).tolist() == sorted(digests[[1, 4]])
    assert s.finetuned_rows(np.arange(6)).tolist() == [False, True, False, False, True, False]
    out.unlink()
    (tmp_path / "x.csv").write_text("path,label\n")
    err(tmp_path / "x.csv", "unknown format")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return
    ragged = pa.table({"path": list(paths), "label": list(labels),
                       "features": [list(map(float, r)) for r in X[:5]] + [[1.0, 2.0]]})
    pq.write_table(ragged, tmp_path / "ragged.parquet")
    err(tmp_path / "ragged.parquet", "different lengths")
    nulls = pa.table({"path": [None, *paths[1:]], "label": list(labels),
                      "features": [list(map(float, r)) for r in X]})
    pq.write_table(nulls, tmp_path / "nullpath.parquet")
    err(tmp_path / "nullpath.parquet", "'path' holds NoneType")


def test_export_bad_suffix(fmnist_store: Path, tmp_path: Path) -> None:
    one_line_error(cli("export-features", fmnist_store, "-o", tmp_path / "x.csv"),
                   "unknown format", ".parquet")
    assert not list(tmp_path.iterdir())
