"""Checkpoints that ``resume`` continues exactly (model, optimizer, scheduler, scaler, RNG states,
history), and atomic writes of the outputs.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import _io
from ..backbones import STATE_DICT_KEYS, TorchFileError, load_torch_file
from .options import CHECKPOINT_FORMAT, FinetuneError, FinetuneOptions, Outputs


def resume_from(resume: Path, say: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``--resume`` continues, loaded: ``resume`` itself when it is a file; for
    a folder, its newest ``epoch-*.pt`` that can be read, the newer ones that cannot (cut off,
    empty, corrupt: TorchFileError) skipped, with one ``say`` line naming each of them and
    why, and the one resumed from. Raises
    FinetuneError (one line) for a missing path, a folder without checkpoints or with none
    readable, and a file that is not an `embedpipe finetune` checkpoint (load_checkpoint)."""
    if resume.is_dir():
        found = sorted(resume.glob("epoch-*.pt"))
        if not found:
            raise FinetuneError(f"--resume {resume}: the folder holds no epoch-*.pt checkpoint; "
                                "pass a checkpoint file, or leave out --resume to start afresh")
        skipped: list[tuple[Path, str]] = []
        for path in reversed(found):
            try:
                ckpt = load_torch_file(path)
            except TorchFileError as e:
                skipped.append((path, str(e)))
                continue
            if skipped:
                said = [f"{bad.name} ({why})" for bad, why in skipped]
                listed = ", ".join(said[:-1]) + " and " + said[-1] if len(said) > 1 else said[0]
                say(f"note: --resume {resume}: skipped {listed}; resuming from {path.name}, "
                    "the newest readable checkpoint")
            return path, _checked(path, ckpt)
        newest, why = skipped[0]
        raise FinetuneError(
            f"--resume {resume}: none of its {len(found)} checkpoint(s) can be read (the newest, "
            f"{newest.name}: {why}); leave out --resume to start afresh (with --overwrite), "
            "or restore a checkpoint into the folder")
    if not resume.is_file():
        raise FinetuneError(f"--resume {resume}: no such checkpoint; pass a file from "
                            "<output>.checkpoints/ (epoch-NNN.pt), or leave out --resume to "
                            "start afresh")
    return resume, load_checkpoint(resume)


# what every checkpoint holds (_save_checkpoint); "ema" is missing from older ones
_KEYS = ("fingerprint", "soft", "epoch", "model", "optimizer", "scheduler", "scaler", "rng",
         "history", "best", "bad_epochs", "stopped")
_RESUME_FIX = ("pass a file from <output>.checkpoints/ (epoch-NNN.pt) written by `embedpipe "
               "finetune`, or leave out --resume to start afresh")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``; FinetuneError (one line: what is wrong with the file in
    plain words, and the fix) for a file that is unreadable, another tool's, or of another
    checkpoint format."""
    try:
        ckpt = load_torch_file(path)
    except TorchFileError as e:
        raise FinetuneError(f"--resume {path}: {e}; {_RESUME_FIX}") from None
    return _checked(path, ckpt)


def _checked(path: Path, ckpt: Any) -> dict[str, Any]:
    """``ckpt`` (loaded from ``path``) when it is an `embedpipe finetune` checkpoint; else
    FinetuneError naming what it is and the fix."""
    wrong = _not_a_checkpoint(ckpt)
    if wrong is not None:
        raise FinetuneError(f"--resume {path}: {wrong[0]}; {wrong[1]}")
    return ckpt


def _not_a_checkpoint(ckpt: Any) -> tuple[str, str] | None:
    """(what a loaded file holds instead of an `embedpipe finetune` checkpoint, the fix), or
    None for a checkpoint."""
    fix = _RESUME_FIX
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if not isinstance(ckpt, dict):
        what = f"it holds a {type(ckpt).__name__}, not an `embedpipe finetune` checkpoint"
    elif fmt == CHECKPOINT_FORMAT:
        missing = [k for k in _KEYS if k not in ckpt]
        if not missing:
            return None
        what = f"an incomplete checkpoint (no {', '.join(missing)})"
    elif isinstance(fmt, str) and fmt.startswith(CHECKPOINT_FORMAT.split("/")[0] + "/"):
        what = (f"a checkpoint of format {fmt}, which this embedpipe does not read (it reads "
                f"{CHECKPOINT_FORMAT})")
        fix = ("resume it with the embedpipe version that wrote it, or leave out --resume to "
               "start afresh")
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        what = ("a bare state dict (model weights only, such as a `finetune -o` output), not "
                "a training checkpoint")
        fix = ("pass a file from <output>.checkpoints/, or start a new run from these weights "
               "with --weights PATH instead of --resume")
    else:
        keys = ", ".join(sorted(map(str, ckpt))[:5]) + (", …" if len(ckpt) > 5 else "")
        if any(isinstance(ckpt.get(k), dict) and ckpt[k] and all(
                isinstance(v, torch.Tensor) for v in ckpt[k].values())
                for k in STATE_DICT_KEYS):
            what = (f"another tool's checkpoint holding model weights (keys: {keys}; e.g. "
                    "timm's train.py), not an `embedpipe finetune` checkpoint")
            fix = "start a new run from its weights with --weights PATH instead of --resume"
        else:
            what = (f"another tool's file (keys: {keys or 'none'}), not an `embedpipe "
                    "finetune` checkpoint")
    return what, fix


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
    _io.write_bytes(path, bytes(buf.getbuffer()), flag="-o")


def _atomic_text(text: str, path: Path) -> None:
    _io.write_text(path, text, flag="-o")


def backbone_state_with_head(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the whole state (backbone and new classifier)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _save_checkpoint(path: Path, outs: Outputs, opts: FinetuneOptions, fingerprint, soft, epoch,
                     model, optimizer, sched, scaler, history, best, bad_epochs, stopped,
                     ema: dict[str, Any] | None = None,
                     train_hashes: torch.Tensor | None = None) -> None:
    """Write the checkpoint of ``epoch`` to ``path`` (atomic), then drop the earlier run's and
    those past --keep-checkpoints. ``train_hashes``: the record of the images the backbone of
    this epoch's weights was trained on (record_tensor), held in the checkpoint itself: the
    weights of a head-only epoch have the base's record, a later epoch's the run's too."""
    if not outs.checkpoints.is_dir():
        try:
            outs.checkpoints.mkdir()
        except OSError as e:
            raise _io.write_failed(path, e, flag="-o (its checkpoints)") from None
        outs.made.insert(0, outs.checkpoints)
    outs.saving = path
    _atomic_save({
        "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "soft": soft, "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "rng": _rng_state(), "history": history, "best": best, "bad_epochs": bad_epochs,
        "stopped": stopped, "ema": ema,
        **({} if train_hashes is None else {"train_hashes": train_hashes}),
    }, path)
    outs.last = path
    stale, outs.stale_checkpoints = outs.stale_checkpoints, []
    for old in stale:  # the earlier run's (--overwrite), once this one has one
        if old != path:
            old.unlink(missing_ok=True)
    if opts.keep_checkpoints:
        for old in sorted(outs.checkpoints.glob("epoch-*.pt"))[:-opts.keep_checkpoints]:
            if old != path:
                old.unlink(missing_ok=True)


def record_tensor(hashes: Any) -> torch.Tensor:
    """A record of training images (sha256 hex digests) as a checkpoint holds it: the sorted
    unique digests as a uint8 tensor (K, 32), 32 bytes an image (backbones.finetune_hashes
    reads it back)."""
    lines = sorted(set(hashes))
    raw = bytes.fromhex("".join(lines))
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).reshape(len(lines), 32)


def write_train_hashes(outs: Outputs, hashes: Any) -> dict[str, Any]:
    """Write ``outs.train_hashes``: the sha256 (data.content_hash, the digest a store keeps
    per row) of every image the backbone of the run's output weights was trained on, sorted
    and unique, one a line (65 bytes an image: 65 MB for a million). The same plan and kept
    epoch give the same bytes, so a resumed run ends with the same record. Returns what the
    manifest names it by."""
    lines = sorted(set(hashes))
    data = "".join(h + "\n" for h in lines).encode("ascii")
    _io.write_bytes(outs.train_hashes, data, flag="-o")
    return {"train_hashes_file": outs.train_hashes.name,
            "train_hashes_sha256": hashlib.sha256(data).hexdigest(),
            "train_hashes_images": len(lines)}
