"""Streaming heads next to in-memory logreg: test accuracy, fit time and peak memory.

On the store bench/heads.py builds (10k train / 2k test Fashion-MNIST images, EfficientNet-Lite0
features, cache/bench-heads/fmnist-1000-200.h5; pass --store for another with a test split),
runs `embedpipe fit` in a fresh process for: logreg (loads the training matrix), logreg-sgd and
sgd (streamed, default chunk and small ones), one after the other, each once; then scores
each head file on the test rows with `embedpipe predict --store --split test`. Peak memory is
the fit process's VmHWM (peak RSS) and VmPeak (peak address space) from /proc at its exit.

Small chunks run twice: as shipped (a training epoch reads shuffled mixing windows of
``store.read.MIX_BYTES`` and hands them out a chunk at a time) and with the window switched off
in the bench's own runner (``MIX_BYTES = 0``: each chunk is read and fitted alone, which is how
it worked before the window), so the effect of the window on a store sorted by class is
measured side by side.

    python bench/streaming.py
    python bench/streaming.py --store cache/other.h5

Writes bench/results/streaming.md and streaming.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

_RUN = """
import os, sys
from embedpipe.cli import app
if os.environ.get("BENCH_NO_MIX"):  # the bench's A/B only: chunks read and fitted alone
    import embedpipe.store.read as r
    r.MIX_BYTES = 0
code = 0
try:
    app(sys.argv[1:])
except SystemExit as e:
    code = e.code
vm = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("Vm")}
print("VM=" + str(vm["VmHWM"]) + "," + str(vm["VmPeak"]), file=sys.stderr)
sys.exit(code)
"""


def cli(*args: object, mix: bool = True) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS KiB, peak address space KiB, stdout) of one CLI run; ``mix``
    False switches the training epochs' mixing window off (see the module docstring)."""
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "BENCH_NO_MIX"}
    if not mix:
        env["BENCH_NO_MIX"] = "1"
    proc = subprocess.run([sys.executable, "-c", _RUN, *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: embedpipe {' '.join(map(str, args))}\n{proc.stderr[-2000:]}")
    hwm, peak = (int(v) for v in [ln for ln in proc.stderr.splitlines()
                                  if ln.startswith("VM=")][0][3:].split(","))
    return dt, hwm, peak, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path,
                    default=ROOT / "cache" / "bench-heads" / "fmnist-1000-200.h5")
    ap.add_argument("--small-chunk", type=int, nargs="+", default=[2048, 256])
    args = ap.parse_args()
    if not args.store.is_file():
        sys.exit(f"{args.store}: no such store; run `python bench/heads.py` first (it builds "
                 "it) or pass --store")
    hdr = bu.Header("Streaming heads (sgd, logreg-sgd) next to in-memory logreg")
    from embedpipe.heads.rows import select_rows
    from embedpipe.store import open_store

    s = open_store(args.store, features=False)
    rows = select_rows(s)
    matrix_mib = len(rows.train) * s.dim * s.features.dtype.itemsize / 2**20
    runs = [("logreg", None, True)]
    for head in ("logreg-sgd", "sgd"):
        runs.append((head, None, True))
        for chunk in args.small_chunk:  # interleaved: window on, then off, chunk by chunk
            runs += [(head, chunk, True), (head, chunk, False)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for head, chunk, mix in runs:
            out = Path(tmp) / f"{head}-{chunk}-{mix}.skops"
            extra = ["--chunk-rows", chunk] if chunk else []
            print(f"fit {head} {extra} mix={mix} ...", file=sys.stderr, flush=True)
            load = os.getloadavg()[0]
            dt, hwm, peak, _ = cli("fit", args.store, "--head", head, "-o", out, "-q", *extra,
                                   mix=mix)
            preds = Path(tmp) / "p.csv"
            cli("predict", out, "--store", args.store, "--split", "test", "-o", preds, "-q")
            with open(preds, newline="") as f:
                got = list(csv.DictReader(f))
            acc = sum(r["label"] == r["predicted"] for r in got) / len(got)
            results.append({"head": head, "chunk_rows": chunk or 65536,
                            "streamed": head != "logreg", "mixing_window": mix,
                            "test_accuracy": acc,
                            "fit_wall_s": dt, "peak_rss_mib": hwm / 1024,
                            "peak_address_space_mib": peak / 1024, "loadavg_1m": load})
    table = bu.table(
        ["head", "chunk rows", "mixing window", "test accuracy", "fit wall s (incl. start-up)",
         "peak RSS MiB", "peak address space MiB", "load (1m)"],
        [(r["head"], r["chunk_rows"] if r["streamed"] else "(in memory)",
          ("on" if r["mixing_window"] else "off (before)") if r["streamed"] else "",
          f"{r['test_accuracy']:.3f}", f"{r['fit_wall_s']:.1f}", f"{r['peak_rss_mib']:.0f}",
          f"{r['peak_address_space_mib']:.0f}", f"{r['loadavg_1m']:.1f}") for r in results])
    extra = [f"store: {args.store} ({len(rows.train)} train rows x {s.dim} "
             f"{s.features.dtype}: a {matrix_mib:.0f} MiB training matrix; "
             f"{len(rows.heldout.get('test', []))} test rows)",
             "each row: one `embedpipe fit` in a fresh process (defaults: 5 epochs, "
             "averaged SGD), then `predict --store --split test`; run once each, one after "
             "the other: the seconds are noisy, the memory is not",
             "the store is sorted by class folder (as `extract` writes an image folder); "
             "mixing window: a training epoch reads shuffled windows of at least "
             "store.read.MIX_BYTES (16 MiB) of features and fits them a chunk at a time; "
             "'off (before)': each chunk read and fitted alone (MIX_BYTES = 0 in the bench's "
             "runner), as before the window"]
    text = hdr.render(extra) + "\n" + table + "\n"
    print(text)
    out = bu.write_result("streaming", text)
    out.with_suffix(".json").write_text(json.dumps(
        {"store": str(args.store), "train_rows": len(rows.train), "dim": s.dim,
         "matrix_mib": matrix_mib, "cpu": bu.cpu_model(), "cores": bu.cores(),
         "versions": bu.versions(), "load_end": bu.load_snapshot(), "runs": results},
        indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
