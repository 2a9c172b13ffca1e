"""`embedpipe finetune`: fine-tune a pretrained backbone on an image folder, write new weights.

The recipe (../shared/SEED-RECIPE.md):
  1. a new classifier sized to the classes replaces the pretrained one; stage 1 trains only it,
     with the whole backbone frozen (frozen modules also stay in eval mode, so their BatchNorm
     statistics do not move either: a frozen backbone is bit-identical afterwards);
  2. stage 2 unfreezes the last ``unfreeze`` feature stages (plus the layers after them, e.g.
     EfficientNet's conv_head/bn2), or with ``gradual`` one more stage (deep to shallow) every
     ``stage_epochs`` epochs up to ``unfreeze``;
  3. discriminative learning rates (backbone ``lr``, classifier ``head_lr``), AdamW with weight
     decay (none on biases and norm weights), a cosine schedule with linear warmup per stage,
     stepped every batch; label smoothing; dropout before the classifier;
  4. augmentation on training images only (random resized crop, flip, small rotation, colour
     jitter; timm's RandAugment and CutMix on request); validation uses the model's own
     pretrained preprocessing (backbones.make_transform);
  5. validation on the data's own ``val`` split, else a seeded stratified fraction; early
     stopping on validation accuracy; a checkpoint every epoch that ``resume`` continues exactly.

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
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import DEFAULT_MODEL, Backbone, decode_size, file_sha256, load_backbone, make_transform
from .data import DEFAULT_MAX_PIXELS, DecodeError, Discovery, ImageRef, LAYOUTS, content_hash, decode_image, discover, read_file
from .errors import UserError
from .extract import default_workers, resolve_device, versions
from .progress import Progress, printer

FORMAT = "embedpipe-finetune/1"
CHECKPOINT_FORMAT = "embedpipe-finetune-checkpoint/1"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin")
STAGE_CONTAINERS = ("blocks", "stages", "layers")
RANDAUGMENT = "rand-m9-mstd0.5"
CROP_SCALE = (0.25, 1.0)  # RandomResizedCrop area range: milder than ImageNet's 0.08 for small data
ROTATION_DEGREES = 10.0
COLOR_JITTER = 0.3
MIN_LR_FACTOR = 0.01  # the cosine ends at 1% of each group's learning rate
PLOTS_HINT = "pip install 'embedpipe[plots]'"


class FinetuneError(UserError):
    """A bad option, data set or checkpoint; one line naming it and the fix."""


@dataclass
class FinetuneOptions:
    model: str = DEFAULT_MODEL
    weights: str | None = None
    epochs: int = 10
    head_epochs: int = 2
    unfreeze: int = 1
    gradual: bool = False
    stage_epochs: int = 1
    img_size: int | None = None
    batch_size: int = 32
    lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    dropout: float = 0.2
    randaugment: bool = False
    cutmix: bool = False
    hflip: bool = True
    val_fraction: float = 0.2
    patience: int = 3
    class_weight: str | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    deterministic: bool | None = None  # None: on for the CPU, off for CUDA
    layout: str = "auto"
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    keep_checkpoints: int = 1  # 0 keeps every epoch's checkpoint


# Options a resumed run must share with the checkpoint (they change the numbers); the others
# (device, precision, workers, deterministic, ...) may change, with a note that the continuation
# is then not bit-exact.
STRICT = ("model", "weights", "epochs", "head_epochs", "unfreeze", "gradual", "stage_epochs",
          "img_size", "batch_size", "lr", "head_lr", "weight_decay", "warmup_epochs",
          "label_smoothing", "dropout", "randaugment", "cutmix", "hflip", "val_fraction",
          "patience", "class_weight", "seed", "layout", "max_pixels")
SOFT = ("device", "precision", "workers", "threads", "deterministic")


@dataclass
class FinetuneResult:
    out: Path
    manifest: Path
    history_path: Path
    classifier: Path
    curves: Path | None
    checkpoint: Path | None
    model: str
    classes: list[str]
    n_train: int
    n_val: int
    best_epoch: int
    best_val_accuracy: float | None
    epochs_run: int
    stopped_early: bool
    seconds: float
    sha256: str
    img_size: int
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    left_out: int = 0

    def line(self) -> str:
        val = (f"best val accuracy {self.best_val_accuracy:.3f} at epoch {self.best_epoch}"
               if self.best_val_accuracy is not None else f"no validation; kept epoch {self.best_epoch}")
        stop = ", stopped early" if self.stopped_early else ""
        return (f"fine-tuned {self.model} on {self.n_train} images ({self.n_val} val), "
                f"{len(self.classes)} classes: {val} of {self.epochs_run}{stop} in "
                f"{self.seconds:.0f} s → {self.out} (sha256 {self.sha256[:12]}…, manifest "
                f"{self.manifest.name})")

    def extract_hint(self, data: str | Path) -> str:
        return (f"re-extract with: embedpipe extract {data} --model {self.model} --weights "
                f"{self.out} --img-size {self.img_size}")


# -- which parameters belong to which stage ------------------------------------------------

@dataclass
class StageSplit:
    """The backbone's parameters by role: stem, feature stages (shallow → deep), layers after
    the last stage (post), and the new classifier (head)."""

    names: list[str]  # one name per stage, e.g. "blocks.6" or "layer4"
    stages: list[list[str]]  # parameter names per stage
    post: list[str]
    stem: list[str]
    head: list[str]

    def trainable(self, k: int) -> set[str]:
        """Parameter names trained when the last ``k`` stages are unfrozen (plus the head)."""
        names = set(self.head)
        if k > 0:
            names |= set(self.post)
            for group in self.stages[len(self.stages) - k:]:
                names |= set(group)
        if k >= len(self.stages):
            names |= set(self.stem)
        return names

    def backbone(self) -> list[str]:
        return self.stem + [n for g in self.stages for n in g] + self.post


def _has_params(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _module_name(model: torch.nn.Module, target: torch.nn.Module) -> str | None:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    return None


def feature_stages(model: torch.nn.Module, name: str = "model") -> StageSplit:
    """Split a timm model into stem / feature stages / post / classifier.

    Stages are the children of a top-level ``blocks``/``stages``/``layers`` container
    (EfficientNet, MobileNet, ConvNeXt, ViT, Swin, ...), else the groups of children that end at
    each of timm's ``feature_info`` modules (ResNet: layer1..layer4; DenseNet, VGG, Inception).
    The first group is the stem. Layers between the last stage and the classifier (conv_head and
    bn2, a final norm) are 'post' and train together with the last stage.
    """
    cls = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in cls.parameters()} if isinstance(cls, torch.nn.Module) else set()
    top = list(model.named_children())
    top_names = [n for n, _ in top]
    stage_mods: list[str] = []
    stem_mods: list[str] = []
    post_mods: list[str] = []
    for attr in STAGE_CONTAINERS:
        container = getattr(model, attr, None)
        if (attr in top_names and isinstance(container, (torch.nn.Sequential, torch.nn.ModuleList))
                and len(container) > 0):
            i = top_names.index(attr)
            stem_mods = top_names[:i]
            stage_mods = [f"{attr}.{j}" for j, m in enumerate(container) if _has_params(m)]
            post_mods = top_names[i + 1:]
            break
    else:
        info = getattr(model, "feature_info", None)
        mods = [f["module"] for f in info] if isinstance(info, list) else []
        if hasattr(info, "get_dicts"):
            mods = [f["module"] for f in info.get_dicts()]
        parents = {m.rpartition(".")[0] for m in mods}
        if mods and len(parents) == 1:
            parent = parents.pop()
            container = model.get_submodule(parent) if parent else model
            kids = [n for n, _ in container.named_children()]
            ends = [m.rpartition(".")[2] for m in mods]
            if all(e in kids for e in ends):
                prefix = f"{parent}." if parent else ""
                groups, start = [], 0
                for e in ends:
                    j = kids.index(e) + 1
                    group = [prefix + k for k in kids[start:j]]
                    if any(_has_params(model.get_submodule(g)) for g in group):
                        groups.append(group)
                    start = j
                if len(groups) >= 2:
                    stem_mods, stage_groups = groups[0], groups[1:]
                    stage_mods = [";".join(g) for g in stage_groups]
                    post_mods = [prefix + k for k in kids[start:]]
                    if parent:
                        i = top_names.index(parent.split(".")[0])
                        stem_mods = top_names[:i] + stem_mods
                        post_mods += top_names[i + 1:]
    if len(stage_mods) < 1:
        raise FinetuneError(
            f"{name}: cannot tell this model's feature stages apart (no blocks/stages/layers "
            "container, no usable feature_info); pass --unfreeze 0 to train only the classifier, "
            "or use a model such as resnet50, efficientnet_b0, tf_efficientnet_lite0, "
            "convnext_tiny or a ViT")

    def members(mods: list[str]) -> list[str]:
        out = []
        for pname, p in model.named_parameters():
            if id(p) in head_ids:
                continue
            if any(pname.startswith(m + ".") for m in mods):
                out.append(pname)
        return out

    stages = [members(s.split(";")) for s in stage_mods]
    post = members(post_mods)
    head = [n for n, p in model.named_parameters() if id(p) in head_ids]
    placed = set(head) | set(post) | {n for g in stages for n in g}
    stem = [n for n, _ in model.named_parameters() if n not in placed]
    names = [s.split(";")[-1] for s in stage_mods]
    return StageSplit(names, stages, post, stem, head)


def apply_freeze(model: torch.nn.Module, trainable: set[str]) -> None:
    for pname, p in model.named_parameters():
        p.requires_grad_(pname in trainable)


def set_train_mode(model: torch.nn.Module) -> None:
    """Train mode, except subtrees whose parameters are all frozen: those stay in eval mode
    (BatchNorm keeps its running statistics, dropout inside them is off)."""
    model.train()

    def visit(mod: torch.nn.Module) -> None:
        for child in mod.children():
            params = list(child.parameters())
            if not params:
                if any(True for _ in child.buffers()):
                    child.eval()
                continue
            if not any(p.requires_grad for p in params):
                child.eval()
            else:
                visit(child)

    visit(model)


# -- data ----------------------------------------------------------------------------------

@dataclass
class DataPlan:
    root: Path
    layout: str
    classes: list[str]
    train: list[tuple[ImageRef, int, str]]  # (ref, class index, content hash)
    val: list[tuple[ImageRef, int, str]]
    val_source: str  # "split folder 'val'" | "stratified 20% of train (seed 0)" | "none"
    skipped: list[tuple[str, str]]
    left_out: dict[str, int]  # split name -> images not used (e.g. test)

    def counts(self, which: str) -> dict[str, int]:
        rows = self.train if which == "train" else self.val
        out = {c: 0 for c in self.classes}
        for _, y, _ in rows:
            out[self.classes[y]] += 1
        return out

    def fingerprint(self) -> dict[str, str]:
        def digest(rows: list[tuple[ImageRef, int, str]]) -> str:
            h = hashlib.sha256()
            for ref, y, hsh in rows:
                h.update(f"{ref.rel}\t{self.classes[y]}\t{hsh}\n".encode())
            return h.hexdigest()
        return {"train_images": digest(self.train), "val_images": digest(self.val)}


class _Probe(torch.utils.data.Dataset):
    """Reads and decodes each file once, before training: bad files are found up front."""

    def __init__(self, refs: list[ImageRef], min_size: tuple[int, int], max_pixels: int | None):
        self.refs, self.min_size, self.max_pixels = refs, min_size, max_pixels

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[int, str, str | None]:
        try:
            data = read_file(self.refs[i].path)
            decode_image(data, min_size=self.min_size, max_pixels=self.max_pixels)
            return i, content_hash(data), None
        except DecodeError as e:
            return i, "", str(e)


class _Images(torch.utils.data.Dataset):
    """(tensor, label) per image; a file that fails now (changed since the probe) is dropped
    from its batch with its reason, never an exception."""

    def __init__(self, rows: list[tuple[ImageRef, int, str]], transform: Any,
                 min_size: tuple[int, int], max_pixels: int | None):
        self.rows, self.transform = rows, transform
        self.min_size, self.max_pixels = min_size, max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ref, y, _ = self.rows[i]
        try:
            img = decode_image(read_file(ref.path), min_size=self.min_size,
                               max_pixels=self.max_pixels)
            return {"x": self.transform(img), "y": y, "rel": ref.rel}
        except DecodeError as e:
            return {"x": None, "y": y, "rel": ref.rel, "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - a transform failure is this file's failure
            return {"x": None, "y": y, "rel": ref.rel,
                    "reason": f"preprocessing failed: {type(e).__name__}: {e}"}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [it for it in items if it["x"] is not None]
    return {
        "x": torch.stack([it["x"] for it in good]) if good else None,
        "y": torch.tensor([it["y"] for it in good], dtype=torch.long),
        "bad": [(it["rel"], it["reason"]) for it in items if it["x"] is None],
    }


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def _seed_worker(worker_id: int) -> None:
    """DataLoader seeds torch and python `random` in each worker; numpy needs it too."""
    np.random.seed(torch.initial_seed() % 2**32)


def plan_data(disc: Discovery, opts: FinetuneOptions, data_config: dict[str, Any],
              workers: int, say: Callable[[str], None]) -> DataPlan:
    labeled = [r for r in disc.items if r.label is not None]
    if not labeled:
        raise FinetuneError(f"{disc.root}: no labeled images ({len(disc.items)} unlabeled); "
                            "fine-tuning needs one folder per class (root/<class>/*.jpg) or a "
                            "CSV manifest with a label column")
    has_val = any(r.split == "val" for r in labeled)
    train_split = ("train", None)
    if has_val:
        cand_train = [r for r in labeled if r.split in train_split]
        cand_val = [r for r in labeled if r.split == "val"]
    else:
        cand_train = [r for r in labeled if r.split in train_split]
        cand_val = []
    left_out: dict[str, int] = {}
    for r in disc.items:
        if r.label is None or r.split not in (*train_split, "val"):
            name = "(unlabeled)" if r.label is None else (r.split or "")
            left_out[name] = left_out.get(name, 0) + 1
    if not cand_train:
        splits = ", ".join(sorted({r.split or "(none)" for r in labeled}))
        raise FinetuneError(f"{disc.root}: no training images (splits found: {splits}); put them "
                            "in train/<class>/ folders or use one folder per class")
    refs = cand_train + cand_val
    probe = _Probe(refs, decode_size(data_config), opts.max_pixels)
    loader = torch.utils.data.DataLoader(probe, batch_size=32, num_workers=workers,
                                         collate_fn=_as_list)
    hashes: dict[int, str] = {}
    skipped = list(disc.ignored)
    bad: set[int] = set()
    for batch in loader:
        for i, h, reason in batch:
            if reason is None:
                hashes[i] = h
            else:
                bad.add(i)
                skipped.append((refs[i].rel, reason))
    good_train = [(i, r) for i, r in enumerate(cand_train) if i not in bad]
    off = len(cand_train)
    good_val = [(off + i, r) for i, r in enumerate(cand_val) if off + i not in bad]
    classes = sorted({r.label for _, r in good_train})
    if not classes:
        raise FinetuneError(f"{disc.root}: none of the {len(cand_train)} training images could "
                            f"be decoded (e.g. {skipped[-1][0]}: {skipped[-1][1]}); fix the files")
    if len(classes) < 2:
        raise FinetuneError(f"{disc.root}: the training images hold one class ({classes[0]}); "
                            "fine-tuning a classifier needs at least two: add a folder per class")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({r.label for _, r in good_val if r.label not in index})
    if unknown:
        raise FinetuneError(f"{disc.root}: val/ holds class(es) with no training images "
                            f"({', '.join(unknown[:5])}); add train/<class>/ images or remove them "
                            "from val/")
    train = [(r, index[r.label], hashes[i]) for i, r in good_train]
    val = [(r, index[r.label], hashes[i]) for i, r in good_val]
    if has_val:
        source = f"the data's own val split ({len(val)} images)"
        if not val:
            raise FinetuneError(f"{disc.root}: every image in val/ failed to decode; fix them or "
                                "remove the val/ folder to split off --val-fraction instead")
    elif opts.val_fraction > 0:
        train, val = _stratified_split(train, classes, opts.val_fraction, opts.seed, disc.root)
        source = (f"stratified {opts.val_fraction:g} of the training images "
                  f"(seed {opts.seed})")
    else:
        source = "none (--val-fraction 0): no early stopping, the last epoch is kept"
    return DataPlan(disc.root, disc.layout, classes, train, val, source, skipped, left_out)


def _stratified_split(rows: list[tuple[ImageRef, int, str]], classes: list[str], frac: float,
                      seed: int, root: Path) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(len(classes)):
        members = sorted((r for r in rows if r[1] == c), key=lambda r: r[0].rel)
        if len(members) < 2:
            raise FinetuneError(
                f"{root}: class '{classes[c]}' has {len(members)} usable image(s); a validation "
                "split needs at least 2 per class: add images, give DATA its own val/<class>/ "
                "folders, or pass --val-fraction 0")
        perm = rng.permutation(len(members))
        n_val = min(len(members) - 1, max(1, round(frac * len(members))))
        val += [members[j] for j in sorted(perm[:n_val])]
        train += [members[j] for j in sorted(perm[n_val:])]
    key = lambda r: r[0].rel  # noqa: E731
    return sorted(train, key=key), sorted(val, key=key)


def train_transform(data_config: dict[str, Any], opts: FinetuneOptions):
    """timm's training transform at the model's input size and normalisation, with a small
    rotation after the crop and flip; RandAugment replaces the colour jitter when asked for."""
    import timm.data
    from torchvision import transforms

    primary, secondary, final = timm.data.create_transform(
        input_size=tuple(data_config["input_size"]), is_training=True, scale=CROP_SCALE,
        hflip=0.5 if opts.hflip else 0.0, color_jitter=COLOR_JITTER,
        auto_augment=RANDAUGMENT if opts.randaugment else None,
        interpolation=data_config["interpolation"], mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]), separate=True)
    fill = tuple(int(round(255 * m)) for m in data_config["mean"])
    rotate = transforms.RandomRotation(ROTATION_DEGREES, fill=fill)
    return transforms.Compose([*primary.transforms, rotate, *secondary.transforms,
                               *final.transforms])


# -- schedule ------------------------------------------------------------------------------

class WarmupCosine:
    """Learning-rate factor per optimizer step: each stage (head-only, then unfrozen) warms up
    linearly over ``warmup`` steps (at most half the stage) and then follows a cosine from 1 to
    MIN_LR_FACTOR. A plain object, so LambdaLR saves and restores it with the scheduler."""

    def __init__(self, stage_bounds: list[int], warmup: int):
        self.stage_bounds = list(stage_bounds)  # cumulative step counts ending each stage
        self.warmup = int(warmup)

    def __call__(self, step: int) -> float:
        starts = [0] + self.stage_bounds[:-1]
        start, end = starts[-1], self.stage_bounds[-1]
        for s, e in zip(starts, self.stage_bounds):
            if step < e:
                start, end = s, e
                break
        length = max(1, end - start)
        t = min(step - start, length - 1)
        w = min(self.warmup, length // 2)
        if t < w:
            return (t + 1) / (w + 1)
        progress = (t - w) / max(1, length - w - 1)
        return MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * progress))


# -- options, paths, checkpoints -----------------------------------------------------------

def check_options(opts: FinetuneOptions) -> None:
    def bad(option: str, value: Any, fix: str) -> None:
        raise FinetuneError(f"{option} {value}: {fix}")

    if opts.epochs < 1:
        bad("--epochs", opts.epochs, "pass 1 or more")
    if opts.head_epochs < 0:
        bad("--head-epochs", opts.head_epochs, "pass 0 or more (0 skips the head-only stage)")
    if opts.unfreeze < 0:
        bad("--unfreeze", opts.unfreeze, "pass 0 (classifier only) or the number of last "
            "feature stages to train")
    if opts.stage_epochs < 1:
        bad("--stage-epochs", opts.stage_epochs, "pass 1 or more")
    if opts.batch_size < 1:
        bad("--batch-size", opts.batch_size, "pass a positive number (16-32 is usual)")
    for option, v in (("--lr", opts.lr), ("--head-lr", opts.head_lr)):
        if not v > 0 or not math.isfinite(v):
            bad(option, v, "pass a positive learning rate such as 1e-4")
    if not 0 <= opts.weight_decay < 1:
        bad("--weight-decay", opts.weight_decay, "pass a value in [0, 1), e.g. 0.05")
    if not 0 <= opts.warmup_epochs:
        bad("--warmup-epochs", opts.warmup_epochs, "pass 0 or more")
    if not 0 <= opts.label_smoothing < 1:
        bad("--label-smoothing", opts.label_smoothing, "pass a value in [0, 1), e.g. 0.1")
    if not 0 <= opts.dropout < 1:
        bad("--dropout", opts.dropout, "pass a value in [0, 1), e.g. 0.2")
    if not 0 <= opts.val_fraction < 1:
        bad("--val-fraction", opts.val_fraction, "pass a value in [0, 1), e.g. 0.2")
    if opts.patience < 0:
        bad("--patience", opts.patience, "pass 0 (no early stopping) or more epochs")
    if opts.class_weight not in (None, "balanced"):
        bad("--class-weight", opts.class_weight, "pass balanced (or leave it out)")
    if opts.precision not in PRECISIONS:
        bad("--precision", opts.precision, f"pass one of {', '.join(PRECISIONS)}")
    if opts.layout not in LAYOUTS:
        bad("--layout", opts.layout, f"pass one of {', '.join(LAYOUTS)}")
    if opts.keep_checkpoints < 0:
        bad("--keep-checkpoints", opts.keep_checkpoints, "pass 0 (keep all) or more")
    if opts.workers is not None and opts.workers < 0:
        bad("--workers", opts.workers, "pass 0 (load in the main process) or more")
    if opts.threads is not None and opts.threads < 1:
        bad("--threads", opts.threads, "pass 1 or more (or leave it out for torch's default)")


@dataclass
class Outputs:
    weights: Path

    @property
    def stem(self) -> Path:
        return self.weights.with_suffix("")

    @property
    def manifest(self) -> Path:
        return self.stem.with_name(self.stem.name + ".json")

    @property
    def history(self) -> Path:
        return self.stem.with_name(self.stem.name + ".history.json")

    @property
    def classifier(self) -> Path:
        return self.stem.with_name(self.stem.name + ".classifier.pt")

    @property
    def curves(self) -> Path:
        return self.stem.with_name(self.stem.name + ".curves.png")

    @property
    def checkpoints(self) -> Path:
        return self.stem.with_name(self.stem.name + ".checkpoints")

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch-{epoch:03d}.pt"


def check_output(out: Path, resume: Path | None, overwrite: bool) -> Outputs:
    if out.suffix.lower() not in WEIGHT_SUFFIXES:
        raise FinetuneError(f"-o {out}: pass a weights file name ending in .pt or .pth "
                            "(e.g. -o tuned.pt)")
    if out.is_dir():
        raise FinetuneError(f"-o {out}: is a folder; pass a file name such as {out / 'tuned.pt'}")
    outs = Outputs(out)
    stale = [p for p in (out, outs.manifest) if p.exists()]
    stale += sorted(outs.checkpoints.glob("epoch-*.pt")) if outs.checkpoints.is_dir() else []
    if stale and resume is None and not overwrite:
        raise FinetuneError(f"-o {out}: {stale[0]} exists from an earlier run; pass --resume "
                            f"{outs.checkpoints} to continue it, --overwrite to start afresh, "
                            "or another -o")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FinetuneError(f"-o {out}: cannot create {out.parent} ({e.strerror or e}); pass a "
                            "writable location") from None
    if resume is None:  # a fresh run: no checkpoint of the earlier one may be resumed by mistake
        for old in stale:
            if old.parent == outs.checkpoints:
                old.unlink(missing_ok=True)
    return outs


def find_checkpoint(resume: Path) -> Path:
    if resume.is_dir():
        found = sorted(resume.glob("epoch-*.pt"))
        if not found:
            raise FinetuneError(f"--resume {resume}: the folder holds no epoch-*.pt checkpoint; "
                                "pass a checkpoint file, or leave out --resume to start afresh")
        return found[-1]
    if not resume.is_file():
        raise FinetuneError(f"--resume {resume}: no such checkpoint; pass a file from "
                            "<output>.checkpoints/ (epoch-NNN.pt), or leave out --resume to "
                            "start afresh")
    return resume


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise FinetuneError(f"--resume {path}: cannot read the checkpoint ({first}); pass a "
                            "checkpoint written by `embedpipe finetune`") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FinetuneError(f"--resume {path}: not an `embedpipe finetune` checkpoint; pass a "
                            "file from <output>.checkpoints/")
    return ckpt


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if k.endswith("_images"):
                out.append(f"the {k.split('_')[0]} images differ")
            elif k in ("classes", "data_config", "base_weights_sha256"):
                out.append(f"{k} differ")
            else:
                out.append(f"{k} {a.get(k)!r} vs {b.get(k)!r} now")
    return out


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Reseed every RNG from (seed, epoch): an epoch's randomness never depends on how the run
    got there, which is what makes --resume exact."""
    s = np.random.SeedSequence([seed, epoch]).generate_state(2)
    torch.manual_seed(int(s[0]))
    np.random.seed(int(s[1]))
    random.seed(int(s[0]) ^ int(s[1]))
    return torch.Generator().manual_seed(int(s[1]))


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save through memory, so the zip's inner folder name is always 'archive' (saving
    to a path would embed the file name): equal tensors give equal bytes and sha256."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(buf.getbuffer())
    os.replace(tmp, path)


def _atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _torch_settings(deterministic: bool, threads: int | None):
    """Deterministic algorithms and the intra-op thread count for the run, restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    n_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)
        torch.set_num_threads(n_threads)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise FinetuneError("--precision fp16: not supported for training on the CPU; pass fp32 "
                            "(or bf16 on CPUs with native bf16)")
    return precision


# -- the model -----------------------------------------------------------------------------

def build_model(backbone: Backbone, num_classes: int, seed: int, dropout: float) -> torch.nn.Module:
    """The backbone with a new classifier for ``num_classes`` (initialised from ``seed``)."""
    model = backbone.model
    torch.manual_seed(seed)
    model.reset_classifier(num_classes)
    for mod in model.get_classifier().modules():  # small init: the start loss is ~ln(classes)
        if isinstance(mod, torch.nn.Linear):
            torch.nn.init.trunc_normal_(mod.weight, std=0.01)
            if mod.bias is not None:
                torch.nn.init.zeros_(mod.bias)
    if isinstance(getattr(model, "drop_rate", None), float):
        model.drop_rate = float(dropout)
    return model


def classifier_prefix(model: torch.nn.Module) -> str:
    name = _module_name(model, model.get_classifier())
    if not name:
        raise FinetuneError("the model's classifier could not be located; use a timm model with "
                            "get_classifier()")
    return name


def _param_groups(model: torch.nn.Module, split: StageSplit, opts: FinetuneOptions) -> list[dict]:
    """AdamW groups: classifier (head_lr) and backbone (lr), each split into decayed weights
    and undecayed biases/norm parameters. Every parameter that may ever train is in a group
    from the start (frozen ones simply have no gradient), so the optimizer state of a resumed
    run lines up with the checkpoint."""
    params = dict(model.named_parameters())
    ever = split.trainable(opts.unfreeze)
    head = set(split.head)
    groups = []
    for role, lr in (("head", opts.head_lr), ("backbone", opts.lr)):
        names = [n for n in params if n in ever and (n in head) == (role == "head")]
        decay = [params[n] for n in names if params[n].ndim > 1]
        no_decay = [params[n] for n in names if params[n].ndim <= 1]
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": opts.weight_decay,
                           "name": f"{role}"})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0,
                           "name": f"{role}-no-decay"})
    return groups


def unfrozen_at(epoch: int, opts: FinetuneOptions) -> int:
    """How many of the last feature stages train in ``epoch`` (0-based)."""
    if epoch < opts.head_epochs or opts.unfreeze == 0:
        return 0
    if not opts.gradual:
        return opts.unfreeze
    return min(opts.unfreeze, 1 + (epoch - opts.head_epochs) // opts.stage_epochs)


# -- the run -------------------------------------------------------------------------------

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def finetune(data: str | Path, out: str | Path, opts: FinetuneOptions, *,
             resume: str | Path | None = None, overwrite: bool = False, progress: bool = True,
             say: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune ``opts.model`` on the labeled images under ``data``; write the tuned backbone
    weights to ``out`` (and the manifest, history, classifier, curves and checkpoints beside
    it). ``resume``: a checkpoint file (or the checkpoint folder: its latest file)."""
    t0 = time.perf_counter()
    say = say or printer(progress)
    check_options(opts)
    out = Path(out)
    ckpt_path = find_checkpoint(Path(resume)) if resume is not None else None
    outs = check_output(out, ckpt_path, overwrite)
    ckpt = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    device = resolve_device(opts.device)
    precision = resolve_precision(opts.precision, device)
    deterministic = device.type == "cpu" if opts.deterministic is None else opts.deterministic
    workers = default_workers() if opts.workers is None else opts.workers
    disc = discover(data, opts.layout)
    backbone = load_backbone(opts.model, weights=opts.weights, img_size=opts.img_size)
    base_keys = list(backbone.model.state_dict())
    data_config = backbone.data_config
    plan = plan_data(disc, opts, data_config, workers, say)
    classes = plan.classes
    model = build_model(backbone, len(classes), opts.seed, opts.dropout)
    prefix = classifier_prefix(model)
    if opts.unfreeze > 0:
        split = feature_stages(model, opts.model)
        if opts.unfreeze > len(split.stages):
            raise FinetuneError(
                f"--unfreeze {opts.unfreeze}: {opts.model} has {len(split.stages)} feature "
                f"stages ({split.names[0]} … {split.names[-1]}); pass 0 to {len(split.stages)} "
                f"({len(split.stages)} trains the whole backbone)")
    else:
        head_names = [n for n, p in model.named_parameters()
                      if n.startswith(prefix + ".")]
        split = StageSplit([], [], [], [n for n, _ in model.named_parameters()
                                        if n not in head_names], head_names)
    fingerprint = json.loads(json.dumps({
        **{k: getattr(opts, k) for k in STRICT}, "base_weights_sha256": backbone.weights.sha256,
        "data_config": data_config, "classes": classes, **plan.fingerprint()}))
    soft = {"device": str(device), "precision": precision, "workers": workers,
            "threads": opts.threads or torch.get_num_threads(), "deterministic": deterministic}
    if ckpt is not None:
        diffs = _differences(ckpt["fingerprint"], fingerprint)
        if diffs:
            raise FinetuneError(
                f"--resume {ckpt_path}: the checkpoint is from another run ({'; '.join(diffs[:4])}"
                f"{'; …' if len(diffs) > 4 else ''}); rerun with that run's DATA and options, or "
                "leave out --resume to start afresh")
        changed = [f"{k} {ckpt['soft'].get(k)!r} → {v!r}" for k, v in soft.items()
                   if ckpt["soft"].get(k) != v]
        if changed:
            say(f"note: resuming with {', '.join(changed)}: the continuation is valid but not "
                "bit-identical to an uninterrupted run")

    model.to(device)
    groups = _param_groups(model, split, opts)
    optimizer = torch.optim.AdamW(groups, lr=opts.head_lr, weight_decay=opts.weight_decay)
    n_train, n_val = len(plan.train), len(plan.val)
    drop_last = n_train > opts.batch_size and n_train % opts.batch_size == 1  # BN needs 2+
    steps_per_epoch = n_train // opts.batch_size if drop_last else math.ceil(n_train / opts.batch_size)
    head_epochs = min(opts.head_epochs, opts.epochs)
    bounds = [b for b in (head_epochs * steps_per_epoch, opts.epochs * steps_per_epoch) if b > 0]
    bounds = sorted(set(bounds))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(bounds, round(opts.warmup_epochs * steps_per_epoch)))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    amp = (torch.autocast(device.type, dtype=_AMP[precision]) if precision in _AMP
           else contextlib.nullcontext())
    class_weight = None
    if opts.class_weight == "balanced":
        counts = np.bincount([y for _, y, _ in plan.train], minlength=len(classes))
        class_weight = torch.tensor(n_train / (len(classes) * counts), dtype=torch.float32,
                                    device=device)
    mixup = None
    if opts.cutmix:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, mode="batch",
                      label_smoothing=opts.label_smoothing, num_classes=len(classes))

    min_size = decode_size(data_config)
    train_ds = _Images(plan.train, train_transform(data_config, opts), min_size, opts.max_pixels)
    val_ds = _Images(plan.val, make_transform(data_config), min_size, opts.max_pixels)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "val_accuracy": None, "val_loss": None, "state": None}
    start_epoch, bad_epochs, stopped = 0, 0, False
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        history = list(ckpt["history"])
        best = dict(ckpt["best"])
        start_epoch, bad_epochs = int(ckpt["epoch"]), int(ckpt["bad_epochs"])
        stopped = bool(ckpt["stopped"])
        say(f"resuming from {ckpt_path} after epoch {start_epoch} of {opts.epochs}")

    say(f"fine-tuning {opts.model} ({backbone.weights.describe()}) on {n_train} training images, "
        f"{len(classes)} classes; validation: {plan.val_source}; input "
        f"{data_config['input_size'][1]}px, {device}, {precision}; "
        f"{_plan_text(opts, split)}")
    for rel, reason in plan.skipped[:20]:
        say(f"skipped {rel}: {reason}")
    if len(plan.skipped) > 20:
        say(f"... and {len(plan.skipped) - 20} more skipped files")
    if plan.left_out:
        say("not used for training: " + ", ".join(f"{n} in split {s or '(none)'}"
                                                   for s, n in sorted(plan.left_out.items())))

    skipped_live: list[tuple[str, str]] = []
    epoch = start_epoch
    last_ckpt = ckpt_path
    try:
        with _torch_settings(deterministic, opts.threads):
            while epoch < opts.epochs and not stopped:
                k = unfrozen_at(epoch, opts)
                apply_freeze(model, split.trainable(k))
                stage = 1 if epoch < head_epochs or opts.unfreeze == 0 else 2
                gen = _seed_epoch(opts.seed, epoch)
                e0 = time.perf_counter()
                tr = _train_epoch(model, train_ds, opts, workers, gen, drop_last, device, amp,
                                  scaler, optimizer, sched, class_weight, mixup, progress,
                                  f"epoch {epoch + 1}/{opts.epochs}", skipped_live)
                lrs = tr["lr"]
                va = _evaluate(model, val_ds, opts, workers, device, amp) if n_val else None
                epoch += 1
                improved = False
                if va is None:
                    improved = True
                elif (best["val_accuracy"] is None or va["accuracy"] > best["val_accuracy"]
                      or (va["accuracy"] == best["val_accuracy"]
                          and va["loss"] < best["val_loss"])):
                    improved = True
                if improved:
                    best = {"epoch": epoch, "val_accuracy": va["accuracy"] if va else None,
                            "val_loss": va["loss"] if va else None,
                            "state": backbone_state_with_head(model)}
                if stage == 2 and n_val and opts.patience:
                    bad_epochs = 0 if improved else bad_epochs + 1
                    stopped = bad_epochs >= opts.patience and epoch < opts.epochs
                row = {"epoch": epoch, "stage": stage, "unfrozen_stages": k,
                       "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                       "val_loss": va["loss"] if va else None,
                       "val_accuracy": va["accuracy"] if va else None,
                       "lr_head": lrs.get("head"), "lr_backbone": lrs.get("backbone") if k else 0.0,
                       "images": tr["images"], "seconds": round(time.perf_counter() - e0, 2),
                       "best": improved}
                history.append(row)
                say(_epoch_line(row, opts.epochs) + ("  (early stop)" if stopped else ""))
                last_ckpt = outs.checkpoint(epoch)
                _save_checkpoint(last_ckpt, outs, opts, fingerprint, soft, epoch, model,
                                 optimizer, sched, scaler, history, best, bad_epochs, stopped)
    except KeyboardInterrupt:
        where = last_ckpt or "(none yet)"
        raise FinetuneError(f"interrupted after epoch {epoch}; continue with the same command "
                            f"plus --resume {where}") from None

    if best["state"] is None:  # resumed from a finished checkpoint without a best state
        best["state"] = backbone_state_with_head(model)
    state = best["state"]
    tuned = {k: v for k, v in state.items() if not k.startswith(prefix + ".")}
    if set(tuned) != set(base_keys):
        raise FinetuneError(f"{opts.model}: the tuned state dict does not match the "
                            "num_classes=0 model's keys; this model cannot be saved headless")
    head = {k.removeprefix(prefix + "."): v for k, v in state.items()
            if k.startswith(prefix + ".")}
    _atomic_save(tuned, out)
    _atomic_save(head, outs.classifier)
    sha = file_sha256(out)
    history_doc = {"format": FORMAT, "classes": classes, "history": history,
                   "best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"]}
    _atomic_text(json.dumps(history_doc, indent=2) + "\n", outs.history)
    curves = _plot(history, head_epochs, best["epoch"], outs.curves, say)
    seconds = time.perf_counter() - t0
    manifest = {
        "format": FORMAT,
        "weights_file": out.name, "weights_sha256": sha,
        "classifier_file": outs.classifier.name,
        "model": opts.model,
        "base_weights": {"source": backbone.weights.describe(),
                         "sha256": backbone.weights.sha256},
        "data_config": data_config,
        "classes": classes,
        "data": {"root": str(plan.root), "layout": plan.layout, "validation": plan.val_source,
                 "train_per_class": plan.counts("train"), "val_per_class": plan.counts("val"),
                 "skipped": len(plan.skipped) + len(skipped_live), "left_out": plan.left_out},
        "best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"],
        "best_val_loss": best["val_loss"], "epochs_run": epoch,
        "stopped_early": bool(stopped and epoch < opts.epochs),
        "stages": {"names": split.names, "post": sorted({n.rsplit(".", 2)[0] for n in split.post}),
                   "unfreeze": opts.unfreeze, "gradual": opts.gradual},
        "options": asdict(opts), "device": str(device), "precision": precision,
        "deterministic": deterministic, "workers": workers,
        "history_file": outs.history.name, "curves_file": curves.name if curves else None,
        "seconds": round(seconds, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
    }
    _atomic_text(json.dumps(manifest, indent=2) + "\n", outs.manifest)
    return FinetuneResult(out, outs.manifest, outs.history, outs.classifier, curves, last_ckpt,
                          opts.model, classes, n_train, n_val, best["epoch"],
                          best["val_accuracy"], epoch, manifest["stopped_early"], seconds, sha,
                          int(data_config["input_size"][1]), history,
                          plan.skipped + skipped_live, sum(plan.left_out.values()))


def backbone_state_with_head(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the whole state (backbone and new classifier)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _plan_text(opts: FinetuneOptions, split: StageSplit) -> str:
    head = min(opts.head_epochs, opts.epochs)
    if opts.unfreeze == 0:
        return f"classifier only for {opts.epochs} epochs"
    last = split.names[len(split.names) - opts.unfreeze:]
    what = (f"then one more stage every {opts.stage_epochs} epoch(s) deep to shallow up to "
            f"{', '.join(last)}" if opts.gradual else f"then {', '.join(last)}")
    if split.post:
        what += " + " + ", ".join(sorted({n.split(".")[0] for n in split.post}))
    return f"classifier only for {head} epoch(s), {what} for {opts.epochs - head}"


def _group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        out.setdefault(g["name"].split("-")[0], float(g["lr"]))
    return out


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    val = (f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.3f}"
           if row["val_accuracy"] is not None else "no val")
    lr_bb = f"{row['lr_backbone']:.1e}" if row["lr_backbone"] else "frozen"
    return (f"epoch {row['epoch']}/{epochs} stage {row['stage']} (unfrozen {row['unfrozen_stages']})"
            f": loss {row['train_loss']:.4f} train acc {row['train_accuracy']:.3f} {val} "
            f"lr head {row['lr_head']:.1e} backbone {lr_bb} {row['seconds']:.1f} s"
            + ("  *best" if row["best"] else ""))


def _loader(ds: torch.utils.data.Dataset, batch_size: int, workers: int, *, shuffle: bool,
            generator: torch.Generator | None = None, drop_last: bool = False, pin: bool = False):
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=_collate,
        generator=generator, drop_last=drop_last, worker_init_fn=_seed_worker if workers else None,
        pin_memory=pin, persistent_workers=False)


def _train_epoch(model, ds, opts, workers, gen, drop_last, device, amp, scaler, optimizer,
                 sched, class_weight, mixup, progress, label, skipped) -> dict[str, float]:
    set_train_mode(model)
    loader = _loader(ds, opts.batch_size, workers, shuffle=True, generator=gen,
                     drop_last=drop_last, pin=device.type == "cuda")
    total_loss, correct, seen = 0.0, 0, 0
    lrs = _group_lrs(optimizer)
    with Progress(len(ds), label, enabled=progress) as bar:
        for batch in loader:
            skipped += batch["bad"]
            n = len(batch["y"])
            if batch["x"] is None or n < 2:
                bar.update(n + len(batch["bad"]))
                continue
            x = batch["x"].to(device, non_blocking=True)
            y = batch["y"].to(device, non_blocking=True)
            target = None
            if mixup is not None and n % 2 == 0:
                x, target = mixup(x, y)
            with amp:
                logits = model(x)
            logits = logits.float()
            if target is not None:
                loss = F.cross_entropy(logits, target, weight=class_weight)
            else:
                loss = F.cross_entropy(logits, y, weight=class_weight,
                                       label_smoothing=opts.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            lrs = _group_lrs(optimizer)  # the learning rates this step used
            sched.step()
            total_loss += float(loss.detach()) * n
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += n
            bar.update(n + len(batch["bad"]))
    if seen == 0:
        raise FinetuneError("no training batch could be used in this epoch (every image failed "
                            "to load, or fewer than 2 images); check the data")
    return {"loss": total_loss / seen, "accuracy": correct / seen, "images": seen, "lr": lrs}


@torch.no_grad()
def _evaluate(model, ds, opts, workers, device, amp) -> dict[str, float] | None:
    model.eval()
    loader = _loader(ds, opts.batch_size, workers, shuffle=False, pin=device.type == "cuda")
    total_loss, correct, seen = 0.0, 0, 0
    for batch in loader:
        if batch["x"] is None:
            continue
        x, y = batch["x"].to(device), batch["y"].to(device)
        with amp:
            logits = model(x)
        logits = logits.float()
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    if seen == 0:
        return None
    return {"loss": total_loss / seen, "accuracy": correct / seen}


def _save_checkpoint(path: Path, outs: Outputs, opts: FinetuneOptions, fingerprint, soft, epoch,
                     model, optimizer, sched, scaler, history, best, bad_epochs, stopped) -> None:
    outs.checkpoints.mkdir(parents=True, exist_ok=True)
    _atomic_save({
        "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "soft": soft, "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "rng": _rng_state(), "history": history, "best": best, "bad_epochs": bad_epochs,
        "stopped": stopped,
    }, path)
    if opts.keep_checkpoints:
        for old in sorted(outs.checkpoints.glob("epoch-*.pt"))[:-opts.keep_checkpoints]:
            if old != path:
                old.unlink(missing_ok=True)


def _plot(history: list[dict[str, Any]], head_epochs: int, best_epoch: int, path: Path,
          say: Callable[[str], None]) -> Path | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        say(f"note: matplotlib is not installed, so no loss/accuracy curves PNG ({PLOTS_HINT})")
        return None
    ep = [r["epoch"] for r in history]
    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    for ax, key, title in ((fig.add_subplot(1, 2, 1), "loss", "loss"),
                           (fig.add_subplot(1, 2, 2), "accuracy", "accuracy")):
        ax.plot(ep, [r[f"train_{key}"] for r in history], "o-", label="train (augmented)")
        val = [r[f"val_{key}"] for r in history]
        if any(v is not None for v in val):
            ax.plot(ep, [np.nan if v is None else v for v in val], "o-", label="validation")
        if 0 < head_epochs < len(ep) + 1:
            ax.axvline(head_epochs + 0.5, color="grey", ls=":", label="backbone unfrozen")
        if best_epoch:
            ax.axvline(best_epoch, color="green", ls="--", alpha=0.5, label="best epoch")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `embedpipe finetune`")
