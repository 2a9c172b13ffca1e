"""The reader: stat, read, hash and decode one image per item for torch's DataLoader workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data import (
    DecodeError,
    content_hash,
    file_stat,
    decode_image,
    read_file,
)
from ..env import usable_cores
from .plan import Task

if TYPE_CHECKING:  # imported where used: a no-op rerun never imports torch or timm

    pass



def default_workers() -> int:
    """Loader worker processes by default: one core for decoding, the others for inference
    (cores − 1, at least 1, at most 8). On 2 cores 1 worker beat 2 with OpenVINO's streams on
    the other threads (about 400 vs 370-395 img/s steady, Lite0 bf16, 224-px JPEGs)."""
    return max(1, min(8, usable_cores() - 1))


class _Images:
    """Reads, hashes and decodes one image per item; never raises for a bad file. (A map-style
    dataset for torch's DataLoader: __len__ and __getitem__.)

    Paths and expected hashes are kept in two numpy byte arrays, not as the tasks' Python
    objects: a forked loader worker that reads a Python object writes its reference count,
    which copies the object's memory page into the worker, so a worker walking a list of
    tasks grew with every image (bench/memory.py measured it: bench/results/memory.md). A
    numpy array is one object."""

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
    stat = file_stat(path)  # a dangling symlink: the link's own (data.file_stat)
    if stat is not None:
        out["mtime_ns"], out["size"] = stat
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
    """A batch: the items, their views stacked into one tensor (``stack_views``), and the
    dataset indices of the good ones."""
    from ..backbones import stack_views

    good = [it for it in items if it["status"] == "ok"]
    return {
        "items": items,
        "tensor": stack_views([it.pop("tensor") for it in good]) if good else None,
        "good": [it["i"] for it in good],
    }


def _start_worker(fd: int | None, worker_id: int) -> None:
    """A loader worker's start (DataLoader's worker_init_fn): ignore SIGINT, and close its copy
    of the store's writer lock (see StoreWriter.inherited_lock), so that it never holds the
    lock of a killed run. Ctrl-C at a terminal reaches the whole process group; the main
    process alone acts on it (CtrlC) and shuts the workers down, where a worker that died of
    it in the middle of handing over a batch printed a multiprocessing traceback
    (resource_sharer). Between the fork and this call a worker has the main's CtrlC handler,
    which only counts the signal."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


class CtrlC:
    """Ctrl-C (SIGINT) in a batch loop, acted on between batches: while active (a context
    manager, in the main thread, where SIGINT has Python's default handler), the first SIGINT
    is counted and ``check()`` raises KeyboardInterrupt at the next batch boundary, so a
    batch being handed over by a loader worker or written is never cut in half; a second one
    raises at once (a loop stuck in a batch still stops). Installed before the loader forks
    its workers, which inherit it until _start_worker ignores SIGINT in them. Elsewhere
    (another thread, SIGINT ignored by a `nohup` or set by a library caller) it changes
    nothing."""

    def __init__(self) -> None:
        self.pressed = 0
        self._previous: Any = None

    def __enter__(self) -> "CtrlC":
        import threading

        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.pressed += 1
        if self.pressed > 1:
            raise KeyboardInterrupt

    def check(self) -> None:
        """KeyboardInterrupt when Ctrl-C was pressed since the loop began."""
        if self.pressed:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
