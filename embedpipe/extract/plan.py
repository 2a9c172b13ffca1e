"""Planning a run against what the store already holds, so a rerun does only new work (torch-free):

  * a path already stored whose size and mtime are unchanged is skipped without reading it;
  * one whose stat changed is re-hashed in a worker: same content → only the stat is updated,
    other content → extracted again and its row overwritten;
  * a file that failed before with the same stat is not retried (it is still reported), unless
    it failed under an option this run changes so that it may pass (a larger --max-pixels);
  * paths in the store that are gone from the data, and changed files that no longer decode,
    are reported, and their rows removed with ``prune``.

Rows are committed per finished batch (``Session.commit``), so an interrupted run loses at
most the batch in flight.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..env import version_of
from ..provenance import OV_BF16, numeric_precision
from ..data import (
    DecodeError,
    Discovery,
    ImageRef,
    content_hash,
    file_stat,
    passes_max_pixels,
    read_file,
)
from ..store.read import has_finetune_record, open_store, read_runs
from ..store.schema import StoreError
from ..store.write import StoreWriter
from .options import _IDENTITY_OPTIONS, ExtractError, ExtractOptions, Summary

if TYPE_CHECKING:  # imported where used: a no-op rerun never imports torch or timm

    pass



# -- loading -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    ref: ImageRef
    expect_hash: str | None  # set when only a content check is needed first


# -- the run -------------------------------------------------------------------------------

@dataclass
class Plan:
    new: list[Task]
    check: list[tuple[Task, int]]  # stat changed: (task, row)
    relabel: list[tuple[int, str | None, str | None]]  # row, label, split of unchanged files
    still_failing: list[tuple[str, str]]
    retry_fixed: list[str]  # failed before; retried (file changed, or an option that failed it)
    unchanged: int
    vanished: list[str]
    vanished_errors: list[str]
    # still failing under an option whose value changed: the record, reworded for it
    reworded: list[tuple[str, str, str, int, int]] = field(default_factory=list)
    # stored files that changed and failed to decode in an earlier run, unchanged since (their
    # old rows kept; in still_failing too): not retried, so a rerun needs no model for them
    stale: list[str] = field(default_factory=list)


def _option_verdict(reason: str, opts: ExtractOptions | None) -> tuple[bool, str] | None:
    """For a failure recorded earlier: None when no option of this run bears on it; else
    (whether this run's options may let the file through, the reason as they would word
    it). The options that can fail a file without changing the store's identity: the pixel
    limit (--max-pixels). Decoding options (--exact-decode, --img-size, --tta ...) are part of
    the identity, so a change gives another store, where every file is tried afresh."""
    if opts is None:
        return None
    return passes_max_pixels(reason, opts.max_pixels)


def make_plan(disc: Discovery, writer: StoreWriter, opts: ExtractOptions | None = None, *,
              present: Discovery | None = None) -> Plan:
    """What a run has to do; a file that failed before with the same size and mtime is retried
    only when this run's options would now let it through (``opts``; see _option_verdict).
    ``present``: every file of the data when ``disc`` is a part of it (--shard): a stored file
    of another part has not vanished."""
    idx = writer.index()
    reworded = []
    classes = {c: i for i, c in enumerate(writer.classes)}
    new, check, relabel, failing, retry, stale = [], [], [], [], [], []
    unchanged = 0
    for ref in disc.items:
        stat = file_stat(ref.path)  # as the loader records it (a dangling link: its own)
        row = idx.row.get(ref.rel)
        if row is not None:
            same = stat is not None and (int(idx.mtime_ns[row]), int(idx.size[row])) == stat
            if same:
                unchanged += 1
                label = classes.get(ref.label, -2) if ref.label is not None else -1
                if label != int(idx.label[row]) or (ref.split or "") != idx.split[row]:
                    relabel.append((row, ref.label, ref.split))
            elif _still_failing(ref.rel, idx.errors.get(ref.rel), stat, opts, failing,
                                reworded):
                stale.append(ref.rel)  # changed, failed since, unchanged since that failure
            else:
                check.append((Task(ref, idx.hash[row]), row))
            continue
        err = idx.errors.get(ref.rel)
        if _still_failing(ref.rel, err, stat, opts, failing, reworded):
            continue
        if err is not None:
            retry.append(ref.rel)
        new.append(Task(ref, None))
    whole = present or disc
    seen = {r.rel for r in whole.items} | {p for p, _ in whole.ignored}
    vanished = sorted(p for p in idx.row if p not in seen)
    vanished_err = sorted(p for p in idx.errors if p not in seen)
    return Plan(new, check, relabel, failing, retry, unchanged, vanished, vanished_err,
                reworded, stale)


def _still_failing(rel: str, err: Any, stat: tuple[int, int] | None,
                   opts: ExtractOptions | None, failing: list, reworded: list) -> bool:
    """Whether the file ``rel`` failed before (its record ``err``) with the size and mtime it
    has now (``stat``) and this run's options would fail it again (_option_verdict): then it
    is added to ``failing`` (and ``reworded`` when an option's new value rewords why)."""
    if err is None or stat is None or (err[2], err[3]) != stat:
        return False
    verdict = _option_verdict(err[0], opts)
    if verdict is not None and verdict[0]:
        return False
    reason = err[0] if verdict is None else verdict[1]
    failing.append((rel, reason))
    if reason != err[0]:
        reworded.append((rel, reason, *err[1:]))
    return True


def refuse_other_dataset(out: Path, disc: Discovery, source: str | Path) -> None:
    """ExtractError, before any work, when ``out`` holds rows and not one of their paths is
    among the files discovered under ``source``: the folder is another dataset (a wrong -o),
    or the store's images moved to another folder structure. Extracting anyway would mix the
    two datasets in one store and list every stored row as vanished (whose --prune would
    delete them all). Stored paths are relative to the data root, so the same folder moved or
    copied elsewhere, images added or removed, and a manifest keep working. ``disc``: the whole
    discovery (before --shard selects a part of it)."""
    if not out.exists() or not disc.items:
        return
    store = open_store(out, features=False)
    if not store.paths:
        return
    seen = {r.rel for r in disc.items} | {p for p, _ in disc.ignored}
    if any(p in seen for p in store.paths):
        return
    was = next((r.get("source") for r in reversed(store.runs) if r.get("source")), None)
    origin = f" extracted from {was}" if was else ""
    raise ExtractError(
        f"{out}: the store holds {len(store.paths)} rows{origin} (e.g. {store.paths[0]}), "
        f"and not one of them is among the {len(disc.items)} images of {source}: to extract "
        f"another dataset pass another -o (`embedpipe merge` combines stores); if the store's "
        f"images moved, pass the folder they are in now")


def _settle_touched(writer: StoreWriter, plan: Plan, summary: Summary) -> None:
    """Files whose size or mtime changed but whose bytes did not (touched, copied back) need no
    model: hash them here, update their stat and labels, and leave only real changes in
    ``plan.check``."""
    keep, rows, refs, mtimes, sizes = [], [], [], [], []
    for task, row in plan.check:
        try:
            st = os.stat(task.ref.path)
            same = content_hash(read_file(task.ref.path)) == task.expect_hash
        except (OSError, DecodeError):
            same = False
        if same:
            rows.append(row)
            refs.append(task.ref)
            mtimes.append(st.st_mtime_ns)
            sizes.append(st.st_size)
        else:
            keep.append((task, row))
    if rows:
        writer.update_stat(rows, mtimes, sizes)
        writer.relabel(rows, _label_ids(writer, refs), [r.split or "" for r in refs])
        summary.unchanged += len(rows)
    plan.check = keep


def _label_ids(writer: StoreWriter, refs: list[ImageRef]) -> list[int]:
    ids = writer.class_ids(r.label for r in refs if r.label is not None)
    return [ids[r.label] if r.label is not None else -1 for r in refs]


class Session:
    """One store brought up to date with one set of discovered images: the plan against what
    the store holds, the run record, the commits of finished batches, and the final record.
    The in-process engine runs one; the Ray engine one per shard store."""

    def __init__(self, writer: StoreWriter, disc: Discovery, opts: ExtractOptions, device: str,
                 env: dict[str, str], summary: Summary, *, settle_touched: bool = False,
                 present: Discovery | None = None):
        self.writer, self.summary = writer, summary
        self.plan = plan = make_plan(disc, writer, opts, present=present)
        summary.unchanged = plan.unchanged
        # (before _settle_touched empties plan.check of the touched files)
        summary.all_vanished = bool(plan.vanished) and not plan.unchanged and not plan.check
        if settle_touched and plan.check:  # without a model: hash touched files here
            _settle_touched(writer, plan, summary)
        summary.vanished = plan.vanished
        self.record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "source": str(disc.root), "layout": disc.layout,
                       "options": asdict(opts), "device": device, "host": platform.node(),
                       "versions": env, "weights_stat": _weights_stat(opts.weights)}
        writer.log_run({**self.record, "status": "running"})
        if plan.relabel:
            ids = writer.class_ids(lbl for _, lbl, _ in plan.relabel if lbl is not None)
            writer.relabel([r for r, _, _ in plan.relabel],
                           [ids[lbl] if lbl is not None else -1 for _, lbl, _ in plan.relabel],
                           [s or "" for _, _, s in plan.relabel])
        writer.record_errors([(p, r, "", 0, 0) for p, r in disc.ignored] + plan.reworded)
        summary.failures = list(plan.still_failing)
        summary.stale = list(plan.stale)
        self.tasks = [t for t, _ in plan.check] + plan.new
        self.rows_of = {id(t): row for t, row in plan.check}
        self.retry = set(plan.retry_fixed)

    @property
    def changes(self) -> bool:
        """Whether this run changes the store's rows or errors (beyond its run record)."""
        p = self.plan
        return bool(self.tasks or p.relabel or p.vanished_errors)

    def commit(self, batch: dict[str, Any], feats: np.ndarray | None) -> None:
        """Commit one finished batch: ``batch['items']`` (dicts of load_one plus ``i``, the
        index into ``tasks``), ``batch['good']`` (the ``i`` of the ok items, in the order of
        the rows of ``feats``)."""
        _commit_batch(self.writer, self.tasks, self.rows_of, batch, feats, self.retry,
                      self.summary)

    def failed(self, e: BaseException) -> None:
        with contextlib.suppress(StoreError):
            self.writer.log_run({**self.record, "status": "failed", "error": str(e),
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def finish(self, seconds: float) -> None:
        summary = self.summary
        if self.plan.vanished_errors:
            self.writer.forget_errors(self.plan.vanished_errors)
        summary.failed = len(summary.failures)
        summary.seconds = seconds
        self.writer.log_run(
            {**self.record, "status": "interrupted" if summary.interrupted else "done",
             "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "summary": {k: v for k, v in asdict(summary).items()
                         if k not in ("failures", "ignored_files", "vanished", "store")},
             "vanished": len(summary.vanished)})


def _weights_stat(weights: str | None) -> list[int] | None:
    """(size, mtime_ns) of a --weights file, so a rerun can tell the file is unchanged."""
    if weights in (None, "auto", "bundled", "hub"):
        return None
    try:
        st = os.stat(weights)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]



def _from_finetune(weights: str | None) -> bool:
    """Whether --weights is (by its name and the manifest beside it; nothing loaded) the
    output or a checkpoint of an `embedpipe finetune` run, whose store records the images
    the run trained on."""
    if weights in (None, "auto", "bundled", "hub"):
        return False
    path = Path(weights)
    if path.parent.name.endswith(".checkpoints"):
        return True
    try:
        import json

        m = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and str(m.get("format", "")).startswith("embedpipe-finetune")


def _same_as_last_run(out: Path, opts: ExtractOptions, stored: dict[str, Any]) -> bool:
    """True when ``opts`` would give the store's identity for sure, known without loading the
    backbone: the store's last run used the same feature-deciding options, the same weights file
    (size and mtime), embedpipe and timm versions, and the precision asked is 'auto' or the
    store's own (by a runtime that makes the store's kind of bf16). Anything else takes the full
    check (load the backbone, compare identities)."""
    if not stored.get("precision") or not stored.get("data_config"):
        return False
    sp = stored["precision"]
    if opts.precision not in ("auto", numeric_precision(sp)) or opts.device not in ("auto", "cpu"):
        return False
    if (sp, opts.runtime) in (("bf16", "openvino"), (OV_BF16, "torch")):
        return False  # another runtime's bf16: the full check names the mismatch
    try:
        runs = read_runs(out)
    except StoreError:
        return False
    last = next((r for r in reversed(runs) if isinstance(r.get("options"), dict)), None)
    if last is None:
        return False
    now = asdict(opts)
    if any(last["options"].get(k) != now[k] for k in _IDENTITY_OPTIONS):
        return False
    if last.get("weights_stat") != _weights_stat(opts.weights):
        return False
    if _from_finetune(opts.weights) and not has_finetune_record(out):
        return False  # a store of before the record: the full check adds it (StoreWriter.open)
    was = last.get("versions") or {}
    return (was.get("embedpipe") == __version__
            and was.get("timm") == version_of("timm"))


# A per-image failure, as a decode error is: the image is listed (extract's summary, `info`,
# predict's skipped images; the next run with the same options, which would compute the same
# features, lists it again) and no command meets its features
UNUSABLE_FEATURES = ("the backbone gave NaN, infinite or huge features (beyond ±{limit:.0e}) "
                     "for this image, a numeric overflow: extract it with --precision fp32 "
                     "(or check the --weights)")


def _refuse_unusable_features(items: dict[int, dict[str, Any]], good: list[int],
                              feats: np.ndarray) -> tuple[list[int], np.ndarray]:
    """``good`` and ``feats`` without the rows whose features are unusable
    (checks.unusable_rows); their items become errors (status, reason) in place."""
    from .. import checks

    bad = checks.unusable_rows(feats)
    if not len(bad):
        return good, feats
    for k in bad:
        it = items[good[int(k)]]
        it["status"] = "error"
        it["reason"] = UNUSABLE_FEATURES.format(limit=checks.FEATURE_LIMIT)
    keep = np.setdiff1d(np.arange(len(good)), bad)
    return [good[int(k)] for k in keep], feats[keep]


def _commit_batch(writer: StoreWriter, tasks: list[Task], rows_of: dict[int, int],
                  batch: dict[str, Any], feats: np.ndarray | None, retry: set[str],
                  summary: Summary) -> None:
    items = {it["i"]: it for it in batch["items"]}
    good = batch["good"]
    if feats is not None and len(good):
        good, feats = _refuse_unusable_features(items, good, feats)
    new_pos = [k for k, i in enumerate(good) if id(tasks[i]) not in rows_of]
    old_pos = [k for k, i in enumerate(good) if id(tasks[i]) in rows_of]

    def cols(pos: list[int]) -> dict[str, Any]:
        refs = [tasks[good[k]].ref for k in pos]
        its = [items[good[k]] for k in pos]
        return dict(labels=_label_ids(writer, refs), hashes=[it["hash"] for it in its],
                    splits=[r.split or "" for r in refs],
                    mtime_ns=[it["mtime_ns"] for it in its], size=[it["size"] for it in its])

    if new_pos:
        writer.append(feats[new_pos], paths=[tasks[good[k]].ref.rel for k in new_pos],
                      **cols(new_pos))
        summary.extracted += len(new_pos)
    if old_pos:
        writer.overwrite([rows_of[id(tasks[good[k]])] for k in old_pos], feats[old_pos],
                         **cols(old_pos))
        summary.replaced += len(old_pos)
    same = [it for it in batch["items"] if it["status"] == "same"]
    if same:
        rows = [rows_of[id(tasks[it["i"]])] for it in same]
        refs = [tasks[it["i"]].ref for it in same]
        writer.update_stat(rows, [it["mtime_ns"] for it in same], [it["size"] for it in same])
        writer.relabel(rows, _label_ids(writer, refs), [r.split or "" for r in refs])
        summary.unchanged += len(same)
    errors = [it for it in batch["items"] if it["status"] == "error"]
    if errors:
        writer.record_errors([(tasks[it["i"]].ref.rel, it["reason"], it["hash"],
                               it["mtime_ns"], it["size"]) for it in errors])
        summary.failures += [(tasks[it["i"]].ref.rel, it["reason"]) for it in errors]
        summary.stale += [tasks[it["i"]].ref.rel for it in errors if id(tasks[it["i"]]) in rows_of]
    fixed = [tasks[i].ref.rel for i in good if tasks[i].ref.rel in retry]
    if fixed:
        writer.forget_errors(fixed)
