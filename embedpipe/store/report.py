"""What a store holds, as a report (``embedpipe info``): a JSON-ready dict and its text form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._hdf5 import writer_alive
from .read import open_store


def describe(path: str | Path) -> dict[str, Any]:
    """The report of the store at ``path`` (its features are not read): rows, feature_dim,
    dtype, classes (name → rows), unlabeled rows, splits (name → rows), the identity (model,
    weights source and sha256, pool, precision, data_config), created, versions, the number of
    run records and the last one (``last_run``: what it was, when, its status and where), the
    skipped files with their reasons, the rows merges dropped (``dropped_by_merge``: path,
    the store it came from, its hash; ``merge --on-conflict first``), and for a store of
    `embedpipe finetune` weights ``finetuned_on``: the images its record lists and, per split,
    how many of the store's rows are among them (the rows whose accuracy would overrate the
    model; None for other weights). Raises StoreError as open_store."""
    s = open_store(path, features=False)
    split_of = np.array([sp or "(none)" for sp in s.splits], dtype=object)
    names, counts = np.unique(split_of, return_counts=True)
    tuned = None
    if s.finetune_hashes is not None:
        seen = s.finetuned_rows(np.arange(len(s)))
        tuned = {"images": int(len(s.finetune_hashes)),
                 "rows": {str(k): int(seen[split_of == k].sum()) for k in names}}
    return {
        "store": str(path), "rows": len(s), "feature_dim": s.meta.get("feature_dim"),
        "dtype": s.meta.get("dtype"), "classes": s.class_counts(),
        "unlabeled": int((s.labels < 0).sum()),
        "splits": {str(k): int(v) for k, v in zip(names, counts)},
        "model": s.meta.get("model"),
        "weights": {"source": s.meta.get("weights_source"),
                    "sha256": s.meta.get("weights_sha256")},
        "pool": s.meta.get("pool"), "precision": s.meta.get("precision"),
        "data_config": s.meta.get("data_config"), "created": s.meta.get("created"),
        "versions": s.meta.get("versions"), "runs": len(s.runs),
        "last_run": _last_run(s.runs[-1], path) if s.runs else None,
        "skipped": [{"path": p, "reason": r} for p, r in s.errors],
        "dropped_by_merge": [d for r in s.runs for d in (r.get("dropped") or [])],
        "finetuned_on": tuned,
    }


NO_MODEL = "no model loaded"  # the device of an extract run that had nothing to extract


def _last_run(run: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """What a run record says, for one line: an extraction (when it started, status, device,
    runtime, and how many files it extracted) or a merge (when it finished, status, how many
    stores); only the fields the record has. A record still "running" whose writer no longer
    holds the store's lock (killed: kill -9, a crash, power) has status "interrupted" and
    ``writer: gone``; a live one ``writer: alive``."""
    out = {"kind": "merge" if "merged" in run else "extract",
           "when": run.get("started") or run.get("finished"), "status": run.get("status")}
    if "merged" in run:
        out["stores"] = len(run["merged"])
    else:
        if run.get("device"):
            out["device"] = run["device"]
        runtime = run.get("runtime")
        if isinstance(runtime, dict) and runtime.get("name"):
            out["runtime"] = str(runtime["name"])
        summary = run.get("summary") or {}
        if "extracted" in summary:
            out["extracted"] = int(summary.get("extracted", 0)) + int(summary.get("replaced", 0))
    if out["status"] == "running":
        alive = writer_alive(path)
        if alive is not None:
            out["writer"] = "alive" if alive else "gone"
        if alive is False:
            out["status"] = "interrupted"
    return out


def _run_line(last: dict[str, Any]) -> str:
    when = last.get("when") or "(time not recorded)"
    status = last.get("status") or "(status not recorded)"
    if last["kind"] == "merge":
        if last.get("writer") == "gone":
            return (f"merge of {last['stores']} store(s) started at {when}, interrupted (its "
                    "writer is gone; run the merge again)")
        return f"merge of {last['stores']} store(s) {status} at {when}"
    device = last.get("device")
    on = ""
    if device and device != NO_MODEL:
        on = f" on {device}" + (f" ({last['runtime']})" if last.get("runtime") else "")
    if last.get("writer") == "gone":
        return (f"{when} interrupted{on} (its writer is gone: killed or crashed; rerun the same "
                "extract to continue, every committed row is kept)")
    if device == NO_MODEL:
        if status == "running":
            return f"{when} running (planning; no model loaded yet)"
        if not last.get("extracted"):
            return f"{when} {status}: nothing new to extract (no model loaded)"
    return f"{when} {status}{on}"


def _tuned_lines(tuned: dict[str, Any] | None, splits: dict[str, int]) -> list[str]:
    """The info line of a store of fine-tuned weights: how many images the backbone was tuned
    on, and how many of each split's rows are among them ([] for other weights)."""
    if tuned is None:
        return []
    if not tuned["images"]:  # a run whose kept backbone never trained (only its classifier)
        return ["tuned on   0 images (the run's record: its backbone did not train, so no "
                "row's accuracy is overrated)"]
    per = ", ".join(f"{k}={tuned['rows'].get(k, 0)} of {n}" for k, n in sorted(splits.items()))
    return [f"tuned on   {tuned['images']} images (the run's record); rows among them: {per} "
            "(accuracies over those overrate the model)"]


def format_info(report: dict[str, Any], show: int = 50) -> str:
    """The text of ``embedpipe info``: ``report`` (from ``describe``) with at most ``show``
    skipped files (and rows dropped by merges) listed."""
    dc = report["data_config"] or {}
    classes = report["classes"]
    unlabeled = report["unlabeled"]
    lines = [
        f"store      {report['store']}",
        f"rows       {report['rows']} × {report['feature_dim']} ({report['dtype']})",
        f"model      {report['model']}  pool={report['pool']}  precision={report['precision']}",
        f"weights    {report['weights']['source']}  sha256={report['weights']['sha256']}",
        *_tuned_lines(report.get("finetuned_on"), report["splits"]),
        "preprocess " + ", ".join(f"{k}={v}" for k, v in sorted(dc.items())),
        f"classes    {len(classes)}" + (f" (+{unlabeled} unlabeled)" if unlabeled else ""),
    ]
    width = max((len(c) for c in classes), default=0)
    lines += [f"  {c:<{width}}  {n}" for c, n in classes.items()]
    lines.append("splits     " + ", ".join(f"{k}={v}" for k, v in sorted(report["splits"].items())))
    if report["last_run"] is not None:
        lines.append(f"last run   {_run_line(report['last_run'])}")
    skipped = report["skipped"]
    lines.append(f"skipped    {len(skipped)}")
    lines += [f"  {e['path']}: {e['reason']}" for e in skipped[:show]]
    if len(skipped) > show:
        lines.append(f"  ... and {len(skipped) - show} more (--show N)")
    dropped = report.get("dropped_by_merge") or []
    if dropped:  # merge --on-conflict first: other images under a path already taken
        lines.append(f"dropped    {len(dropped)} by merge (another image under a path already "
                     "in the store)")
        lines += [f"  {d['path']} from {d['store']}" for d in dropped[:show]]
        if len(dropped) > show:
            lines.append(f"  ... and {len(dropped) - show} more (--show N)")
    return "\n".join(lines)
