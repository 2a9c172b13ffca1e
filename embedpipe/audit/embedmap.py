"""A 2-D map of the embeddings: UMAP (``umap-learn``, optional) or scikit-learn's t-SNE,
after PCA to 50 dimensions, drawn as an inline SVG (no plotting library needed)."""

from __future__ import annotations

import html
import warnings
from typing import Any, Sequence

import numpy as np

MAP_MAX_ROWS = 5000
"""Rows drawn on the map at most: above this, a seeded random sample of the unflagged rows
plus every flagged row (t-SNE and UMAP time grow faster than linearly with rows)."""

MIN_ROWS_NONLINEAR = 20  # below this, the map is a plain 2-component PCA

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")


def choose_rows(n: int, flagged: np.ndarray, seed: int, max_rows: int = MAP_MAX_ROWS
                ) -> np.ndarray:
    """Row indices to draw: all when ``n <= max_rows``, else every flagged row (N bool) and a
    seeded sample of the others, sorted."""
    if n <= max_rows:
        return np.arange(n)
    flag = np.flatnonzero(flagged)[:max_rows]
    rest = np.flatnonzero(~flagged)
    take = np.random.default_rng(seed).choice(rest, max(0, max_rows - len(flag)), replace=False)
    return np.sort(np.concatenate([flag, take]))


def method() -> str:
    try:
        import umap  # noqa: F401
    except ImportError:
        return "t-SNE (scikit-learn)"
    return "UMAP (umap-learn)"


def coordinates(Xn: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """(M x 2 float coordinates, method) for unit rows ``Xn`` (M x D), PCA to 50 first."""
    from sklearn.decomposition import PCA

    m = len(Xn)
    if m < 3:
        return np.zeros((m, 2)), "none (fewer than 3 rows)"
    if m < MIN_ROWS_NONLINEAR:
        return PCA(n_components=2, random_state=seed).fit_transform(Xn), \
            f"PCA (fewer than {MIN_ROWS_NONLINEAR} rows for UMAP or t-SNE)"
    Z = PCA(n_components=min(50, m - 1, Xn.shape[1]), random_state=seed).fit_transform(Xn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import umap
        except ImportError:
            from sklearn.manifold import TSNE

            perplexity = float(min(30.0, max(2.0, (m - 1) / 3)))
            xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                      ).fit_transform(Z)
            return np.asarray(xy, dtype=np.float64), "t-SNE (scikit-learn)"
        xy = umap.UMAP(n_components=2, n_neighbors=int(min(15, m - 1)), random_state=seed,
                       ).fit_transform(Z)
        return np.asarray(xy, dtype=np.float64), "UMAP (umap-learn)"


def svg(xy: np.ndarray, labels: Sequence[str | None], flags: Sequence[str],
        paths: Sequence[str], classes: Sequence[str], size: int = 640) -> str:
    """An inline <svg>: one dot per row coloured by class (grey: unlabeled), flagged rows
    (non-empty ``flags``) drawn larger with a black ring; hovering a dot shows its path,
    class and flags. Includes a legend."""
    pad = 12
    if len(xy):
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        span = np.where(hi - lo > 0, hi - lo, 1.0)
        pts = pad + (xy - lo) / span * (size - 2 * pad)
    else:
        pts = xy
    colour = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(classes)}
    out = [f'<svg id="map-svg" xmlns="http://www.w3.org/2000/svg" width="{size + 220}" '
           f'height="{size}" viewBox="0 0 {size + 220} {size}" role="img">',
           f'<rect width="{size}" height="{size}" fill="#fafafa" stroke="#ccc"/>']
    order = sorted(range(len(pts)), key=lambda i: bool(flags[i]))  # flagged on top
    for i in order:
        x, y = pts[i]
        c = colour.get(labels[i], "#999") if labels[i] is not None else "#999"
        tip = html.escape(f"{paths[i]} [{labels[i] or 'unlabeled'}]"
                          + (f" {flags[i]}" if flags[i] else ""))
        if flags[i]:
            out.append(f'<circle cx="{x:.1f}" cy="{size - y:.1f}" r="4.5" fill="{c}" '
                       f'stroke="#000" stroke-width="1.5"><title>{tip}</title></circle>')
        else:
            out.append(f'<circle cx="{x:.1f}" cy="{size - y:.1f}" r="2.2" fill="{c}" '
                       f'fill-opacity="0.7"><title>{tip}</title></circle>')
    for k, c in enumerate(list(classes)[:40]):
        y = 20 + 18 * k
        out.append(f'<circle cx="{size + 20}" cy="{y}" r="5" fill="{colour[c]}"/>'
                   f'<text x="{size + 32}" y="{y + 4}" font-size="12">{html.escape(c)}</text>')
    y = 20 + 18 * min(len(classes), 40)
    out.append(f'<circle cx="{size + 20}" cy="{y}" r="5" fill="#fff" stroke="#000" '
               f'stroke-width="1.5"/><text x="{size + 32}" y="{y + 4}" font-size="12">'
               'flagged</text>')
    out.append("</svg>")
    return "\n".join(out)


def build(Xn: np.ndarray, *, labels: Sequence[str | None], flags: Sequence[str],
          paths: Sequence[str], classes: Sequence[str], seed: int,
          max_rows: int = MAP_MAX_ROWS) -> dict[str, Any]:
    """The map of unit rows ``Xn`` (N x D): {"method", "rows" drawn, "sampled" (bool), "svg"}."""
    flagged = np.array([bool(f) for f in flags], dtype=bool)
    rows = choose_rows(len(Xn), flagged, seed, max_rows)
    xy, how = coordinates(Xn[rows], seed)
    return {"method": how, "rows": int(len(rows)), "sampled": bool(len(rows) < len(Xn)),
            "svg": svg(xy, [labels[i] for i in rows], [flags[i] for i in rows],
                       [paths[i] for i in rows], classes)}
