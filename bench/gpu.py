"""GPU check of extraction (issue #15 item 5): one prepared script, under 8 minutes on one CUDA
GPU with ~16 cores. It never makes up a number: without CUDA it stops at once (exit 2) unless
--cpu-dry-run, which runs the same logic on the CPU at tiny sizes and labels every number as
a CPU dry run.

What it measures, for tf_efficientnet_lite0 (bundled weights) and resnet50 (RANDOM weights:
speed only) on synthetic JPEGs (Fashion-MNIST test images at 224×224, q90; and 1024×768
garment-on-texture JPEGs, q90, from bench/_benchutil.py):
  1. whole process: `embedpipe extract DATA -o NEW.h5 --model M` with every other option at
     its default (start-up included), img/s, GPU utilisation (nvidia-smi sampled every
     100 ms while it ran), and which runtime it chose: with CUDA present `--runtime auto` must
     pick torch, never OpenVINO (checked on the summary line and the store's run record;
     if `extract` has no --runtime option yet, that is reported instead);
  2. end to end, steady state: `embedpipe.extract.run()` in this process with the backbone
     already built (CUDA context, cuDNN autotuning warm), fresh store each time, for
     precision bf16/fp16 (autocast), batch 64/256, loader workers 4/8/16, pinned memory
     on/off (the loader's pin_memory forced), img/s and GPU utilisation;
  3. model only: the same model on pre-made tensors already on the GPU (batch 64/256,
     bf16/fp16), and fed from host memory (pinned vs pageable) — the ceiling the end-to-end
     runs are compared with: e2e ÷ model-only < 0.7 with the GPU mostly idle = decode-bound;
  4. fidelity: features of 32 images under bf16/fp16 on the GPU vs torch fp32 on the CPU
     (cosine), and the default run's stored features vs CPU fp32 of the same files.
Steps are skipped (and said so) once --budget-s seconds have passed, so the whole run stays
under 8 minutes.

Run on the GPU machine from the repository root:
    python bench/gpu.py                 # writes $OUT/gpu.json and $OUT/gpu.md
    python bench/gpu.py --cpu-dry-run   # here, without a GPU: proves the logic, tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _benchutil as bu  # noqa: E402

MODELS = {"tf_efficientnet_lite0": "bundled ImageNet weights",
          "resnet50": "RANDOM weights (timm init, seed 0): speed only"}


# -- sizes ------------------------------------------------------------------------------------

class Plan:
    """The configuration matrix; tiny on a CPU dry run (same code paths)."""

    def __init__(self, dry: bool):
        self.dry = dry
        self.small = 20 if dry else 8000  # 224×224 JPEGs
        self.large = 10 if dry else 800  # 1024×768 JPEGs
        self.batches = (8, 16) if dry else (64, 256)
        self.workers = (0, 1, 2) if dry else (4, 8, 16)
        self.precisions = ("bf16", "fp16")
        # fp16 on a CPU is emulated and minutes slow: the dry run's end-to-end and model-only
        # runs skip it (its cosine step still runs fp16)
        self.steady_precisions = ("bf16",) if dry else self.precisions
        self.model_only_iters = 2 if dry else 30
        self.cosine_images = 8 if dry else 32


# -- data ----------------------------------------------------------------------------------------

def _gen(kind: str, root: str, per_class: int, seed: int) -> None:
    if kind == "small":
        bu.write_small_jpeg_folder(Path(root), per_class=per_class, seed=seed)
    else:
        bu.write_jpeg_folder(Path(root), per_class=per_class, seed=seed)


def make_folder(kind: str, root: Path, n: int, procs: int) -> Path:
    """n JPEGs under root/part<k>/<class>/ written by `procs` processes (parts use different
    seeds, so the images differ)."""
    parts = max(1, min(procs, n // 10))
    per = max(1, n // (10 * parts))
    with ProcessPoolExecutor(parts) as ex:
        list(ex.map(_gen, [kind] * parts, [str(root / f"part{k}") for k in range(parts)],
                    [per] * parts, list(range(parts))))
    return root


# -- GPU utilisation ------------------------------------------------------------------------------

class GpuSampler:
    """nvidia-smi utilization.gpu every 100 ms in the background (None without nvidia-smi)."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self.proc = None
        exe = shutil.which("nvidia-smi")
        if exe:
            self.proc = subprocess.Popen([exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "100"], stdout=subprocess.PIPE, text=True,
                                         stderr=subprocess.DEVNULL)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append((time.perf_counter(), float(line.split(",")[0])))

    def window(self, t0: float, t1: float) -> dict | None:
        xs = [u for t, u in self.samples if t0 <= t <= t1]
        if not xs:
            return None
        return {"mean": float(np.mean(xs)), "p90": float(np.percentile(xs, 90)), "samples": len(xs)}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def fmt_util(u: dict | None) -> str:
    return "n/a" if u is None else f"{u['mean']:.0f}% (p90 {u['p90']:.0f}%)"


# -- helpers -----------------------------------------------------------------------------------------

def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(bu.ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def extract_help() -> str:
    res = subprocess.run(bu.cli_command() + ["extract", "--help"], capture_output=True, text=True,
                         env={**env(), "COLUMNS": "250"})
    return res.stdout


def last_run_record(store: Path) -> dict:
    try:
        from embedpipe.store import read_runs
    except ImportError:
        return {}
    with contextlib.suppress(Exception):
        runs = read_runs(store)
        return runs[-1] if runs else {}
    return {}


def runtime_chosen(line: str, record: dict) -> str:
    """'openvino', 'torch' or 'unknown (...)' from a summary line and a run record."""
    rec = record.get("runtime")
    if isinstance(rec, dict) and rec.get("name"):
        return str(rec["name"])
    if isinstance(rec, str) and rec:
        return rec.split()[0]
    if "openvino" in line.lower():
        return "openvino"
    return "torch" if line else "unknown (no summary line)"


@contextlib.contextmanager
def pin_memory(on: bool):
    """Force DataLoader(pin_memory=on) for loaders made inside the block."""
    import torch.utils.data as tud

    orig = tud.DataLoader
    made = {"loaders": 0}  # > 0: the override reached extract's loader

    class Pinned(orig):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw):
            kw["pin_memory"] = on
            made["loaders"] += 1
            super().__init__(*a, **kw)

    tud.DataLoader = Pinned
    try:
        yield made
    finally:
        tud.DataLoader = orig


def cosine(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a, b = a.astype(np.float64), b.astype(np.float64)
    c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(c.mean()), float(c.min())


def pre_decode(bb, files: list[Path]):
    import torch

    from embedpipe.backbones import decode_size, make_transform
    from embedpipe.data import decode_image

    tf, size = make_transform(bb.data_config), decode_size(bb.data_config)
    return torch.stack([tf(decode_image(f.read_bytes(), min_size=size)) for f in files])


# -- the steps ---------------------------------------------------------------------------------------

def whole_process(name: str, data: Path, tmp: Path, device: str, sampler: GpuSampler,
                  has_runtime: bool, n: int) -> dict:
    store = tmp / f"cli-{name}-{data.name}.h5"
    cmd = bu.cli_command() + ["extract", str(data), "-o", str(store), "--model", name]
    if name != "tf_efficientnet_lite0":
        cmd.append("--random-init")
    if has_runtime:
        cmd += ["--runtime", "auto"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    t1 = time.perf_counter()
    if res.returncode != 0:
        return {"error": f"exit {res.returncode}: {res.stderr.strip()[-500:]}"}
    done = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("done")]
    line = done[-1] if done else ""
    rec = last_run_record(store)
    return {"images": n, "seconds": t1 - t0, "img_s": n / (t1 - t0), "summary": line,
            "gpu_util": sampler.window(t0, t1), "runtime": runtime_chosen(line, rec),
            "record_device": rec.get("device"), "record_runtime": rec.get("runtime"),
            "store": str(store), "device": device}


def steady(bb, name: str, data: Path, tmp: Path, device: str, precision: str, batch: int,
           workers: int, pin: bool, sampler: GpuSampler) -> dict:
    from embedpipe.extract import ExtractOptions, run

    store = tmp / "steady.h5"
    opts = ExtractOptions(model=name, random_init=name != "tf_efficientnet_lite0", device=device,
                          precision=precision, batch_size=batch, workers=workers)
    t0 = time.perf_counter()
    with pin_memory(pin) as made:
        s = run(data, store, opts, progress=False, backbone=bb)
    t1 = time.perf_counter()
    if not made["loaders"]:
        raise SystemExit("bench/gpu.py: forcing pin_memory no longer reaches extract's "
                         "DataLoader (torch.utils.data.DataLoader); update pin_memory()")
    store.unlink()
    if s.extracted != s.total:
        raise SystemExit(f"steady run did not extract everything: {s.line()}")
    return {"img_s": s.extracted / s.seconds, "seconds": s.seconds, "summary": s.line(),
            "gpu_util": sampler.window(t0, t1)}


def model_only(model, x, device: str, precision: str, iters: int, source: str) -> float:
    """img/s of the model alone on batch x: source 'device' (already on the GPU), 'pinned' or
    'pageable' (host tensor copied each iteration)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    dev = torch.device(device)
    if source == "device":
        xs = x.to(dev).contiguous(memory_format=torch.channels_last)
    else:
        xs = x.pin_memory() if (source == "pinned" and dev.type == "cuda") else x.clone()

    def step():
        xi = xs if source == "device" else xs.to(dev, non_blocking=True).contiguous(
            memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=dtype):
            return model(xi).float()

    with torch.inference_mode():
        for _ in range(3):
            step()
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for _ in range(iters):
            out = step()
        out.cpu()
        sync()
        return iters * x.shape[0] / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run the logic on the CPU at tiny sizes (no GPU numbers)")
    ap.add_argument("--out", default=os.environ.get("OUT"),
                    help="folder for gpu.json / gpu.md (default: $OUT, else a temp folder)")
    ap.add_argument("--budget-s", type=float, default=400,
                    help="start no new step after this many seconds (default 400)")
    ap.add_argument("--models", default=",".join(MODELS))
    a = ap.parse_args()
    t_start = time.perf_counter()
    import torch

    if not a.cpu_dry_run and not torch.cuda.is_available():
        print(f"error: bench/gpu.py needs a CUDA GPU, and torch {torch.__version__} sees none "
              "(torch.cuda.is_available() is False); run it on the GPU machine, or pass "
              "--cpu-dry-run to check its logic on this CPU", file=sys.stderr)
        return 2
    dry = a.cpu_dry_run
    plan = Plan(dry)
    device = "cpu" if dry else "cuda"
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="gpu-bench-out-"))
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    def time_left() -> bool:
        return time.perf_counter() - t_start < a.budget_s

    facts = bu.machine_facts()
    if not dry:
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
        with contextlib.suppress(Exception):
            facts["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
    help_text = extract_help()
    has_runtime = "--runtime" in help_text
    result: dict = {"dry_run": dry, "device": device, "machine": facts,
                    "extract_has_runtime_option": has_runtime, "models": {}, "skipped": []}
    log(f"{'CPU DRY RUN (not GPU numbers)' if dry else facts.get('gpu')}: "
        f"{bu.cores()} cores; extract has --runtime: {has_runtime}")
    sampler = GpuSampler() if not dry else GpuSampler.__new__(GpuSampler)
    if dry:
        sampler.samples, sampler.proc = [], None
    failures: list[str] = []
    try:
        procs = min(16, bu.cores())
        t = time.perf_counter()
        small = make_folder("small", tmp / "small224", plan.small, procs)
        large = make_folder("large", tmp / "large1024", plan.large, procs)
        n_small = len(list(small.rglob("*.jpg")))
        n_large = len(list(large.rglob("*.jpg")))
        log(f"data: {n_small} JPEGs 224×224, {n_large} JPEGs 1024×768 in {time.perf_counter() - t:.0f} s")
        result["images"] = {"small224": n_small, "large1024x768": n_large}
        from embedpipe.backbones import load_backbone

        for name in a.models.split(","):
            if not time_left():
                result["skipped"].append(f"{name}: everything")
                continue
            rnd = name != "tf_efficientnet_lite0"
            R: dict = {"weights": MODELS[name], "whole_process": {}, "steady": [],
                       "model_only": [], "cosine": {}}
            result["models"][name] = R
            # 1. whole process, defaults (and which runtime auto picks)
            for label, data, n in (("small224", small, n_small), ("large1024x768", large, n_large)):
                if not time_left():
                    result["skipped"].append(f"{name} whole process {label}")
                    continue
                w = whole_process(name, data, tmp, device, sampler, has_runtime, n)
                R["whole_process"][label] = w
                log(f"{name} whole process {label}: "
                    + (w["error"] if "error" in w else
                       f"{w['img_s']:.0f} img/s ({w['seconds']:.1f} s), GPU {fmt_util(w['gpu_util'])}, "
                       f"runtime {w['runtime']}; {w['summary']}"))
                if "error" not in w and device == "cuda" and w["runtime"] == "openvino":
                    failures.append(f"{name}: the OpenVINO runtime was chosen on CUDA ({w['summary']})")
            # 2. steady state, in process
            bb = load_backbone(name, random_init=rnd)
            cpu_model = load_backbone(name, random_init=rnd).model.eval()  # fp32 reference
            steady(bb, name, small, tmp, device, "bf16", plan.batches[0], plan.workers[0], True,
                   sampler)  # warm-up: CUDA context, cuDNN autotuning, page cache
            configs = []
            b_hi, w_mid = plan.batches[-1], plan.workers[1]
            for p in plan.steady_precisions:
                configs.append(("small224", p, b_hi, w_mid, True))
            for b in plan.batches[:-1]:
                configs.append(("small224", "bf16", b, w_mid, True))
            for w in plan.workers:
                if w != w_mid:
                    configs.append(("small224", "bf16", b_hi, w, True))
            configs.append(("small224", "bf16", b_hi, w_mid, False))
            for w in (plan.workers[1], plan.workers[-1]):
                configs.append(("large1024x768", "bf16", b_hi, w, True))
            for label, p, b, w, pin in configs:
                if not time_left():
                    result["skipped"].append(f"{name} steady {label} {p} b{b} w{w} pin={pin}")
                    continue
                s = steady(bb, name, small if label == "small224" else large, tmp, device, p, b,
                           w, pin, sampler)
                R["steady"].append({"images": label, "precision": p, "batch": b, "workers": w,
                                    "pin_memory": pin, **s})
                log(f"{name} steady {label} {p} batch {b} workers {w} pin {pin}: "
                    f"{s['img_s']:.0f} img/s, GPU {fmt_util(s['gpu_util'])}")
            # 3. model only, 4. fidelity
            files = sorted(small.rglob("*.jpg"))
            x_few = pre_decode(bb, files[:plan.cosine_images])
            with torch.inference_mode():
                ref = cpu_model(x_few).numpy()
            model = bb.model  # on the device, channels_last, after run()
            for b in plan.batches:
                reps = -(-b // len(x_few))
                xb = x_few.repeat(reps, 1, 1, 1)[:b].contiguous()
                for p in plan.steady_precisions:
                    for source in (("device", "pinned", "pageable") if b == plan.batches[-1]
                                   else ("device",)):
                        if not time_left():
                            result["skipped"].append(f"{name} model-only b{b} {p} {source}")
                            continue
                        r = model_only(model, xb, device, p, plan.model_only_iters, source)
                        R["model_only"].append({"batch": b, "precision": p, "source": source,
                                                "img_s": r})
                        log(f"{name} model only batch {b} {p} from {source}: {r:.0f} img/s")
            for p in plan.precisions:
                dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[p]
                dev = torch.device(device)
                with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype):
                    f = model(x_few.to(dev).contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
                R["cosine"][f"model {p} on {device} vs CPU fp32"] = cosine(f, ref)
            w = R["whole_process"].get("small224", {})
            if w.get("store"):
                from embedpipe.store import open_store

                st = open_store(w["store"])
                pos = {p: i for i, p in enumerate(st.paths)}
                rels = [str(f.relative_to(small)) for f in files[:plan.cosine_images]]
                if all(r in pos for r in rels):
                    R["cosine"]["default extract (stored) vs CPU fp32"] = cosine(
                        st.features[[pos[r] for r in rels]], ref)
            for k, v in R["cosine"].items():
                log(f"{name} cosine {k}: mean {v[0]:.5f}, min {v[1]:.5f}")
            # verdicts: e2e vs model only at the same batch / precision
            mo = {(m["batch"], m["precision"]): m["img_s"] for m in R["model_only"]
                  if m["source"] == "device"}
            for s in R["steady"]:
                ceil = mo.get((s["batch"], s["precision"]))
                if ceil:
                    s["over_model_only"] = s["img_s"] / ceil
                    util = (s["gpu_util"] or {}).get("mean")
                    s["verdict"] = ("decode/loader-bound" if s["over_model_only"] < 0.7 and
                                    (util is None or util < 70) else
                                    "model-bound" if s["over_model_only"] >= 0.85 else "mixed")
            del bb, model
            if device == "cuda":
                torch.cuda.empty_cache()
        # explicit --runtime openvino on CUDA: reported, not asserted
        if has_runtime and device == "cuda" and time_left():
            cmd = bu.cli_command() + ["extract", str(small), "-o", str(tmp / "ov-on-cuda.h5"),
                                      "--runtime", "openvino", "--device", "cuda"]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
            out_txt = (res.stdout + res.stderr).strip().splitlines()
            result["explicit_openvino_on_cuda"] = {"exit": res.returncode,
                                                   "last_line": out_txt[-1] if out_txt else ""}
            log(f"--runtime openvino --device cuda: exit {res.returncode}: "
                f"{out_txt[-1] if out_txt else ''}")
    finally:
        sampler.close()
        shutil.rmtree(tmp, ignore_errors=True)
    result["failures"] = failures
    result["wall_s"] = time.perf_counter() - t_start
    (out / "gpu.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = render(result, log_lines)
    (out / "gpu.md").write_text(md)
    print("\n" + md)
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'} ({result['wall_s']:.0f} s)")
    return 1 if failures else 0


def render(r: dict, log_lines: list[str]) -> str:
    m = r["machine"]
    title = ("# GPU extraction check — CPU DRY RUN (tiny sizes; NOT GPU numbers)" if r["dry_run"]
             else "# GPU extraction check")
    lines = [title, "", f"- date: {m['date']}", f"- command: `{m['command']}`",
             f"- device: {m.get('gpu', 'none (CPU dry run)')} {m.get('nvidia_smi', '')}; "
             f"CPU: {m['cpu']} ({m['cores']} cores)",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
             f"- images: {r.get('images')}", f"- wall time: {r['wall_s']:.0f} s",
             f"- extract has --runtime: {r['extract_has_runtime_option']}"]
    if r["failures"]:
        lines += ["- **FAILED**: " + "; ".join(r["failures"])]
    if r["skipped"]:
        lines += ["- skipped (time budget): " + "; ".join(r["skipped"])]
    for name, R in r["models"].items():
        lines += ["", f"## {name} ({R['weights']})", ""]
        rows = [[k, f"{w.get('img_s', 0):.0f}", f"{w.get('seconds', 0):.1f}", fmt_util(w.get("gpu_util")),
                 w.get("runtime", ""), w.get("error", w.get("summary", ""))]
                for k, w in R["whole_process"].items()]
        lines += ["Whole process, `embedpipe extract` defaults:", "",
                  bu.table(["images", "img/s", "s", "GPU util", "runtime", "summary"], rows), ""]
        rows = [[s["images"], s["precision"], s["batch"], s["workers"], s["pin_memory"],
                 f"{s['img_s']:.0f}", fmt_util(s["gpu_util"]),
                 f"{s.get('over_model_only', float('nan')):.2f}", s.get("verdict", "")]
                for s in R["steady"]]
        lines += ["End to end, steady state (run() with the backbone built):", "",
                  bu.table(["images", "precision", "batch", "workers", "pinned", "img/s",
                            "GPU util", "÷ model only", "verdict"], rows), ""]
        rows = [[x["batch"], x["precision"], x["source"], f"{x['img_s']:.0f}"] for x in R["model_only"]]
        lines += ["Model only (pre-made tensors):", "",
                  bu.table(["batch", "precision", "input from", "img/s"], rows), ""]
        lines += [f"- cosine {k}: mean {v[0]:.5f}, min {v[1]:.5f}" for k, v in R["cosine"].items()]
    if "explicit_openvino_on_cuda" in r:
        e = r["explicit_openvino_on_cuda"]
        lines += ["", f"- `--runtime openvino --device cuda`: exit {e['exit']}: {e['last_line']}"]
    lines += ["", "## Log", "", "```", *log_lines, "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
