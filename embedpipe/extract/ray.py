"""`extract --engine ray`: the same extraction spread over a Ray cluster with Ray Data.

Design (one run):
  * The driver (this process) discovers the files and partitions them into a fixed number of
    shards by a hash of each path (extract.partition), recorded in ``STORE.shards/shards.json``
    on the first run, so a rerun maps every file to the same shard store
    ``STORE.shards/shard-KKKKK-of-NNNNN.h5`` (same schema and provenance as any store).
  * Each shard store is planned exactly as a single-machine extract plans its store
    (extract.Session): committed rows are kept, only new or changed files become work. A
    finished shard has nothing to do and is left as it is.
  * The work of up to MAX_OPEN_SHARDS shards at a time runs as one Ray Data pipeline:
    ``from_items`` → ``map_batches(decode)`` as CPU tasks (read, hash, decode, preprocess:
    extract.load_one, the function the in-process loader uses) → ``map_batches(_Embedder)`` on
    an actor pool of ``--workers`` actors, one backbone per actor, ``num_gpus`` per actor with
    ``--num-gpus-per-worker``. Ray Data restarts a killed actor and retries its batch
    (max_restarts / max_task_retries = -1 for actor pools).
  * The driver consumes the stream and commits each finished batch to its shard store through
    extract.Session (a store has exactly one writer: its flock and SWMR model; Ray Data cannot
    route every batch of one shard to one fixed actor, so the stream's consumer writes).
    Features are small (5 KB per 1280-d fp32 image) next to the decoded tensors the pipeline
    moves, so one driver keeps up with many GPUs; see README "Sizing".
  * Finally the shard stores are merged (store.merge, rebuild) into STORE, which every other
    command reads like any store; the merge is skipped when no shard changed.

Ray is an optional extra (``pip install 'embedpipe[ray]'``): this module imports it lazily.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..provenance import identity_of
from ..data import discover
from ..errors import RAY_MISSING, first_line
from ..extract.loader import load_one
from ..extract.options import ExtractError, ExtractOptions, Summary, check_options
from ..extract.plan import Session, refuse_other_dataset
from ..env import EXTRACT, versions
from ..extract.runtime import auto_precision, choose_runtime, resolve_precision
from ..provenance import STORED_PRECISIONS, stored_precision
from ..extract.shards import partition
from ..progress import Progress, printer
from ..provenance import diff_fields
from ..store._hdf5 import check_not_busy
from ..store.ops import merge, prune
from ..store.read import read_identity
from ..store.schema import StoreError, StoreMismatch, describe_mismatch
from ..store.write import StoreWriter

MAX_OPEN_SHARDS = 64  # shard stores written at once (one pipeline); more run in waves
ROWS_PER_SHARD = 50_000  # default shard size on the first run (resume granularity)
ACTOR_MEMORY = 1 << 30  # bytes reserved per backbone actor (Ray's logical memory resource)


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ExtractError(RAY_MISSING) from None
    return ray


def shard_dir(out: Path) -> Path:
    return out.with_name(out.name + ".shards")


def shard_path(sdir: Path, k: int, n: int) -> Path:
    return sdir / f"shard-{k:05d}-of-{n:05d}.h5"


def _shard_count(sdir: Path, n_files: int, workers: int) -> int:
    """The shard count recorded by the first run (so files keep their shard), else a new one:
    at least one shard per worker, at most ROWS_PER_SHARD files per shard."""
    meta = sdir / "shards.json"
    if meta.exists():
        try:
            return int(json.loads(meta.read_text())["shards"])
        except (ValueError, KeyError, TypeError, OSError):
            raise ExtractError(f"{meta}: unreadable shard record; move {sdir} aside (its shard "
                               "stores are rebuilt) and rerun") from None
    n = max(1, workers, math.ceil(n_files / ROWS_PER_SHARD))
    try:
        sdir.mkdir(parents=True, exist_ok=True)
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps({"shards": n, "hash": "crc32(relative path) % shards"}))
        os.replace(tmp, meta)
    except OSError as e:
        raise StoreError(f"{sdir}: cannot create the shard folder ({e.strerror}); pass an "
                         "--out in a writable place") from None
    return n


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _mark_merged(sdir: Path, out: Path) -> None:
    """Record that ``out`` is the merge of the shard stores as they are now."""
    tmp = sdir / "merged.json.tmp"
    tmp.write_text(json.dumps({"store": str(out), "stat": _stat_key(out)}))
    os.replace(tmp, sdir / "merged.json")


def _merged(sdir: Path, out: Path) -> bool:
    """Whether ``out`` is still the last merge of the shard stores: the record exists (a run
    that changes a shard removes it first) and ``out`` is the file that merge wrote."""
    try:
        return json.loads((sdir / "merged.json").read_text())["stat"] == _stat_key(out)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _unmark_merged(sdir: Path) -> None:
    try:
        (sdir / "merged.json").unlink()
    except FileNotFoundError:
        pass


# -- what runs on the cluster --------------------------------------------------------------

_TRANSFORMS: dict[str, Any] = {}


def _decode_batch(batch: dict[str, np.ndarray], *, data_config: dict[str, Any],
                  min_size: tuple[int, int] | None, max_pixels: int | None,
                  view_shape: tuple[int, ...], view_dtype: str = "uint8"
                  ) -> dict[str, np.ndarray]:
    """A Ray Data CPU task: read, hash, decode and preprocess a batch of files (load_one, as
    the in-process loader). Bad files become status=error rows with their reason."""
    from ..backbones import make_views_transform

    key = json.dumps(data_config, sort_keys=True)
    if key not in _TRANSFORMS:
        _TRANSFORMS[key] = make_views_transform(data_config)
    transform = _TRANSFORMS[key]
    n = len(batch["key"])
    tensor = np.zeros((n, *view_shape), dtype=view_dtype)
    cols: dict[str, list[Any]] = {"status": [], "reason": [], "hash": [], "mtime_ns": [],
                                  "size": []}
    for j in range(n):
        expect = str(batch["expect"][j]) or None
        it = load_one(str(batch["path"][j]), expect, transform, min_size, max_pixels)
        if it["status"] == "ok":
            tensor[j] = it.pop("tensor").numpy()
        for c in cols:
            cols[c].append(it.get(c, ""))
    return {"key": batch["key"], "tensor": tensor,
            "status": np.array(cols["status"], dtype=object),
            "reason": np.array(cols["reason"], dtype=object),
            "hash": np.array(cols["hash"], dtype=object),
            "mtime_ns": np.array(cols["mtime_ns"], dtype=np.int64),
            "size": np.array(cols["size"], dtype=np.int64)}


def _embedder_class(opts: dict[str, Any], identity: dict[str, Any], device: str,
                    precision: str) -> type:
    """The actor class with its settings built in (a class made here is pickled by value,
    so its actors need no constructor arguments from the object store, which Ray could not
    restore if they were lost while restarting a killed actor)."""

    class Embedder(_Embedder):
        def __init__(self) -> None:
            super().__init__(opts, identity, device, precision)

    return Embedder


class _Embedder:
    """A Ray Data actor: one backbone, loaded once; embeds the ok rows of each batch."""

    def __init__(self, opts: dict[str, Any], identity: dict[str, Any], device: str,
                 precision: str):
        import torch

        from ..backbones import build_backbone
        from ..extract.runtime import build_engine

        o = ExtractOptions(**opts)  # o.runtime: torch or openvino, as the driver resolved it
        backbone = build_backbone(o)
        _, mine = identity_of(backbone, o, precision)
        self.engine = build_engine(backbone, torch.device(device), precision, o.runtime,
                                   channels_last=o.channels_last)
        del backbone
        mine["precision"] = self.engine.stored_precision
        diffs = diff_fields(identity, mine)
        if diffs:  # e.g. another weights file or timm version on this node
            raise ExtractError(f"a Ray worker's backbone differs from the driver's "
                               f"({'; '.join(diffs[:3])}); install the same embedpipe, timm "
                               "and weights on every node")
        self.torch = torch
        self.opts = o
        self.flip = "flip" in (json.loads(identity["data_config"]).get("tta") or "")
        self.dim = int(identity["feature_dim"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["status"] == "ok")
        feats = np.zeros((len(ok), self.dim), dtype=np.float32)
        if ok.any():
            with self.torch.inference_mode():
                f = self.engine(self.torch.from_numpy(batch["tensor"][ok]), flip=self.flip,
                                chunk=self.opts.batch_size)
            feats[ok] = f.cpu().numpy()
        out = {k: v for k, v in batch.items() if k != "tensor"}
        out["features"] = feats
        return out


def _probe(gpus: float) -> tuple[str, bool, bool]:
    """Where the actors will run: (device, CUDA bf16 support, CPU native bf16)."""
    import torch

    from ..extract.runtime import cpu_has_native_bf16

    cuda = gpus > 0 and torch.cuda.is_available()
    return ("cuda" if cuda else "cpu", cuda and torch.cuda.is_bf16_supported(),
            cpu_has_native_bf16())


# -- the driver ------------------------------------------------------------------------------

def run(source: str | Path, out: str | Path, opts: ExtractOptions, *, address: str | None,
        workers: int | None = None, gpus_per_worker: float = 0.0, progress: bool = True,
        say: Callable[[str], None] | None = None,
        notice: Callable[[str], None] | None = None) -> Summary:
    """Extract every image under ``source`` into ``out`` on a Ray cluster (see the module).
    ``notice``: as local.run's (the backbone's notes; default ``say``)."""
    say = say or printer(progress)
    notice = notice or say
    t0 = time.perf_counter()
    if workers is not None and workers < 1:  # before check_options: here they are actors
        raise ExtractError(f"--workers {workers}: pass at least 1 backbone actor")
    check_options(opts)
    if opts.shard:
        raise ExtractError("--shard with --engine ray: the Ray engine shards the files itself; "
                           "drop --shard")
    if gpus_per_worker < 0:
        raise ExtractError(f"--num-gpus-per-worker {gpus_per_worker}: pass 0 or more")
    if opts.device not in ("auto", "cpu", "cuda"):
        raise ExtractError(f"--device {opts.device} with --engine ray: pass auto (cuda when "
                           "--num-gpus-per-worker > 0), cpu or cuda")
    ray = import_ray()
    out = Path(out)
    disc = discover(source, opts.layout)
    check_not_busy(out)
    for note in disc.notes:  # e.g. a class folder whose name ends with a space
        notice(note)
    refuse_other_dataset(out, disc, source)
    stored = read_identity(out) if out.exists() else {}

    from ..backbones import decode_size, build_backbone, make_views_transform

    sdir = shard_dir(out)
    if not stored:  # an earlier run that stopped before its merge: its shards' settings
        first = next(iter(sorted(sdir.glob("shard-*.h5"))), None) if sdir.is_dir() else None
        stored = read_identity(first) if first is not None else {}
    cluster = _Cluster(ray, address, workers, gpus_per_worker, say)
    try:
        backbone = build_backbone(opts)  # as the actors will (the runtime is theirs alone)
        for note in backbone.notes:  # the actors, which build it again, say nothing
            notice(note)
        # before Ray starts: the actors of a local cluster would share this machine's memory
        _check_memory(backbone, opts, cluster, cluster.device(opts.device), len(disc.items))
        known = (sdir / "shards.json").exists()
        if opts.precision == "auto" and not stored.get("precision") or not known:
            cluster.up()  # a first run, or the precision depends on the workers' hardware
        device = cluster.device(opts.device)
        precision = _precision(opts.precision, device, cluster.cuda_bf16, cluster.cpu_bf16,
                               stored.get("precision"))
        # The actors run the runtime resolved here (an actor that cannot run it fails the
        # pipeline with its reason), so every shard's identity is the driver's.
        runtime, why = choose_runtime(opts.runtime, device, precision,
                                      stored=stored.get("precision"),
                                      cpu_bf16=cluster.cpu_bf16 if cluster.probed else None)
        if why:
            print(f"note: --runtime auto uses torch: {why}", file=sys.stderr, flush=True)
        opts = replace(opts, runtime=runtime)
        data_config, identity = identity_of(backbone, opts, precision)
        identity["precision"] = stored_precision(precision, runtime)
        tuned_on = backbone.finetune_hashes  # every shard store records it; merge keeps it
        del backbone
        if stored:
            mismatch = describe_mismatch(out, stored, identity)
            if mismatch:
                raise StoreMismatch(mismatch)
        from PIL import Image

        probe = make_views_transform(data_config)(Image.new("RGB", (8, 8)))
        view_shape = (*probe.shape, str(probe.dtype).removeprefix("torch."))
        min_size = None if opts.exact_decode else decode_size(data_config)
        n_shards = _shard_count(sdir, len(disc.items), cluster.workers or 1)
        parts = partition(disc, n_shards)
        env = versions(*EXTRACT, *(("openvino",) if runtime == "openvino" else ()))
        summary = Summary(out, total=len(disc.items), ignored=len(disc.ignored),
                          ignored_files=list(disc.ignored), device=f"ray:{device}",
                          precision=identity["precision"], runtime=runtime)
        say(f"ray: {len(disc.items)} images in {n_shards} shard stores under {sdir}")
        shard_summaries: list[Summary] = []
        changed = False
        # a line a second when not on a terminal: a fast cluster run (seconds) still shows one,
        # where the 10-s default printed none
        bar = Progress(len(disc.items), "extract (ray)", enabled=progress, every=1.0)
        try:
            for lo in range(0, n_shards, MAX_OPEN_SHARDS):
                wave = range(lo, min(n_shards, lo + MAX_OPEN_SHARDS))
                changed |= _run_wave(cluster, wave, parts, sdir, n_shards, opts, identity,
                                     data_config, env, device, precision, min_size,
                                     view_shape, summary, shard_summaries, bar, say,
                                     finetune_hashes=tuned_on)
                if summary.interrupted:
                    break
        except KeyboardInterrupt:  # outside the batch loop (a wave's start or its shards'
            summary.interrupted = True  # closing): what was committed stays, as inside it
        finally:
            bar.close()
    finally:
        try:
            cluster.close()
        except KeyboardInterrupt:  # Ctrl-C during Ray's shutdown: the shards are closed
            summary.interrupted = True
    for s in shard_summaries:
        for k in ("extracted", "replaced", "unchanged", "failed", "pruned"):
            setattr(summary, k, getattr(summary, k) + getattr(s, k))
        summary.vanished += s.vanished
        summary.stale += s.stale
        summary.failures += [f for f in s.failures if f not in disc.ignored]
    summary.failed = len(summary.failures)
    if not summary.interrupted and (changed or not _merged(sdir, out)):
        shards = [shard_path(sdir, k, n_shards) for k in range(n_shards)]
        shards = [p for p in shards if p.exists()]
        say(f"merging {len(shards)} shard stores into {out}")
        merge(out, shards, versions=env, rebuild=True, progress=say)
        _mark_merged(sdir, out)
    summary.seconds = time.perf_counter() - t0
    return summary


def _check_memory(backbone: Any, opts: ExtractOptions, cluster: "_Cluster", device: str,
                  images: int) -> None:
    """ExtractError (one line, before Ray starts) when the backbone actors of a new local
    cluster on the CPU, each with a batch of min(--batch-size, images) in its forward,
    need more memory than this machine has available (runtime.check_batch_memory, the check
    of a local extract, x the actors). The actors of a remote cluster (--address, RAY_ADDRESS)
    or on GPUs run where the driver cannot measure before they start: not checked here."""
    if device != "cpu" or not cluster.local or not images:
        return
    import torch

    from ..extract.runtime import check_batch_memory

    actors = cluster.workers or 1  # up() makes it 1 on a CPU cluster when --workers is not given
    check_batch_memory(backbone, opts, torch.device("cpu"), min(opts.batch_size, images),
                       copies=actors, copies_what=f"{actors} backbone actors (--workers)")


class _Cluster:
    """The Ray cluster, connected (or started) on first need: a rerun with nothing to do
    never starts Ray."""

    def __init__(self, ray: Any, address: str | None, workers: int | None, gpus: float,
                 say: Callable[[str], None]):
        self.ray, self.address, self.workers, self.gpus, self.say = ray, address, workers, gpus, say
        self.ready = self.started = False
        self.cpus = 1.0
        self.probed: tuple[str, bool, bool] | None = None

    @property
    def local(self) -> bool:
        """Whether the actors run on this machine: a new local cluster (no --address, or
        `local`, and no RAY_ADDRESS), as _init_ray starts it."""
        return self.address in (None, "local") and not os.environ.get("RAY_ADDRESS")

    def up(self) -> None:
        if self.ready:
            return
        ray = self.ray
        if not ray.is_initialized():
            _init_ray(ray, self.address)
            self.started = True
        self.ready = True
        resources = ray.cluster_resources()
        self.cpus = float(resources.get("CPU", 1))
        if self.workers is None:  # one actor per GPU share, else one
            self.workers = max(1, int(resources.get("GPU", 0) // self.gpus) if self.gpus else 1)
        self.probed = ray.get(ray.remote(_probe).options(num_gpus=self.gpus or None,
                                                         num_cpus=0).remote(self.gpus))
        self.say(f"ray: {self.workers} backbone actor(s) on {self.probed[0]}"
                 + (f" ({self.gpus:g} GPU each)" if self.gpus else "")
                 + f", cluster of {self.cpus:g} CPUs")

    def device(self, wanted: str) -> str:
        if self.probed is None:  # not started yet: the device the workers are asked for
            return "cuda" if wanted == "cuda" or (wanted == "auto" and self.gpus) else "cpu"
        if wanted == "cuda" and self.probed[0] != "cuda":
            raise ExtractError("--device cuda with --engine ray: the Ray workers have no CUDA "
                               "GPU; pass --num-gpus-per-worker G on a cluster with GPUs")
        return "cpu" if wanted == "cpu" else self.probed[0]

    @property
    def cuda_bf16(self) -> bool:
        return bool(self.probed and self.probed[1])

    @property
    def cpu_bf16(self) -> bool:
        return bool(self.probed and self.probed[2])

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def _init_ray(ray: Any, address: str | None) -> None:
    kw: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": True,
                          "configure_logging": True}
    if address in (None, "local") and not os.environ.get("RAY_ADDRESS"):
        # A new local cluster: no dashboard, and listening on loopback only.
        kw.update(include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = first_line(e, 200)
        raise ExtractError(f"--address {address}: cannot connect to a Ray cluster ({first}); "
                           "start one with `ray start --head` and pass its address, or omit "
                           "--address to start a local one") from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # embedpipe's own progress line instead
    ctx.print_on_execution_start = False


def _precision(precision: str, device: str, cuda_bf16: bool, cpu_bf16: bool,
               stored: str | None) -> str:
    """The numeric precision: runtime.resolve_precision's rule, with the workers' hardware as
    the cluster probe found it."""
    if precision != "auto" or stored in STORED_PRECISIONS:
        import torch

        return resolve_precision(precision, torch.device("cpu"), stored)
    return auto_precision(device, cuda_bf16=cuda_bf16, cpu_bf16=cpu_bf16)


def _run_wave(cluster: _Cluster, wave: range, parts: list[Any], sdir: Path, n_shards: int,
              opts: ExtractOptions, identity: dict[str, Any], data_config: dict[str, Any],
              env: dict[str, str], device: str, precision: str,
              min_size: tuple[int, int] | None, view_shape: tuple[Any, ...],  # (*shape, dtype)
              summary: Summary, shard_summaries: list[Summary],
              bar: Progress, say: Callable[[str], None], finetune_hashes: Any = None) -> bool:
    """Plan the shards of ``wave``, run their work through one Ray Data pipeline, commit it to
    the shard stores. Returns whether any shard changed."""
    sessions: dict[int, Session] = {}
    writers: list[StoreWriter] = []
    wave_summaries: list[Summary] = []
    items: list[dict[str, Any]] = []
    where: list[tuple[int, int]] = []  # item key → (shard, index into its session's tasks)
    t0 = time.perf_counter()
    changed = False
    error: BaseException | None = None
    try:
        for k in wave:
            s = Summary(shard_path(sdir, k, n_shards), total=len(parts[k].items))
            w = StoreWriter.open(s.store, identity, versions=env, progress=say,
                                 finetune_hashes=finetune_hashes)
            writers.append(w)
            sess = Session(w, parts[k], opts, f"ray:{device}", env, s)
            sess.record["runtime"] = {"name": opts.runtime, "precision": precision,
                                      "version": env.get(opts.runtime, "unknown")}
            wave_summaries.append(s)
            if sess.changes and not changed:
                _unmark_merged(sdir)  # STORE is out of date until the merge at the end
            changed |= sess.changes
            bar.update(len(parts[k].items) - len(sess.tasks))
            if not sess.tasks:
                sess.finish(0.0)  # a finished shard: kept as it is
                w.close()
                continue
            sessions[k] = sess
            for i, t in enumerate(sess.tasks):
                items.append({"key": len(where), "path": str(t.ref.path),
                              "expect": t.expect_hash or ""})
                where.append((k, i))
        if items:
            cluster.up()
            _stream(cluster, items, where, sessions, opts, identity, data_config, device,
                    precision, min_size, view_shape, summary, bar)
    except BaseException as e:
        error = e
        raise
    finally:
        for sess in sessions.values():
            if error is not None:
                sess.failed(error)
                continue
            sess.summary.interrupted = summary.interrupted
            sess.finish(time.perf_counter() - t0)
        for w in writers:
            w.close()
        shard_summaries += wave_summaries
    if opts.prune and not summary.interrupted:
        for s in wave_summaries:
            if s.vanished or s.stale:
                _unmark_merged(sdir)
                s.pruned = len(prune(s.store, set(s.vanished) | set(s.stale)))
                changed = True
    return changed


def _stream(cluster: _Cluster, items: list[dict[str, Any]], where: list[tuple[int, int]],
            sessions: dict[int, Session], opts: ExtractOptions, identity: dict[str, Any],
            data_config: dict[str, Any], device: str, precision: str,
            min_size: tuple[int, int] | None, view_shape: tuple[Any, ...],  # (*shape, dtype)
            summary: Summary, bar: Progress) -> None:
    ray, workers, gpus, cpus = cluster.ray, cluster.workers or 1, cluster.gpus, cluster.cpus
    b = opts.batch_size
    # Leave at least half the cluster's CPUs to the decode tasks (Ray's CPUs are logical:
    # on a small machine the actors get a fraction each).
    actor_cpus = min(1.0, max(0.01, cpus / (2 * workers)))
    decode_cpus = min(1.0, max(0.01, cpus / 2))
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(10_000, -(-len(items) // b))))
    ds = ds.map_batches(_decode_batch, batch_size=b, batch_format="numpy", num_cpus=decode_cpus,
                        fn_kwargs={"data_config": data_config, "min_size": min_size,
                                   "max_pixels": opts.max_pixels, "view_shape": view_shape[:-1],
                                   "view_dtype": view_shape[-1]})
    embedder = _embedder_class(_opts_dict(opts), identity, device, precision)
    ds = ds.map_batches(embedder, batch_size=b, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=workers),
                        num_cpus=actor_cpus, num_gpus=gpus or None,
                        # What one backbone actor holds (model + a batch in flight). Resource
                        # requests that differ from the decode tasks' also keep Ray Data from
                        # fusing decoding into the actors: it stays in CPU tasks, overlapped.
                        memory=ACTOR_MEMORY)
    out_dtype = np.dtype(opts.dtype)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            by_shard: dict[int, list[int]] = {}
            for j, key in enumerate(batch["key"]):
                by_shard.setdefault(where[int(key)][0], []).append(j)
            for k, rows in by_shard.items():
                items_k, good, pos = [], [], []
                for j in rows:
                    it = {"i": where[int(batch["key"][j])][1],
                          "status": str(batch["status"][j]), "hash": str(batch["hash"][j]),
                          "mtime_ns": int(batch["mtime_ns"][j]), "size": int(batch["size"][j])}
                    if it["status"] == "error":
                        it["reason"] = str(batch["reason"][j])
                    if it["status"] == "ok":
                        good.append(it["i"])
                        pos.append(j)
                    items_k.append(it)
                feats = batch["features"][pos].astype(out_dtype, copy=False) if pos else None
                sessions[k].commit({"items": items_k, "good": good}, feats)
            bar.update(len(batch["key"]))
    except KeyboardInterrupt:
        summary.interrupted = True
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - a failure reported by Ray: one line
        cause = e
        while cause.__cause__ is not None and not isinstance(cause, ExtractError):
            cause = cause.__cause__
        text = first_line(cause, 300)
        raise ExtractError(f"the Ray pipeline failed ({type(cause).__name__}: {text}); every "
                           "committed batch is kept in the shard stores: fix the cause and "
                           "rerun the same command") from None


def _opts_dict(opts: ExtractOptions) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(opts)
