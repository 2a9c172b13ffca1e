"""`embedpipe serve` under a bounded loopback load: latency percentiles, throughput, failures.

Fits a logreg head on a small real store (Fashion-MNIST, 10 train images per class, bundled
EfficientNet-Lite0, fp32; kept under cache/bench-serve/ so a rerun reuses it), starts two real
servers on 127.0.0.1 (any free port) side by side:

  * batched:   the defaults, --max-batch 32 --batch-wait-ms 10
  * unbatched: --max-batch 1 --batch-wait-ms 0 (one forward pass per image)

and sends each one a fixed number of single-image POST /predict requests (real Fashion-MNIST
test PNGs) at concurrency 1, 4 and 16 from a thread pool with urllib. Cells are interleaved
(config × concurrency, shuffled per repetition) because the machine is shared. Every request
has a timeout and every cell a time budget; nothing leaves the loopback interface.

    python bench/serve.py            # 2 repetitions, ~3-5 minutes on 2 busy cores
    python bench/serve.py --quick    # 1 repetition, fewer requests; scratch output

Writes bench/results/serve.md (with --quick: a file in the temp dir instead).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"batched": ["--max-batch", "32", "--batch-wait-ms", "10"],
           "unbatched": ["--max-batch", "1", "--batch-wait-ms", "0"]}
LEVELS = (1, 4, 16)


def make_head(work: Path) -> Path:
    from embedpipe.heads import train
    from embedpipe.datasets import write_fashion_mnist_folder
    from embedpipe.extract.options import ExtractOptions
    from embedpipe.extract.local import run

    data = work / "data"
    if not (data / "train").is_dir():
        write_fashion_mnist_folder(data, splits={"train": 10, "test": 4})
    store = work / "fmnist.h5"
    summary = run(data, store, ExtractOptions(precision="fp32"), progress=False)
    assert not summary.failed, summary.line()
    head = work / "logreg.skops"
    if not head.is_file():
        train.fit(store, "logreg", head, say=lambda m: None)
    return head


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


class Server:
    def __init__(self, head: Path, extra: list[str]):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "embedpipe.cli", "serve", str(head), "--host", "127.0.0.1",
             "--port", "0", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=env, cwd=ROOT)
        self.url: str | None = None
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if m:
                self.url = m.group(1)

    def wait_ready(self, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("server exited:\n" + "".join(self.lines))
            if self.url:
                try:
                    with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                        if r.status == 200:
                            return time.perf_counter() - self.t0
                except OSError:
                    pass
            time.sleep(0.2)
        raise SystemExit("server not ready:\n" + "".join(self.lines))

    def metrics(self) -> dict:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def load(url: str, payloads: list[tuple[bytes, str]], n: int, concurrency: int,
         budget_s: float) -> tuple[list[float], int, float]:
    """n requests, ``concurrency`` at a time; returns latencies (s), failed count, wall s."""
    deadline = time.monotonic() + budget_s

    def one(i: int) -> float | None:
        if time.monotonic() > deadline:
            return None  # over the cell's time budget: counted as failed, not sent
        body, ctype = payloads[i % len(payloads)]
        req = urllib.request.Request(url + "/predict", data=body, method="POST",
                                     headers={"Content-Type": ctype})
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                ok = r.status == 200 and json.loads(r.read())["predictions"]
        except (OSError, ValueError, KeyError):
            return None
        return time.perf_counter() - t if ok else None

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = [x for x in out if x is not None]
    return lat, n - len(lat), wall


def main() -> None:
    args, reps = bu.reps_args(2)
    count = {1: 20, 4: 40, 16: 80} if args.quick else {1: 40, 4: 80, 16: 160}
    hdr = bu.Header("`embedpipe serve`: loopback load test (latency, throughput, batching)")
    work = ROOT / "cache" / "bench-serve"
    work.mkdir(parents=True, exist_ok=True)
    head = make_head(work)
    test_pngs = sorted((work / "data" / "test").rglob("*.png"))
    payloads = [multipart(p.name, p.read_bytes()) for p in test_pngs]

    servers = {name: Server(head, extra) for name, extra in CONFIGS.items()}
    try:
        startup = {name: s.wait_ready() for name, s in servers.items()}
        for s in servers.values():  # warm-up
            load(s.url, payloads, 4, 1, 60)
        cells = [(c, lvl) for c in CONFIGS for lvl in LEVELS]
        res: dict[tuple[str, int], dict] = {k: {"lat": [], "failed": 0, "rps": [],
                                                "images": 0, "batches": 0} for k in cells}
        rng = random.Random(0)
        for rep in range(reps):
            order = cells[:]
            rng.shuffle(order)
            for name, lvl in order:
                srv = servers[name]
                before = srv.metrics()
                lat, failed, wall = load(srv.url, payloads, count[lvl], lvl, budget_s=90)
                after = srv.metrics()
                r = res[(name, lvl)]
                r["lat"] += lat
                r["failed"] += failed
                r["rps"].append(len(lat) / wall)
                r["images"] += after["images"] - before["images"]
                r["batches"] += after["batches"] - before["batches"]
                print(f"rep {rep + 1} {name:9s} c={lvl:2d}: {len(lat) / wall:6.1f} req/s, "
                      f"p50 {1000 * np.percentile(lat, 50):6.0f} ms, failed {failed}",
                      flush=True)
    finally:
        for s in servers.values():
            s.stop()

    rows = []
    for name, lvl in cells:
        r = res[(name, lvl)]
        lat = np.array(r["lat"]) * 1000
        pct = np.percentile(lat, [50, 90, 99]) if len(lat) else [float("nan")] * 3
        rows.append([name, lvl, len(lat) + r["failed"], r["failed"], f"{pct[0]:.0f}",
                     f"{pct[1]:.0f}", f"{pct[2]:.0f}", f"{bu.median(r['rps']):.1f}",
                     bu.spread(r["rps"]),
                     f"{r['images'] / r['batches']:.1f}" if r["batches"] else "-"])
    speed = {lvl: bu.median(res[("batched", lvl)]["rps"]) / bu.median(res[("unbatched", lvl)]["rps"])
             for lvl in LEVELS}
    extra = [
        f"head: logreg on {len(list((work / 'data' / 'train').rglob('*.png')))} Fashion-MNIST "
        "train images (bundled EfficientNet-Lite0, fp32, 224x224 input); requests: one "
        f"28x28 PNG each, cycling over {len(test_pngs)} Fashion-MNIST test images",
        f"{reps} repetition(s) per cell, cells interleaved in shuffled order; requests per "
        f"cell and repetition: {', '.join(f'c={k}: {v}' for k, v in count.items())}; "
        "client: urllib from a thread pool in the same machine (it competes for the 2 cores)",
        "server start-up (process start to /health ok, both starting at once): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in startup.items()),
        "latency: per request, client side, pooled over repetitions; throughput: successful "
        "requests / wall time of the cell (median over repetitions, min–max beside it); "
        "mean batch: images per backbone forward pass, from the server's /metrics",
    ]
    table = bu.table(["server", "concurrency", "requests", "failed", "p50 ms", "p90 ms",
                      "p99 ms", "req/s", "req/s range", "mean batch"], rows)
    summary = ("Batched over unbatched throughput: "
               + ", ".join(f"c={lvl}: x{speed[lvl]:.2f}" for lvl in LEVELS) + ".")
    text = hdr.render(extra) + "\n" + table + "\n\n" + summary + "\n"
    print(text)
    if args.quick:
        out = Path(tempfile.gettempdir()) / "serve-quick.md"
        out.write_text(text)
    else:
        out = bu.write_result("serve", text)
    print(f"→ {out}")


if __name__ == "__main__":
    main()
