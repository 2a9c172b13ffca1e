"""The backbone's feature stages: which to unfreeze when, parameter groups with discriminative
learning rates, the warmup-cosine schedule, and the model with its new classifier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backbones import (
    Backbone,
)
from .options import MIN_LR_FACTOR, STAGE_CONTAINERS, FinetuneError, FinetuneOptions

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


def set_train_mode(model: torch.nn.Module, bn_frozen: bool = False) -> None:
    """Train mode, except subtrees whose parameters are all frozen: those stay in eval mode
    (BatchNorm keeps its running statistics, dropout inside them is off). With ``bn_frozen``
    every BatchNorm stays in eval mode, trained or not: it normalises with the pretrained
    running statistics (which never move) while its scale and shift still train, so the
    features do not jump when a stage is unfrozen and small batches never replace ImageNet's
    statistics (the Keras transfer-learning guide's advice)."""
    model.train()
    if bn_frozen:
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.eval()

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


def backbone_trained_by(epochs: int, opts: FinetuneOptions) -> bool:
    """Whether the backbone's weights after ``epochs`` epochs differ from the base's: a
    stage trained in one of them (unfrozen_at > 0; unfreezing only grows, so the last one
    decides). Until then only the new classifier trains; the frozen backbone stays in eval
    mode (set_train_mode), so its BatchNorm statistics do not move either, and its weights,
    their EMA included, are the base's byte for byte."""
    return epochs > 0 and unfrozen_at(epochs - 1, opts) > 0


def unfrozen_at(epoch: int, opts: FinetuneOptions) -> int:
    """How many of the last feature stages train in ``epoch`` (0-based)."""
    if epoch < opts.head_epochs or opts.unfreeze == 0:
        return 0
    if not opts.gradual:
        return opts.unfreeze
    return min(opts.unfreeze, 1 + (epoch - opts.head_epochs) // opts.stage_epochs)
