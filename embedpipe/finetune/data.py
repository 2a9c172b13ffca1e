"""Training and validation images: the split (the data's own ``val``, else a seeded stratified
fraction), decoding, augmentation and loaders.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..backbones import (
    decode_size,
)
from ..data import (
    DecodeError,
    Discovery,
    ImageRef,
    content_hash,
    decode_image,
    read_file,
)
from .options import (
    COLOR_JITTER,
    CROP_SCALE,
    RANDAUGMENT,
    ROTATION_DEGREES,
    FinetuneError,
    FinetuneOptions,
)

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
    bad: dict[int, str] = {}  # index in refs -> why it was skipped
    for batch in loader:
        for i, h, reason in batch:
            if reason is None:
                hashes[i] = h
            else:
                bad[i] = reason
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
    known = set(classes)
    lost = next((i for i, r in enumerate(cand_train) if r.label not in known), None)
    if lost is not None:  # never a class left out of the classifier without a word
        r = cand_train[lost]
        raise FinetuneError(f"{disc.root}: class '{r.label}' has no training image that "
                            f"decodes (e.g. {r.rel}: {bad[lost]}); fix or remove its files")
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
    """data.limit_aspect (as every path), then timm's training transform at the model's input
    size and normalisation, with a small rotation after the crop and flip; RandAugment replaces the colour jitter when asked for."""
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
    from ..data import limit_aspect

    return transforms.Compose([limit_aspect, *primary.transforms, rotate,
                               *secondary.transforms, *final.transforms])


def _loader(ds: torch.utils.data.Dataset, batch_size: int, workers: int, *, shuffle: bool,
            generator: torch.Generator | None = None, drop_last: bool = False, pin: bool = False):
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=_collate,
        generator=generator, drop_last=drop_last, worker_init_fn=_seed_worker if workers else None,
        pin_memory=pin, persistent_workers=False)
