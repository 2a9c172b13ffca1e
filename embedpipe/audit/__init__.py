"""`embedpipe audit`: know your data from its feature store (numpy, scikit-learn; no torch).

Reads the store (and the image files, only to draw thumbnails) and reports exact and near
duplicates grouped across splits and classes (neighbors, duplicates), likely label errors from
out-of-fold probabilities (labels), outliers by kNN distance (outliers), class balance per
split (balance) and a 2-D map (embedmap), as ``audit.json``, a self-contained ``report.html``
(report) and, if asked, ``fix_plan.csv`` (fixplan). Nothing is ever deleted or moved.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import UserError
from . import balance as _balance
from . import duplicates as _dups
from . import embedmap, fixplan, labels as _labels, neighbors, outliers as _outliers, report
from .duplicates import NEAR_DUPLICATE_COSINE
from .outliers import K_NEIGHBOURS

__all__ = ["AuditError", "AuditResult", "run_audit", "NEAR_DUPLICATE_COSINE", "K_NEIGHBOURS",
           "SCHEMA"]

SCHEMA = "embedpipe.audit/1"
TRAIN_SPLIT = "train"
OUTLIER_IQR = 1.5
"""Outliers flagged: kNN distance above Q3 + OUTLIER_IQR x IQR of all rows' kNN distances
(Tukey's fence), at most max(outliers.FLAG_TOP, N / 200) rows, the most distant first."""


class AuditError(UserError):
    """A store or option the audit cannot work with; one line naming it and the fix."""


@dataclass
class AuditResult:
    """What ``run_audit`` found (``data``: the audit.json content) and the files it wrote."""

    data: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def line(self) -> str:
        s = self.data["summary"]
        lab = ("label errors skipped" if self.data["label_issues"].get("skipped")
               else f"{s['label_issues']} likely label errors")
        return (f"audit: {s['rows']} rows; {s['duplicate_groups']} duplicate groups "
                f"({s['exact_duplicate_groups']} exact, {s['leak_groups']} across splits, "
                f"{s['conflict_groups']} with conflicting labels); {lab}; "
                f"{s['outliers']} outliers → {self.files['report']}"
                + (f", {self.files['fix_plan']}" if "fix_plan" in self.files else ""))


def _check(threshold: float, k: int, folds: int, head: str) -> None:
    from .. import heads

    if not 0.0 < threshold <= 1.0:
        raise AuditError(f"--threshold {threshold}: pass a cosine similarity in (0, 1], e.g. "
                         f"{NEAR_DUPLICATE_COSINE}")
    if k < 1:
        raise AuditError(f"-k {k}: pass 1 or more neighbours")
    if folds < 2:
        raise AuditError(f"--folds {folds}: pass 2 or more")
    heads.get(head)  # unknown head: HeadError naming the known ones


def _out_dir(store: Path, out: Path | None) -> Path:
    dest = Path(out) if out is not None else store.with_name(store.stem + "-audit")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        probe = dest / ".embedpipe-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise AuditError(f"{dest}: cannot write the report there ({e.strerror or e}); pass "
                         "--out DIR in a writable place") from None
    return dest


def _images_root(store: Any, images: Path | None) -> Path | None:
    if images is not None:
        return Path(images)
    for run in reversed(store.runs):
        if run.get("source"):
            src = Path(run["source"])
            return src.parent if src.is_file() else src  # a manifest: paths beside it
    return None


def _label_section(store: Any, Xn: np.ndarray, *, head: str, folds: int, seed: int,
                   progress: bool, notes: list[str]) -> dict[str, Any]:
    from ..progress import Progress

    labeled = np.flatnonzero(store.labels >= 0)
    counts = np.bincount(store.labels[labeled], minlength=len(store.classes))
    small = [store.classes[c] for c in range(len(store.classes)) if counts[c] == 1]
    usable = labeled[counts[store.labels[labeled]] >= 2]
    n_cls = int((counts >= 2).sum())
    if len(labeled) == 0:
        return {"skipped": "the store has no labels (extract a class-folder layout or a "
                           "manifest with a label column to find label errors)", "issues": []}
    if n_cls < 2:
        return {"skipped": f"{n_cls} of {len(store.classes)} classes have 2 or more labeled "
                           "rows; label errors need at least 2 classes", "issues": []}
    if small:
        notes.append(f"label errors: left out {len(small)} classes with a single labeled row "
                     f"({', '.join(small[:5])}{', ...' if len(small) > 5 else ''})")
    present = np.flatnonzero(counts >= 2)
    to_local = {int(c): i for i, c in enumerate(present)}
    y = np.array([to_local[int(c)] for c in store.labels[usable]], dtype=np.int64)
    n_folds = int(max(2, min(folds, np.bincount(y).min())))
    if n_folds < folds:
        notes.append(f"label errors: the smallest class has {np.bincount(y).min()} labeled "
                     f"rows, so {n_folds} folds instead of {folds}")
    with Progress(n_folds, f"label errors: {n_folds}-fold {head}", enabled=progress,
                  unit="folds") as bar:
        P, n_folds = _labels.out_of_fold_probabilities(
            Xn[usable], y, len(present), head=head, folds=n_folds, seed=seed, tick=bar.update)
    idx, how = _labels.find_issues(y, P)
    pred = P.argmax(axis=1)
    names = [store.classes[c] for c in present]
    issues = []
    for i in idx:
        r = int(usable[i])
        issues.append({"row": r, "path": store.paths[r], "split": str(store.splits[r]),
                       "label": names[y[i]], "suggested_label": names[pred[i]],
                       "self_confidence": round(float(P[i, y[i]]), 4),
                       "suggested_probability": round(float(P[i, pred[i]]), 4)})
    return {"method": how, "head": head, "folds": n_folds, "rows": int(len(usable)),
            "oof_accuracy": round(float((pred == y).mean()), 4), "issues": issues}


def run_audit(store_path: str | Path, out: str | Path | None = None, *,
              threshold: float = NEAR_DUPLICATE_COSINE, k: int = K_NEIGHBOURS,
              folds: int = 5, head: str = "logreg", seed: int = 0,
              images: str | Path | None = None, draw_map: bool = True,
              fix_plan: bool = False, progress: bool = True,
              say: Callable[[str], Any] | None = None) -> AuditResult:
    """Audit the store at ``store_path``; write ``audit.json``, ``report.html`` and (with
    ``fix_plan``) ``fix_plan.csv`` into ``out`` (default: ``<store>-audit/`` beside it).

    ``threshold``: cosine similarity of power-normalised features (neighbors.duplicate_view)
    at or above which two rows are near duplicates (default NEAR_DUPLICATE_COSINE, measured in
    bench/results/audit.md).
    ``k``: neighbours of the kNN outlier distance, taken among the ``train`` split's rows
    (all rows when there is no train split). ``folds``/``head``/``seed``: the cross-validation
    giving out-of-fold probabilities for label errors (as ``embedpipe cv``). ``images``: the
    folder the stored paths are relative to, when it moved (default: the one extraction
    recorded). Memory: three N x D float32 copies of the features (as read, and two views)
    plus a few 64 MB similarity blocks; time grows as N^2 (neighbours) plus the folds' fits.

    Raises StoreError (missing or damaged store), AuditError (empty store, bad option or an
    unwritable ``out``), HeadError (unknown head)."""
    from ..progress import Progress, printer
    from ..store import open_store

    say = say or printer(progress)
    _check(threshold, k, folds, head)
    store_path = Path(store_path)
    if not store_path.exists():
        raise AuditError(f"{store_path}: no such store; pass a store made by `embedpipe "
                         "extract`")
    t0 = time.perf_counter()
    store = open_store(store_path)
    if len(store) == 0:
        raise AuditError(f"{store_path}: the store has no rows; extract some images first")
    from .. import checks

    checks.refuse_unusable(store.features, store.paths, str(store.path))  # before any output
    dest = _out_dir(store_path, Path(out) if out is not None else None)
    root = _images_root(store, Path(images) if images is not None else None)
    notes: list[str] = []
    if root is None or not root.is_dir():
        notes.append(f"image folder {root} not found: thumbnails are missing (pass --images "
                     "DIR if the images moved)")
    n = len(store)
    Xn = neighbors.normalize(store.features)
    splits = np.asarray(store.splits, dtype=object)
    label_names = store.label_names()
    has_train = bool((splits == TRAIN_SPLIT).any())
    reference = splits == TRAIN_SPLIT if has_train else np.ones(n, dtype=bool)
    if n == 1:
        notes.append("one row: no neighbours, duplicates or outliers to find")

    phase = {"read": round(time.perf_counter() - t0, 2)}
    t = time.perf_counter()
    from ..heads.fit import blas_threads

    # the thread rule of cv and fit (heads.fit.blas_threads) for every part that calls BLAS:
    # the similarity blocks, the label search's fits (labels.py) and the map's PCA
    with Progress(n, "duplicates and neighbours", enabled=progress, unit="rows") as bar, \
            blas_threads(n):
        sc = neighbors.scan(Xn, neighbors.duplicate_view(store.features), store.labels,
                            reference, threshold=threshold, k=k, tick=bar.update)
    groups = [_dups.describe(g, store.paths, splits, label_names, TRAIN_SPLIT)
              for g in _dups.groups(store.hashes, sc.pairs, sc.pair_sims)]
    groups.sort(key=lambda g: (not (g["leak"] or g["conflict"]), -len(g["rows"]), g["rows"][0]))

    phase["neighbours"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    label_sec = _label_section(store, Xn, head=head, folds=folds, seed=seed,
                               progress=progress, notes=notes)
    phase["labels"] = round(time.perf_counter() - t, 2)
    if label_sec.get("skipped"):
        notes.append(f"label errors skipped: {label_sec['skipped']}")

    ranked = _outliers.ranked(sc.knn_all, sc.knn_class, paths=store.paths, splits=splits,
                              label_names=label_names, classes=store.classes,
                              labels=store.labels)
    valid = sc.knn_all[~np.isnan(sc.knn_all)]
    cutoff = None
    flagged: list[dict[str, Any]] = []
    if len(valid) >= 4:
        q1, q3 = np.percentile(valid, [25, 75])
        cutoff = float(q3 + OUTLIER_IQR * (q3 - q1))
        most = max(_outliers.FLAG_TOP, n // 200)
        for rank, it in enumerate(ranked["overall"][:most], 1):
            if it["distance"] > cutoff:
                flagged.append({**it, "rank": rank})
    outlier_sec = {"k": k, "reference": TRAIN_SPLIT if has_train else "all",
                   "cutoff": None if cutoff is None else round(cutoff, 4),
                   "flagged": flagged, **ranked}

    flags = [""] * n
    for g in groups:
        for r in g["rows"]:
            flags[r] = "duplicate" + (" (leak)" if g["leak"] else "")
    for it in label_sec["issues"]:
        flags[it["row"]] = (flags[it["row"]] + "; " if flags[it["row"]] else "") + \
            f"label issue: {it['label']}→{it['suggested_label']}?"
    for it in flagged:
        flags[it["row"]] = (flags[it["row"]] + "; " if flags[it["row"]] else "") + "outlier"

    map_sec: dict[str, Any] = {"skipped": "--no-map"}
    map_svg = None
    t = time.perf_counter()
    if draw_map:
        say(f"map: {embedmap.method()} of {min(n, embedmap.MAP_MAX_ROWS)} rows ...")
        with blas_threads(min(n, embedmap.MAP_MAX_ROWS)):
            m = embedmap.build(Xn, labels=label_names, flags=flags, paths=store.paths,
                               classes=store.classes, seed=seed)
        map_svg = m.pop("svg")
        map_sec = m
    phase["map"] = round(time.perf_counter() - t, 2)

    bal = _balance.balance(store.labels, splits, store.classes)
    summary = {"rows": n, "classes": len(store.classes), "splits": len(bal["splits"]),
               "duplicate_groups": len(groups),
               "exact_duplicate_groups": sum(g["exact"] for g in groups),
               "near_duplicate_groups": sum(not g["exact"] for g in groups),
               "rows_in_duplicate_groups": sum(len(g["rows"]) for g in groups),
               "leak_groups": sum(g["leak"] for g in groups),
               "conflict_groups": sum(g["conflict"] for g in groups),
               "label_issues": len(label_sec["issues"]), "outliers": len(flagged)}
    files = {"json": dest / "audit.json", "report": dest / "report.html"}
    if fix_plan:
        files["fix_plan"] = dest / "fix_plan.csv"
    data = {"schema": SCHEMA, "store": str(store_path), "rows": n, "dim": store.dim,
            "model": store.meta.get("model"),
            "images_root": None if root is None else str(root),
            "options": {"threshold": threshold, "k": k, "folds": folds, "head": head,
                        "seed": seed},
            "summary": summary, "balance": bal,
            "duplicates": {"threshold": threshold, "exact_groups": summary[
                "exact_duplicate_groups"], "leak_groups": summary["leak_groups"],
                "conflict_groups": summary["conflict_groups"], "groups": groups},
            "label_issues": label_sec, "outliers": outlier_sec, "map": map_sec,
            "notes": notes, "seconds": phase,
            "files": {k2: str(v) for k2, v in files.items()}}
    t = time.perf_counter()
    html = report.render(data, map_svg=map_svg, root=root)
    phase["report"] = round(time.perf_counter() - t, 2)
    phase["total"] = round(time.perf_counter() - t0, 2)
    try:
        files["report"].write_text(html, encoding="utf-8")
        files["json"].write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        if fix_plan:
            fixplan.write(fixplan.plan(data), files["fix_plan"])
    except OSError as e:
        raise AuditError(f"{dest}: cannot write the report there ({e.strerror or e}); pass "
                         "--out DIR in a writable place") from None
    return AuditResult(data, files)
