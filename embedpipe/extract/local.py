"""The in-process runner: plan, load the backbone only when there is work, decode in DataLoader
workers, embed, and commit each finished batch from a writer thread.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..provenance import identity_of
from ..env import EXTRACT, versions
from ..data import (
    Discovery,
    discover,
)
from ..progress import Progress, printer
from ..store._hdf5 import check_not_busy
from ..store.ops import prune
from ..store.read import read_identity
from ..store.schema import StoreError, StoreMismatch, describe_mismatch
from ..store.write import StoreWriter
from .loader import CtrlC, _collate, _Images, _start_worker, default_workers
from .options import ExtractError, ExtractOptions, Summary, check_options
from .plan import Session, _same_as_last_run, refuse_other_dataset
from .runtime import (
    CompiledForward,
    _warn,
    build_engine,
    check_batch_memory,
    resolve_compile,
    resolve_device,
    resolve_precision,
)
from .shards import select_shard

if TYPE_CHECKING:  # imported where used: a no-op rerun never imports torch or timm
    from ..backbones import Backbone
    from .runtime import Engine



def run(source: str | Path | Discovery, out: str | Path, opts: ExtractOptions, *,
        progress: bool = True, say: Callable[[str], None] | None = None,
        backbone: Backbone | None = None,
        notice: Callable[[str], None] | None = None) -> Summary:
    """Extract features of every image under ``source`` (a folder, a CSV manifest, or images
    already discovered) into the store ``out``. ``say``: progress notes (default: stderr when
    ``progress``); ``notice``: what the user should see even without progress (the backbone's
    notes: which entry of a finetune checkpoint it uses; default ``say``)."""
    say = say or printer(progress)
    notice = notice or say
    t0 = time.perf_counter()
    check_options(opts)
    out = Path(out)
    disc = source if isinstance(source, Discovery) else discover(source, opts.layout)
    check_not_busy(out)  # fail now rather than after loading the backbone
    for note in disc.notes:  # e.g. a class folder whose name ends with a space
        notice(note)
    if not isinstance(source, Discovery):  # a data folder or manifest (predict's images and
        refuse_other_dataset(out, disc, source)  # the embedder's cache add to their stores)
    whole = disc  # a stored file of another --shard has not vanished
    if opts.shard:
        disc = select_shard(disc, opts.shard)
    stored = read_identity(out) if out.exists() else {}
    lazy = backbone is None and _same_as_last_run(out, opts, stored)
    if lazy:  # plan against the store first; load the backbone only if there is work
        device, engine = None, None
        identity, data_config = stored, json.loads(stored["data_config"])
    else:
        device, engine, data_config, identity = _load(opts, stored, say, backbone,
                                                      images=len(disc.items), notice=notice)
    env = _versions(engine)
    summary = Summary(out, total=len(disc.items), ignored=len(disc.ignored),
                      ignored_files=list(disc.ignored),
                      device=str(device or "no model loaded"), precision=identity["precision"],
                      runtime=engine.describe() if engine else "")
    # a store of a fine-tuned backbone records the images it was trained on (a lazy rerun:
    # the store has it from its first run)
    with StoreWriter.open(out, identity, versions=env, progress=say,
                          finetune_hashes=engine and engine.finetune_hashes) as writer:
        session = Session(writer, disc, opts, summary.device, env, summary,
                          settle_touched=lazy, present=whole)
        if engine is not None:
            session.record["runtime"] = engine.record()
            writer.log_run({**session.record, "status": "running"})  # what runs, for `info`
        if lazy and session.tasks:  # new or changed files: now the backbone is needed
            device, engine, data_config, identity = _load(opts, stored, say, None,
                                                          images=len(session.tasks),
                                                          notice=notice)
            mismatch = describe_mismatch(out, stored, identity)
            if mismatch:  # the same options no longer give the same features (e.g. weights)
                raise StoreMismatch(mismatch)
            summary.device, summary.precision = str(device), identity["precision"]
            summary.runtime = engine.describe()
            session.record.update(device=summary.device, versions=_versions(engine),
                                  runtime=engine.record())
            writer.log_run({**session.record, "status": "running"})  # no longer "no model"
        try:
            _extract(session, engine, data_config, opts, progress)
        except KeyboardInterrupt:
            summary.interrupted = True
        except StoreError as e:  # e.g. the disk filled up: note it in the run record if we can
            session.failed(e)
            raise
        session.finish(time.perf_counter() - t0)
    if opts.prune and (summary.vanished or summary.stale) and not summary.interrupted:
        # never every stored row (a Discovery of other images, or moved ones: see Summary)
        gone = set(summary.stale) | (set() if summary.all_vanished else set(summary.vanished))
        summary.pruned = len(prune(out, gone)) if gone else 0
    summary.seconds = time.perf_counter() - t0
    return summary


def _versions(engine: Engine | None) -> dict[str, str]:
    """The run record's versions; with OpenVINO running the backbone, OpenVINO's too."""
    return versions(*EXTRACT, *(("openvino",) if engine and engine.runtime == "openvino"
                                else ()))


def _load(opts: ExtractOptions, stored: dict[str, Any], say: Callable[[str], None],
          backbone: Backbone | None, images: int | None = None,
          notice: Callable[[str], None] | None = None
          ) -> tuple[Any, Engine, dict[str, Any], dict[str, Any]]:
    """Device, the backbone (loaded unless given) ready on its runtime, data config and store
    identity (whose precision names the runtime's bf16: provenance.OV_BF16). With ``images``
    (how many are to be extracted), ExtractError before the runtime is built when a batch of
    them does not fit in memory (runtime.check_batch_memory). The notes of a backbone it loads go to
    ``notice`` (default ``say``)."""
    from ..backbones import build_backbone

    device = resolve_device(opts.device)
    precision = resolve_precision(opts.precision, device, stored.get("precision"))
    if precision == "fp16" and device.type == "cpu":
        say("note: fp16 on the CPU is emulated and slow; bf16 or fp32 are faster there")
    if backbone is None:
        backbone = build_backbone(opts)
        for note in backbone.notes:  # e.g. which entry of a finetune checkpoint it used
            (notice or say)(note)
    if images:
        check_batch_memory(backbone, opts, device, min(opts.batch_size, images))
    data_config, identity = identity_of(backbone, opts, precision)
    # --compile on asks for torch.compile: auto then means torch (OpenVINO compiles anyway)
    runtime = "torch" if opts.runtime == "auto" and opts.compile == "on" else opts.runtime
    engine = build_engine(backbone, device, precision, runtime,
                          channels_last=opts.channels_last, stored=stored.get("precision"),
                          say=_warn)  # on stderr even with -q: it changes what runs
    identity["precision"] = engine.stored_precision
    engine.finetune_hashes = backbone.finetune_hashes
    return device, engine, data_config, identity


def _extract(session: Session, engine: Engine, data_config: dict[str, Any],
             opts: ExtractOptions, progress: bool) -> None:
    tasks = session.tasks
    if not tasks:
        return
    import torch

    device = engine.device
    from ..backbones import decode_size, make_views_transform

    min_size = None if opts.exact_decode else decode_size(data_config)
    dataset = _Images(tasks, make_views_transform(data_config), min_size, opts.max_pixels)
    workers = default_workers() if opts.workers is None else opts.workers
    session.summary.pipeline = (f"{workers} decode worker{'s' if workers > 1 else ''}"
                                if workers else "decode in-process")
    session.record["decode_workers"] = workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=opts.batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if workers else None,
        worker_init_fn=functools.partial(_start_worker, session.writer.inherited_lock()),
    )
    tta = data_config.get("tta") or ""
    forwards = len(tasks) * (5 if "crops" in tta else 1) * (2 if "flip" in tta else 1)
    if engine.runtime == "torch" and resolve_compile(opts.compile, device, forwards):
        # warns on stderr even with -q
        engine.forward = CompiledForward(engine.forward, opts.batch_size)
        session.summary.compiled = "compiled"
    out_dtype = np.dtype(opts.dtype)
    # Writing a batch (HDF5 append + flush) runs in one background thread while the next
    # batch computes; at most one batch is in flight, and it is always finished (also on
    # Ctrl-C or an error) before the store closes.
    writes = ThreadPoolExecutor(1, thread_name_prefix="embedpipe-write")
    pending: list[tuple[Future, int]] = []

    def settle() -> None:
        while pending:
            fut, n = pending.pop()
            fut.result()  # a StoreError (e.g. disk full) surfaces here
            bar.update(n)

    def write(batch: dict[str, Any], result: Callable[[], Any] | None) -> None:
        feats = None
        if result is not None:
            feats = result().cpu().numpy().astype(out_dtype, copy=False)
        settle()
        pending.append((writes.submit(session.commit, batch, feats), len(batch["items"])))

    # With OpenVINO's streams a batch's forward runs in the background (Engine.submit): the
    # next batch is submitted before this one is written, so no stream idles between them.
    # At most one batch is in flight, and it is written on Ctrl-C or an error too.
    inflight: tuple[dict[str, Any], Callable[[], Any] | None] | None = None
    # Ctrl-C stops the loop between batches (CtrlC; its handler is in place before the loader
    # forks its workers, which ignore SIGINT), so the batches taken so far are written.
    with Progress(len(tasks), "extract", enabled=progress) as bar, torch.inference_mode(), \
            CtrlC() as ctrl_c:
        try:
            for batch in loader:
                result = None
                if batch["tensor"] is not None:
                    result = engine.submit(batch["tensor"], flip="flip" in tta,
                                           chunk=opts.batch_size)
                if inflight is not None:
                    write(*inflight)
                    inflight = None
                if engine.background:
                    inflight = (batch, result)
                else:
                    write(batch, result)
                ctrl_c.check()
            if inflight is not None:
                last, inflight = inflight, None
                write(*last)
            settle()
        finally:
            try:
                if inflight is not None:  # Ctrl-C or an error: its forward is done or nearly
                    with contextlib.suppress(Exception):
                        write(*inflight)
                settle()
            finally:
                writes.shutdown(wait=True)
    if isinstance(engine.forward, CompiledForward) and engine.forward.failed:
        session.summary.compiled = "eager (compile failed)"
