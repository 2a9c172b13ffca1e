"""The inference runtime: device, precision rule, torch.compile, and ``embed`` (the mapper).

The only module that knows devices, precisions and inference runtimes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable


from ..errors import first_line
from .options import COMPILES, PRECISIONS, ExtractError

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
