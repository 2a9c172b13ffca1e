"""Shared helpers for the bench/ scripts: machine description, medians, markdown output.

Not a benchmark itself. Every script here measures its configurations side by side in one
process (interleaved repetitions, shuffled order per repetition) and reports medians and
ratios, because the machine is shared and absolute numbers drift with other people's load.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags(wanted: Sequence[str] = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")) -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def cores() -> int:
    """The cores this process may use, as embedpipe counts them (env.usable_cores: affinity
    mask and a container's CPU quota), so results say what the code under test saw."""
    from embedpipe.env import usable_cores

    return usable_cores()


def load_snapshot() -> str:
    """1-minute load average and CPU pressure (share of time some task waited for a CPU)."""
    parts = []
    try:
        parts.append(f"loadavg(1m)={os.getloadavg()[0]:.2f}")
    except OSError:
        pass
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()
        avg60 = dict(kv.split("=") for kv in some[1:] if "=" in kv).get("avg60")
        if avg60 is not None:
            parts.append(f"cpu-pressure(avg60)={avg60}%")
    except OSError:
        pass
    return ", ".join(parts) or "n/a"


class CpuMeter:
    """How many cores *other* processes kept busy while we measured.

    Busy time of the whole machine (/proc/stat) minus this process and its reaped children
    (getrusage), over wall time. Live DataLoader workers are counted once they have exited.
    """

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), _machine_busy(), _own_cpu()

    def foreign_cores(self) -> float:
        dt = time.perf_counter() - self.t0
        if dt <= 0:
            return 0.0
        busy, own = _machine_busy() - self.busy0, _own_cpu() - self.own0
        return max(0.0, (busy - own) / dt)


def _machine_busy() -> float:
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def versions() -> dict[str, str]:
    """Versions of what a bench ran on (embedpipe.env.versions: package metadata, no imports)."""
    from embedpipe.env import EXTRACT, versions as env_versions

    return env_versions(*EXTRACT, "torchvision", "scikit-learn", "openvino", "onnxruntime")


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """min–max of the repetitions, to show the noise next to a median."""
    return f"{min(xs):.1f}–{max(xs):.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table (also readable as plain text on a terminal)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


class Header:
    """Collects the facts every results file starts with."""

    def __init__(self, title: str):
        import torch

        self.title = title
        self.started = time.time()
        self.date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.load_start = load_snapshot()
        self.torch_threads = torch.get_num_threads()

    def render(self, extra: Sequence[str] = ()) -> str:
        v = versions()
        elapsed = time.time() - self.started
        lines = [
            f"# {self.title}",
            "",
            f"- date: {self.date}",
            f"- command: `{command_line()}` (from the repository root)",
            f"- wall time of the whole script: {elapsed:.0f} s",
            f"- CPU: {cpu_model()} ({cores()} cores usable; flags: {', '.join(cpu_flags()) or 'none of avx512f/avx512_bf16/amx'})",
            f"- torch intra-op threads: {self.torch_threads}",
            "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
            f"- machine load at start: {self.load_start}; at end: {load_snapshot()} "
            "(shared machine; ratios are measured side by side, interleaved, so they are "
            "more trustworthy than the absolute img/s)",
        ]
        lines += [f"- {e}" for e in extra]
        return "\n".join(lines) + "\n"


def write_result(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    return path


def machine_facts() -> dict:
    """CPU, flags, cores, versions and load, for the JSON results."""
    import torch

    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"cpu": cpu_model(), "flags": cpu_flags(), "cores": cores(),
            "torch_threads": torch.get_num_threads(), "versions": versions(),
            "loadavg": load, "load": load_snapshot(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": command_line()}


def write_json(name: str, data: dict) -> Path:
    import json

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


# -- image sets shared by the extraction benches -----------------------------------------------

JPEG_W, JPEG_H = 1024, 768


def write_jpeg_folder(out: Path, per_class: int, seed: int = 0) -> Path:
    """per_class × 10 JPEGs of JPEG_W×JPEG_H: a Fashion-MNIST garment on a random colour field."""
    import numpy as np
    from PIL import Image

    from embedpipe.datasets import FASHION_CLASSES, balanced_indices, load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    rng = np.random.default_rng(seed)

    def noise(w: int, h: int, resample: int) -> Image.Image:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        return Image.fromarray(a).resize((JPEG_W, JPEG_H), resample)

    side = int(JPEG_H * 0.91)
    for i in balanced_indices(labels, per_class, seed):
        base = Image.blend(noise(4, 3, Image.BICUBIC), noise(32, 24, Image.BICUBIC), 0.4)
        fine = noise(JPEG_W // 4, JPEG_H // 4, Image.BILINEAR)
        base = Image.blend(base, fine, 0.15)
        colour = tuple(int(c) for c in rng.integers(40, 256, 3))
        garment = Image.blend(Image.new("RGB", (JPEG_W, JPEG_H), colour), fine, 0.2)
        mask = Image.new("L", (JPEG_W, JPEG_H), 0)
        mask.paste(Image.fromarray(images[i]).resize((side, side), Image.BICUBIC),
                   ((JPEG_W - side) // 2, (JPEG_H - side) // 2))
        folder = out / FASHION_CLASSES[int(labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.composite(garment, base, mask).save(folder / f"test_{i:05d}.jpg", quality=90)
    return out


def write_small_jpeg_folder(out: Path, per_class: int, size: int = 224, seed: int = 1) -> Path:
    """per_class × 10 Fashion-MNIST test images upscaled (bicubic) to size×size, saved as RGB
    JPEGs (quality 90) in class folders, named small_<index>.jpg."""
    from PIL import Image

    from embedpipe.datasets import FASHION_CLASSES, balanced_indices, load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    for i in balanced_indices(labels, per_class, seed):
        folder = out / FASHION_CLASSES[int(labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BICUBIC)
        img.convert("RGB").save(folder / f"small_{i:05d}.jpg", quality=90)
    return out


def folder_stats(root: Path) -> tuple[int, float]:
    """Number of files under root and their mean size in KB."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files) / max(1, len(files)) / 1024


# -- Fashion-MNIST features shared by heads.py, fewshot.py and predict.py --------------------

def fmnist_split_folder(root: Path, train: int, test: int) -> Path:
    """``root/train/<class>/*.png`` (``train`` per class from Fashion-MNIST's train split) and
    ``root/test/<class>/*.png`` (``test`` per class from its test split), written if missing."""
    from embedpipe.datasets import write_fashion_mnist_folder

    if not (root / "train").is_dir():
        write_fashion_mnist_folder(root / "train", per_class=train, split="train")
    if not (root / "test").is_dir():
        write_fashion_mnist_folder(root / "test", per_class=test, split="test")
    return root


def fmnist_features(train: int = 1000, test: int = 200, base: Path | None = None):
    """(image folder, store path, extraction Summary) of bundled-Lite0 features of
    ``fmnist_split_folder``, under cache/bench-heads/ by default. The store is kept: a rerun
    finds it complete and extracts nothing (extraction is incremental)."""
    from embedpipe.extract.options import ExtractOptions
    from embedpipe.extract.local import run

    base = base or ROOT / "cache" / "bench-heads"
    data = fmnist_split_folder(base / f"fmnist-{train}-{test}", train, test)
    store_path = base / f"fmnist-{train}-{test}.h5"
    summary = run(data, store_path, ExtractOptions(), progress=True)
    print(summary.line(), file=sys.stderr)
    return data, store_path, summary


def fmnist_split(train: int = 6000, test: int = 1000):
    """(store path, train features (N, D) float32, train labels (N,) str, test features,
    test labels) of ``fmnist_features(train, test)``: the store's train and test split."""
    import numpy as np

    from embedpipe.heads.rows import select_rows, targets
    from embedpipe.store import open_store

    _, path, _ = fmnist_features(train, test)
    s = open_store(path)
    r = select_rows(s)
    te = r.heldout["test"]
    return (path, np.asarray(s.features[r.train], np.float32), targets(s, r.train),
            np.asarray(s.features[te], np.float32), targets(s, te))


def pixels(root: Path, paths: Sequence[str]):
    """Raw pixels in [0, 1] of the stored images (784-d for Fashion-MNIST), in ``paths`` order."""
    import numpy as np
    from PIL import Image

    return np.stack([np.asarray(Image.open(root / p), dtype=np.float32).ravel() / 255.0
                     for p in paths])


def reps_args(default: int):
    """(args, repetitions) of a bench that takes only ``--reps N`` (default ``default``) and
    ``--quick`` (one repetition, scratch output)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=default)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    return args, 1 if args.quick else args.reps


def cli_command() -> list[str]:
    """How a user runs the CLI: the installed `embedpipe` script beside this interpreter (it
    imports embedpipe from PYTHONPATH first, like `python -m embedpipe.cli`)."""
    script = Path(sys.executable).parent / "embedpipe"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "embedpipe.cli"]


def timed(cmd: Sequence[str], env: dict | None = None):
    """(wall seconds, CPU seconds, CompletedProcess) of a command in a subprocess. CPU time
    (user + sys of the child, from getrusage) barely depends on other people's load, so on a
    busy machine it estimates what the wall time would be on an idle one (for single-threaded
    work such as imports). Raises with the command's stderr when it fails."""
    import resource
    import subprocess

    def children() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    c0, t = children(), time.perf_counter()
    res = subprocess.run(list(cmd), capture_output=True, text=True, env=env)
    dt, cpu = time.perf_counter() - t, children() - c0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr}")
    return dt, cpu, res


def timed_cli(*args: object, env: dict | None = None):
    """(wall seconds, CompletedProcess) of ``embedpipe ARGS`` in a subprocess (see timed);
    the CPU seconds are in ``res.cpu_s``."""
    dt, cpu, res = timed(cli_command() + [str(a) for a in args], env=env)
    res.cpu_s = cpu
    return dt, res


def save_results(name: str, text: str, payload: dict, quick: bool) -> Path:
    """Write ``name``'s markdown and JSON (with machine facts) under bench/results/, or, for a
    --quick smoke run, to scratch files in the temp dir. Returns the markdown's path."""
    import json
    import tempfile

    if quick:
        out = Path(tempfile.gettempdir()) / f"{name}.quick.md"
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
        return out
    out = write_result(name, text)
    write_json(name, {"machine": machine_facts(), **payload})
    return out


def finish(name: str, header: Header, extra: Sequence[str], body: str, payload: dict,
           quick: bool) -> Path:
    """The usual ending of a bench whose body is several sections: the header's facts plus
    ``extra`` lines (and "QUICK run"), then ``body``; printed and saved (``save_results``).
    Returns the markdown's path."""
    text = header.render(list(extra) + (["QUICK run"] if quick else [])) + body
    print(text)
    out = save_results(name, text, payload, quick)
    print(f"wrote {out}", file=sys.stderr)
    return out


def publish(name: str, header: Header, extra: Sequence[str], headers: Sequence[str],
            rows: Sequence[Sequence[object]], payload: dict, quick: bool) -> Path:
    """The usual ending of a one-table bench: the header's facts plus ``extra`` lines, the
    table, saved (``save_results``) and printed. Returns the markdown's path."""
    text = header.render(extra) + "\n" + table(headers, rows)
    out = save_results(name, text, payload, quick)
    print(text)
    print(f"wrote {out}")
    return out


def tutorial_loop(model, root: Path, out: Path, batch: int = 32) -> int:
    """What a transfer-learning tutorial does: torchvision ImageFolder + timm's eval transform +
    DataLoader(batch, workers 0) + the model in fp32 under no_grad; features saved with
    np.save to ``out`` (paths beside it). Returns the number of images."""
    import numpy as np
    import timm.data
    import torch
    import torchvision

    config = timm.data.resolve_data_config({}, model=model)
    ds = torchvision.datasets.ImageFolder(str(root), transform=timm.data.create_transform(**config))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0)
    feats = []
    with torch.no_grad():
        for x, _ in loader:
            feats.append(model(x).numpy())
    np.save(out, np.concatenate(feats))
    np.save(out.with_suffix(".paths.npy"),
            np.array([str(Path(p).relative_to(root)) for p, _ in ds.samples]))
    return len(ds)
