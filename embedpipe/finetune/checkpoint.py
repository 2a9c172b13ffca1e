"""Checkpoints that ``resume`` continues exactly (model, optimizer, scheduler, scaler, RNG states,
history), and atomic writes of the outputs.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import _io
from ..errors import first_line
from .options import CHECKPOINT_FORMAT, FinetuneError, FinetuneOptions, Outputs


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
        first = first_line(e, 120)
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
    _io.write_bytes(path, bytes(buf.getbuffer()), flag="-o")


def _atomic_text(text: str, path: Path) -> None:
    _io.write_text(path, text, flag="-o")


def backbone_state_with_head(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the whole state (backbone and new classifier)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _save_checkpoint(path: Path, outs: Outputs, opts: FinetuneOptions, fingerprint, soft, epoch,
                     model, optimizer, sched, scaler, history, best, bad_epochs, stopped,
                     ema: dict[str, Any] | None = None) -> None:
    outs.checkpoints.mkdir(parents=True, exist_ok=True)
    _atomic_save({
        "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "soft": soft, "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "rng": _rng_state(), "history": history, "best": best, "bad_epochs": bad_epochs,
        "stopped": stopped, "ema": ema,
    }, path)
    for old in outs.stale_checkpoints:  # the earlier run's (--overwrite), once this one has one
        if old != path:
            old.unlink(missing_ok=True)
    outs.stale_checkpoints = []
    if opts.keep_checkpoints:
        for old in sorted(outs.checkpoints.glob("epoch-*.pt"))[:-opts.keep_checkpoints]:
            if old != path:
                old.unlink(missing_ok=True)
