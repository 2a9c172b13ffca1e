"""Whether a training step fits in memory, told before any epoch from the model's shapes.

A training step keeps, for the backward pass, the activations autograd saves in the forward:
per image, a number that grows with the input's pixels (EfficientNet-Lite0 with every layer
training: ~80 MiB at 224 px, ~300 MiB at 448 px, ~25 GiB at 4096 px; far less with only the
last stages unfrozen), plus the largest module's input and output while it runs. ``finetune`` measures it at the run's input size on a
copy of the model on PyTorch's ``meta`` device (tensors with shapes and no storage: nothing is
allocated, and it takes a fraction of a second at any size), with the parameters of the
widest stage of the run unfrozen, and refuses a batch that does not fit in the memory available
now, naming the largest batch size and input size that do. Without the check, a size that
passed the one-image probe (backbones.feature_dim, inference only) was killed by the kernel's
OOM killer at the first batch, with nothing said.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .options import FinetuneError, FinetuneOptions
from .stages import StageSplit, apply_freeze, set_train_mode, unfrozen_at

# A training step's peak memory growth per image is about the activations autograd saves
# (saved) plus twice the largest module's input + output (transient: a frozen block's input
# stays while its expanded intermediates are computed), then x TRAIN_STEP_FACTOR. Measured on
# EfficientNet-Lite0 on this CPU (fp32, 2 threads; VmHWM growth of one forward + backward +
# AdamW step, /proc/self/clear_refs reset before it), as a fraction of that estimate without
# the factor: 0.68-0.69 (unfreeze 2, 448-640 px, batch 4-8), 0.85-0.91 (every layer, 224-448
# px, batch 8-16), 0.98 (classifier only, 320 px, batch 16); the factor leaves 10% on top.
TRANSIENT_FACTOR = 2
TRAIN_STEP_FACTOR = 1.1
SIZE_STEP = 32  # --img-size suggestions are multiples of this


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` copied onto the meta device without copying its weights."""
    import copy

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                         requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    return 0


def _meta_forward(meta: torch.nn.Module, n: int, size: tuple[int, int]
                  ) -> tuple[tuple[int, ...], int, int]:
    """(output shape, bytes autograd saves, the largest input + output of one leaf module) of
    a forward of ``n`` fp32 3 x H x W zero images through ``meta`` (a meta-device model, in the
    grad mode of the caller)."""
    saved: dict[int, int] = {}
    peak = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t)] = _nbytes(t)
        return t

    def hook(_mod: Any, inputs: Any, output: Any) -> None:
        peak[0] = max(peak[0], _nbytes(inputs) + _nbytes(output))

    leaves = [m for m in meta.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = meta(torch.zeros(n, 3, *size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
    return shape, sum(saved.values()), peak[0]


def inference_probe(model: torch.nn.Module, size: tuple[int, int]) -> tuple[tuple[int, ...], int]:
    """(output shape, bytes) of one fp32 3 x H x W image (``size``) through ``model`` in
    inference, told on a meta-device copy (nothing allocated, a fraction of a second at any
    size): the output's shape, e.g. (1, 1280) pooled features, and the memory the forward adds
    at its peak, TRANSIENT_FACTOR x the largest input + output of one module (the weights are
    already in memory). Raises what the meta device raises for a model or size it cannot run
    (RuntimeError, NotImplementedError for a custom kernel; AssertionError, ValueError,
    TypeError for a size the model refuses)."""
    meta = _meta_copy(model)
    meta.eval()
    with torch.inference_mode(False), torch.no_grad():
        shape, _, transient = _meta_forward(meta, 1, size)
    return shape, TRANSIENT_FACTOR * transient


def check_inference_fits(model: torch.nn.Module, size: tuple[int, int], batch: int,
                         device: torch.device, *, views: int = 1,
                         error: type[Exception] = FinetuneError, flag: str = "--batch-size",
                         copies: int = 1, copies_what: str = "") -> None:
    """``error`` (one line) when an inference batch of ``batch`` images (3 x H x W, ``size``)
    would need more memory than is available now (available_bytes): per image, the forward's
    peak (inference_probe: TRANSIENT_FACTOR x the largest module input + output, which grows
    with the batch) plus its ``views`` model inputs (test-time augmentation: crops x flips),
    each held as uint8 pixels and float32 (3 x H x W x 5 bytes), all x ``batch``, x
    ``copies`` (batches in memory at once: ``copies_what`` names them, e.g. "2 Ray actors").
    On EfficientNet-Lite0 (fp32, torch, this CPU) the peak's growth measured 0.94-0.96 of the
    forward's part (448 px x 8 and x 16, 224 px x 64). The line names the option ``flag``
    (--batch-size; serve's --max-batch) and the largest value of it that fits
    (backbones.feature_dim refuses a size where one image does not). No refusal when the
    memory available cannot be told or the meta device cannot run the model."""
    have = available_bytes(device)
    if have is None or batch <= 1:
        return
    avail, where = have
    h, w = size
    try:
        _, forward = inference_probe(model, size)
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AssertionError):
        return  # an op the meta device cannot run (a custom kernel): no estimate, no refusal
    per = forward + views * 3 * h * w * 5
    copies = max(1, copies)
    total = copies * batch * per
    if total <= avail:
        return
    fits = int(avail // (copies * per)) if per else batch
    fix = (f"{flag} {fits} or less at this size" if fits >= 1 else
           "a smaller --img-size")
    tta = f", {views} views each" if views > 1 else ""
    at_once = f", {copies_what} at once" if copies > 1 else ""
    pass_ = "a forward pass needs" if copies == 1 else f"{copies} forward passes need"
    raise error(f"{flag} {batch} at {h}x{w} px{tta}{at_once}: {pass_} about {_gib(total)} "
                f"(~{per / 2 ** 20:,.0f} MiB per image, measured from the model's activations "
                f"at this size) but {_gib(avail)} is available ({where}); pass {fix}")


def activation_bytes(model: torch.nn.Module, size: tuple[int, int], trainable: set[str],
                     bn_frozen: bool) -> tuple[int, int]:
    """(saved, transient) bytes per image (fp32, 3 x H x W input ``size``) of a training
    forward of ``model`` with the parameters named in ``trainable`` unfrozen and its modules
    in the modes the loop sets (stages.set_train_mode): what autograd saves for the backward
    pass (``torch.autograd.graph.saved_tensors_hooks``), and the largest input + output of one
    module (forward hooks). Counted on a meta-device copy, as a batch of 2 minus a batch of 1,
    so what does not grow with the batch (weights saved for their gradients) cancels. An
    upper bound under bf16/fp16 autocast, which keeps some of them in 16 bits."""
    meta = _meta_copy(model)
    apply_freeze(meta, trainable)
    set_train_mode(meta, bn_frozen)

    with torch.enable_grad():
        one, two = _meta_forward(meta, 1, size), _meta_forward(meta, 2, size)
    return max(two[1] - one[1], 0), max(two[2] - one[2], 0)


def image_bytes(model: torch.nn.Module, size: tuple[int, int], trainable: set[str],
                bn_frozen: bool) -> int:
    """The memory one more image adds to a training step's peak (activation_bytes, combined
    with TRANSIENT_FACTOR and TRAIN_STEP_FACTOR)."""
    saved, transient = activation_bytes(model, size, trainable, bn_frozen)
    return int((saved + TRANSIENT_FACTOR * transient) * TRAIN_STEP_FACTOR)


def available_bytes(device: torch.device) -> tuple[int, str] | None:
    """(bytes a training run may still allocate, where that number comes from), or None when
    it cannot be told. CUDA: the device's free memory (torch.cuda.mem_get_info). CPU: the
    kernel's MemAvailable (/proc/meminfo), lowered to the cgroup's limit less its usage when
    the process runs under one (a container: its OOM killer acts at that limit)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    found: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap = Path(limit).read_text().strip()
            if cap != "max" and int(cap) < 2 ** 60:
                found.append((int(cap) - int(Path(usage).read_text()), "the cgroup's limit"))
            break
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def check_fits(model: torch.nn.Module, split: StageSplit, opts: FinetuneOptions,
               data_config: dict[str, Any], device: torch.device, n_train: int) -> None:
    """FinetuneError (one line) when a training step of this run would need more memory than
    is available: batch x image_bytes, plus the trainable weights' gradients and AdamW
    moments and one copy of every weight, at the run's widest stage and input size. The line gives the
    largest --batch-size that fits at this size and the largest --img-size (a multiple of 32)
    that fits at this batch size. The batch is at most the training images."""
    have = available_bytes(device)
    if have is None:
        return
    avail, where = have
    h, w = (int(v) for v in data_config["input_size"][1:])
    widest = max((unfrozen_at(e, opts) for e in range(opts.epochs)), default=0)
    trainable = split.trainable(widest)
    batch = max(1, min(opts.batch_size, n_train))
    # the trainable weights' gradients and AdamW's two moments, and one more copy of every
    # weight (the model itself on a CUDA device, or the EMA of the weights)
    fixed = sum((4 if n in trainable else 1) * p.numel() * p.element_size()
                for n, p in model.named_parameters())

    def need(size: tuple[int, int], n: int) -> tuple[int, int]:
        per = image_bytes(model, size, trainable, opts.bn_frozen)
        return fixed + n * per, per

    try:
        total, per = need((h, w), batch)
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AssertionError):
        return  # an op the meta device cannot run (a custom kernel): no estimate, no refusal
    if total <= avail:
        return
    fits_batch = int((avail - fixed) // per) if per else batch
    size = None
    guess = int(h * math.sqrt(max(avail - fixed, 0) / max(total - fixed, 1)))
    guess -= guess % SIZE_STEP
    for _ in range(8):  # activations grow about with the pixels: check the guess, step down
        if guess < SIZE_STEP:
            break
        try:
            fits = need((guess, round(guess * w / h)), batch)[0] <= avail
        except (RuntimeError, NotImplementedError, TypeError, ValueError, AssertionError):
            break  # e.g. a size the model cannot take: suggest the batch size only
        if fits:
            size = guess
            break
        guess -= SIZE_STEP
    fixes = []
    if fits_batch >= 2:
        fixes.append(f"--batch-size {fits_batch} or less at this size")
    if size is not None:
        fixes.append(f"--img-size {size} or less at this batch size")
    fix = (" or ".join(fixes) if fixes else
           f"a much smaller --img-size and --batch-size (even 2 images at {h} px need "
           f"{_gib(fixed + 2 * per)})")
    asked = (f"--batch-size {batch}" if batch == opts.batch_size else
             f"--batch-size {opts.batch_size} (batches of {batch}, all the training images)")
    raise FinetuneError(
        f"--img-size {h} with {asked}: a training step needs about {_gib(total)} "
        f"(~{per / 2 ** 20:,.0f} MiB per {h}x{w} image, measured from the model's activations "
        f"at this size) but {_gib(avail)} is available ({where}); pass {fix}")
