"""`embedpipe merge SHARD... -o STORE`: provenance is checked key by key; the same image under
one path is kept once; different images under one path are refused, or with --on-conflict
first dropped deterministically (the first row wins, in argument order) and recorded, or with
--on-conflict qualify kept under <store name>/<path>. Real Fashion-MNIST images and the
bundled pretrained backbone."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from clitools import cli

from embedpipe.datasets import write_fashion_mnist_folder
from embedpipe.store import open_store


def extract(data: Path, out: Path, *extra: str) -> Path:
    res = cli("extract", data, "-o", out, "-q", "--precision", "fp32", *extra)
    assert res.exit_code == 0, res.output
    return out


def one_line_error(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 real Fashion-MNIST images, one per class."""
    return write_fashion_mnist_folder(tmp_path_factory.mktemp("merge") / "data", per_class=1)


@pytest.fixture(scope="module")
def small_store(small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return extract(small, tmp_path_factory.mktemp("merge_store") / "a.h5")


def test_merge_refuses_shards_of_other_provenance_naming_the_keys(small: Path,
                                                                  small_store: Path,
                                                                  tmp_path: Path):
    bag = small / "bag"
    other_size = extract(bag, tmp_path / "b192.h5", "--img-size", "192")
    random = extract(bag, tmp_path / "random.h5", "--random-init")
    out = tmp_path / "m.h5"
    line = one_line_error(cli("merge", small_store, other_size, "-o", out))
    assert "b192.h5" in line and "data_config.input_size: [3, 224, 224] vs [3, 192, 192]" in line
    line = one_line_error(cli("merge", small_store, random, "-o", out))
    assert "random.h5" in line and "weights_source:" in line and "weights_sha256:" in line
    assert " vs " in line
    assert not out.exists()
    # extending a store of another backbone is refused the same way
    line = one_line_error(cli("merge", small_store, "-o", random))
    assert "weights_sha256:" in line and "pass another -o" in line
    assert len(open_store(random)) == 1


def test_merge_drops_duplicate_paths_first_in_argument_order_wins(small: Path,
                                                                  small_store: Path,
                                                                  tmp_path: Path):
    # a second snapshot of the data: one image replaced by another picture, one made empty
    snap = tmp_path / "snap"
    shutil.copytree(small, snap)
    changed = sorted((snap / "bag").iterdir())[0]
    broken = sorted((snap / "coat").iterdir())[0]
    shutil.copyfile(sorted((snap / "sneaker").iterdir())[0], changed)
    broken.write_bytes(b"")
    b = extract(snap, tmp_path / "b.h5")
    a = small_store
    rel_changed = f"bag/{changed.name}"
    rel_broken = f"coat/{broken.name}"
    fa, fb = (dict(zip(s.paths, s.features)) for s in (open_store(a), open_store(b)))
    assert not np.allclose(fa[rel_changed], fb[rel_changed])

    for order, winner in (((a, b), fa), ((b, a), fb)):
        out = tmp_path / f"m_{order[0].stem}.h5"
        line = one_line_error(cli("merge", *order, "-o", out))  # by default: refused
        assert f"1 path(s) hold different images in different stores (e.g. {rel_changed} in " \
               f"{order[0]} and {order[1]})" in line and "--on-conflict" in line, line
        assert not out.exists()
        res = cli("merge", *order, "-o", out, "--on-conflict", "first")
        assert res.exit_code == 0, res.output
        assert "1 paths are in several stores with different content" in res.output
        assert "10 rows added" in res.output and "1 conflicting duplicates dropped" in res.output
        info = cli("info", out).output
        assert "dropped    1 by merge" in info and f"  {rel_changed} from {order[1]}" in info
        m = open_store(out)
        assert sorted(m.paths) == sorted(fa) and len(set(m.paths)) == 10
        feats = dict(zip(m.paths, m.features))
        np.testing.assert_array_equal(feats[rel_changed], winner[rel_changed])
        # the file that decodes in one store and not in the other keeps its row, no error
        np.testing.assert_array_equal(feats[rel_broken], fa[rel_broken])
        assert m.errors == []
    # merging the same stores again adds nothing; the legacy form `merge STORE SHARD...` too
    # (a: 10 rows, b: 9 rows and the empty file's error record; 1 row differs)
    res = cli("merge", a, b, "-o", tmp_path / "m_a.h5", "--on-conflict", "first")
    assert "0 rows added, 18 already there, 1 conflicting" in res.output, res.output
    one_line_error(cli("merge", tmp_path / "m_a.h5", b))
    res = cli("merge", tmp_path / "m_a.h5", b, "--on-conflict", "first")
    assert "0 rows added, 8 already there, 1 conflicting" in res.output, res.output
    assert len(open_store(tmp_path / "m_a.h5")) == 10
    # every merge that dropped a row says so in `info` (three merges, one row each)
    assert "dropped    3 by merge" in cli("info", tmp_path / "m_a.h5").output


def test_stores_of_two_folders_sharing_paths_are_refused_or_qualified_never_silently_cut(
        tmp_path: Path):
    """Two folders whose files share relative paths (class/test_NNNNN.png in both, different
    pictures): before, merge kept 12 of 16 images, exit 0, and recorded nothing."""
    one = write_fashion_mnist_folder(tmp_path / "one", per_class=1)
    two = write_fashion_mnist_folder(tmp_path / "two", per_class=1, seed=1)
    for cls in sorted(p.name for p in two.iterdir()):  # give `two` the same file names
        for mine, theirs in zip(sorted((two / cls).iterdir()), sorted((one / cls).iterdir())):
            mine.rename(two / cls / theirs.name)
    a, b = extract(one, tmp_path / "a.h5"), extract(two, tmp_path / "b.h5")
    fa, fb = (dict(zip(s.paths, s.features)) for s in (open_store(a), open_store(b)))
    assert set(fa) == set(fb) and len(fa) == 10
    out = tmp_path / "m.h5"
    line = one_line_error(cli("merge", a, b, "-o", out))
    assert "10 path(s) hold different images" in line and "--on-conflict qualify" in line
    assert not out.exists()
    # extending a store: refused the same way, the store untouched
    shutil.copy(a, tmp_path / "ext.h5")
    one_line_error(cli("merge", tmp_path / "ext.h5", b))
    assert len(open_store(tmp_path / "ext.h5")) == 10

    res = cli("merge", a, b, "-o", out, "--on-conflict", "qualify")
    assert res.exit_code == 0, res.output
    assert "20 rows added" in res.output and f"{a} → a/" in res.output, res.output
    assert "already holds under another path" not in res.output  # all the images differ
    m = open_store(out)
    assert len(m) == 20 and len(set(m.paths)) == 20
    feats = dict(zip(m.paths, m.features))
    for prefix, src in (("a/", fa), ("b/", fb)):
        for p, f in src.items():
            np.testing.assert_array_equal(feats[prefix + p], f)
    assert sorted(m.class_counts().values()) == [2] * 10
    # the same store twice: the names are made unique
    res = cli("merge", a, a, "-o", tmp_path / "aa.h5", "--on-conflict", "qualify")
    assert res.exit_code == 0 and "a-2/" in res.output, res.output
    # ... and every image is kept twice: said (an attack's finding 15), with the way out
    assert ("note: 10 rows added are images another of the stores already holds under "
            f"another path (e.g. a-2/{sorted(fa)[0]})") in res.output, res.output
    assert len(open_store(tmp_path / "aa.h5")) == 20
    line = one_line_error(cli("merge", a, b, "-o", out, "--on-conflict", "sometimes"))
    assert "error, first, qualify" in line


def test_a_store_with_labels_past_its_class_names_is_refused_before_anything_is_written(
        small_store: Path, tmp_path: Path):
    """A damaged input whose labels index no class name (before: IndexError, exit 1): one line
    naming it, exit 2, and the output store is not created."""
    from embedpipe.store import StoreWriter, read_identity

    s = open_store(small_store)
    bad = tmp_path / "bad.h5"
    with StoreWriter.open(bad, read_identity(small_store), versions={}) as w:
        w.class_ids(s.classes[:2])
        w.append(s.features[:3], paths=["x/1.png", "x/2.png", "x/3.png"], labels=[0, 1, 7],
                 hashes=["a", "b", "c"], splits=["", "", ""], mtime_ns=[0] * 3, size=[0] * 3)
    out = tmp_path / "out.h5"
    line = one_line_error(cli("merge", small_store, bad, "-o", out))
    assert str(bad) in line and "label 7" in line and "2 class names" in line, line
    assert not out.exists()


def test_info_describes_a_merge_run(small_store: Path, tmp_path: Path):
    out = tmp_path / "m.h5"
    assert cli("merge", small_store, "-o", out).exit_code == 0
    res = cli("info", out)
    assert res.exit_code == 0 and "None" not in res.output, res.output
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith("last run")]
    assert "merge of 1 store(s) done at 20" in line, line
