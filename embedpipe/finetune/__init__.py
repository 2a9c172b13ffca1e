"""`embedpipe finetune`: fine-tune a pretrained backbone on an image folder, write new weights.

The recipe (the seed recipe; see README "Fine-tuning"):
  1. a new classifier sized to the classes replaces the pretrained one; stage 1 trains only it,
     with the whole backbone frozen (frozen modules also stay in eval mode, so their BatchNorm
     statistics do not move either: a frozen backbone is bit-identical afterwards);
  2. stage 2 unfreezes the last ``unfreeze`` feature stages (plus the layers after them, e.g.
     EfficientNet's conv_head/bn2), or with ``gradual`` one more stage (deep to shallow) every
     ``stage_epochs`` epochs up to ``unfreeze``;
  3. discriminative learning rates (backbone ``lr``, classifier ``head_lr``), AdamW with weight
     decay (none on biases and norm weights), a cosine schedule with linear warmup per stage,
     stepped every batch; label smoothing; dropout before the classifier; with ``bn_frozen``
     (default) every BatchNorm keeps its pretrained running statistics while its scale and
     shift train; with ``ema`` an EMA of the weights (loop.EMA) is validated beside them;
  4. augmentation on training images only (random resized crop, flip, small rotation, then
     timm's RandAugment or colour jitter; CutMix on request); validation uses the model's own
     pretrained preprocessing (backbones.make_transform);
  5. validation on the data's own ``val`` split, else a seeded stratified fraction; the output
     is the last epoch (``keep="last"``, default) or the best validated one, early stopping on
     request (``patience``); a checkpoint every epoch that ``resume`` continues exactly;
     ``budget`` caps the call's CPU seconds (loop.cpu_seconds), checked between epochs.

The output is a state dict of the backbone without the new classifier, keyed like timm's
``num_classes=0`` model, so ``embedpipe extract --weights tuned.pt --model M`` loads it through
backbones.py and records its sha256 (a new store, never mixed with the base weights' one).
Beside it: ``<stem>.json`` (manifest), ``<stem>.history.json``, ``<stem>.classifier.pt`` (the
new classifier's weight and bias), ``<stem>.curves.png`` (with matplotlib) and
``<stem>.checkpoints/epoch-NNN.pt``.

Exactness of ``resume``: every epoch reseeds the global RNGs (torch, numpy, python) and the
loader's generator from (seed, epoch), and the checkpoint holds the model, optimizer,
scheduler, AMP scaler, RNG states, history, best weights and early-stopping counter. On the CPU
with deterministic algorithms and the same number of loader workers, a resumed run gives the
same tensors as an uninterrupted one.

Modules: ``options`` · ``data`` · ``stages`` · ``checkpoint`` · ``loop`` (``finetune()``).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["FinetuneOptions", "FinetuneError", "FinetuneResult", "finetune"]


def __getattr__(name: str) -> Any:  # PEP 562: options stay importable without torch
    if name in ("FinetuneOptions", "FinetuneError", "FinetuneResult"):
        return getattr(importlib.import_module(f"{__name__}.options"), name)
    if name == "finetune":
        return importlib.import_module(f"{__name__}.loop").finetune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
