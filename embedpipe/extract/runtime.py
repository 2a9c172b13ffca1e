"""The inference runtime: device, precision rule, torch/OpenVINO, torch.compile, ``embed``.

The one owner of these decisions (DESIGN.md: only the runtime module knows devices,
precisions and inference runtimes); extract, predict, serve, the Ray engine's actors and
finetune call it.

Runtimes (``--runtime``):
  * ``torch``: the timm module itself, channels-last, under ``torch.autocast`` for bf16/fp16
    (optionally ``torch.compile``d by extract).
  * ``openvino``: the same module converted with ``openvino.convert_model`` (traced once,
    batch dimension dynamic) and compiled for the CPU with ``INFERENCE_PRECISION_HINT`` f32 or
    bf16. CPU only. The converted model (OpenVINO IR) is cached on disk (see ``ov_cache_dir``)
    and OpenVINO's own compiled blobs under its ``CACHE_DIR``, so a second run neither traces
    nor compiles again. torch's copy of the model is dropped once converted: one runtime's
    thread pool per process.
  * ``auto``: torch on CUDA, always; on the CPU OpenVINO where it is installed, the precision
    is one it runs (f32, or bf16 on a CPU with native bf16) and the model converts; otherwise
    torch, with one line on stderr saying why.

Precision and store identity (provenance.OV_BF16): ``fp32`` features are the same from both
runtimes and share stores; OpenVINO's bf16 is recorded as ``bf16-openvino``, never mixed with
torch autocast's ``bf16``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import first_line
from ..provenance import OV_BF16, STORED_PRECISIONS, numeric_precision, stored_precision
from .options import COMPILES, PRECISIONS, RUNTIMES, ExtractError

if TYPE_CHECKING:  # imported where used: a no-op rerun never imports torch or timm
    import torch

    from ..backbones import Backbone


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


def check_batch_memory(backbone: Backbone, opts: Any, device: Any, batch: int, *,
                       error: type[Exception] = ExtractError, flag: str = "--batch-size",
                       copies: int = 1, copies_what: str = "") -> None:
    """``error`` (one line, with the largest ``flag`` value that fits) when ``copies`` batches
    of ``batch`` images at the backbone's input size, with ``opts.tta``'s views (5 crops x 2
    flips at most), need more memory than ``device`` has available now
    (finetune.memory.check_inference_fits: the model's activations measured on the meta
    device, nothing allocated; backbones.feature_dim checked one image). Called before any
    work by extract (--batch-size), serve (--max-batch, before it listens) and the Ray engine
    (--batch-size x the backbone actors of a local cluster, before they start)."""
    from ..finetune.memory import check_inference_fits
    from ..provenance import parse_tta

    h, w = (int(v) for v in backbone.data_config["input_size"][1:])
    tta = parse_tta(opts.tta) or ""
    views = (5 if "crops" in tta else 1) * (2 if "flip" in tta else 1)
    check_inference_fits(backbone.model, (h, w), batch, device, views=views, error=error,
                         flag=flag, copies=copies, copies_what=copies_what)


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX512-BF16 or AMX), where it is measured faster
    than fp32 (bench/precision.py); elsewhere bf16 is emulated and slower."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def auto_precision(device_type: str, *, cuda_bf16: bool, cpu_bf16: bool,
                   training: bool = False) -> str:
    """The one precision rule for ``--precision auto``: CUDA: bf16 where supported, else
    fp16; CPU: bf16 where the CPU has native bf16 (``cpu_has_native_bf16``), else fp32.
    Training on the CPU (finetune) stays fp32: its bf16 gradients were not validated."""
    if device_type == "cuda":
        return "bf16" if cuda_bf16 else "fp16"
    return "bf16" if cpu_bf16 and not training else "fp32"


def resolve_precision(precision: str, device: torch.device, stored: str | None = None, *,
                      training: bool = False) -> str:
    """``--precision`` (auto, fp32, bf16, fp16) → the numeric precision to run. auto keeps an
    existing store's (``stored``) so a store stays consistent across machines, else
    ``auto_precision``. Raises ExtractError for an unknown value."""
    if precision not in PRECISIONS:
        raise ExtractError(f"--precision {precision}: pass one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if stored in STORED_PRECISIONS:
        return numeric_precision(stored)
    import torch

    cuda = device.type == "cuda"
    return auto_precision(device.type, cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
                          cpu_bf16=not cuda and cpu_has_native_bf16(), training=training)


# -- runtime choice ----------------------------------------------------------------------------

def openvino_version() -> str | None:
    """OpenVINO's version where it is installed (package metadata: nothing imported)."""
    if importlib.util.find_spec("openvino") is None:
        return None
    try:
        from importlib.metadata import version

        return version("openvino")
    except Exception:  # noqa: BLE001 - installed without metadata: still usable
        return "unknown"


def _import_openvino() -> Any:
    """``import openvino`` without its usage telemetry. Importing openvino imports
    openvino_telemetry, and each ov.convert_model call then counted itself in ~/intel/stats and
    forked a process that posts an event to Google Analytics (it fails where there is no
    network; on Ctrl-C that process printed a traceback of its own). OpenVINO falls back to its
    no-op stub (openvino.tools.ovc.telemetry_stub) when openvino_telemetry does not import:
    embedpipe makes it so, before OpenVINO is first imported in the process (a program that
    imported OpenVINO or its telemetry itself keeps what it chose)."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    import openvino

    return openvino


def _openvino_missing() -> str | None:
    """Why OpenVINO cannot be used here (None when it imports)."""
    try:
        _import_openvino()
    except ImportError as e:
        return f"openvino is not installed ({e.name or e}): pip install 'embedpipe[openvino]'"
    except Exception as e:  # noqa: BLE001 - a broken install is the same for the user
        return f"openvino does not import ({type(e).__name__}: {e})"
    return None


def choose_runtime(runtime: str, device_type: str, precision: str, *,
                   stored: str | None = None, cpu_bf16: bool | None = None
                   ) -> tuple[str, str | None]:
    """``--runtime`` → (torch or openvino, why auto did not pick OpenVINO on the CPU or None).

    ``precision`` is the numeric precision to run; ``stored`` the precision an existing store
    records (a bf16 store keeps the runtime that made it). Raises ExtractError where the
    runtime asked for cannot run this (OpenVINO on CUDA, fp16, or bf16 without native bf16)."""
    if runtime not in RUNTIMES:
        raise ExtractError(f"--runtime {runtime}: pass one of {', '.join(RUNTIMES)}")
    if runtime == "auto" and stored == OV_BF16:
        runtime = "openvino"  # the store's features are OpenVINO's bf16: only it extends them
    if runtime == "torch":
        return "torch", None
    if device_type != "cpu":
        if runtime == "openvino":
            raise ExtractError(f"--runtime openvino runs on the CPU only, and this run is on "
                               f"{device_type}; pass --device cpu or --runtime torch (or auto)")
        return "torch", None
    why = None
    if precision == "fp16":
        why = "fp16 is a torch-only precision here (OpenVINO runs f32 and bf16 on the CPU)"
    elif precision == "bf16":
        if runtime == "auto" and stored == "bf16":
            return "torch", None  # the store's bf16 features were made by torch: keep them so
        if cpu_bf16 is None:
            cpu_bf16 = cpu_has_native_bf16()
        if not cpu_bf16:
            why = "this CPU has no native bf16 (OpenVINO would run f32 instead)"
    if why is None:
        why = _openvino_missing()
    if why is None:
        return "openvino", None
    if runtime == "openvino":
        raise ExtractError(f"--runtime openvino: {why}; pass --runtime torch (or auto)")
    return "torch", why


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
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(numeric_precision(precision))
    amp = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    return model, amp


# -- torch.compile ---------------------------------------------------------------------------

# `--compile auto` compiles only when at least this many forward passes of one image are due
# (images × TTA views); None: never on this device type. The threshold is about where a cold
# compile of the default backbone paid back on the project's 2-core CPU, measured by
# bench/compile.py (bench/results/compile.md, which also shows ResNet-50 gaining nothing).
# CUDA: not measured (no GPU here); the same threshold.
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
        first = first_line(e, 160)
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


Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]


def model_input(pixels: torch.Tensor, normalize: Normalization, *,
                channels_last: bool) -> torch.Tensor:
    """N×H×W×3 uint8 pixels → N×3×H×W float32 model input, (pixels/255 − mean)/std per
    channel, as timm's ToTensor + Normalize compute it; channels-last memory when asked (the
    pixels' own layout: no copy for the permute)."""
    import torch

    mean = torch.tensor(normalize[0], device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(normalize[1], device=pixels.device).view(1, 3, 1, 1)
    x = pixels.permute(0, 3, 1, 2)
    x = x.float() if channels_last else x.contiguous().float()
    return x.div_(255).sub_(mean).div_(std)


def embed(model: Callable[[torch.Tensor], torch.Tensor], views: torch.Tensor,
          device: torch.device, *, amp: Any, channels_last: bool, flip: bool,
          chunk: int, normalize: Normalization | None = None,
          takes_pixels: bool = False) -> torch.Tensor:
    """Views → B×D float32 pooled features: the mean over the views and, with ``flip``, their
    mirror images. Forward passes of at most ``chunk`` images through ``model`` (a torch module
    or an ``OpenVINOForward``).

    ``views`` is B×V×H×W×3 uint8 pixels (``backbones.make_views_transform``; V = 1 without crops
    TTA), normalised here with ``normalize`` unless the model ``takes_pixels`` (OpenVINO with the
    normalisation in its graph), or B×V×3×H×W float32 views already normalised."""
    import torch

    x = model_views(views, device, channels_last=channels_last, flip=flip,
                    normalize=normalize, takes_pixels=takes_pixels)
    with amp:
        outs = [model(x[lo:lo + chunk]) for lo in range(0, x.shape[0], chunk)]
    return pool_views(outs[0] if len(outs) == 1 else torch.cat(outs), *views.shape[:2])


def model_views(views: torch.Tensor, device: torch.device, *, channels_last: bool, flip: bool,
                normalize: Normalization | None, takes_pixels: bool) -> torch.Tensor:
    """``embed``'s model input: B×V views (and with ``flip`` their mirror images after them)
    as one (2·)B·V-image batch on ``device``, normalised unless the model ``takes_pixels``."""
    import torch

    x = views.flatten(0, 1).to(device, non_blocking=True)
    pixels = x.dtype == torch.uint8
    if flip:
        x = torch.cat([x, x.flip(2 if pixels else -1)])
    if pixels and not takes_pixels:
        if normalize is None:
            raise ValueError("uint8 views need the model's normalisation (mean, std)")
        x = model_input(x, normalize, channels_last=channels_last)
    elif channels_last and not pixels:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def pool_views(f: torch.Tensor, b: int, v: int) -> torch.Tensor:
    """The model's (2·)B·V×D output of ``model_views``' batch → B×D float32: the mean over
    each image's views and mirror images."""
    f = f.float()
    if f.shape[0] == b:  # one view per image: nothing to average (and no torch op to run)
        return f
    return f.view(-1, b, v, f.shape[-1]).mean(dim=(0, 2))


# -- OpenVINO -----------------------------------------------------------------------------------

def ov_cache_dir() -> Path:
    """Where converted OpenVINO models are kept: <XDG_CACHE_HOME or ~/.cache>/embedpipe/openvino/<model>-<key>/ (IR
    model.xml + model.bin + meta.json), and OpenVINO's compiled blobs in
    <XDG_CACHE_HOME or ~/.cache>/embedpipe/openvino/compiled/. Deleting the folder only costs the next run a conversion."""
    return compile_cache_dir().parent / "openvino"


def ov_cache_key(backbone: Backbone, ov_version: str) -> dict[str, Any]:
    """What a converted model depends on: the architecture and its weights (sha256), pool and
    input shape (3×H×W; the batch dimension is dynamic), the converter (OpenVINO, torch and
    timm versions). Precision is not in it: the IR is f32 and the precision is a compile-time
    hint (OpenVINO keys its compiled blobs by it under CACHE_DIR)."""
    import timm
    import torch

    return {"format": "embedpipe-openvino-ir/1", "model": backbone.name,
            "weights_sha256": backbone.weights.sha256, "pool": backbone.pool,
            "input_size": list(backbone.data_config["input_size"]),
            "feature_dim": int(backbone.feature_dim), "batch": "dynamic",
            "openvino": ov_version, "torch": torch.__version__, "timm": timm.__version__}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# A batch runs as parts of this many images, each handed to whichever CPU stream is free
# (OpenVINO's AsyncInferQueue with one infer request per stream). Parts of 4 beat one part
# per request (the batch split evenly): a stream the loader's worker slows no longer holds
# the other at the batch's end. bench/results/extract.md (OpenVINO settings) measures it.
OV_PART = 4
OV_REQUESTS_PER_STREAM = 1


@dataclass
class OpenVINOForward:
    """A backbone compiled by OpenVINO for the CPU: N×H×W×3 uint8 pixels (``pixels``: the
    normalisation is in the compiled graph) or N×3×H×W float32 torch tensor → N×D float32
    torch tensor (batch size free). With one stream, one synchronous infer request; with
    several (the THROUGHPUT hint), parts of ``OV_PART`` images on an AsyncInferQueue.
    ``cache`` tells how the converted model was had: 'hit' (read from the disk cache), 'miss'
    (converted and cached), 'rebuilt' (a damaged cache entry was converted again) or 'off'
    (not cacheable here)."""

    compiled: Any
    precision: str  # "fp32" or "bf16"
    version: str
    cache: str
    threads: int
    pixels: bool = False
    seconds: dict[str, float] = field(default_factory=dict)  # convert / read / compile

    def __post_init__(self) -> None:
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        self.request = self.compiled.create_infer_request()
        self.queue = None
        if self.streams > 1:
            ov = _import_openvino()

            self.queue = ov.AsyncInferQueue(self.compiled,
                                            OV_REQUESTS_PER_STREAM * self.streams)
            self.queue.set_callback(self._done)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.submit(x)()

    def submit(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start the forward of ``x`` and return a callable that waits for it and gives the
        N×D features. With streams, the parts run in the background: a next batch submitted
        before this one's result is asked queues its parts behind this one's, so no stream
        idles between batches. ``x`` is read in place until the result is had."""
        import numpy as np
        import torch

        arr = x.detach().cpu().contiguous().numpy()
        if self.queue is None or len(arr) <= OV_PART:
            out = self.request.infer({0: arr}, share_inputs=True, share_outputs=False)
            feats = torch.from_numpy(next(iter(out.values())))
            return lambda: feats
        job = _Job(arr, -(-len(arr) // OV_PART))
        for part in range(job.parts):  # blocks while every request is busy
            lo = part * OV_PART
            self.queue.start_async({0: arr[lo:lo + OV_PART]}, (job, part), share_inputs=True)

        def result() -> torch.Tensor:
            if not job.done.wait(1.0):
                self.queue.wait_all()  # raises what a failed request raised
                if not job.done.is_set():
                    raise RuntimeError(f"OpenVINO finished {job.parts - job.left} of "
                                       f"{job.parts} parts of a batch")
            return torch.from_numpy(np.concatenate(job.outs))

        return result

    @staticmethod
    def _done(request: Any, userdata: tuple[_Job, int]) -> None:
        job, part = userdata
        job.outs[part] = request.get_output_tensor(0).data.copy()
        with job.lock:
            job.left -= 1
            if job.left == 0:
                job.done.set()


class _Job:
    """One batch on OpenVINOForward's AsyncInferQueue: its input (kept alive while requests
    read it), its parts' outputs as they finish, and an event set when the last one has."""

    def __init__(self, arr: Any, parts: int):
        self.arr, self.parts, self.left = arr, parts, parts
        self.outs: list[Any] = [None] * parts
        self.lock = threading.Lock()
        self.done = threading.Event()


_CORE: Any = None
_CORE_LOCK = threading.Lock()


def openvino_core() -> Any:
    """The process's one ``openvino.Core``. A second Core in the same process can crash it
    later with SIGSEGV (openvinotoolkit/openvino#35338; ultralytics/ultralytics#25864 fixed
    the same crash by reusing one Core): every model this process compiles goes through
    this one."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            ov = _import_openvino()

            _CORE = ov.Core()
        return _CORE


def build_openvino(backbone: Backbone, precision: str, *, threads: int | None = None,
                   normalize: Normalization | None = None, hint: str = "throughput",
                   say: Callable[[str], None] = _warn) -> OpenVINOForward:
    """Convert ``backbone`` (or read its cached conversion) and compile it for the CPU at
    ``precision`` (fp32 or bf16). With ``normalize`` (mean, std of pixel/255) the compiled
    model takes N×H×W×3 uint8 pixels and normalises them in its graph (OpenVINO's
    PrePostProcessor: convert to f32, subtract 255·mean, divide by 255·std, NHWC → NCHW); the
    cached IR stays the plain model. ``hint``: "throughput" (OpenVINO's THROUGHPUT hint: CPU
    streams, each batch split over their infer requests; for extraction) or "latency" (one
    request on all ``threads``; for one image at a time, as serve). A cache entry that cannot be read, fails its checksum or does
    not compile is deleted and converted again (one line through ``say``), never fatal; a cache
    folder that cannot be written only costs the next run the conversion. Raises ExtractError
    when the model does not convert or bf16 is asked on a CPU where OpenVINO would not run it.
    """
    import torch

    ov = _import_openvino()

    version = ov.get_version().split("-")[0]
    key = ov_cache_key(backbone, version)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    entry = ov_cache_dir() / f"{backbone.name.replace('/', '_')}-{digest}"
    threads = threads or torch.get_num_threads()
    core = openvino_core()
    blobs = ov_cache_dir() / "compiled"
    with contextlib.suppress(OSError):
        blobs.mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(blobs)})
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
              "INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY"}
    if hint == "throughput":  # streams of their own threads, each running a part of a batch
        config["PERFORMANCE_HINT"] = "THROUGHPUT"
    seconds: dict[str, float] = {}
    status = "miss"
    compiled = None
    if (entry / "meta.json").is_file():
        t = time.perf_counter()
        try:
            meta = json.loads((entry / "meta.json").read_text())
            if meta.get("key") != key or _file_sha256(entry / "model.bin") != meta.get("bin"):
                raise ValueError("its checksum or key does not match")
            model = core.read_model(str(entry / "model.xml"), str(entry / "model.bin"))
            seconds["read"] = time.perf_counter() - t
            t = time.perf_counter()
            compiled = core.compile_model(_with_pixels(ov, model, normalize), "CPU", config)
            seconds["compile"] = time.perf_counter() - t
            status = "hit"
        except Exception as e:  # noqa: BLE001 - any damage: convert again
            first = first_line(e, 120)
            say(f"note: OpenVINO cache entry {entry} is damaged ({first}); converting again")
            shutil.rmtree(entry, ignore_errors=True)
            status, compiled = "rebuilt", None
    elif entry.exists():  # an entry without meta.json: a conversion that never finished
        shutil.rmtree(entry, ignore_errors=True)
    if compiled is None:
        t = time.perf_counter()
        model = _convert(ov, backbone)
        seconds["convert"] = time.perf_counter() - t
        if not _save_entry(ov, model, entry, key):
            status = "off"
        t = time.perf_counter()
        compiled = core.compile_model(_with_pixels(ov, model, normalize), "CPU", config)
        seconds["compile"] = time.perf_counter() - t
    got = str(compiled.get_property("INFERENCE_PRECISION_HINT")).lower()  # <Type: 'bfloat16'>
    if precision == "bf16" and "bf16" not in got and "bfloat16" not in got:
        raise ExtractError(f"--runtime openvino --precision bf16: OpenVINO runs {got} on this "
                           "CPU (no native bf16); pass --precision fp32 or --runtime torch")
    return OpenVINOForward(compiled, precision, version, status, int(threads),
                           normalize is not None, seconds)


def _with_pixels(ov: Any, model: Any, normalize: Normalization | None) -> Any:
    """``model`` (N×3×H×W float input) taking N×H×W×3 uint8 pixels instead, normalised in its
    graph; ``model`` itself when ``normalize`` is None."""
    if normalize is None:
        return model
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    inp = ppp.input()
    inp.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    inp.model().set_layout(ov.Layout("NCHW"))
    inp.preprocess().convert_element_type(ov.Type.f32) \
        .mean([255.0 * m for m in normalize[0]]).scale([255.0 * s for s in normalize[1]])
    return ppp.build()


def _convert(ov: Any, backbone: Backbone) -> Any:
    import torch

    c, h, w = backbone.data_config["input_size"]
    example = torch.zeros(1, c, h, w)
    try:
        # the tracer's deprecation warnings say nothing a user can act on
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ov.convert_model(backbone.model.float().eval(), example_input=example,
                                     input=[(-1, c, h, w)])
    except Exception as e:  # noqa: BLE001 - the converter's errors are many and deep
        first = first_line(e, 160)
        raise ExtractError(f"{backbone.name}: OpenVINO cannot convert this model "
                           f"({type(e).__name__}: {first}); pass --runtime torch") from None
    return model


def _save_entry(ov: Any, model: Any, entry: Path, key: dict[str, Any]) -> bool:
    """Write the IR to a temporary folder beside ``entry`` and rename it into place (another
    process finishing first wins; a run killed half-way leaves only a temporary folder)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError:
        return False
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        meta = {"key": key, "bin": _file_sha256(tmp / "model.bin"),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, entry)
        return True
    except OSError:
        return entry.is_dir()  # another process renamed its copy first: that one is used
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- what the commands build ----------------------------------------------------------------------

@dataclass
class Engine:
    """A backbone ready to embed: ``forward`` (torch module or OpenVINOForward) with its
    autocast context ``amp`` and memory format, plus what run records say about it."""

    forward: Any
    amp: Any
    channels_last: bool
    device: torch.device
    runtime: str  # "torch" or "openvino"
    precision: str  # numeric: fp32, bf16 or fp16
    note: str | None = None  # why auto chose torch on the CPU
    normalize: Normalization | None = None  # of uint8 views (backbones.input_normalization)
    # the backbone's Backbone.finetune_hashes (weights of an `embedpipe finetune` run): what a
    # new store of its features records (StoreWriter.open); None for other weights
    finetune_hashes: Any = None

    @property
    def stored_precision(self) -> str:
        return stored_precision(self.precision, self.runtime)

    def record(self) -> dict[str, Any]:
        """The run record's ``runtime`` entry: name, version and (OpenVINO) cache use."""
        if isinstance(self.forward, OpenVINOForward):
            f = self.forward
            return {"name": "openvino", "version": f.version, "precision": f.precision,
                    "cache": f.cache, "threads": f.threads, "streams": f.streams}
        import torch

        return {"name": "torch", "version": torch.__version__, "precision": self.precision}

    def describe(self) -> str:
        if isinstance(self.forward, OpenVINOForward):
            f = self.forward
            streams = f", {f.streams} streams" if f.streams > 1 else ""
            return f"openvino {f.version} (cache {f.cache}{streams})"
        return "torch"

    def __call__(self, views: torch.Tensor, *, flip: bool, chunk: int) -> torch.Tensor:
        """B×V×H×W×3 uint8 (or B×V×3×H×W float) views → B×D float32 features (``embed``).
        With OpenVINO, torch's own ops here (TTA flips, the mean over views) run on one
        thread (``one_torch_thread``)."""
        with one_torch_thread() if self.runtime == "openvino" else contextlib.nullcontext():
            return embed(self.forward, views, self.device, amp=self.amp,
                         channels_last=self.channels_last, flip=flip, chunk=chunk,
                         normalize=self.normalize,
                         takes_pixels=getattr(self.forward, "pixels", False))

    @property
    def background(self) -> bool:
        """Whether ``submit`` runs the forward in the background (OpenVINO on streams)."""
        return isinstance(self.forward, OpenVINOForward) and self.forward.queue is not None

    def submit(self, views: torch.Tensor, *, flip: bool, chunk: int
               ) -> Callable[[], torch.Tensor]:
        """As calling the engine, but where OpenVINO runs on streams the forward runs in the
        background: returns a callable that waits for it and gives the B×D features, so the
        caller can submit the next batch first and no stream idles between batches
        (``OpenVINOForward.submit``). Elsewhere the features are computed now."""
        if not self.background:
            feats = self(views, flip=flip, chunk=chunk)
            return lambda: feats
        b, v = views.shape[:2]
        with one_torch_thread():
            x = model_views(views, self.device, channels_last=self.channels_last, flip=flip,
                            normalize=self.normalize, takes_pixels=self.forward.pixels)
        pending = self.forward.submit(x)

        def result() -> torch.Tensor:
            f = pending()
            with one_torch_thread():
                return pool_views(f, b, v)

        return result


@contextlib.contextmanager
def one_torch_thread():
    """torch's intra-op threads set to 1 for the block, then restored.

    Where OpenVINO runs the backbone, torch only moves and averages small tensors around it,
    but by default on all cores: a parallel op then waits for a thread of its OpenMP team
    whose core another process, or the loader worker, holds. On this 2-core machine next to
    one busy process (bench/results/contention.md) the flip TTA's cat of a batch and its
    mirror took a median 6.8 ms on 2 threads against 0.9 on one (worst 73 vs 5 ms); with two
    other jobs running, a mean over a batch's views took 34 ms against 1.4. Extraction
    steady state, interleaved A/B on 1,500 224-px JPEGs (with the numpy stacking of
    ``backbones.stack_views``): 431-442 vs 418-441 img/s, main-process CPU 3.0 vs 3.2 ms per
    image. Setting the count costs well under a microsecond."""
    import torch

    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_engine(backbone: Backbone, device: torch.device, precision: str, runtime: str, *,
                 channels_last: bool = True, stored: str | None = None,
                 hint: str = "throughput", say: Callable[[str], None] = _warn) -> Engine:
    """The backbone ready for inference on ``device`` at ``precision`` (numeric) by
    ``runtime`` (auto, torch, openvino; see ``choose_runtime``). With OpenVINO the engine keeps
    no reference to torch's module (one runtime per process). ``auto`` falls back to torch
    with one line through ``say`` when OpenVINO is not installed, cannot run the precision, or
    the model does not convert. ``hint`` as ``build_openvino``'s. Raises ExtractError when
    ``--runtime openvino`` cannot run."""
    from ..backbones import input_normalization

    normalize = input_normalization(backbone.data_config)
    name, why = choose_runtime(runtime, device.type, precision, stored=stored)
    if name == "openvino":
        try:
            fwd = build_openvino(backbone, precision, normalize=normalize, hint=hint, say=say)
        except ExtractError as e:
            if runtime == "openvino":
                raise
            name, why = "torch", str(e).split("; pass")[0]
        else:
            return Engine(fwd, contextlib.nullcontext(), False, device, "openvino", precision,
                          normalize=normalize)
    if why and runtime == "auto" and device.type == "cpu":
        say(f"note: --runtime auto uses torch: {why}")
    model, amp = prepare_model(backbone, device, precision, channels_last)
    return Engine(model, amp, channels_last, device, "torch", precision, why,
                  normalize=normalize)
