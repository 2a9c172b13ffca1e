"""Stable partition of discovered files into shards (``--shard K/N``, the Ray engine).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from ..data import (
    Discovery,
    ImageRef,
)
from .options import ExtractError

if TYPE_CHECKING:  # imported where used: a no-op rerun never imports torch or timm

    pass



def select_shard(disc: Discovery, shard: str) -> Discovery:
    """Keep the files of shard K of N (0-based; stable across runs: by a hash of the path)."""
    try:
        k, n = (int(v) for v in shard.split("/"))
        assert 0 <= k < n
    except (ValueError, AssertionError):
        raise ExtractError(f"--shard {shard}: pass K/N with 0 <= K < N, e.g. 0/4") from None
    return partition(disc, n)[k]


def shard_of(rel: str, n: int) -> int:
    """The shard (of ``n``) a file belongs to: a hash of its relative path, so the same file
    lands in the same shard on every run and every machine."""
    return zlib.crc32(rel.encode()) % n


def partition(disc: Discovery, n: int) -> list[Discovery]:
    """Split the discovered files (and the ignored ones) into ``n`` shards by shard_of."""
    items: list[list[ImageRef]] = [[] for _ in range(n)]
    ign: list[list[tuple[str, str]]] = [[] for _ in range(n)]
    for r in disc.items:
        items[shard_of(r.rel, n)].append(r)
    for p, why in disc.ignored:
        ign[shard_of(p, n)].append((p, why))
    return [Discovery(disc.root, disc.layout, items[k], disc.class_names, ign[k])
            for k in range(n)]
