"""Exact and near-duplicate groups: same content hash, or cosine similarity of the features at
or above a threshold, joined into connected components (union-find)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

NEAR_DUPLICATE_COSINE = 0.94
"""Default threshold on the cosine similarity of two rows in neighbors.duplicate_view (signed
power 0.25, then L2) for calling them near duplicates. Measured by bench/audit.py on bundled
Lite0 features of Fashion-MNIST (bench/results/audit.md): 11 of 1.8 million pairs of distinct
images reach it (15 of 1,920 images), while copies of a 28 px image do 0.93-1.0 of the time
when re-encoded as JPEG q90, upscaled 2x (PNG or JPEG q90) or mirrored, 0.87 when upscaled 4x
to JPEG q75; harsher copies at 28 px (JPEG q75 or below, downscales, 2 px crops) mostly stay
below it, and a threshold low enough to catch them pairs hundreds of distinct look-alike
garments (441 pairs at 0.90)."""


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def groups(hashes: Sequence[str], pairs: np.ndarray, pair_sims: np.ndarray
           ) -> list[dict[str, Any]]:
    """Connected components of rows joined by equal non-empty ``hashes`` or by ``pairs``
    (P x 2 row indices with similarity ``pair_sims``). Each group: {"rows": sorted row
    indices, "exact": all members share one hash, "min_sim"/"max_sim": the lowest/highest
    similarity of the joining pairs (1.0 for hash-only links)}; groups of 2+ rows only,
    largest first."""
    n = len(hashes)
    uf = _UnionFind(n)
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if h:
            if h in first:
                uf.union(first[h], i)
            else:
                first[h] = i
    for a, b in pairs:
        uf.union(int(a), int(b))
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(uf.find(i), []).append(i)
    comp = {r: m for r, m in members.items() if len(m) > 1}
    lo: dict[int, float] = {}
    hi: dict[int, float] = {}
    for (a, b), s in zip(pairs, pair_sims):
        r = uf.find(int(a))
        lo[r] = min(lo.get(r, 1.0), float(s))
        hi[r] = max(hi.get(r, -1.0), float(s))
    out = []
    for r, rows in comp.items():
        hs = {hashes[i] for i in rows}
        out.append({"rows": sorted(rows), "exact": len(hs) == 1 and "" not in hs,
                    "min_sim": round(lo.get(r, 1.0), 4), "max_sim": round(hi.get(r, 1.0), 4)})
    out.sort(key=lambda g: (-len(g["rows"]), g["rows"][0]))
    return out


def describe(group: dict[str, Any], paths: Sequence[str], splits: np.ndarray,
             label_names: Sequence[str | None], train: str = "train") -> dict[str, Any]:
    """A group with its members spelled out, whether it spans splits (``leak``: the same image
    on both sides of a train/test split) or classes (``conflict``: one image, two labels), and
    which member to keep: the first in ``train`` (else the first), the others being the
    suggested drops."""
    rows = group["rows"]
    sp = [str(splits[i]) for i in rows]
    lb = [label_names[i] for i in rows]
    keep = next((i for i, s in zip(rows, sp) if s == train), rows[0])
    return {**group,
            "members": [{"row": i, "path": paths[i], "split": s, "label": l}
                        for i, s, l in zip(rows, sp, lb)],
            "splits": sorted(set(sp)), "labels": sorted({l for l in lb if l is not None}),
            "leak": len(set(sp)) > 1,
            "conflict": len({l for l in lb if l is not None}) > 1,
            "keep": keep}
