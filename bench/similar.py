"""bench/similar.py: exact (numpy, blocked) vs HNSW (faiss) nearest-neighbour search in a store.

Question: up to what store size is exact search good enough for `embedpipe similar`, and what
recall@10 does the HNSW index give at 60k x 1280?

Real features: bundled-Lite0 features of 1000 Fashion-MNIST train images (100 per class,
extracted once under cache/bench-heads/). Larger stores are synthesised from them: row j is
real row j mod 1000 plus Gaussian noise of 0.25x the per-dimension standard deviation (so the
copies are distinct points around real ones, not ties), written through StoreWriter as a real
store. Queries: 100 other real images' features (from the test split), not in the store.

Per size it measures, interleaved over repetitions: the exact search of all queries from the
HDF5 file (read in blocks + matrix products: what a `similar` call pays), the HNSW search of
the same queries (index loaded), and once: the HNSW build time and its recall@10 against exact.
`--quick`: one size (5000 rows), 2 repetitions, results to the temp dir.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402


def synth_store(path: Path, base, n: int, rng: np.random.Generator) -> None:
    from embedpipe.env import versions
    from embedpipe.store import StoreWriter, read_identity

    X = base.features.astype(np.float32)
    std = X.std(axis=0, keepdims=True)
    with StoreWriter.open(path, read_identity(base.path), versions=versions()) as w:
        ids = w.class_ids(base.classes)
        step = 4096
        for lo in range(0, n, step):
            j = np.arange(lo, min(n, lo + step))
            src = j % len(X)
            feats = X[src] + 0.25 * std * rng.standard_normal((len(j), X.shape[1]), np.float32)
            w.append(feats, paths=[f"synth/{i:06d}.png" for i in j],
                     labels=[ids[base.classes[base.labels[s]]] for s in src],
                     hashes=[f"{i:064x}" for i in j], splits=["train"] * len(j),
                     mtime_ns=[0] * len(j), size=[0] * len(j))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default="10000,30000,60000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ef", default="64,128,256", help="HNSW efSearch values to compare")
    args = ap.parse_args()
    sizes = [5000] if args.quick else [int(s) for s in args.sizes.split(",")]
    reps = 2 if args.quick else args.reps
    efs = [int(e) for e in args.ef.split(",")]

    from embedpipe import similar as sim
    from embedpipe.store import open_store

    header = bu.Header("similar: exact numpy search vs HNSW index (faiss)")
    _, store_path, _ = bu.fmnist_features(train=100 if not args.quick else 20,
                                          test=10 if not args.quick else 2)
    real = open_store(store_path)
    base_rows = np.flatnonzero(real.splits == "train")
    qrows = np.flatnonzero(real.splits == "test")
    base = open_store(store_path)
    base.features, base.labels = real.features[base_rows], real.labels[base_rows]
    Q = real.features[qrows].astype(np.float32)
    k = 10
    rng = np.random.default_rng(0)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-similar-") as tmp:
        for n in sizes:
            path = Path(tmp) / f"s{n}.h5"
            t = time.perf_counter()
            synth_store(path, base, n, rng)
            write_s = time.perf_counter() - t
            st = open_store(path, features=False)
            t = time.perf_counter()
            index = sim.build_index(st)
            build_s = time.perf_counter() - t
            exact_t: list[float] = []
            hnsw_t: dict[int, list[float]] = {e: [] for e in efs}
            exact = None
            approx: dict[int, tuple] = {}
            for r in range(reps):
                order = ["exact", *efs]
                rng.shuffle(order)
                for what in order:
                    t = time.perf_counter()
                    if what == "exact":
                        st = open_store(path, features=False)
                        exact = sim.exact_search(st, Q, k)
                        exact_t.append(time.perf_counter() - t)
                    else:
                        approx[int(what)] = sim.index_search(index, Q, k, ef_search=int(what))
                        hnsw_t[int(what)].append(time.perf_counter() - t)
            recall = {e: float(np.mean([len(set(a) & set(b)) / k for a, b in
                                        zip(exact[0].tolist(), approx[e][0].tolist())]))
                      for e in efs}
            ex = bu.median(exact_t)
            row = dict(rows=n, dim=st.dim, dtype=str(st.features.dtype), queries=len(Q),
                       write_s=write_s, exact_s=ex, build_s=build_s,
                       hnsw_s={e: bu.median(hnsw_t[e]) for e in efs}, recall_at_10=recall,
                       exact_per_query_ms=1000 * ex / len(Q),
                       breakeven_calls={e: build_s / max(1e-9, ex - bu.median(hnsw_t[e]))
                                        for e in efs})
            results.append(row)
            print(row, file=sys.stderr)
            path.unlink()
    table = bu.table(
        ["rows x dim", f"exact: {len(Q)} queries (s)", "HNSW efSearch",
         f"HNSW: {len(Q)} queries (s)", "exact / HNSW", "HNSW build (s)",
         "build pays off after (calls)", "HNSW recall@10"],
        [[f"{r['rows']} x {r['dim']} ({r['dtype']})", f"{r['exact_s']:.2f}", e,
          f"{r['hnsw_s'][e]:.4f}", f"{r['exact_s'] / max(1e-9, r['hnsw_s'][e]):.0f}x",
          f"{r['build_s']:.1f}", f"{r['breakeven_calls'][e]:.0f}",
          f"{r['recall_at_10'][e]:.3f}"]
         for r in results for e in efs])
    text = header.render([
        f"queries: {len(Q)} real test-split features not in the store; k = {k}",
        f"stores synthesised from {len(base_rows)} real Lite0 features + noise (0.25x per-dim "
        "std)",
        f"repetitions: {reps}, exact and each HNSW efSearch interleaved, order shuffled per repetition; medians",
        "HNSW: faiss IndexHNSWFlat, M=32, efConstruction=80 (embedpipe's defaults), "
        "efSearch as listed; exact: embedpipe.similar.exact_search reading the HDF5 file in 32 MiB "
        "blocks (what one `similar` call pays)",
    ]) + "\n" + table + "\n\n" + (
        "Reading: `similar --index auto` stays exact up to embedpipe.similar.INDEX_ROWS rows: "
        "below it an exact call costs seconds and misses nothing, so a one-off HNSW build "
        "(paid back only after the calls in the table) and its recall below 1 are not worth "
        "it; above it exact calls grow linearly with the store. Default efSearch is "
        "embedpipe.similar.EF_SEARCH, from the recall column.\n")
    out = bu.save_results("similar", text, {"results": results}, args.quick)
    print(text)
    print(f"→ {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
