"""The batch engine: plan what to extract, decode in loader workers, run the backbone, commit.

A run is planned against what the store already holds, so a rerun does only new work:
  * a path already stored whose size and mtime are unchanged is skipped without reading it;
  * one whose stat changed is re-hashed in a worker: same content → only the stat is updated,
    other content → extracted again and its row overwritten;
  * a file that failed before with the same stat is not retried (it is still reported);
  * paths in the store that are gone from the data, and changed files that no longer decode,
    are reported, and their rows removed with ``prune``.
Rows are committed per finished batch (see store.py), so an interrupted run loses at most the
batch in flight.

torch, timm and the backbone are imported and loaded only when something must be extracted: a
rerun with the options of the store's last run on an unchanged folder plans against the store
and finishes without them (see ``_same_as_last_run``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import platform
import sys
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import DEFAULT_MODEL, __version__
from .data import (DEFAULT_MAX_PIXELS, DecodeError, Discovery, ImageRef, content_hash,
                   decode_image, discover, read_file)
from .progress import Progress, printer
from .errors import UserError
from .store import (StoreError, StoreMismatch, StoreWriter, check_not_busy, describe_mismatch,
                    prune, read_identity, read_runs)

if TYPE_CHECKING:  # imported where used: a no-op rerun never imports torch or timm
    import torch

    from .backbones import Backbone

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILES = ("auto", "on", "off")
DTYPES = ("float32", "float16")


class ExtractError(UserError):
    """A bad option or environment; one line naming the problem and the fix."""


@dataclass
class ExtractOptions:
    model: str = DEFAULT_MODEL
    weights: str | None = None
    random_init: bool = False
    pool: str | None = None
    img_size: int | None = None
    crop_pct: float | None = None
    device: str = "auto"
    precision: str = "auto"
    dtype: str = "float32"
    batch_size: int = 32
    workers: int | None = None
    layout: str = "auto"
    exact_decode: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    prune: bool = False
    channels_last: bool = True
    shard: str | None = None  # "K/N": only the files of shard K of N (merge with store.merge)
    tta: str | None = None  # test-time augmentation: "flip", "crops" or "flip,crops"
    compile: str = "auto"  # torch.compile the backbone: auto, on, off (not part of the identity)


@dataclass
class Summary:
    store: Path
    total: int = 0
    extracted: int = 0
    replaced: int = 0
    unchanged: int = 0
    failed: int = 0
    ignored: int = 0
    vanished: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # changed files that no longer decode
    pruned: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    ignored_files: list[tuple[str, str]] = field(default_factory=list)
    device: str = ""
    precision: str = ""
    compiled: str = ""  # "", "compiled" or "eager (compile failed)"
    interrupted: bool = False

    @property
    def rate(self) -> float:
        done = self.extracted + self.replaced
        return done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        parts = [f"{self.extracted} extracted"]
        if self.replaced:
            parts.append(f"{self.replaced} changed and re-extracted")
        parts.append(f"{self.unchanged} already in store")
        parts.append(f"{self.failed} failed")
        if self.ignored:
            parts.append(f"{self.ignored} ignored")
        if self.stale:
            parts.append(f"{len(self.stale)} changed but undecodable (old rows kept)")
        if self.vanished:
            parts.append(f"{len(self.vanished)} vanished")
        if self.pruned:
            parts.append(f"{self.pruned} pruned")
        head = "interrupted" if self.interrupted else "done"
        how = ", ".join(x for x in (self.device, self.precision, self.compiled) if x)
        return (f"{head}: {', '.join(parts)} of {self.total} images in {self.seconds:.1f} s "
                f"({self.rate:.1f} img/s, {how}) → {self.store}")


# -- device / precision --------------------------------------------------------------------

def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ExtractError(f"--device {device}: not a device; pass auto, cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ExtractError(f"--device {device}: CUDA is not available on this machine; "
                               "pass --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ExtractError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                               "device(s); pass a smaller index")
    elif dev.type != "cpu":
        raise ExtractError(f"--device {device}: unsupported; pass auto, cpu or cuda[:N]")
    return dev


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX512-BF16 or AMX), where it is measured faster
    than fp32 (bench/precision.py); elsewhere bf16 is emulated and slower."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device, stored: str | None = None) -> str:
    if precision not in PRECISIONS:
        raise ExtractError(f"--precision {precision}: pass one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if stored in ("fp32", "bf16", "fp16"):
            return stored  # keep an existing store consistent across machines
        import torch

        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return precision


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (cores or 1) - 1))


def versions() -> dict[str, str]:
    import h5py
    import PIL
    import timm
    import torch

    return {"embedpipe": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "h5py": h5py.__version__, "pillow": PIL.__version__,
            "python": platform.python_version()}


# -- loading -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    ref: ImageRef
    expect_hash: str | None  # set when only a content check is needed first


class _Images:
    """Reads, hashes and decodes one image per item; never raises for a bad file. (A map-style
    dataset for torch's DataLoader: __len__ and __getitem__.)

    Paths and expected hashes are kept in two numpy byte arrays, not as the tasks' Python
    objects: a forked loader worker that reads a Python object writes its reference count,
    which copies the object's memory page into the worker, so a worker walking a list of
    tasks grew by ~16 KB per image (bench/results/memory.md). A numpy array is one object."""

    def __init__(self, tasks: list[Task], transform: Any, min_size: tuple[int, int] | None,
                 max_pixels: int | None):
        self.paths = np.array([os.fsencode(t.ref.path) for t in tasks], dtype=np.bytes_)
        self.hashes = np.array([(t.expect_hash or "").encode() for t in tasks], dtype=np.bytes_)
        self.transform = transform
        self.min_size, self.max_pixels = min_size, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        expect = self.hashes[i].decode() or None
        return {"i": i, **load_one(os.fsdecode(self.paths[i]), expect, self.transform,
                                   self.min_size, self.max_pixels)}


def load_one(path: str | Path, expect_hash: str | None, transform: Any,
             min_size: tuple[int, int] | None, max_pixels: int | None) -> dict[str, Any]:
    """Stat, read, hash and decode one file: a dict with status ok (and its ``tensor``), same
    (content equals ``expect_hash``: nothing to extract) or error (and its ``reason``), plus
    hash, mtime_ns and size. Never raises for a bad file (both engines use this)."""
    out: dict[str, Any] = {"hash": "", "mtime_ns": 0, "size": 0}
    try:
        st = os.stat(path)
        out["mtime_ns"], out["size"] = st.st_mtime_ns, st.st_size
    except OSError:
        pass
    try:
        data = read_file(path)
        out["hash"] = content_hash(data)
        if expect_hash is not None and out["hash"] == expect_hash:
            out["status"] = "same"
            return out
        img = decode_image(data, min_size=min_size, max_pixels=max_pixels)
        out["tensor"] = transform(img)
        out["status"] = "ok"
    except DecodeError as e:
        out["status"], out["reason"] = "error", str(e)
    except Exception as e:  # noqa: BLE001 - a transform failure is this file's failure too
        out["status"], out["reason"] = "error", f"preprocessing failed: {type(e).__name__}: {e}"
    return out


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    good = [it for it in items if it["status"] == "ok"]
    return {
        "items": items,
        "tensor": torch.stack([it.pop("tensor") for it in good]) if good else None,
        "good": [it["i"] for it in good],
    }


# -- the run -------------------------------------------------------------------------------

@dataclass
class Plan:
    new: list[Task]
    check: list[tuple[Task, int]]  # stat changed: (task, row)
    relabel: list[tuple[int, str | None, str | None]]  # row, label, split of unchanged files
    still_failing: list[tuple[str, str]]
    retry_fixed: list[str]
    unchanged: int
    vanished: list[str]
    vanished_errors: list[str]


def make_plan(disc: Discovery, writer: StoreWriter) -> Plan:
    idx = writer.index()
    classes = {c: i for i, c in enumerate(writer.classes)}
    new, check, relabel, failing, retry = [], [], [], [], []
    unchanged = 0
    for ref in disc.items:
        try:
            st = os.stat(ref.path)
            stat = (st.st_mtime_ns, st.st_size)
        except OSError:
            stat = None
        row = idx.row.get(ref.rel)
        if row is not None:
            same = stat is not None and (int(idx.mtime_ns[row]), int(idx.size[row])) == stat
            if same:
                unchanged += 1
                label = classes.get(ref.label, -2) if ref.label is not None else -1
                if label != int(idx.label[row]) or (ref.split or "") != idx.split[row]:
                    relabel.append((row, ref.label, ref.split))
            else:
                check.append((Task(ref, idx.hash[row]), row))
            continue
        err = idx.errors.get(ref.rel)
        if err is not None and stat is not None and (err[2], err[3]) == stat:
            failing.append((ref.rel, err[0]))
            continue
        if err is not None:
            retry.append(ref.rel)
        new.append(Task(ref, None))
    seen = {r.rel for r in disc.items} | {p for p, _ in disc.ignored}
    vanished = sorted(p for p in idx.row if p not in seen)
    vanished_err = sorted(p for p in idx.errors if p not in seen)
    return Plan(new, check, relabel, failing, retry, unchanged, vanished, vanished_err)


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


def run(source: str | Path | Discovery, out: str | Path, opts: ExtractOptions, *,
        progress: bool = True, say: Callable[[str], None] | None = None,
        backbone: Backbone | None = None) -> Summary:
    """Extract features of every image under ``source`` (a folder, a CSV manifest, or images
    already discovered) into the store ``out``."""
    say = say or printer(progress)
    t0 = time.perf_counter()
    check_options(opts)
    out = Path(out)
    disc = source if isinstance(source, Discovery) else discover(source, opts.layout)
    if opts.shard:
        disc = select_shard(disc, opts.shard)
    check_not_busy(out)  # fail now rather than after loading the backbone
    stored = read_identity(out) if out.exists() else {}
    lazy = backbone is None and _same_as_last_run(out, opts, stored)
    if lazy:  # plan against the store first; load the backbone only if there is work
        device, precision = None, stored["precision"]
        identity, data_config, env = stored, json.loads(stored["data_config"]), _light_versions()
    else:
        device, precision, backbone, data_config, identity = _load(opts, stored, say, backbone)
        env = versions()
    summary = Summary(out, total=len(disc.items), ignored=len(disc.ignored),
                      ignored_files=list(disc.ignored),
                      device=str(device or "no model loaded"), precision=precision)
    with StoreWriter.open(out, identity, versions=env, progress=say) as writer:
        session = Session(writer, disc, opts, summary.device, env, summary,
                          settle_touched=lazy)
        if lazy and session.tasks:  # new or changed files: now the backbone is needed
            device, precision, backbone, data_config, identity = _load(opts, stored, say, None)
            mismatch = describe_mismatch(out, stored, identity)
            if mismatch:  # the same options no longer give the same features (e.g. weights)
                raise StoreMismatch(mismatch)
            summary.device, summary.precision = str(device), precision
            session.record.update(device=summary.device, versions=versions())
        try:
            _extract(session, backbone, data_config, opts, device, precision, progress)
        except KeyboardInterrupt:
            summary.interrupted = True
        except StoreError as e:  # e.g. the disk filled up: note it in the run record if we can
            session.failed(e)
            raise
        session.finish(time.perf_counter() - t0)
    if opts.prune and (summary.vanished or summary.stale) and not summary.interrupted:
        summary.pruned = len(prune(out, set(summary.vanished) | set(summary.stale)))
    summary.seconds = time.perf_counter() - t0
    return summary


def check_options(opts: ExtractOptions) -> None:
    """Fail on a bad option before anything is loaded."""
    if opts.batch_size < 1:
        raise ExtractError(f"--batch-size {opts.batch_size}: pass a positive number")
    if opts.dtype not in DTYPES:
        raise ExtractError(f"--dtype {opts.dtype}: pass float32 or float16")
    if opts.compile not in COMPILES:
        raise ExtractError(f"--compile {opts.compile}: pass one of {', '.join(COMPILES)}")
    if opts.max_pixels is not None and opts.max_pixels < 1:
        raise ExtractError(f"--max-pixels {opts.max_pixels}: pass a positive number of pixels "
                           f"(default {DEFAULT_MAX_PIXELS})")
    if opts.tta is not None:
        from .backbones import parse_tta

        parse_tta(opts.tta)


class Session:
    """One store brought up to date with one set of discovered images: the plan against what
    the store holds, the run record, the commits of finished batches, and the final record.
    The in-process engine runs one; the Ray engine one per shard store."""

    def __init__(self, writer: StoreWriter, disc: Discovery, opts: ExtractOptions, device: str,
                 env: dict[str, str], summary: Summary, *, settle_touched: bool = False):
        self.writer, self.summary = writer, summary
        self.plan = plan = make_plan(disc, writer)
        summary.unchanged = plan.unchanged
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
        writer.record_errors([(p, r, "", 0, 0) for p, r in disc.ignored])
        summary.failures = list(plan.still_failing)
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


# Options that decide the features a run stores (the rest only change speed or what is planned).
_IDENTITY_OPTIONS = ("model", "weights", "random_init", "pool", "img_size", "crop_pct", "dtype",
                     "exact_decode", "tta")


def _load(opts: ExtractOptions, stored: dict[str, Any], say: Callable[[str], None],
          backbone: Backbone | None) -> tuple[Any, str, Backbone, dict[str, Any], dict[str, Any]]:
    """Device, precision, backbone (loaded unless given), data config and store identity."""
    from .backbones import load_backbone

    device = resolve_device(opts.device)
    precision = resolve_precision(opts.precision, device, stored.get("precision"))
    if precision == "fp16" and device.type == "cpu":
        say("note: fp16 on the CPU is emulated and slow; bf16 or fp32 are faster there")
    if backbone is None:
        backbone = load_backbone(opts.model, weights=opts.weights, random_init=opts.random_init,
                                 pool=opts.pool, img_size=opts.img_size, crop_pct=opts.crop_pct)
    data_config, identity = store_identity(backbone, opts, precision)
    return device, precision, backbone, data_config, identity


def _weights_stat(weights: str | None) -> list[int] | None:
    """(size, mtime_ns) of a --weights file, so a rerun can tell the file is unchanged."""
    if weights in (None, "auto", "bundled", "hub"):
        return None
    try:
        st = os.stat(weights)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _light_versions() -> dict[str, str]:
    """versions() from package metadata, without importing torch or timm."""
    out = {"embedpipe": __version__}
    for name, dist in (("torch", "torch"), ("timm", "timm"), ("numpy", "numpy"),
                       ("h5py", "h5py"), ("pillow", "pillow")):
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    out["python"] = platform.python_version()
    return out


def _same_as_last_run(out: Path, opts: ExtractOptions, stored: dict[str, Any]) -> bool:
    """True when ``opts`` would give the store's identity for sure, known without loading the
    backbone: the store's last run used the same feature-deciding options, the same weights file
    (size and mtime), embedpipe and timm versions, and the precision asked is 'auto' or the
    store's own. Anything else takes the full check (load the backbone, compare identities)."""
    if not stored.get("precision") or not stored.get("data_config"):
        return False
    if opts.precision not in ("auto", stored["precision"]) or opts.device not in ("auto", "cpu"):
        return False
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
    was = last.get("versions") or {}
    return (was.get("embedpipe") == __version__
            and was.get("timm") == _light_versions()["timm"])


def store_identity(backbone: Backbone, opts: ExtractOptions,
                   precision: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The preprocessing (the model's data config, JPEG draft decoding, TTA) and the identity a
    store of ``backbone`` features made with ``opts`` records and is checked against."""
    from .backbones import parse_tta

    tta = parse_tta(opts.tta)
    data_config = {**backbone.data_config, "jpeg_draft": not opts.exact_decode,
                   **({"tta": tta} if tta else {})}
    identity = {**backbone.identity(), "data_config": json.dumps(data_config, sort_keys=True),
                "precision": precision, "dtype": opts.dtype}
    return data_config, identity


def prepare_model(backbone: Backbone, device: torch.device, precision: str,
                  channels_last: bool) -> tuple[torch.nn.Module, Any]:
    """The backbone on ``device`` (channels-last when asked) and the autocast context of
    ``precision`` (a no-op for fp32), for ``embed``."""
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest
    model = backbone.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    return model, amp


# -- torch.compile ---------------------------------------------------------------------------

# `--compile auto` compiles only when at least this many forward passes of one image are due
# (images × TTA views); None: never on this device type. Measured by bench/compile.py
# (bench/results/compile.md) on a 2-core AMD EPYC without native bf16, fp32: compiling Lite0
# took 245 s with an empty inductor cache and 17 s with a filled one, and the compiled model
# ran 1.7× eager, so a cold compile paid back after ~1,500 images. ResNet-50 compiled ran
# 0.93–1.07× eager (344 s cold compile): no gain, so the threshold is set for the default
# backbone. CUDA: not measured here (no GPU); the same threshold.
COMPILE_MIN_IMAGES: dict[str, int | None] = {"cpu": 2000, "cuda": 2000}


def compile_cache_dir() -> Path:
    """Where inductor keeps compiled kernels and FX graphs between runs (unless the user set
    TORCHINDUCTOR_CACHE_DIR): <XDG_CACHE_HOME or ~/.cache>/embedpipe/inductor."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "embedpipe" / "inductor"


def resolve_compile(mode: str, device: torch.device, forwards: int) -> bool:
    """Whether to torch.compile the backbone for ``forwards`` single-image forward passes."""
    if mode not in COMPILES:
        raise ExtractError(f"--compile {mode}: pass one of {', '.join(COMPILES)}")
    if mode != "auto":
        return mode == "on"
    least = COMPILE_MIN_IMAGES.get(device.type)
    return least is not None and forwards >= least


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class CompiledForward:
    """The backbone's forward through ``torch.compile`` with one fixed batch shape.

    Shorter batches (the last one, or one with undecodable files) are padded with zeros to
    ``batch`` and the padding's outputs dropped, so the compiled graph is never recompiled
    for a new shape (eval-mode networks treat every image independently). Any failure to
    compile -- torch.compile itself, a missing C++ compiler or an unsupported op surfacing at
    the first call -- prints one warning line and the run continues in eager mode: the
    failed batch is recomputed eagerly, so nothing is lost.
    """

    def __init__(self, model: torch.nn.Module, batch: int,
                 warn: Callable[[str], None] = _warn):
        self.eager, self.batch, self.warn = model, batch, warn
        self.failed = False
        self.fn: Any = None
        import torch

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
        # torch.utils.cpp_extension logs "No CUDA runtime is found" on CPU-only machines
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        try:
            self.fn = torch.compile(model, dynamic=False)
        except Exception as e:  # noqa: BLE001 - e.g. a Python version dynamo does not support
            self._fall_back(e)

    def _fall_back(self, e: BaseException) -> None:
        self.failed, self.fn = True, None
        first = (str(e).strip().splitlines() or [""])[0][:160]
        self.warn(f"warning: torch.compile failed ({type(e).__name__}: {first}); continuing "
                  "in eager mode (same features; pass --compile off to skip compiling)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fn is None:
            return self.eager(x)
        import torch

        n = x.shape[0]
        xp = x
        if n < self.batch:
            xp = torch.cat([x, x.new_zeros((self.batch - n, *x.shape[1:]))])
            if x.is_contiguous(memory_format=torch.channels_last):
                xp = xp.contiguous(memory_format=torch.channels_last)
        try:
            return self.fn(xp)[:n]
        except Exception as e:  # noqa: BLE001 - compile errors surface at the first call
            self._fall_back(e)
            return self.eager(x)


def select_shard(disc: Discovery, shard: str) -> Discovery:
    """Keep the files of shard K of N (0-based; stable across runs: by a hash of the path)."""
    try:
        k, n = (int(v) for v in shard.split("/"))
        assert 0 <= k < n
    except (ValueError, AssertionError):
        raise ExtractError(f"--shard {shard}: pass K/N with 0 <= K < N, e.g. 0/4") from None
    return partition(disc, n)[k]


def shard_of(rel: str, n: int) -> int:
    """The shard (of ``n``) a file belongs to: a hash of its relative path, so the same file
    lands in the same shard on every run and every machine."""
    return zlib.crc32(rel.encode()) % n


def partition(disc: Discovery, n: int) -> list[Discovery]:
    """Split the discovered files (and the ignored ones) into ``n`` shards by shard_of."""
    items: list[list[ImageRef]] = [[] for _ in range(n)]
    ign: list[list[tuple[str, str]]] = [[] for _ in range(n)]
    for r in disc.items:
        items[shard_of(r.rel, n)].append(r)
    for p, why in disc.ignored:
        ign[shard_of(p, n)].append((p, why))
    return [Discovery(disc.root, disc.layout, items[k], disc.class_names, ign[k])
            for k in range(n)]


def _extract(session: Session, backbone: Backbone, data_config: dict[str, Any],
             opts: ExtractOptions, device: torch.device, precision: str,
             progress: bool) -> None:
    tasks = session.tasks
    if not tasks:
        return
    import torch

    from .backbones import decode_size, make_views_transform

    min_size = None if opts.exact_decode else decode_size(data_config)
    dataset = _Images(tasks, make_views_transform(data_config), min_size, opts.max_pixels)
    workers = default_workers() if opts.workers is None else max(0, opts.workers)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=opts.batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if workers else None,
        worker_init_fn=functools.partial(_close_in_worker, session.writer.inherited_lock()),
    )
    model, amp = prepare_model(backbone, device, precision, opts.channels_last)
    tta = data_config.get("tta") or ""
    forwards = len(tasks) * (5 if "crops" in tta else 1) * (2 if "flip" in tta else 1)
    if resolve_compile(opts.compile, device, forwards):
        model = CompiledForward(model, opts.batch_size)  # warns on stderr even with -q
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

    with Progress(len(tasks), "extract", enabled=progress) as bar, torch.inference_mode():
        try:
            for batch in loader:
                feats = None
                if batch["tensor"] is not None:
                    feats = embed(model, batch["tensor"], device, amp=amp,
                                  channels_last=opts.channels_last,
                                  flip="flip" in (data_config.get("tta") or ""),
                                  chunk=opts.batch_size)
                    feats = feats.cpu().numpy().astype(out_dtype, copy=False)
                settle()
                pending.append((writes.submit(session.commit, batch, feats),
                                len(batch["items"])))
            settle()
        finally:
            try:
                settle()
            finally:
                writes.shutdown(wait=True)
    if isinstance(model, CompiledForward) and model.failed:
        session.summary.compiled = "eager (compile failed)"


def _close_in_worker(fd: int | None, worker_id: int) -> None:
    """A loader worker's start: close its copy of the store's writer lock (see
    StoreWriter.inherited_lock), so that it never holds the lock of a killed run."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def embed(model: torch.nn.Module, views: torch.Tensor, device: torch.device, *, amp: Any,
          channels_last: bool, flip: bool, chunk: int) -> torch.Tensor:
    """B×V×C×H×W views (V = 1 without crops TTA) → B×D float32 pooled features: the mean over
    the views and, with ``flip``, their mirror images. Forward passes of at most ``chunk``."""
    import torch

    b, v = views.shape[:2]
    x = views.flatten(0, 1).to(device, non_blocking=True)
    if flip:
        x = torch.cat([x, x.flip(-1)])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with amp:
        outs = [model(x[lo:lo + chunk]) for lo in range(0, x.shape[0], chunk)]
    f = (outs[0] if len(outs) == 1 else torch.cat(outs)).float()
    return f.view(-1, b, v, f.shape[-1]).mean(dim=(0, 2))


def _commit_batch(writer: StoreWriter, tasks: list[Task], rows_of: dict[int, int],
                  batch: dict[str, Any], feats: np.ndarray | None, retry: set[str],
                  summary: Summary) -> None:
    items = {it["i"]: it for it in batch["items"]}
    good = batch["good"]
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


def default_store_path(source: str | Path, opts: ExtractOptions, cache_dir: Path) -> Path:
    """cache/<data>__<model>__<weights>.h5, so different backbones never share a store."""
    src = Path(source).resolve()
    data = src.stem if src.is_file() else src.name
    if opts.random_init:
        w = "random"
    elif opts.weights in (None, "auto", "bundled", "hub"):
        w = opts.weights or "default"
    else:
        w = Path(opts.weights).stem
    parts = [data or "data", opts.model.replace("/", "_"), w]
    if opts.pool:
        parts.append(opts.pool)
    if opts.img_size:
        parts.append(str(opts.img_size))
    if opts.tta:
        from .backbones import parse_tta

        if parse_tta(opts.tta):
            parts.append("tta-" + parse_tta(opts.tta).replace(",", "-"))
    return cache_dir / ("__".join(parts) + ".h5")
