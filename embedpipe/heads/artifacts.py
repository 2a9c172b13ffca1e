"""Head files: a fitted scikit-learn estimator plus its manifest, saved and loaded safely.

A head file is a skops archive (a zip of JSON and numpy arrays, no pickle) holding
``{"format": "embedpipe-head", "format_version": 1, "manifest": {...}, "estimator": ...}``.
Loading never runs code from the file: skops rebuilds only types that are trusted, which are
its defaults (scikit-learn estimators, numpy, builtins) plus the short allow-list below of
scikit-learn internals that our heads contain. A file naming any other type, a truncated or
damaged file, or one that is not a head at all is refused with one line.

Needs numpy, scikit-learn and skops only; never torch.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .._io import HDF5_SIGNATURE, same_file
from ..env import HEADS, versions
from ..provenance import (
    HEAD_KEYS,
    HEAD_NOTE_KEYS,
    diff,
    ids_known,
    members,
    short,
    stack_order_error,
)
from ..errors import UserError, first_line

FORMAT = "embedpipe-head"
FORMAT_VERSION = 1
SUFFIX = ".skops"

# scikit-learn internals inside our fitted heads that skops does not trust by default:
# calibration of heads without native probabilities (svm, linear-svm, ridge, centroid), the
# MLP's optimizer state and the ensembles' dict of members. Each is plain data (arrays,
# numbers, a dict); none runs code when rebuilt.
TRUSTED_EXTRA = (
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._TemperatureScaling",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    # mlp with --param solver=sgd (head files of embedpipe's MLPClassifier no longer hold an
    # optimizer; scikit-learn's class in older files does): learning rates and velocities only
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.utils._bunch.Bunch",  # a dict with attribute access (ensembles' named members)
    # the held-out split of calibration on many rows (fewshot.holdout): its parameters only
    "sklearn.model_selection._split.StratifiedShuffleSplit",
    # our stateless power-normalisation step (heads/transforms.py): its n_features_in_ only
    "embedpipe.heads.transforms.SignedSqrt",
    # the mlp head's network: scikit-learn's, trained in float64 (heads/mlp.py); no own state
    "embedpipe.heads.mlp.MLPClassifier",
)

# What must agree between a head and the store (or images) it predicts: otherwise the features
# mean something else. Precision and stored dtype only change features slightly: a warning.


class ArtifactError(UserError):
    """A head file that cannot be used; one line naming the file and the fix."""


class _Disagree(ArtifactError):
    """The parts of a sealed head file disagree (_disagree); ``what``: how, without the fix."""

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what


class _CompactDisagrees(Exception):
    """While saving: the compact form does not load or predict as the head does (save then
    writes the head without it)."""


@dataclass
class HeadFile:
    path: Path
    estimator: Any
    manifest: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.estimator.classes_]

    @property
    def identity(self) -> dict[str, Any]:
        return self.manifest["store_identity"]

    def fitted_row_keys(self) -> Any:
        """The record of the rows this head was fitted on (save's ``fitted_rows``): a sorted
        uint64 array of row_keys, or None for a head written without one (older heads) or
        whose record cannot be read. Read with zipfile and numpy only (no skops, no torch);
        the file's seal, checked when it was loaded, covers it."""
        import io
        import zipfile

        import numpy as np

        rec = (self.manifest.get("training") or {}).get(FITTED_ROWS_KEY)
        if not isinstance(rec, dict):
            return None
        try:
            with zipfile.ZipFile(self.path) as z:
                keys = np.load(io.BytesIO(z.read(FITTED_ROWS)), allow_pickle=False)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            return None
        if keys.dtype != np.uint64 or keys.ndim != 1 or len(keys) != rec.get("rows"):
            return None
        return keys


class _NoTorch:
    """A meta-path finder that makes ``import torch`` fail (see _skops_io)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden while loading skops)",
                                      name=name)
        return None


@contextlib.contextmanager
def _torch_hidden() -> Iterator[None]:
    finder = _NoTorch()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def _skops_io() -> Any:
    """``skops.io``, imported without importing torch.

    skops builds its trusted-type list from ``sklearn.utils.all_estimators()``, whose package
    walk imports scikit-learn's vendored array-API shim for torch and, through it, torch itself
    (~2 s and ~1 GiB here) whenever torch is installed. The walk skips packages that fail to
    import, so hiding torch during that one import gives the same list as on a machine without
    torch, and keeps the prediction path torch-free.
    """
    if "skops.io" in sys.modules or "torch" in sys.modules:
        import skops.io

        return skops.io
    with _torch_hidden():
        import skops.io
    return skops.io



# The rows a head was fitted on, by their images' content: row_keys of the store's row hashes
# (the sha256 of each image's bytes, the digest `finetune` records too), one .npy member of
# the head file (covered by its seal), described in the manifest's training[FITTED_ROWS_KEY]
FITTED_ROWS = "embedpipe/fitted_rows.npy"
FITTED_ROWS_KEY = "row_hashes"


def _nibbles() -> Any:
    """A 256-entry table: a hex digit's byte → its value (0-15), any other byte → 255."""
    import numpy as np

    table = np.full(256, 255, dtype=np.uint8)
    for i, c in enumerate(b"0123456789abcdef"):
        table[c] = i
    for i, c in enumerate(b"ABCDEF"):
        table[c] = 10 + i
    return table


def row_keys(hashes: Any) -> tuple[Any, Any]:
    """(keys, valid) for store row hashes ``hashes`` (sha256 hex digests, str or bytes): each
    digest's first 8 bytes as a uint64 (N,), and whether the row has a digest at all (64 hex
    digits; "" or anything else: False, its key 0). Vectorized: about 2 s per million rows
    on a busy 2-core machine (small beside a fit on them). 8 bytes a row keep a record of a
    million training rows at 8 MB; two different images share a key with probability 2^-64,
    so a scored row that is not in a record of n rows matches one by chance with probability
    at most n / 2^64 (a million-row record: 5e-14 per row; over a million scored rows, one
    false match in about 20 million such predictions)."""
    import numpy as np

    try:  # str or bytes digests as they are (ascii)
        h = np.asarray(hashes, dtype="S64")
    except (UnicodeEncodeError, TypeError, ValueError):
        h = np.array([x if isinstance(x, bytes) else str(x).encode("ascii", "replace")
                      for x in hashes], dtype="S64")
    h = h.reshape(-1)
    if not len(h):
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=bool)
    nib = _nibbles()[h.view(np.uint8).reshape(len(h), 64)]
    valid = (nib < 16).all(axis=1)
    keys = np.zeros(len(h), dtype=np.uint64)
    for i in range(16):
        keys = (keys << np.uint64(4)) | np.where(valid, nib[:, i], 0).astype(np.uint64)
    return keys, valid


def fitted_rows_record(hashes: Any) -> Any:
    """The record save keeps of the rows a head was fitted on: the sorted, unique row_keys of
    their ``hashes`` (rows without a digest left out)."""
    import numpy as np

    keys, valid = row_keys(hashes)
    return np.unique(keys[valid])


def fitted_mask(record: Any, hashes: Any) -> Any:
    """Which rows of ``hashes`` (store row hashes) are in ``record`` (fitted_rows_record; a
    HeadFile's fitted_row_keys): a boolean mask; rows without a digest never match."""
    import numpy as np

    keys, valid = row_keys(hashes)
    if not len(record) or not len(keys):
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(record, keys), len(record) - 1)
    return valid & (record[at] == keys)


def save(path: str | Path, estimator: Any, manifest: dict[str, Any],
         check_rows: Any = None, inputs: Any = (), fitted_rows: Any = None) -> Path:
    """Write a head file atomically (a temporary file beside ``path``, renamed into place once
    complete and checked: a crash or a full disk never leaves half a file at ``path``, and an
    older head there survives any failure). ``path`` being one of ``inputs`` (the stores it
    was fitted on; by path, symlink or hard link) is refused first (OutputError).

    With ``check_rows`` (some training features), the head's compact form (compact.py) is
    written too when it has one and predicts like the estimator on those rows: then
    `predict --store` needs neither scikit-learn nor skops (see load_compact). Every head file
    is then sealed (see _seal: a digest of all its parts and the head's own predictions on a
    few of those rows), and loaded back with exactly the rules `predict` uses, predicting the
    same, before it is renamed into place: whatever `fit` writes, `predict` loads; otherwise
    ArtifactError names what the file would hold.

    ``fitted_rows``: the row hashes (store.hashes) of the rows it was fitted on; the file then
    records them (fitted_rows_record, member FITTED_ROWS, described in the manifest's
    training[FITTED_ROWS_KEY]), so that `predict --store` counts the scored rows it was
    fitted on in any store of those images (HeadFile.fitted_row_keys)."""
    from .. import _io

    from .registry import as_saved

    sio = _skops_io()
    path = Path(path)
    as_saved(estimator)  # no lda_cache directory in a head file; arrays laid out as loaded
    manifest = json.loads(json.dumps(manifest, default=_jsonable))  # plain data only
    record = None
    if fitted_rows is not None:
        record = fitted_rows_record(fitted_rows)
        manifest.setdefault("training", {})[FITTED_ROWS_KEY] = {
            "rows": int(len(record)), "member": FITTED_ROWS,
            "key": "the first 8 bytes of each image's sha256 (big-endian uint64), sorted, "
                   "unique"}
    head = {"format": FORMAT, "format_version": FORMAT_VERSION, "manifest": manifest}
    rows = None if check_rows is None else _probe_rows(check_rows)
    with _io.atomic_output(path, inputs=inputs) as tmp:
        for with_compact in (check_rows is not None, False):
            sio.dump({**head, "estimator": estimator}, tmp)  # a new file each time
            if record is not None:
                import zipfile

                with zipfile.ZipFile(tmp, "a") as z:
                    z.writestr(FITTED_ROWS, _npy(record))
            if with_compact:
                with_compact = _add_compact(tmp, estimator, head, check_rows)
            _seal(tmp, estimator, head, rows)
            try:
                _verify_saved(tmp, path, estimator, rows)
                break
            except _CompactDisagrees:  # the compact form is optional: the head goes without
                if not with_compact:
                    raise
    return path


PROBE_ROWS = 16  # rows (between training rows) whose predictions a head file records (_seal)
PROBE_X = "embedpipe/probe/X.npy"
PROBE_PREDICTED = "embedpipe/probe/predicted.npy"
PROBE_SCORES = "embedpipe/probe/scores.npy"


def _probe_rows(rows: Any) -> Any:
    """PROBE_ROWS rows to record a head's predictions on: midpoints of neighbouring rows among
    PROBE_ROWS + 1 spread over ``rows`` (training rows), in their dtype; the rows themselves
    when there are fewer than 2. Rows the head has not seen: a kNN's training rows are their
    own nearest neighbours, at a distance of 0 or of a rounding error, which its distance
    weights turn into scores that move with the last bits of any transform before it."""
    import numpy as np

    rows = np.asarray(rows)
    if len(rows) < 2:
        return np.ascontiguousarray(rows)
    pick = np.unique(np.linspace(0, len(rows) - 1, min(len(rows), PROBE_ROWS + 1)).astype(int))
    mid = (rows[pick[:-1]].astype(np.float64) + rows[pick[1:]]) / 2
    return np.ascontiguousarray(mid.astype(rows.dtype, copy=False))


def _npy(arr: Any) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def _scored(estimator: Any, X: Any) -> tuple[Any, Any]:
    import numpy as np

    from .compact import predict_scored

    pred, scores, _, _ = predict_scored(estimator, X)
    return np.asarray(pred).astype("U"), np.asarray(scores, dtype=np.float64)


def _seal(path: Path, estimator: Any, head: dict[str, Any], rows: Any) -> None:
    """Add the head member (compact.HEAD_MEMBER): format, manifest, ``probe`` (the estimator's
    own predicted classes and scores on a few training rows, stored beside them as .npy) and
    ``sha256``, a digest over the names and bytes of every other member of the file (the skops
    pipeline, the compact form, the probe)."""
    import zipfile

    from . import compact

    with zipfile.ZipFile(path, "a") as z:
        if rows is not None and len(rows):
            pred, scores = _scored(estimator, rows)
            z.writestr(PROBE_X, _npy(rows))
            z.writestr(PROBE_PREDICTED, _npy(pred))
            z.writestr(PROBE_SCORES, _npy(scores))
    with zipfile.ZipFile(path) as z:
        sealed = {**head, "probe": rows is not None and len(rows) > 0,
                  "sha256": _digest(z, exclude=(compact.HEAD_MEMBER,))}
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(compact.HEAD_MEMBER, json.dumps(sealed))


def _verify_saved(tmp: Path, path: Path, estimator: Any, rows: Any) -> None:
    """Load the file just written as `predict` will (both forms) and check it predicts like
    ``estimator``; ArtifactError (naming ``path``) when its pipeline does not,
    _CompactDisagrees when only its compact form does not."""
    def refused(why: str) -> ArtifactError:
        return ArtifactError(f"{path}: this head cannot be saved so that `predict` loads it "
                             f"({why[:300]}); fit it with other --param values (see "
                             "`embedpipe heads`)")

    try:
        full = load(tmp)
    except _Disagree as e:
        raise refused(e.what) from None
    except ArtifactError as e:
        raise refused(str(e).split(": ", 1)[-1]) from None
    try:
        fast = load_compact(tmp)
    except ArtifactError:
        raise _CompactDisagrees() from None
    if rows is not None and len(rows):
        import numpy as np

        want = _scored(estimator, rows)
        for form in (full, fast):
            if form is None:
                continue
            got = _scored(form.estimator, rows)
            if not (np.array_equal(got[0], want[0]) and np.allclose(
                    got[1], want[1], rtol=1e-5, atol=1e-6, equal_nan=True)):
                if form is fast:
                    raise _CompactDisagrees()
                raise ArtifactError(f"{path}: the saved head predicts differently from the "
                                    "fitted one (a bug in embedpipe or skops: please report "
                                    "it); nothing was written")


def _add_compact(path: Path, estimator: Any, head: dict[str, Any], rows: Any) -> bool:
    import io
    import zipfile

    import numpy as np

    from . import compact

    exported = compact.export(estimator)
    if exported is None:
        return False
    spec, arrays = exported
    rows = np.asarray(rows)
    # scored on the midpoints of neighbouring training rows, rows the head has not seen (a
    # kNN's training rows are their own nearest neighbours, at distance 0 or of a rounding
    # error: their scores are ill-conditioned); a kNN's training rows' classes are checked too
    # (other heads score them as any row: checking them too doubled an RBF svm's check, whose
    # kernel rows against every support vector are most of a save, bench/results/save_check.md)
    mids = ((rows[:-1] + rows[1:]) / 2).astype(rows.dtype, copy=False)
    if not compact.agrees(estimator, compact.load(spec, arrays), mids if len(mids) else rows,
                          classes_only=(rows if compact.scores_training_rows_apart(estimator)
                                        else None)):
        return False
    with zipfile.ZipFile(path, "a") as z:
        sizes: dict[int, list[str]] = {}  # the pipeline's own arrays, by size
        for info in z.infolist():
            if info.filename.endswith(".npy"):
                sizes.setdefault(info.file_size, []).append(info.filename)
        members, data = {}, {}
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            data[name] = buf.getvalue()
            same = next((m for m in sizes.get(len(data[name]), ()) if z.read(m) == data[name]),
                        None)
            if same is not None and len(data[name]) >= 1 << 16:  # large ones: stored once
                members[name] = same
        if members:
            spec = {**spec, "members": members}
        z.writestr(compact.SPEC_MEMBER, json.dumps(spec))
        for name, blob in data.items():
            if name not in members:
                z.writestr(f"{compact.ARRAY_PREFIX}{name}.npy", blob)
    return True


def _digest(z: Any, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over the names and contents of a head file's members (but ``exclude``), in name
    order; reading them also checks each member's CRC-32."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(z.namelist()):
        if name not in exclude:
            h.update(name.encode() + b"\0" + z.read(name) + b"\0")
    return h.hexdigest()


# What a head's skops schema may name for the compact path to skip skops: plain containers
# and scalars, numpy, and scikit-learn classes other than the tree structures that skops
# itself does not trust (raw index arrays read without bounds checks). Anything else (a
# function such as os.system or builtins.eval, operator.methodcaller, another package) sends
# the file through skops' own trust check (load), which refuses it.
_PLAIN_BUILTINS = {"dict", "list", "tuple", "str", "int", "float", "bool", "NoneType",
                   "bytes", "complex"}
_PLAIN_LOADERS = {"DictNode", "ListNode", "TupleNode", "JsonNode", "CachedNode", "NdArrayNode",
                  "DtypeNode", "ObjectNode", "ReduceNode", "NoneNode", "BunchNode",
                  "SparseMatrixNode", "RandomStateNode", "RandomGeneratorNode", "SetNode",
                  "SliceNode", "SGDNode", "LossNode", "TypeNode"}


def _schema_types(node: Any, out: set[tuple[str, str, str]]) -> None:
    if isinstance(node, dict):
        if "__module__" in node or "__class__" in node or "__loader__" in node:
            out.add((str(node.get("__module__")), str(node.get("__class__")),
                     str(node.get("__loader__"))))
        for v in node.values():
            _schema_types(v, out)
    elif isinstance(node, list):
        for v in node:
            _schema_types(v, out)


def _plain_schema(schema: Any) -> bool:
    """Whether every type a skops schema names is plain (see _PLAIN_BUILTINS and above)."""
    found: set[tuple[str, str, str]] = set()
    _schema_types(schema, found)
    for module, cls, loader in found:
        if loader not in _PLAIN_LOADERS or "Tree" in cls:
            return False
        if module == "builtins":
            if cls not in _PLAIN_BUILTINS:
                return False
        elif not (module == "numpy" or module.startswith(("numpy.", "sklearn."))
                  or f"{module}.{cls}" in TRUSTED_EXTRA):
            return False
    return True


def _schema_value(node: Any, ids: dict[Any, Any]) -> Any:
    """A plain value (dicts, lists, JSON scalars) decoded from its skops schema node."""
    loader = node.get("__loader__")
    if loader == "DictNode":
        value: Any = {k: _schema_value(v, ids) for k, v in node["content"].items()}
    elif loader in ("ListNode", "TupleNode"):
        value = [_schema_value(v, ids) for v in node["content"]]
    elif loader == "JsonNode":
        value = json.loads(node["content"])
    elif loader == "CachedNode":
        return ids[node["content"]]
    else:
        raise ValueError(f"not plain data: {loader}")
    ids[node.get("__id__")] = value
    return value


def _skops_manifest(z: Any) -> Any:
    """The manifest inside a head file's skops pipeline, read from its schema (no skops)."""
    schema = json.loads(z.read("schema.json"))
    return _schema_value(schema["content"]["manifest"], {})


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _disagree(path: Any, what: str) -> ArtifactError:
    return _Disagree(f"{path}: the parts of this head file disagree ({what}); it was "
                     "damaged or edited after `embedpipe fit` wrote it: make the head "
                     "again with `embedpipe fit`", what)


def _read_seal(path: Any, z: Any) -> dict[str, Any] | None:
    """The head member of a sealed head file, after checking the digest of every other member
    (ArtifactError when it differs); None for a file without one (written before the seal:
    it is loaded through skops only)."""
    import zipfile

    from . import compact

    if compact.HEAD_MEMBER not in z.namelist():
        return None
    try:
        head = json.loads(z.read(compact.HEAD_MEMBER))
    except (ValueError, zipfile.BadZipFile, OSError) as e:
        raise ArtifactError(f"{path}: head file is damaged ({_why(e)}); make the head again "
                            "with `embedpipe fit`") from None
    if not isinstance(head, dict) or "sha256" not in head:
        return None
    try:
        digest = _digest(z, exclude=(compact.HEAD_MEMBER,))
    except (zipfile.BadZipFile, OSError, EOFError) as e:  # a member's CRC-32 fails
        raise ArtifactError(f"{path}: head file is damaged ({_why(e)}); make the head again "
                            "with `embedpipe fit`") from None
    if digest != head["sha256"]:
        raise ArtifactError(f"{path}: head file is damaged: its contents no longer match the "
                            "sha256 recorded when it was written; make the head again with "
                            "`embedpipe fit`")
    return head


def _check_probe(path: Any, z: Any, head: dict[str, Any], estimator: Any, form: str) -> None:
    """The estimator must predict the classes and scores the file recorded for its probe."""
    import io

    import numpy as np

    if not head.get("probe"):
        return
    try:
        X, pred, scores = (np.load(io.BytesIO(z.read(n)), allow_pickle=False)
                           for n in (PROBE_X, PROBE_PREDICTED, PROBE_SCORES))
        got = _scored(estimator, X)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise _disagree(path, f"its {form} cannot score the recorded rows: "
                              f"{_why(e)}") from None
    if not (np.array_equal(got[0], pred.astype("U")) and got[1].shape == scores.shape
            and np.allclose(got[1], scores, rtol=1e-5, atol=1e-6, equal_nan=True)):
        n = int((got[0] != pred.astype("U")).sum()) if got[0].shape == pred.shape else -1
        if n == 0:  # the same classes: only the scores differ
            raise _disagree(path, f"its {form} scores the {len(X)} rows recorded with it "
                                  "differently (the same classes, scores beyond 1e-5)")
        raise _disagree(path, f"its {form} predicts {'differently' if n < 0 else n} of the "
                              f"{len(X)} rows recorded with it "
                              f"{'differently' if n >= 0 else ''}".rstrip())


def load_compact(path: str | Path) -> HeadFile | None:
    """A sealed head file's compact form (compact.py), read with zipfile, json and numpy only
    (no scikit-learn, no skops, no pickle), after checking that the file holds together: the
    digest of all its members (damage), a skops schema naming only plain types (else None:
    ``load`` applies skops' trust rules, which refuse the file), the manifest beside the
    compact form equal to the one inside the skops pipeline (classes, backbone, ...), and the
    compact form predicting the rows recorded with the head as the head did. A file that
    fails a check is refused (ArtifactError). None when the file has no compact form or no
    seal (older files): then ``load`` reads the whole head."""
    import io
    import zipfile

    import numpy as np

    from . import compact

    try:
        with zipfile.ZipFile(path) as z:
            if compact.SPEC_MEMBER not in z.namelist():
                return None
            if not _plain_schema(json.loads(z.read("schema.json"))):
                return None  # skops' trust check (load) names what it refuses
            head = _read_seal(path, z)
            if head is None:
                return None
            if (head.get("format") != FORMAT
                    or int(head.get("format_version", 0)) > FORMAT_VERSION):
                return None
            try:
                inner = _skops_manifest(z)
            except (KeyError, ValueError, TypeError) as e:
                raise _disagree(path, f"the pipeline's manifest cannot be read: {_why(e)}"
                                ) from None
            if not _same(inner, head.get("manifest")):
                diff = sorted(k for k in set(inner) | set(head["manifest"])
                              if not _same(inner.get(k), head["manifest"].get(k)))
                raise _disagree(path, "the manifest of its compact form differs from the "
                                      f"pipeline's in {', '.join(diff[:4])}")
            spec = json.loads(z.read(compact.SPEC_MEMBER))
            arrays = {n: np.load(io.BytesIO(z.read(compact.array_member(spec, n))),
                                 allow_pickle=False) for n in compact.array_names(spec)}
            fast = compact.load(spec, arrays)
            _check_probe(path, z, head, fast, "compact form")
        return HeadFile(Path(path), fast, head["manifest"])
    except ArtifactError:
        raise
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, TypeError, AttributeError):
        return None


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):  # numpy scalars
        return v.item()
    if isinstance(v, (tuple, set)):
        return list(v)
    return str(v)


def load(path: str | Path, *, compact: bool = False) -> HeadFile:
    """Load a head file, refusing anything that is not a head made by `embedpipe fit`.
    ``compact``: its compact form, when it has one (enough to predict; see load_compact)."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise ArtifactError(f"{path} is a folder, not a head file; pass the .skops file "
                                "made by `embedpipe fit STORE --head NAME -o HEAD.skops`")
        raise ArtifactError(f"{path}: no such head file; make one with `embedpipe fit STORE "
                            f"--head NAME -o {path}`")
    other = _other_file(path)
    if other is not None:
        raise ArtifactError(other)
    if compact:
        fast = load_compact(path)
        if fast is not None:
            return fast
    sio = _skops_io()
    fix = "make the head again with `embedpipe fit`"
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as e:  # noqa: BLE001 - zip, JSON and schema errors all mean "damaged"
        raise ArtifactError(f"{path}: not a readable head file ({_why(e)}); it is damaged, "
                            f"truncated or not made by embedpipe: {fix}") from None
    foreign = sorted(set(untrusted) - set(TRUSTED_EXTRA))
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4
                                          else "")
        raise ArtifactError(f"{path}: refusing to load: the file asks for types embedpipe does "
                            f"not trust ({shown}), which could run code; {fix}")
    try:
        obj = sio.load(path, trusted=list(untrusted))
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path}: head file is damaged ({_why(e)}); {fix}") from None
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT
            and isinstance(obj.get("manifest"), dict) and hasattr(obj.get("estimator"),
                                                                   "predict")):
        raise ArtifactError(f"{path} is a skops file, but not an embedpipe head; {fix}")
    if int(obj.get("format_version", 0)) > FORMAT_VERSION:
        raise ArtifactError(f"{path}: head format {obj['format_version']} is newer than this "
                            f"embedpipe ({FORMAT_VERSION}); upgrade embedpipe")
    import zipfile

    with zipfile.ZipFile(path) as z:  # a sealed file must hold together (see load_compact)
        head = _read_seal(path, z)
        if head is not None:
            if not _same(head.get("manifest"), obj["manifest"]):
                raise _disagree(path, "the manifest beside the pipeline differs from the one "
                                      "inside it")
            _check_probe(path, z, head, obj["estimator"], "pipeline")
    return HeadFile(path, obj["estimator"], obj["manifest"])


def _finetuned_model(path: Path) -> str | None:
    """The timm model an `embedpipe finetune` output (RUN.pt) or one of its checkpoints
    (RUN.checkpoints/epoch-NNN.pt) was tuned from, read from the run's manifest (RUN.json;
    read as JSON, no torch); None when there is none."""
    runs = [path.with_suffix(".json")]
    if path.parent.name.endswith(".checkpoints"):
        runs.append(path.parent.with_name(path.parent.name.removesuffix(".checkpoints")
                                          + ".json"))
    for cand in runs:
        try:
            m = json.loads(cand.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(m, dict) and str(m.get("format", "")).startswith("embedpipe-finetune") \
                and isinstance(m.get("model"), str):
            return m["model"]
    return None


#: The kinds file_kind tells apart (the second item it returns).
FILE_KINDS = ("store", "hdf5", "head", "torch", "features", "onnx", "sidecar")


def file_kind(path: Path) -> tuple[str, str] | None:
    """(what ``path`` is, as a noun phrase naming the command that makes it; its kind, one of
    FILE_KINDS) for one of embedpipe's own files (a feature store or another HDF5 file, a head
    file, backbone weights or a checkpoint, a features file of `export-features`, an ONNX
    export or its sidecar), told from the file's first bytes (for a store, its HDF5 datasets;
    for a features .npz, its array names); None for anything else or a file that cannot be
    opened. Reads no more than a zip's directory: cheap enough to check an argument before
    any work, and torch-free."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(2056)
    except OSError:
        return None
    # HDF5's signature is at offset 0, or after a user block of 512, 1024, 2048... bytes
    if any(head[at:at + 8] == HDF5_SIGNATURE for at in (0, 512, 1024, 2048)):
        with contextlib.suppress(Exception):  # unreadable HDF5: still an HDF5 file
            import h5py

            with h5py.File(path, "r") as h:
                if "features" in h and "class_names" in h:
                    return "an embedpipe feature store (made by `embedpipe extract`)", "store"
        return "an HDF5 file", "hdf5"
    if head.startswith(b"\x93NUMPY"):
        return "a features file (.npy, as `embedpipe export-features` writes)", "features"
    if head.startswith(b"PAR1") and path.suffix.lower() == ".parquet":
        return ("a features file (Parquet, as `embedpipe export-features` writes)", "features")
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return None  # a cut-off zip: the reader says the file is damaged
        if "schema.json" in names:
            return "a head file (made by `embedpipe fit`)", "head"
        if any(n.endswith("/data.pkl") for n in names):
            return ("a PyTorch file (backbone weights or a checkpoint, e.g. from "
                    "`embedpipe finetune`)"), "torch"
        if "features.npy" in names:
            return "a features file (.npz, as `embedpipe export-features` writes)", "features"
        return None
    side = path.with_name(path.name + ".json")  # export.sidecar_path: an ONNX export's
    text = head.lstrip()[:1]
    for cand in ((path, side) if text == b"{" else (side,)):
        try:
            info = json.loads(cand.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and info.get("format") == "embedpipe-onnx":
            if cand == path:
                return "the JSON sidecar of an ONNX export", "sidecar"
            return "an ONNX export (made by `embedpipe export`)", "onnx"
    return None


def _other_file(path: Path) -> str | None:
    """What ``path`` is when it is another of embedpipe's files where a head file belongs
    (file_kind: a feature store, a features file, backbone weights or a checkpoint, an ONNX
    export or its sidecar), as a one-line error: the file, what it is, that a head file from
    `embedpipe fit` is wanted, and the command that makes one. None for a head file or
    anything else (``load`` then says why it cannot read it)."""
    found = file_kind(path)
    if found is None or found[1] == "head":
        return None
    what, kind = found
    fit = "a head file made by `embedpipe fit` goes here"
    if kind in ("store", "hdf5"):
        return (f"{path} is {what}, not a head file; {fit}: make one from the store with "
                f"`embedpipe fit {path} --head logreg -o {path.with_suffix(SUFFIX).name}` and "
                "pass that (predict takes the store itself as `--store STORE`)")
    if kind == "features":
        store = path.with_suffix(".h5")
        return (f"{path} is {what}, not a head file; {fit}: import it into a store "
                f"(`embedpipe import-features {path} -o {store}`), fit a head on that "
                f"(`embedpipe fit {store} -o {path.with_suffix(SUFFIX).name}`) and pass the head")
    if kind == "torch":
        model = _finetuned_model(path)  # extract takes its run's --img-size itself
        flag = f"--model {model} " if model else ""
        return (f"{path} is {what}, not a head file; {fit}: extract features with it "
                f"(`embedpipe extract DATA {flag}--weights {path} -o STORE.h5`), fit a head "
                "on them (`embedpipe fit STORE.h5 -o HEAD.skops`) and pass that")
    info = {}
    with contextlib.suppress(OSError, ValueError):
        side = path if kind == "sidecar" else path.with_name(path.name + ".json")
        info = json.loads(side.read_text(encoding="utf-8"))
    return (f"{path} is {what}, not a head file; {fit}: pass the head it was exported from "
            f"({info.get('head_file') or 'HEAD.skops'})")


def _why(e: BaseException) -> str:
    text = first_line(e)
    return f"{type(e).__name__}: {text[:160]}"


def check_compatible(head: HeadFile, other: dict[str, Any], what: str,
                     fix: str | None = None) -> list[str]:
    """Raise when ``other`` (a store's metadata, or the identity of a rebuilt backbone) was made
    with another backbone, weights, preprocessing, pool or feature dim than the head's
    (provenance.HEAD_KEYS); return notes for precision/dtype (provenance.HEAD_NOTE_KEYS). A head
    fitted on stacked stores needs the same stores, stacked in the same order. ``fix``: what the
    error tells the user to do (default: extract with the head's backbone or fit a new head)."""
    mine, theirs = members(head.identity), members(other)
    training = head.manifest.get("training", {})
    swapped = stack_order_error(head.identity, other, training.get("stores"), what, head.path,
                                training.get("store_ids"))
    if swapped:  # the head's stores in another order: say which order, not "another backbone"
        raise ArtifactError(swapped)
    if len(mine) != len(theirs):
        hint = (f"pass the {len(mine)} stores it was fitted on, in that order "
                f"({_models(mine)}: `--store A --store B`)" if len(mine) > 1
                else "pass a single store of the head's backbone")
        raise ArtifactError(f"{what}: holds features of {_models(theirs)} but head {head.path} "
                            f"was fitted on features of {_models(mine)}; {hint}")
    notes: list[str] = []
    for i, (m, o) in enumerate(zip(mine, theirs)):
        where = what if len(mine) == 1 else f"{what} (stacked store {i + 1})"
        diffs = diff(o, m, HEAD_KEYS)
        if diffs:
            parts = "; ".join(f"{k}: {where} has {short(theirs_v)}, head has {short(mine_v)}"
                              for k, theirs_v, mine_v in diffs[:3])
            raise ArtifactError(
                f"{where}: made with another backbone than head {head.path} ({parts}); "
                + (fix or f"extract the images with the head's backbone (`embedpipe predict "
                          f"{head.path} IMAGES...` does it for you) or fit a head on this store"))
        notes += [f"note: {where} has {k}={o.get(k)} while head {head.path} was trained on "
                  f"{k}={m.get(k)}; features differ slightly" for k, _, _ in diff(o, m, HEAD_NOTE_KEYS)]
    return notes + _unchecked_order(head, other, what)


def _unchecked_order(head: HeadFile, other: dict[str, Any], what: str) -> list[str]:
    """A note when stacked stores ``other`` (a stacked store's metadata) hold stores of one
    identity (nothing but their files tells them apart) and the order they are given in cannot
    be checked (stack_order): the head or a store was written before stores had a store_id, or
    the stores are other files than the head's (re-extracted), and they are not the head's own
    files in its order. [] otherwise."""
    mine = members(head.identity)
    n = len(mine)
    if n < 2 or "stacked" not in other or len(members(other)) != n:
        return []
    if all(diff(mine[i], mine[j], HEAD_KEYS) for j in range(n) for i in range(j)):
        return []  # every store told apart by its identity
    training = head.manifest.get("training", {})
    head_ids, ids = training.get("store_ids"), other.get("store_ids")
    known = ids_known(head_ids, n) and ids_known(ids, n)
    if known and set(head_ids) == set(ids):
        return []  # the head's stores (checked by stack_order), renamed or not
    files, fitted = list(other.get("stores") or []), list(training.get("stores") or [])
    if len(files) == n == len(fitted) and all(same_file(f, h) for f, h in zip(files, fitted)):
        return []  # the very files it was fitted on, in its order
    why = ("are other files than the ones it was fitted on" if known else
           "were stacked into a head written before stores had a store_id"
           if ids_known(ids, n) else "are copies of one file (the same store_id)"
           if all(ids or [None]) and len(ids or []) == n else
           "were written before stores had a store_id")
    order = " + ".join(Path(str(f)).name for f in fitted) or "its training.stores"
    return [f"note: {what}: stores of one backbone and settings that {why}, so the order they "
            f"are given in cannot be checked: pass them in the order of the stores head "
            f"{head.path} was fitted on ({order}), else each store's features land in "
            "another's columns"]


def _models(idents: list[dict[str, Any]]) -> str:
    return " + ".join(str(i.get("model")) for i in idents)


#: What a head's class probabilities are (the manifest's ``probabilities``, which predict keys
#: on): its own predict_proba, temperature-scaled decision values, a soft vote (the mean of its
#: members' probabilities, each native or temperature-scaled: the manifest's ``calibration``
#: names which), or a plain softmax of decision values (no calibration was possible: the only
#: kind that is no probability).
PROBABILITIES = ("native", "calibrated", "vote", "scores")


def probability_kind(manifest: dict[str, Any]) -> str:
    """The manifest's ``probabilities`` (PROBABILITIES); for a head written before manifests
    recorded it, derived from its ``calibration`` text."""
    if manifest.get("probabilities") in PROBABILITIES:
        return manifest["probabilities"]
    calibration = str(manifest.get("calibration", "native"))
    if calibration == "native":
        return "native"
    return "calibrated" if calibration.startswith("temperature") else "scores"


def new_manifest(**fields: Any) -> dict[str, Any]:
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(*HEADS), **fields}
