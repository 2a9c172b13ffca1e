"""What a head file guarantees (heads/artifacts.py): whatever `fit` writes, `predict` loads and
predicts the same; every part of the file is covered by a digest (accidental damage is
refused); a file whose parts disagree (an edited compact form or manifest, a schema naming an
untrusted type) is refused on every path, the fast compact one included, even when the digest
was recomputed to match."""

from __future__ import annotations

import hashlib
import io
import json
import operator
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from clitools import cli, ok, one_line_error

from embedpipe.heads import artifacts
from embedpipe.store import open_store

HEAD_MEMBER = "embedpipe/head.json"


@pytest.fixture(scope="module")
def heads_dir(fmnist_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("artifacts")
    for head in ("logreg", "svm"):
        ok("fit", fmnist_store, "--head", head, "-o", d / f"{head}.skops", "-q")
    return d


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def rewrite(path: Path, parts: dict[str, bytes], reseal: bool = True) -> Path:
    """Write ``parts`` as a zip at ``path``; with ``reseal``, recompute the digest in the head
    member over every other member, as someone editing the file on purpose would."""
    if reseal:
        h = hashlib.sha256()
        for name in sorted(parts):
            if name != HEAD_MEMBER:
                h.update(name.encode() + b"\0" + parts[name] + b"\0")
        head = json.loads(parts[HEAD_MEMBER])
        head["sha256"] = h.hexdigest()
        parts = {**parts, HEAD_MEMBER: json.dumps(head).encode()}
    with zipfile.ZipFile(path, "w") as z:
        for name, data in parts.items():
            z.writestr(name, data)
    return path


def predict_store(head: Path, store: Path, out: Path):
    return cli("predict", head, "--store", store, "-o", out, "-q")


def test_untrusted_types_in_the_schema_are_refused_even_on_the_compact_path(
        heads_dir: Path, fmnist_store: Path, tmp_path: Path):
    """os.system, builtins.eval and operator.methodcaller written into the skops pipeline of
    a head with a compact form (digest recomputed): refused in one line, nothing runs."""
    from embedpipe.heads import artifacts

    good = members(heads_dir / "logreg.skops")
    head = artifacts.load(heads_dir / "logreg.skops")
    sio = artifacts._skops_io()
    for name, evil in (("os.system", os.system), ("eval", eval),
                       ("methodcaller", operator.methodcaller("touch"))):
        est = head.estimator
        est.evil = evil  # an attribute skops writes into the schema
        tmp = tmp_path / "evil.skops"
        sio.dump({"format": "embedpipe-head", "format_version": 1,
                  "manifest": head.manifest, "estimator": est}, tmp)
        del est.evil
        bad = {**members(tmp), **{k: v for k, v in good.items() if k.startswith("embedpipe/")}}
        path = rewrite(tmp_path / f"{name}.skops", bad)
        out = tmp_path / "p.csv"
        line = one_line_error(predict_store(path, fmnist_store, out), str(path),
                              "refusing to load", "types embedpipe does not trust")
        assert name in line, line
        assert not out.exists()


def test_permuted_compact_weights_are_refused(heads_dir: Path, fmnist_store: Path,
                                              tmp_path: Path):
    """The compact form's weight matrix with its columns permuted (digest recomputed): before,
    40 of 60 predictions changed silently; now the file is refused on both paths."""
    parts = members(heads_dir / "logreg.skops")
    spec = json.loads(parts["embedpipe/compact.json"])
    (w,) = [op["w"] for op in spec["ops"] if op.get("w") is not None and np.load(io.BytesIO(
        parts[f"embedpipe/compact/{op['w']}.npy"])).ndim == 2][:1]
    arr = np.load(io.BytesIO(parts[f"embedpipe/compact/{w}.npy"]))
    buf = io.BytesIO()
    np.save(buf, arr[:, ::-1].copy())
    parts[f"embedpipe/compact/{w}.npy"] = buf.getvalue()
    path = rewrite(tmp_path / "permuted.skops", parts)
    one_line_error(predict_store(path, fmnist_store, tmp_path / "p.csv"), str(path),
                   "parts of this head file disagree", "compact form predicts")
    from embedpipe.heads import artifacts

    with pytest.raises(artifacts.ArtifactError, match="disagree"):
        artifacts.load_compact(path)


def test_an_edited_backbone_record_is_refused(heads_dir: Path, fmnist_store: Path,
                                              tmp_path: Path):
    """The compact form's manifest edited to claim another backbone (Lite1), digest
    recomputed: it no longer matches the pipeline's own record, so it is refused instead of
    letting a Lite0 head run on a Lite1 store."""
    parts = members(heads_dir / "logreg.skops")
    head = json.loads(parts[HEAD_MEMBER])
    head["manifest"]["store_identity"]["model"] = "tf_efficientnet_lite1"
    parts[HEAD_MEMBER] = json.dumps(head).encode()
    path = rewrite(tmp_path / "lite1.skops", parts)
    one_line_error(predict_store(path, fmnist_store, tmp_path / "p.csv"), str(path),
                   "parts of this head file disagree", "store_identity")


@pytest.mark.parametrize("head", ["logreg", "svm"])  # with and without a compact form
def test_accidental_damage_anywhere_in_the_file_is_refused(heads_dir: Path,
                                                           fmnist_store: Path,
                                                           tmp_path: Path, head: str):
    """One byte changed in any member (an array of the pipeline, of the compact form, the
    recorded probe), the digest left as written: refused in one line naming the file."""
    parts = members(heads_dir / f"{head}.skops")
    names = [n for n in parts if n.endswith(".npy")]
    for name in (names[0], names[-1], "embedpipe/probe/X.npy"):
        data = bytearray(parts[name])
        data[-3] ^= 0x10
        path = rewrite(tmp_path / "damaged.skops", {**parts, name: bytes(data)},
                       reseal=False)
        one_line_error(predict_store(path, fmnist_store, tmp_path / "p.csv"), str(path),
                       "damaged")


def test_fit_refuses_what_predict_could_not_load(fmnist_store: Path, tmp_path: Path,
                                                 monkeypatch):
    """knn with a KD or ball tree (a type skops does not trust: its raw index arrays are read
    without bounds checks) is refused before any work; and if a head held any type the loader
    does not trust, fit fails in one line and writes nothing instead of exiting 0."""
    out = tmp_path / "knn.skops"
    for algo in ("kd_tree", "ball_tree", "auto"):
        one_line_error(cli("fit", fmnist_store, "--head", "knn", "--param", f"algorithm={algo}",
                           "--param", "metric=euclidean", "-o", out, "-q"),
                       f"algorithm={algo}", "brute")
    one_line_error(cli("fit", fmnist_store, "--head", "knn", "--param", "algorithm=kd_tree",
                       "--param", "metric=cosine", "-o", out, "-q"), "algorithm=kd_tree")
    from embedpipe.heads import artifacts

    monkeypatch.setattr(artifacts, "TRUSTED_EXTRA", tuple(
        t for t in artifacts.TRUSTED_EXTRA if "SignedSqrt" not in t))
    one_line_error(cli("fit", fmnist_store, "--head", "mlp", "-o", tmp_path / "mlp.skops",
                       "-q"), "cannot be saved so that `predict` loads it", "SignedSqrt")
    assert list(tmp_path.iterdir()) == []


def test_fit_refuses_to_write_over_its_store_and_a_killed_fit_leaves_nothing(
        fmnist_store: Path, tmp_path: Path):
    """fit -o STORE (or a link to it) is refused before any work; the temporary file a killed
    fit left beside the head is removed by the next fit; a head written earlier survives a
    fit that fails."""
    store = tmp_path / "s.h5"
    store.write_bytes(fmnist_store.read_bytes())
    digest = hashlib.sha256(store.read_bytes()).hexdigest()
    (tmp_path / "alias.h5").symlink_to(store)
    for out in (store, tmp_path / "alias.h5"):
        one_line_error(cli("fit", store, "-o", out, "-q"), f"--out {out}", "input")
    assert hashlib.sha256(store.read_bytes()).hexdigest() == digest
    head = tmp_path / "h.skops"
    ok("fit", store, "--head", "centroid", "-o", head, "-q")  # any head: the file is the point
    before = head.read_bytes()
    stale = tmp_path / ".h.skops.999999999.embedpipe.tmp"  # no such pid
    stale.write_bytes(b"PK half a zip")
    one_line_error(cli("fit", store, "--head", "knn", "--param", "n_neighbors=0", "-o", head,
                       "-q"), "n_neighbors")
    assert head.read_bytes() == before
    ok("fit", store, "--head", "ridge", "-o", head, "-q")
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias.h5", "h.skops", "s.h5"]


def test_fit_on_a_full_or_read_only_disk_is_one_line_and_keeps_the_older_head(
        fmnist_store: Path, tmp_path: Path, monkeypatch):
    """ENOSPC while the head is written (injected into skops' dump): one line naming the file,
    exit 2, an older head unchanged, no temporary left; a read-only folder (a real read-only
    tmpfs, where mounting is allowed): one line."""
    import errno
    import subprocess

    from embedpipe.heads import artifacts

    head = tmp_path / "h.skops"
    ok("fit", fmnist_store, "--head", "centroid", "-o", head, "-q")  # any head writes alike
    before = head.read_bytes()
    sio = artifacts._skops_io()
    real_dump = sio.dump

    def full_dump(obj, file, *a, **k):
        Path(file).write_bytes(b"PK\x03\x04 part of a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sio, "dump", full_dump)
    one_line_error(cli("fit", fmnist_store, "--head", "centroid", "-o", head, "-q"),
                   f"--out {head}", "disk full",
                   "free space")
    monkeypatch.setattr(sio, "dump", real_dump)
    assert head.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.skops"]

    ro = tmp_path / "ro"
    ro.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(ro)],
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({res.stderr.strip()})")
    try:
        one_line_error(cli("fit", fmnist_store, "--head", "centroid", "-o", ro / "h.skops",
                           "-q"),
                       f"--out {ro / 'h.skops'}", "cannot write there", "writable folder")
    finally:
        subprocess.run(["umount", "-l", str(ro)], timeout=30)


def _arrays(obj, seen=None):
    """Every numpy array inside a fitted estimator (as registry._walk reaches them)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _arrays(v, seen)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v, seen)
    elif type(obj).__module__.startswith("sklearn"):
        for v in getattr(obj, "__dict__", {}).values():
            yield from _arrays(v, seen)


def _arrays_owners(obj, seen=None):
    """Every scikit-learn object inside a fitted estimator."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple, dict)):
        for v in (obj.values() if isinstance(obj, dict) else obj):
            yield from _arrays_owners(v, seen)
    elif type(obj).__module__.startswith("sklearn"):
        yield obj
        for v in getattr(obj, "__dict__", {}).values():
            yield from _arrays_owners(v, seen)


def test_knn_and_centroid_head_files_hold_no_d_by_d_matrices(fmnist_store: Path,
                                                              tmp_path: Path):
    """The lda step of knn and centroid kept covariance_ and every column of scalings_: two
    1280 x 1280 float64 matrices, a 26.8 MB head file for 200 training rows (269 MB at
    4096-d). What `fit` writes now holds D x (classes - 1) and predicts the same."""
    from embedpipe.heads.fit import fit_configuration
    from embedpipe.heads.registry import as_saved
    from embedpipe.heads.source import Labeled

    store = open_store(fmnist_store)
    X, y = store.features, np.asarray(store.classes)[store.labels]
    for head in ("knn", "centroid"):
        est, _ = fit_configuration(Labeled.in_memory(X[store.splits == "train"],
                                                     y[store.splits == "train"]), head, {})
        before = artifacts._scored(est, X)
        after = artifacts._scored(as_saved(est), X)
        assert np.array_equal(before[0], after[0])
        np.testing.assert_allclose(before[1], after[1], rtol=1e-6, atol=1e-9)
        out = tmp_path / f"{head}.skops"
        ok("fit", fmnist_store, "--head", head, "-o", out, "-q")
        assert out.stat().st_size < 2_000_000, (head, out.stat().st_size)
        res = ok("predict", out, "--store", fmnist_store, "--split", "test", "-o",
                 tmp_path / f"{head}.csv")
        assert "accuracy on the 50 labeled ones" in res.output


@pytest.mark.parametrize("head", ["logreg", "svm", "knn", "centroid", "ridge", "mlp",
                                  "svm+knn"])
def test_a_saved_head_predicts_in_memory_exactly_as_when_loaded(head: str, fmnist_store: Path,
                                                                tmp_path: Path):
    """PCA's components_ is a strided view of the SVD's Vt; a head file loads it C-ordered, and
    float32 products depend on the layout: the PCA transform differed by 1.4e-6, a kNN's
    distance weights on its own rows made that 2.5e-5, and `fit --head svm+knn --param pca=3`
    was refused ("cannot be saved so that `predict` loads it"). Saving lays every fitted array
    out as the file will: the head in memory and the head loaded give the same bits."""
    from embedpipe.heads.fit import fit_configuration
    from embedpipe.heads.source import Labeled

    store = open_store(fmnist_store)
    train = store.splits == "train"
    X = store.features[train]
    y = np.asarray(store.classes)[store.labels[train]]
    est, _ = fit_configuration(Labeled.in_memory(X, y), head, {"pca": 3})
    assert any(not (a.flags.c_contiguous or a.flags.f_contiguous) for a in _arrays(est))
    out = artifacts.save(tmp_path / "h.skops", est, artifacts.new_manifest(head=head),
                         check_rows=X)
    assert all(a.flags.c_contiguous or a.flags.f_contiguous for a in _arrays(est))
    loaded = artifacts.load(out).estimator
    (want, want_scores), (got, got_scores) = (artifacts._scored(e, X) for e in (est, loaded))
    assert np.array_equal(want, got) and np.array_equal(want_scores, got_scores)
    if head in ("knn", "centroid"):  # their lda step keeps what its transform reads
        lda = next(s for s in _arrays_owners(loaded) if type(s).__name__ ==
                   "LinearDiscriminantAnalysis")
        assert lda.scalings_.shape == (X.shape[1], 9) and not hasattr(lda, "covariance_")
    if head == "svm+knn":  # the user's command, end to end
        ok("fit", fmnist_store, "--head", head, "--param", "pca=3", "-o", tmp_path / "c.skops")
        res = predict_store(tmp_path / "c.skops", fmnist_store, tmp_path / "p.csv")
        assert res.exit_code == 0, res.output


@pytest.mark.parametrize("args", [("knn", "pca=1"), ("knn", "pca=2"), ("mlp+knn", "pca=17"),
                                  ("svm+knn", "pca=32")])
def test_knn_heads_after_a_few_dimensions_are_saved(args: tuple[str, str], fmnist_store: Path,
                                                    tmp_path: Path):
    """A kNN scores its own training rows from a distance of 0 or of a rounding error, which
    its distance weights blow up: after a few dimensions (pca=1, 2, 17, 32) a transform's last
    bits moved a training row's scores past 1e-5, and the head file recorded its predictions on
    training rows, so these fits were refused at save (found by helper-29's attack). The file
    records them on rows between training rows; each of these now saves and predicts."""
    head, param = args
    out = tmp_path / "h.skops"
    ok("fit", fmnist_store, "--head", head, "--param", param, "-o", out, "-q")
    assert compact_member(out)
    res = ok("predict", out, "--store", fmnist_store, "--split", "test", "-o", tmp_path / "p.csv")
    assert "accuracy on the 50 labeled ones" in res.output


def compact_member(path: Path) -> bool:
    return "embedpipe/compact.json" in zipfile.ZipFile(path).namelist()


def test_a_compact_form_that_disagrees_after_saving_is_left_out_not_the_head(
        fmnist_store: Path, tmp_path: Path, monkeypatch):
    """The compact form is optional: one that loads or predicts otherwise than the head once
    saved (here: its probe check made to fail) is left out of the file, which is written
    and predicts through scikit-learn, as any head without one."""
    original = artifacts._check_probe

    def failing(path, z, head, estimator, form):
        if form == "compact form":
            raise artifacts._disagree(path, "its compact form scores ... differently")
        return original(path, z, head, estimator, form)

    monkeypatch.setattr(artifacts, "_check_probe", failing)
    out = tmp_path / "svm.skops"
    ok("fit", fmnist_store, "--head", "svm", "-o", out, "-q")
    assert out.is_file() and not compact_member(out)
    monkeypatch.undo()
    assert artifacts.load_compact(out) is None
    res = ok("predict", out, "--store", fmnist_store, "--split", "test", "-o", tmp_path / "p.csv")
    assert "accuracy on the 50 labeled ones" in res.output
    # a pipeline that would not load as it was fitted is still refused, in one line
    monkeypatch.setattr(artifacts, "_check_probe", lambda path, z, head, est, form: (
        _ for _ in ()).throw(artifacts._disagree(path, f"its {form} scores the 16 rows "
                                                      "recorded with it differently")))
    res = cli("fit", fmnist_store, "--head", "svm", "-o", tmp_path / "x.skops", "-q")
    line = one_line_error(res, "cannot be saved so that `predict` loads it",
                          "its pipeline scores the 16 rows", "other --param values")
    assert "damaged or edited" not in line and not (tmp_path / "x.skops").exists()
