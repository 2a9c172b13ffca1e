"""Nearest neighbours (cosine) in a feature store: `embedpipe similar`.

Queries are either paths already in the store (torch-free: their stored features are used) or
new images, extracted with the store's own backbone, weights, preprocessing and precision
through the same path as `predict HEAD IMAGES` (predict.gather_images + predict.extract_images
into a temporary store); torch is imported only then.

Search is exact up to ``INDEX_ROWS`` (50 000) stored rows: the store is read in blocks of
``block_rows`` rows, each block L2-normalised and multiplied with the normalised queries, and a
running top-k kept, so memory is bounded by one block plus the queries, never the store. Above
``INDEX_ROWS`` rows, and when faiss (`pip install 'embedpipe[index]'`) is installed, an HNSW
graph index (faiss.IndexHNSWFlat, inner product on normalised rows) is built once and cached
beside the store (``<store>.<digest>.hnsw``, rebuilt when the store's rows change); its results
are approximate (recall@10 measured in bench/results/similar.md). The crossover is measured
there too.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import _io, checks
from .errors import UserError
from .provenance import HEAD_KEYS, HEAD_NOTE_KEYS, diff_fields
from .store.read import FeatureStore, open_store

#: Above this many stored rows `--index auto` uses the HNSW index when faiss is installed:
#: the crossover measured in bench/results/similar.md (exact time per call grows with the
#: store; the index costs a one-off build and recall below 1).
INDEX_ROWS = 50_000
#: HNSW search beam (faiss efSearch) at least this wide: the recall@10 per efSearch is in
#: bench/results/similar.md (faiss's default 64 loses recall at 60k rows).
EF_SEARCH = 256
#: Bytes of features read (and multiplied) per block in exact search.
BLOCK_BYTES = 32 << 20
FORMATS = ("table", "csv", "json")
METHODS = ("auto", "exact", "hnsw")


class SimilarError(UserError):
    """Bad `similar` input; one line naming it and the fix."""


@dataclass
class Neighbour:
    path: str
    label: str | None
    split: str
    similarity: float  # cosine similarity in [-1, 1]


@dataclass
class Result:
    """The neighbours of each query, best first."""

    store: Path
    queries: list[str]
    kinds: list[str]  # "stored" or "image", per query
    neighbours: list[list[Neighbour]]
    method: str  # "exact" or "hnsw"
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def rows(self) -> Iterator[dict[str, Any]]:
        for q, kind, ns in zip(self.queries, self.kinds, self.neighbours):
            for rank, n in enumerate(ns, 1):
                yield {"query": q, "query_kind": kind, "rank": rank, "path": n.path,
                       "label": n.label or "", "split": n.split,
                       "similarity": round(float(n.similarity), 6)}

    def render(self, fmt: str) -> str:
        """The results as ``table`` (aligned text), ``csv`` or ``json``."""
        if fmt == "json":
            return json.dumps({
                "store": str(self.store), "method": self.method,
                "queries": [{"query": q, "kind": kind,
                             "neighbours": [{"rank": r, "path": n.path, "label": n.label,
                                             "split": n.split,
                                             "similarity": round(float(n.similarity), 6)}
                                            for r, n in enumerate(ns, 1)]}
                            for q, kind, ns in zip(self.queries, self.kinds, self.neighbours)],
            }, indent=1) + "\n"
        cols = ["query", "rank", "similarity", "label", "split", "path"]
        rows = [{**r, "similarity": f"{r['similarity']:.4f}"} for r in self.rows()]
        if fmt == "csv":
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
            return buf.getvalue()
        widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in cols}
        lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
        lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
        return "\n".join(line.rstrip() for line in lines) + "\n"


# -- the search ----------------------------------------------------------------------------

def normalise(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (n, D) scaled to unit L2 norm, as float32; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def block_rows_for(dim: int) -> int:
    """Rows per exact-search block: ``BLOCK_BYTES`` of float32 features, at least 256."""
    return max(256, BLOCK_BYTES // max(1, 4 * dim))


def exact_search(store: FeatureStore, queries: np.ndarray, k: int, *,
                 exclude: Sequence[int] | None = None, block_rows: int | None = None,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-nearest neighbours of ``queries`` (q, D) among the store's rows.

    The store is read ``block_rows`` rows at a time (FeatureStore.iter_feature_chunks; from
    memory if it was opened with its features), so memory is O(block_rows·D + q·(D + k +
    block_rows)). ``exclude[i]`` (a store row, or -1) is left out of query i's neighbours (a
    stored query is not its own neighbour). Returns ``(rows, similarity)``, both (q, k') with
    k' = min(k, rows available), best first; rows int64, similarity float32 cosine."""
    from .progress import Progress

    n, q = len(store), len(queries)
    k = min(k, n - (1 if exclude is not None else 0))
    best_s = np.full((q, max(k, 0)), -np.inf, dtype=np.float32)
    best_i = np.full((q, max(k, 0)), -1, dtype=np.int64)
    if q == 0 or k <= 0:
        return best_i, best_s
    qn = normalise(queries)
    ex = None if exclude is None else np.asarray(exclude, dtype=np.int64)
    rows = np.arange(n, dtype=np.int64)
    step = block_rows or block_rows_for(store.dim)
    with Progress(n, "search", enabled=progress, unit="row") as bar:
        for pos, block in store.iter_feature_chunks(rows, step):
            checks.refuse_unusable_chunk(block, store, rows, step)  # NaN rows sort anywhere
            sel = rows[pos]
            sims = qn @ normalise(block).T  # (q, b)
            if ex is not None:
                hit = ex[:, None] == sel[None, :]
                sims[hit] = -np.inf
            cand_s = np.concatenate([best_s, sims], axis=1)
            cand_i = np.concatenate([best_i, np.broadcast_to(sel, sims.shape)], axis=1)
            top = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
            best_s = np.take_along_axis(cand_s, top, axis=1)
            best_i = np.take_along_axis(cand_i, top, axis=1)
            bar.update(len(sel))
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, axis=1), np.take_along_axis(best_s, order, axis=1)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def rows_digest(store: FeatureStore) -> str:
    """sha256 (hex) of the store's identity and its rows' paths and content hashes, in order:
    it changes whenever a row is added, removed or re-extracted, so a cached index built for
    other rows is never used."""
    h = hashlib.sha256(json.dumps(store.identity, sort_keys=True, default=str).encode())
    for p, c in zip(store.paths, store.hashes):
        h.update(p.encode("utf-8", "surrogateescape") + b"\0" + c.encode() + b"\n")
    return h.hexdigest()


def index_path(store: FeatureStore) -> Path:
    """Where the HNSW index of ``store``'s current rows is cached: beside the store."""
    return store.path.with_name(f"{store.path.name}.{rows_digest(store)[:16]}.hnsw")


def build_index(store: FeatureStore, *, m: int = 32, ef_construction: int = 80,
                block_rows: int | None = None, progress: bool = False) -> Any:
    """A faiss.IndexHNSWFlat (inner product) of the store's L2-normalised rows, added in
    blocks of ``block_rows`` (memory: the index, about N·(4·D + 8·m) bytes, plus one block).
    ``m``: graph degree; ``ef_construction``: build-time beam width (faiss's defaults are 32
    and 40; see bench/results/similar.md for the recall these give)."""
    from .progress import Progress

    faiss = _faiss()
    index = faiss.IndexHNSWFlat(store.dim, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    rows = np.arange(len(store), dtype=np.int64)
    with Progress(len(store), "index", enabled=progress, unit="row") as bar:
        for pos, block in store.iter_feature_chunks(rows, block_rows or
                                                    block_rows_for(store.dim)):
            if not np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos))):
                raise AssertionError("store blocks out of order")  # HNSW ids are row numbers
            checks.refuse_unusable_chunk(block, store, rows,
                                         block_rows or block_rows_for(store.dim))
            index.add(normalise(block))
            bar.update(len(pos))
    return index


def load_or_build_index(store: FeatureStore, *, progress: bool = False,
                        say: Callable[[str], None] | None = None) -> Any:
    """The cached HNSW index of the store's current rows, built and cached if missing (a
    store folder that is not writable: built in memory for this call only, with a note)."""
    faiss = _faiss()
    path = index_path(store)
    if path.is_file():
        with contextlib.suppress(RuntimeError):  # a damaged cache is rebuilt
            index = faiss.read_index(str(path))
            if index.ntotal == len(store) and index.d == store.dim:
                return index
    if say:
        say(f"building the HNSW index of {len(store)} rows (once; cached as {path.name})")
    index = build_index(store, progress=progress)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)
        for old in path.parent.glob(f"{store.path.name}.*.hnsw"):  # indexes of older rows
            if old != path:
                with contextlib.suppress(OSError):
                    old.unlink()
    except (OSError, RuntimeError):
        with contextlib.suppress(OSError):
            tmp.unlink()
        if say:
            say(f"note: cannot write {path} (folder not writable?); the index is rebuilt on "
                "every call")
    return index


def index_search(index: Any, queries: np.ndarray, k: int, *,
                 exclude: Sequence[int] | None = None, ef_search: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Approximate cosine k-nearest neighbours from an HNSW index (see build_index); same
    return as exact_search. ``ef_search``: search beam width (default max(EF_SEARCH, 4k))."""
    extra = 1 if exclude is not None else 0
    k = min(k, index.ntotal - extra)
    if k <= 0 or not len(queries):
        return np.full((len(queries), max(k, 0)), -1), np.zeros((len(queries), max(k, 0)))
    index.hnsw.efSearch = ef_search or max(EF_SEARCH, 4 * (k + extra))
    sims, rows = index.search(normalise(queries), k + extra)
    if exclude is None:
        return rows.astype(np.int64), sims
    out_i = np.full((len(queries), k), -1, dtype=np.int64)
    out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for i, (r, s) in enumerate(zip(rows, sims)):
        keep = r != exclude[i]
        out_i[i] = r[keep][:k]
        out_s[i] = s[keep][:k]
    return out_i, out_s


def choose_method(method: str, n: int) -> tuple[str, list[str]]:
    """``exact`` or ``hnsw`` for ``--index`` METHOD on a store of ``n`` rows, with notes.

    Raises SimilarError for an unknown method, or ``hnsw`` without faiss installed."""
    if method not in METHODS:
        raise SimilarError(f"--index {method}: pass one of {', '.join(METHODS)}")
    have = _faiss() is not None
    if method == "hnsw" and not have:
        raise SimilarError("--index hnsw needs faiss: pip install 'embedpipe[index]' (or pass "
                           "--index exact)")
    if method == "auto":
        if n <= INDEX_ROWS:
            return "exact", []
        if not have:
            return "exact", [f"note: {n} rows: exact search reads the whole store on every call; "
                             "pip install 'embedpipe[index]' for a cached HNSW index"]
        return "hnsw", []
    return method, []


# -- queries -------------------------------------------------------------------------------

def _stored_queries(store: FeatureStore, given: Sequence[str]
                    ) -> tuple[list[tuple[int, str]], list[str]]:
    """Split the arguments into stored paths (row, path) and the others, in order."""
    row = {p: i for i, p in enumerate(store.paths)}
    stored, other = [], []
    for g in given:
        key = str(g)
        alt = Path(key).as_posix()
        if key in row:
            stored.append((row[key], key))
        elif alt in row:
            stored.append((row[alt], alt))
        else:
            other.append(key)
    return stored, other


def _embed_new(store: FeatureStore, inputs: Sequence[str], tmp: Path, *, weights: str | None,
               device: str, batch_size: int, workers: int | None, progress: bool,
               say: Callable[[str], None] | None,
               notice: Callable[[str], None] | None = None, out: str | Path | None = None
               ) -> tuple[list[str], np.ndarray, list[tuple[str, str]], list[str]]:
    """Extract new images with the store's recorded backbone (same path as `predict HEAD
    IMAGES`). Returns (names, features (n, D), skipped, notes)."""
    from .extract.options import options_for_identity
    from .predict import extract_images, gather_images

    ident = store.identity
    source = str(ident.get("weights_source") or "")
    if source.startswith("imported:") or str(ident.get("model", "")).startswith("imported:"):
        raise SimilarError(f"{', '.join(inputs[:3])}: not paths in {store.path}, whose features "
                           "were imported (no backbone to embed new images with); pass paths "
                           "stored in it (see `embedpipe info`)")
    missing = [p for p in inputs if not Path(p).exists()]
    if missing:
        raise SimilarError(f"{missing[0]}: neither a path stored in {store.path} nor an image "
                           "file or folder here; pass stored paths as `embedpipe info` lists "
                           "them, or image files")
    opts = options_for_identity(ident, weights=weights, what=str(store.path), device=device,
                                batch_size=batch_size, workers=workers)
    disc = gather_images(inputs)
    if not disc.items:
        raise SimilarError(f"{', '.join(inputs[:3])}: no images found; pass image files "
                           "(jpg, png, ...) or folders holding them")
    if out is not None and str(out) != "-":  # an image of a folder (or manifest) given
        _io.refuse_among(out, [r.path for r in disc.items], flag="-o")
    (path,), skipped = extract_images(disc, [opts], tmp, progress=progress, say=say,
                                      notice=notice)
    new = open_store(path)
    hard = diff_fields(ident, new.identity, HEAD_KEYS)
    if hard:
        raise SimilarError(f"{store.path}: the images were embedded differently from the "
                           f"store ({'; '.join(hard[:2])}); pass --weights with the weights "
                           "the store was made with")
    notes = []
    soft = diff_fields(ident, new.identity, HEAD_NOTE_KEYS)
    if soft:
        notes.append(f"note: query features differ slightly from the store's ({soft[0]})")
    wanted = {r.rel for r in disc.items}
    rows = [i for i, p in enumerate(new.paths) if p in wanted]
    # a query image that is byte for byte a stored one (the same sha256 as the store's /hash
    # of that row) finds itself first: said, so a user does not take it for a near-duplicate
    stored_at = {h: i for i, h in enumerate(store.hashes)}
    same = [stored_at.get(new.hashes[i], -1) for i in rows]
    if any(r >= 0 for r in same):
        hits = [(new.paths[i], store.paths[r]) for i, r in zip(rows, same) if r >= 0]
        first = f"{hits[0][0]} is {hits[0][1]}"
        notes.append(f"note: {len(hits)} quer{'ies are' if len(hits) > 1 else 'y is'} the same "
                     f"file as a stored image ({first}{', ...' if len(hits) > 1 else ''}), "
                     "so that image is its nearest neighbour; to leave it out, query by its "
                     "stored path instead")
    return [new.paths[i] for i in rows], new.features[rows].astype(np.float32), skipped, notes


def search(store_path: str | Path, queries: Sequence[str | Path], *, k: int = 10,
           out: str | Path | None = None,
           method: str = "auto", weights: str | None = None, device: str = "auto",
           batch_size: int = 32, workers: int | None = None, progress: bool = False,
           say: Callable[[str], None] | None = None,
           notice: Callable[[str], None] | None = None) -> Result:
    """`embedpipe similar`: the ``k`` nearest stored rows (cosine) of each query. ``say``:
    progress notes; ``notice``: what the user should see even without progress (which entry
    of a finetune checkpoint the backbone uses; default ``say``), as extract.local.run's.

    A query that is a path stored in the store uses its stored features (torch-free) and is
    left out of its own neighbours; any other query must be an image file, folder or CSV
    manifest, embedded with the store's backbone. ``out``: where the caller will write the
    results (write), checked here before any work (OutputError: an input, an image of an input
    folder, a store, a folder, unwritable). Raises SimilarError (k < 1, nothing to search,
    unknown path) and StoreError (damaged store)."""
    if k < 1:
        raise SimilarError(f"-k {k}: pass 1 or more")
    if not queries:
        raise SimilarError("no queries: pass stored paths or image files after the store")
    if out is not None and str(out) != "-":  # before any work: not an input, a store, a folder
        _io.check_output(out, [store_path, *queries], flag="-o", kind="the results",
                         example="similar.csv")
    store = open_store(store_path, features=False)
    if not len(store):
        raise SimilarError(f"{store.path}: the store has no rows; extract images into it first")
    chosen, notes = choose_method(method, len(store))
    stored, new = _stored_queries(store, [str(q) for q in queries])
    names: list[str] = []
    kinds: list[str] = []
    feats: list[np.ndarray] = []
    exclude: list[int] = []
    skipped: list[tuple[str, str]] = []
    if stored:
        qrows = np.array([r for r, _ in stored], dtype=np.int64)
        X = np.empty((len(qrows), store.dim), dtype=np.float32)
        for pos, block in store.iter_feature_chunks(qrows, 4096):
            # a query row that cannot be searched: refused, counting every such row of the store
            checks.refuse_unusable_chunk(block, store, np.arange(len(store)), 4096)
            X[pos] = block
        names += [p for _, p in stored]
        kinds += ["stored"] * len(stored)
        feats.append(X)
        exclude += [int(r) for r in qrows]
    if new:
        with tempfile.TemporaryDirectory(prefix="embedpipe-similar-") as tmp:
            got, X, skipped, more = _embed_new(store, new, Path(tmp), weights=weights, out=out,
                                               device=device, batch_size=batch_size,
                                               workers=workers, progress=progress, say=say,
                                               notice=notice)
        names += got
        kinds += ["image"] * len(got)
        feats.append(X)
        exclude += [-1] * len(got)
        notes += more
    Q = np.concatenate(feats) if feats else np.zeros((0, store.dim), np.float32)
    ex = exclude if any(e >= 0 for e in exclude) else None
    if chosen == "exact":
        rows, sims = exact_search(store, Q, k, exclude=ex, progress=progress)
    else:
        index = load_or_build_index(store, progress=progress, say=say)
        rows, sims = index_search(index, Q, k, exclude=ex)
    labels = store.label_names()
    neighbours = [[Neighbour(store.paths[r], labels[r], str(store.splits[r]), float(s))
                   for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, sims)]
    return Result(store.path, names, kinds, neighbours, chosen, notes, skipped)


def write(result: Result, fmt: str, out: str | Path | None) -> None:
    """Write the rendered results to ``out`` (atomically) or stdout (None or "-")."""
    if fmt not in FORMATS:
        raise SimilarError(f"--format {fmt}: pass one of {', '.join(FORMATS)}")
    text = result.render(fmt)
    if out is None or str(out) == "-":
        sys.stdout.write(text)
        return
    _io.write_text(out, text, flag="-o")
