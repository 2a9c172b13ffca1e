"""Extraction throughput: the tutorial loop vs `embedpipe extract` vs every runtime's model-only
ceiling, side by side in one run, interleaved.

For each backbone (tf_efficientnet_lite0 with its bundled ImageNet weights; resnet50 with
RANDOM weights -- speed does not depend on the weights' values, and the fidelity numbers are
then only about arithmetic, not about meaningful features) on a folder of Fashion-MNIST test
images rendered as 224×224 RGB JPEGs (q90), batch 32:

  tutorial    whole process: `python bench/extract.py --worker tutorial` = import torch/timm,
              build the model, torchvision ImageFolder + timm's eval transform +
              DataLoader(batch 32, num_workers 0) + fp32 NCHW model under torch.no_grad,
              np.save of the features. Also reports its loop alone (steady state).
  embedpipe   whole process: `embedpipe extract DATA -o NEW.h5 --model M` with every other
              option at its default (start-up, model build, runtime compile included).
  steady      embedpipe's steady state: a long-lived process that built the backbone once and
              ran `embedpipe.extract.run()` once untimed, then times `run()` with the default
              ExtractOptions into a fresh store (decode + inference + HDF5 writes).
  model-only  one long-lived process per runtime, on pre-decoded tensors (embedpipe's own
              decode + transform, done before), batch 32, features copied out as numpy:
                torch-fp32-nchw   the tutorial's model: fp32, NCHW, no_grad
                torch-fp32        fp32, channels_last, inference_mode
                torch-bf16        bf16 autocast, channels_last, inference_mode
                openvino-f32      openvino.convert_model of the torch module, saved as IR
                                  (weights kept f32), INFERENCE_PRECISION_HINT f32
                openvino-bf16     the same IR, INFERENCE_PRECISION_HINT bf16
                openvino-bf16-throughput  the same, PERFORMANCE_HINT THROUGHPUT (CPU streams),
                                  parts of 4 images on an AsyncInferQueue of one request
                                  per stream, every batch queued back to back (what
                                  embedpipe's OpenVINO runtime does, without its loader)
                onnxruntime-fp32  torch.onnx.export (TorchScript exporter), CPU provider
              Conversions run in this (the orchestrating) process; the OpenVINO and ONNX
              Runtime processes never import torch: one runtime's thread pool per process.

Every timed measurement is either a whole subprocess or a "run" command sent to an idle
long-lived subprocess; within each repetition the order of all measurements of a backbone is
shuffled. img/s are medians over repetitions. Fidelity: each runtime's features of the first
batch vs torch-fp32's (cosine), and embedpipe's stored features vs the tutorial's (all images).

Run from the repository root (the lead runs the full bench on a quiet machine):
    python bench/extract.py            # Lite0 and ResNet-50, 2,000 JPEGs each, 2 reps
    python bench/extract.py --quick    # smoke test: 100 + 50 JPEGs, 1 rep; numbers mean nothing
Writes bench/results/extract.md and extract.json (with --quick: scratch files in the temp dir).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _benchutil as bu  # noqa: E402

BATCH = 32
MODELS = {"tf_efficientnet_lite0": "bundled ImageNet weights",
          "resnet50": "RANDOM weights (timm init, seed 0): timing only"}
RUNTIMES = ("torch-fp32-nchw", "torch-fp32", "torch-bf16", "openvino-f32", "openvino-bf16",
            "openvino-bf16-throughput", "onnxruntime-fp32")
CEILING_IMAGES = {"tf_efficientnet_lite0": 1536, "resnet50": 192}  # per model-only pass: ≥ 2 s each
# (passes of 256 Lite0 images, 0.4-0.8 s, spread 459-580 img/s within one run: too short)
# issue #15's targets (ratios from the same run)
TARGET_TUTORIAL = 5.0  # embedpipe whole process ÷ tutorial whole process
TARGET_CEILING = 0.7  # embedpipe steady ÷ fastest model-only runtime


# == workers (subprocesses) ======================================================================

def _say(obj: dict) -> None:
    print("@@" + json.dumps(obj), flush=True)


def _commands():
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            return
        yield cmd


def worker_ceiling(a) -> None:
    """One runtime on pre-decoded batches; 'run' → one timed pass over all of them."""
    t0 = time.perf_counter()
    x = np.load(a.tensors)
    batches = [np.ascontiguousarray(x[i:i + BATCH]) for i in range(0, len(x) - BATCH + 1, BATCH)]
    rt = a.runtime
    if rt.startswith("torch"):
        import torch

        from embedpipe.backbones import load_backbone

        model = load_backbone(a.model, random_init=a.model != "tf_efficientnet_lite0").model.eval()
        if rt == "torch-fp32-nchw":
            tb = [torch.from_numpy(b) for b in batches]

            def fwd(i):
                with torch.no_grad():
                    return model(tb[i]).numpy().copy()
        else:
            model = model.to(memory_format=torch.channels_last)
            tb = [torch.from_numpy(b).contiguous(memory_format=torch.channels_last) for b in batches]
            bf16 = rt == "torch-bf16"

            def fwd(i):
                with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    return model(tb[i]).float().numpy().copy()
        version = f"torch {torch.__version__}"
    elif rt.startswith("openvino"):
        import openvino as ov

        core = ov.Core()
        prec = "bf16" if "bf16" in rt else "f32"
        config = {"INFERENCE_PRECISION_HINT": prec}
        if rt.endswith("-throughput"):  # CPU streams; 2 requests per stream, as embedpipe
            config["PERFORMANCE_HINT"] = "THROUGHPUT"
        compiled = core.compile_model(core.read_model(a.ir), "CPU", config)
        req = compiled.create_infer_request()
        hints = {k: str(compiled.get_property(k)) for k in
                 ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS",
                  "INFERENCE_NUM_THREADS")}
        streams = int(compiled.get_property("NUM_STREAMS"))
        if rt.endswith("-throughput") and streams > 1:
            # as embedpipe runs it (OpenVINOForward): parts of OV_PART images on an
            # AsyncInferQueue, one request per stream; the timed pass queues every batch's
            # parts back to back (no wait between batches): the ceiling of this way
            from embedpipe.extract.runtime import OV_PART, OV_REQUESTS_PER_STREAM

            queue = ov.AsyncInferQueue(compiled, OV_REQUESTS_PER_STREAM * streams)
            outs = {}
            queue.set_callback(lambda r, k: outs.__setitem__(k, r.get_output_tensor(0).data.copy()))

            def submit(i):
                for lo in range(0, len(batches[i]), OV_PART):
                    queue.start_async({0: batches[i][lo:lo + OV_PART]}, (i, lo), share_inputs=True)

            def fwd(i):
                outs.clear()
                submit(i)
                queue.wait_all()
                return np.concatenate([outs[(i, lo)] for lo in range(0, len(batches[i]), OV_PART)])

            def fwd_pass():
                outs.clear()
                for i in range(len(batches)):
                    submit(i)
                queue.wait_all()
        else:
            def fwd(i):
                return np.array(req.infer({0: batches[i]})[0], dtype=np.float32, copy=True)
        version = f"openvino {ov.__version__} ({hints})"
    elif rt == "onnxruntime-fp32":
        import onnxruntime as ort

        sess = ort.InferenceSession(a.onnx, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name

        def fwd(i):
            return np.array(sess.run(None, {name: batches[i]})[0], dtype=np.float32, copy=True)
        version = f"onnxruntime {ort.__version__}"
    else:
        raise SystemExit(f"unknown runtime {rt}")
    loaded = time.perf_counter() - t0
    np.save(a.out, fwd(0))  # also the warm-up: first-call primitive creation
    for i in range(min(2, len(batches))):
        fwd(i)
    _say({"ready": True, "prepare_s": time.perf_counter() - t0, "load_s": loaded,
          "version": version, "images": len(batches) * BATCH})
    whole = locals().get("fwd_pass")
    for _ in _commands():
        t = time.perf_counter()
        if whole is not None:
            whole()
        else:
            for i in range(len(batches)):
                fwd(i)
        dt = time.perf_counter() - t
        _say({"n": len(batches) * BATCH, "seconds": dt})


def worker_steady(a) -> None:
    """embedpipe.extract.run() with default options on a built backbone; the first run (warm:
    imports, compile caches, page cache) is untimed; 'run' → one run into a fresh store."""
    from embedpipe.backbones import load_backbone
    from embedpipe.extract import ExtractOptions, run

    rnd = a.model != "tf_efficientnet_lite0"
    bb = load_backbone(a.model, random_init=rnd)
    opts = ExtractOptions(model=a.model, random_init=rnd)
    out = Path(a.out)
    s = run(a.data, out / "warm.h5", opts, progress=False, backbone=bb)
    (out / "warm.h5").unlink()
    _say({"ready": True, "line": s.line()})
    for k, _ in enumerate(_commands()):
        store = out / f"steady{k}.h5"
        s = run(a.data, store, opts, progress=False, backbone=bb)
        if s.extracted != s.total:
            raise SystemExit(f"steady run did not extract everything: {s.line()}")
        store.unlink()
        _say({"n": s.extracted, "seconds": s.seconds, "line": s.line()})


def worker_tutorial(a) -> None:
    t0 = time.perf_counter()
    from embedpipe.backbones import load_backbone

    bb = load_backbone(a.model, random_init=a.model != "tf_efficientnet_lite0")
    t1 = time.perf_counter()
    n = bu.tutorial_loop(bb.model.eval(), Path(a.data), Path(a.out), BATCH)
    _say({"n": n, "loop_s": time.perf_counter() - t1, "startup_s": t1 - t0})


class Worker:
    """A long-lived worker subprocess driven by 'run' lines on its stdin."""

    def __init__(self, argv: list[str], label: str):
        self.label = label
        self.p = subprocess.Popen([sys.executable, str(HERE / "extract.py"), *argv],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=_env())
        self.ready = self._read()

    def _read(self) -> dict:
        for line in self.p.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        self.p.wait()
        raise SystemExit(f"worker {self.label} exited with {self.p.returncode} (see its stderr)")

    def run(self) -> dict:
        self.p.stdin.write("run\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write("quit\n")
                self.p.stdin.flush()
                self.p.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.p.kill()
                self.p.wait()


def _env() -> dict:
    env = dict(os.environ)
    root = str(bu.ROOT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_process(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of a whole subprocess (raises with its stderr when it fails)."""
    t = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, env=_env())
    dt = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return dt, res


def said(res: subprocess.CompletedProcess) -> dict:
    return json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("@@")][-1][2:])


# == orchestration ===============================================================================

def pre_decode(model_name: str, data: Path, n: int, out: Path) -> dict:
    """The first n images decoded and transformed exactly as embedpipe does, saved as one
    float32 N×3×H×W array; returns the backbone's data config."""
    from embedpipe.backbones import decode_size, load_backbone, make_transform
    from embedpipe.data import decode_image

    bb = load_backbone(model_name, random_init=model_name != "tf_efficientnet_lite0")
    cfg = bb.data_config
    tf, size = make_transform(cfg), decode_size(cfg)
    files = sorted(data.rglob("*.jpg"))[:n]
    x = np.stack([tf(decode_image(f.read_bytes(), min_size=size)).numpy() for f in files])
    np.save(out, x.astype(np.float32))
    return cfg


def convert(model_name: str, input_size: list[int], tmp: Path) -> dict:
    """OpenVINO IR (f32 weights) and ONNX files of the backbone, with the seconds each took."""
    import torch

    from embedpipe.backbones import load_backbone

    model = load_backbone(model_name, random_init=model_name != "tf_efficientnet_lite0").model.eval()
    x = torch.zeros(BATCH, *input_size)
    out: dict = {}
    import openvino as ov

    import warnings

    t = time.perf_counter()
    ir = tmp / f"{model_name}.xml"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace deprecation
        ov.save_model(ov.convert_model(model, example_input=x), ir, compress_to_fp16=False)
    out["ir"], out["openvino_convert_s"] = ir, time.perf_counter() - t

    t = time.perf_counter()
    path = tmp / f"{model_name}.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["features"])
    out["onnx"], out["onnx_export_s"] = path, time.perf_counter() - t
    return out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def store_vs_tutorial(tut: Path, store: Path) -> tuple[float, float]:
    from embedpipe.store import open_store

    ref = np.load(tut)
    pos = {p: i for i, p in enumerate(np.load(tut.with_suffix(".paths.npy")))}
    st = open_store(store)
    c = cosine_rows(st.features, ref[[pos[p] for p in st.paths]])
    return float(c.mean()), float(c.min())


def extract_has(option: str) -> bool:
    res = subprocess.run(bu.cli_command() + ["extract", "--help"], capture_output=True,
                         text=True, env={**_env(), "COLUMNS": "200"})
    return option in res.stdout


def bench_model(name: str, n: int, n_ceiling: int, reps: int, tmp: Path, rng: random.Random,
                log) -> dict:
    from _benchutil import write_small_jpeg_folder

    rnd = name != "tf_efficientnet_lite0"
    data = tmp / f"{name}-jpegs"
    write_small_jpeg_folder(data, per_class=n // 10)
    n_files, kb = bu.folder_stats(data)
    tensors = tmp / f"{name}-x.npy"
    cfg = pre_decode(name, data, n_ceiling, tensors)
    conv = convert(name, cfg["input_size"], tmp)
    log(f"{name}: {n_files} JPEGs (mean {kb:.1f} KB); OpenVINO convert "
        f"{conv['openvino_convert_s']:.1f} s, ONNX export {conv['onnx_export_s']:.1f} s")
    cli = bu.cli_command() + ["extract", str(data), "--model", name] + (["--random-init"] if rnd else [])
    # untimed warm-up of the CLI on the same folder: fills the OS page cache and embedpipe's
    # on-disk caches (inductor kernels, compiled runtime models) as a user's second run finds them
    warm_s, warm = run_process(cli + ["-o", str(tmp / f"{name}-warm.h5")])
    warm_line = [ln for ln in (warm.stdout + warm.stderr).splitlines() if ln.startswith("done")]
    log(f"{name}: untimed warm-up extract {warm_s:.1f} s: {warm_line[-1] if warm_line else '?'}")
    (tmp / f"{name}-warm.h5").unlink()
    workers: dict[str, Worker] = {}
    try:
        for rt in RUNTIMES:
            argv = ["--worker", "ceiling", "--runtime", rt, "--model", name, "--tensors",
                    str(tensors), "--out", str(tmp / f"{name}-{rt}.npy"),
                    "--ir", str(conv["ir"]), "--onnx", str(conv["onnx"])]
            workers[rt] = Worker(argv, rt)
            log(f"{name}: {rt} ready in {workers[rt].ready['prepare_s']:.1f} s "
                f"({workers[rt].ready['version']})")
        steady_dir = tmp / f"{name}-steady"
        steady_dir.mkdir()
        workers["steady"] = Worker(["--worker", "steady", "--model", name, "--data", str(data),
                                    "--out", str(steady_dir)], "steady")
        log(f"{name}: steady worker ready ({workers['steady'].ready['line']})")
        rates: dict[str, list[float]] = {}
        extra: dict[str, list] = {"tutorial_loop": [], "tutorial_startup": [], "embedpipe_line": [],
                                  "steady_line": []}
        jobs = ["tutorial", "embedpipe", "steady", *RUNTIMES]
        for r in range(reps):
            order = jobs[:]
            rng.shuffle(order)
            for job in order:
                load = bu.load_snapshot()
                if job == "tutorial":
                    out = tmp / f"{name}-tutorial.npy"
                    dt, res = run_process([sys.executable, str(HERE / "extract.py"), "--worker",
                                           "tutorial", "--model", name, "--data", str(data),
                                           "--out", str(out)])
                    s = said(res)
                    rate = s["n"] / dt
                    extra["tutorial_loop"].append(s["n"] / s["loop_s"])
                    extra["tutorial_startup"].append(s["startup_s"])
                elif job == "embedpipe":
                    store = tmp / f"{name}-embedpipe.h5"
                    if store.exists():
                        store.unlink()
                    dt, res = run_process(cli + ["-o", str(store)])
                    rate = n_files / dt
                    done = [ln for ln in (res.stdout + res.stderr).splitlines()
                            if ln.startswith("done")]
                    extra["embedpipe_line"].append(done[-1] if done else "")
                else:
                    s = workers[job].run()
                    dt, rate = s["seconds"], s["n"] / s["seconds"]
                    if job == "steady":
                        extra["steady_line"].append(s["line"])
                rates.setdefault(job, []).append(rate)
                log(f"  rep {r + 1}/{reps} {name:>21} {job:>16}: {rate:7.1f} img/s "
                    f"({dt:5.1f} s; load before: {load})")
        ref = np.load(tmp / f"{name}-torch-fp32.npy")
        fidelity = {rt: (float(cosine_rows(np.load(tmp / f"{name}-{rt}.npy"), ref).mean()),
                         float(cosine_rows(np.load(tmp / f"{name}-{rt}.npy"), ref).min()))
                    for rt in RUNTIMES}
        emb_vs_tut = store_vs_tutorial(tmp / f"{name}-tutorial.npy", tmp / f"{name}-embedpipe.h5")
        versions = {rt: workers[rt].ready["version"] for rt in RUNTIMES}
        prepare = {rt: workers[rt].ready["prepare_s"] for rt in RUNTIMES}
    finally:
        for w in workers.values():
            w.close()
    med = {k: bu.median(v) for k, v in rates.items()}
    fastest = max(RUNTIMES, key=lambda rt: med[rt])
    return {"weights": MODELS[name], "images": n_files, "mean_kb": kb,
            "ceiling_images": n_ceiling, "img_s": rates, "median_img_s": med,
            "tutorial_loop_img_s": extra["tutorial_loop"],
            "tutorial_startup_s": extra["tutorial_startup"],
            "embedpipe_summary": extra["embedpipe_line"], "steady_summary": extra["steady_line"],
            "warmup_extract_s": warm_s, "warmup_summary": warm_line[-1] if warm_line else "",
            "conversion_s": {"openvino": conv["openvino_convert_s"], "onnx": conv["onnx_export_s"]},
            "prepare_s": prepare, "runtime_versions": versions, "fastest_model_only": fastest,
            "embedpipe_over_tutorial": med["embedpipe"] / med["tutorial"],
            "embedpipe_over_tutorial_paired": [e / t for e, t in zip(rates["embedpipe"],
                                                                    rates["tutorial"])],
            "steady_over_tutorial_loop": med["steady"] / bu.median(extra["tutorial_loop"]),
            "steady_over_fastest": med["steady"] / med[fastest],
            "steady_over_fastest_paired": [s / f for s, f in zip(rates["steady"], rates[fastest])],
            "cosine_to_torch_fp32": fidelity, "embedpipe_vs_tutorial_cosine": emb_vs_tut}


LABELS = {"tutorial": "tutorial loop, whole process (ImageFolder, workers 0, fp32 NCHW no_grad)",
          "embedpipe": "embedpipe extract, whole process, defaults",
          "steady": "embedpipe run(), steady state, defaults",
          "torch-fp32-nchw": "model only: torch fp32 NCHW no_grad (tutorial's model)",
          "torch-fp32": "model only: torch fp32 channels_last inference_mode",
          "torch-bf16": "model only: torch bf16 autocast channels_last inference_mode",
          "openvino-f32": "model only: OpenVINO f32",
          "openvino-bf16": "model only: OpenVINO bf16 (INFERENCE_PRECISION_HINT)",
          "openvino-bf16-throughput": "model only: OpenVINO bf16, THROUGHPUT hint (streams)",
          "onnxruntime-fp32": "model only: ONNX Runtime fp32 (CPU provider)"}


def report(results: dict, hdr: bu.Header, args, load_start: str, wall: float) -> str:
    rows = []
    for name, r in results.items():
        for job in ["tutorial", "embedpipe", "steady", *RUNTIMES]:
            v = r["img_s"][job]
            cos = ""
            if job in RUNTIMES:
                c = r["cosine_to_torch_fp32"][job]
                cos = f"{c[0]:.5f} (min {c[1]:.5f})"
            rows.append([name, LABELS[job], f"{bu.median(v):.1f}", bu.spread(v), cos])
    table = bu.table(["model", "configuration", "img/s (median)", "min–max",
                      "cosine to torch fp32 (first batch)"], rows)
    rrows = []
    for name, r in results.items():
        p = r["embedpipe_over_tutorial_paired"]
        rrows.append([name, "embedpipe ÷ tutorial (whole processes)",
                      f"{r['embedpipe_over_tutorial']:.2f}", f"{min(p):.2f}–{max(p):.2f}",
                      f"≥ {TARGET_TUTORIAL:g}: "
                      f"{'met' if r['embedpipe_over_tutorial'] >= TARGET_TUTORIAL else 'NOT met'}"])
        p = r["steady_over_fastest_paired"]
        rrows.append([name, f"embedpipe steady ÷ fastest model-only ({r['fastest_model_only']})",
                      f"{r['steady_over_fastest']:.2f}", f"{min(p):.2f}–{max(p):.2f}",
                      f"≥ {TARGET_CEILING:g}: "
                      f"{'met' if r['steady_over_fastest'] >= TARGET_CEILING else 'NOT met'}"])
        rrows.append([name, "embedpipe steady ÷ tutorial loop (both without start-up)",
                      f"{r['steady_over_tutorial_loop']:.2f}", "", ""])
    rtable = bu.table(["model", "ratio", "ratio of medians", "paired per rep", "issue #15 target"],
                      rrows)
    facts = [f"CPU flags: avx512_bf16 {'yes' if 'avx512_bf16' in bu.cpu_flags() else 'no'}, "
             f"AMX {'yes' if 'amx_bf16' in bu.cpu_flags() else 'no'}",
             "runtimes: " + "; ".join(sorted({v.split(' (')[0] for r in results.values()
                                               for v in r['runtime_versions'].values()})),
             "images: Fashion-MNIST test images rendered at 224×224 RGB JPEG q90: "
             + ", ".join(f"{k} {r['images']}" for k, r in results.items())
             + "; model-only passes on the first " + ", ".join(
                 f"{r['ceiling_images']} ({k})" for k, r in results.items())
             + f" of them, pre-decoded, batch {BATCH}",
             "backbones: " + "; ".join(f"{k}: {MODELS[k]}" for k in results),
             f"{args.reps} interleaved repetitions, order shuffled per repetition per backbone; "
             "img/s are medians; before timing, one untimed `embedpipe extract` of the same "
             "folder per backbone (fills the page cache and embedpipe's compile caches)"]
    if args.quick:
        facts.append("QUICK smoke-test run: numbers mean nothing")
    doc = hdr.render(facts) + "\n" + table + "\n\n" + rtable + "\n\n"
    for name, r in results.items():
        c = r["embedpipe_vs_tutorial_cosine"]
        doc += (f"- {name}: embedpipe's stored features vs the tutorial's (all images, last rep): "
                f"cosine mean {c[0]:.5f}, min {c[1]:.5f}. Tutorial start-up (imports + model) "
                f"{bu.median(r['tutorial_startup_s']):.1f} s; its loop alone "
                f"{bu.median(r['tutorial_loop_img_s']):.1f} img/s. Untimed warm-up extract "
                f"{r['warmup_extract_s']:.1f} s. Conversion: OpenVINO "
                f"{r['conversion_s']['openvino']:.1f} s, ONNX {r['conversion_s']['onnx']:.1f} s.\n")
        doc += f"  - embedpipe's own summary (last rep): `{(r['embedpipe_summary'] or [''])[-1]}`\n"
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=("ceiling", "steady", "tutorial"), help=argparse.SUPPRESS)
    ap.add_argument("--runtime", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--tensors", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--ir", help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--lite0-images", type=int, default=2000, help="JPEGs for Lite0 (×10)")
    ap.add_argument("--resnet50-images", type=int, default=2000,
                    help="JPEGs for ResNet-50 (issue #15 measures 2,000)")
    ap.add_argument("--ceiling", type=int, default=None, help="pre-decoded images per "
                    "model-only pass, a multiple of 32 (default: Lite0 256, ResNet-50 96)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 100 / 50 images, 32 model-only, 1 rep")
    a = ap.parse_args()
    if a.worker:
        {"ceiling": worker_ceiling, "steady": worker_steady, "tutorial": worker_tutorial}[a.worker](a)
        return
    if a.quick:
        a.lite0_images, a.resnet50_images, a.ceiling, a.reps = 100, 50, 32, 1
    t_start = time.perf_counter()
    hdr = bu.Header("Extraction throughput: tutorial loop vs embedpipe extract vs every runtime's "
                    "model-only ceiling")
    load_start = bu.load_snapshot()
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    rng = random.Random(0)

    def log(msg: str) -> None:
        print(msg, flush=True)

    results = {}
    try:
        for name in a.models.split(","):
            n = a.lite0_images if name == "tf_efficientnet_lite0" else a.resnet50_images
            n_ceiling = a.ceiling or CEILING_IMAGES.get(name, 96)
            results[name] = bench_model(name, n, n_ceiling, a.reps, tmp, rng, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - t_start
    doc = report(results, hdr, a, load_start, wall)
    print("\n" + doc)
    import openvino
    import onnxruntime

    payload = {"load_start": load_start, "load_end": bu.load_snapshot(), "wall_s": wall,
               "reps": a.reps, "batch": BATCH,
               "cpu_avx512_bf16": "avx512_bf16" in bu.cpu_flags(),
               "cpu_amx": "amx_bf16" in bu.cpu_flags(),
               "openvino": openvino.__version__, "onnxruntime": onnxruntime.__version__,
               "extract_has_runtime_option": extract_has("--runtime"),
               "models": results}
    out = bu.save_results("extract", doc, payload, a.quick)
    print(f"wrote {out} (whole script {wall:.0f} s)")


if __name__ == "__main__":
    main()
