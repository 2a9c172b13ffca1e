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
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..env import HEADS, versions
from ..provenance import HEAD_KEYS, HEAD_NOTE_KEYS, diff, members, short
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
    "sklearn.utils._bunch.Bunch",  # a dict with attribute access (ensembles' named members)
)

# What must agree between a head and the store (or images) it predicts: otherwise the features
# mean something else. Precision and stored dtype only change features slightly: a warning.


class ArtifactError(UserError):
    """A head file that cannot be used; one line naming the file and the fix."""


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



def save(path: str | Path, estimator: Any, manifest: dict[str, Any],
         check_rows: Any = None) -> Path:
    """Write a head file atomically (a crash never leaves half a file at ``path``).

    With ``check_rows`` (some training features), the head's compact form (compact.py) is
    written too when it has one and predicts like the estimator on those rows: then
    `predict --store` needs neither scikit-learn nor skops (see load_compact)."""
    sio = _skops_io()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(json.dumps(manifest, default=_jsonable))  # plain data only
    head = {"format": FORMAT, "format_version": FORMAT_VERSION, "manifest": manifest}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        sio.dump({**head, "estimator": estimator}, tmp)
        if check_rows is not None:
            _add_compact(tmp, estimator, head, check_rows)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def _add_compact(path: Path, estimator: Any, head: dict[str, Any], rows: Any) -> bool:
    import io
    import zipfile

    import numpy as np

    from . import compact

    exported = compact.export(estimator)
    if exported is None:
        return False
    spec, arrays = exported
    if not compact.agrees(estimator, compact.load(spec, arrays), np.asarray(rows)):
        return False
    with zipfile.ZipFile(path) as z:
        sealed = {**head, "skops_sha256": _skops_digest(z)}
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(compact.HEAD_MEMBER, json.dumps(sealed))
        z.writestr(compact.SPEC_MEMBER, json.dumps(spec))
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            z.writestr(f"{compact.ARRAY_PREFIX}{name}.npy", buf.getvalue())
    return True


def _skops_digest(z: Any) -> str:
    """sha256 over the names and contents of a head file's skops members (CRC-checked)."""
    import hashlib

    from . import compact

    h = hashlib.sha256()
    for name in sorted(z.namelist()):
        if not name.startswith(compact.MEMBER_DIR):
            h.update(name.encode() + b"\0" + z.read(name))
    return h.hexdigest()


def load_compact(path: str | Path) -> HeadFile | None:
    """A head file's compact form (compact.py), read with zipfile, json and numpy only (no
    scikit-learn, no skops, no pickle); None when it has none, it cannot be read, or the rest
    of the file is no longer what `fit` wrote beside it (a digest of the skops members): then
    ``load`` reads the whole head (and says what is wrong with the file, if anything)."""
    import io
    import zipfile

    import numpy as np

    from . import compact

    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if compact.SPEC_MEMBER not in names or compact.HEAD_MEMBER not in names:
                return None
            head = json.loads(z.read(compact.HEAD_MEMBER))
            spec = json.loads(z.read(compact.SPEC_MEMBER))
            if (head.get("format") != FORMAT
                    or int(head.get("format_version", 0)) > FORMAT_VERSION
                    or head.get("skops_sha256") != _skops_digest(z)):
                return None
            wanted = {op[k] for op in spec["ops"] for k in ("a", "w") if k in op}
            arrays = {n: np.load(io.BytesIO(z.read(f"{compact.ARRAY_PREFIX}{n}.npy")),
                                 allow_pickle=False) for n in wanted}
        return HeadFile(Path(path), compact.load(spec, arrays), head["manifest"])
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
        raise ArtifactError(f"{path}: no such head file; make one with `embedpipe fit STORE "
                            f"--head NAME -o {path}`")
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
        raise ArtifactError(f"{path}: a skops file, but not an embedpipe head; {fix}")
    if int(obj.get("format_version", 0)) > FORMAT_VERSION:
        raise ArtifactError(f"{path}: head format {obj['format_version']} is newer than this "
                            f"embedpipe ({FORMAT_VERSION}); upgrade embedpipe")
    return HeadFile(path, obj["estimator"], obj["manifest"])


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
    return notes


def _models(idents: list[dict[str, Any]]) -> str:
    return " + ".join(str(i.get("model")) for i in idents)


#: What a head's class probabilities are (the manifest's ``probabilities``, which predict keys
#: on): its own predict_proba, temperature-scaled decision values, or a plain softmax of decision
#: values (no calibration was possible).
PROBABILITIES = ("native", "calibrated", "scores")


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
