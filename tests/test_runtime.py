"""--runtime auto|torch|openvino on real weights (bundled Lite0) and real Fashion-MNIST images:
feature fidelity, the store identity rule, the OpenVINO model cache, the fallback without
OpenVINO, resume after an interrupt, and predict/serve answering as torch does."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clitools import cli, ok, one_line_error, read_csv
from embedpipe.store import open_store, read_identity, read_runs

pytest.importorskip("openvino")

EMBEDPIPE = [sys.executable, "-m", "embedpipe.cli"]


def _native_bf16() -> bool:
    from embedpipe.extract.runtime import cpu_has_native_bf16

    return cpu_has_native_bf16()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty cache root (XDG_CACHE_HOME) for this test and its subprocesses."""
    root = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    return root / "embedpipe" / "openvino"


@pytest.fixture
def small(fmnist_src: Path, tmp_path: Path) -> Path:
    """12 real images: two Fashion-MNIST classes, 6 each."""
    dst = tmp_path / "small"
    for c in ("bag", "sneaker"):
        shutil.copytree(fmnist_src / c, dst / c)
    return dst


def features(store: Path) -> dict[str, np.ndarray]:
    s = open_store(store)
    return dict(zip(s.paths, s.features.astype(np.float64)))


def cosines(a: Path, b: Path) -> np.ndarray:
    fa, fb = features(a), features(b)
    assert sorted(fa) == sorted(fb)
    x = np.stack([fa[p] for p in sorted(fa)])
    y = np.stack([fb[p] for p in sorted(fa)])
    return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)


def last_runtime(store: Path) -> dict:
    return read_runs(store)[-1]["runtime"]


def test_openvino_fp32_equals_torch_fp32_and_shares_its_stores(small: Path, tmp_path: Path,
                                                                 cache: Path):
    ov, pt = tmp_path / "ov.h5", tmp_path / "torch.h5"
    res = ok("extract", small, "-o", ov, "--precision", "fp32", "--runtime", "openvino",
             "--workers", "0")
    assert "openvino" in res.output.splitlines()[-1]
    ok("extract", small, "-o", pt, "--precision", "fp32", "--runtime", "torch", "-q",
       "--workers", "0")
    assert cosines(ov, pt).min() >= 0.999
    assert read_identity(ov) == read_identity(pt)  # f32 runtimes are interchangeable
    rt = last_runtime(ov)
    assert rt["name"] == "openvino" and rt["version"] and rt["precision"] == "fp32"
    assert read_runs(ov)[-1]["versions"]["openvino"] == rt["version"]
    assert last_runtime(pt)["name"] == "torch"
    # a torch fp32 store grows with OpenVINO features (and the other way round)
    (small / "coat").mkdir()
    src = sorted((small / "bag").iterdir())[0]
    shutil.copy(src, small / "coat" / "copy.png")
    ok("extract", small, "-o", pt, "--precision", "fp32", "--runtime", "openvino", "-q",
       "--workers", "0")
    assert len(open_store(pt)) == 13
    f = features(pt)
    assert np.allclose(f["coat/copy.png"], f[f"bag/{src.name}"], atol=1e-3)


@pytest.mark.skipif(not _native_bf16(), reason="this CPU has no native bf16 (avx512_bf16 or "
                    "AMX): OpenVINO would run f32, so its bf16 path is not testable here")
def test_openvino_bf16_is_its_own_precision(small: Path, tmp_path: Path, cache: Path):
    ref, ov = tmp_path / "fp32.h5", tmp_path / "ovbf16.h5"
    ok("extract", small, "-o", ref, "--precision", "fp32", "--runtime", "torch", "-q",
       "--workers", "0")
    ok("extract", small, "-o", ov, "--precision", "bf16", "--runtime", "openvino", "-q",
       "--workers", "0")
    c = cosines(ov, ref)
    assert c.mean() >= 0.995 and c.min() >= 0.98, c
    assert read_identity(ov)["precision"] == "bf16-openvino"
    assert last_runtime(ov)["precision"] == "bf16"
    # torch's bf16 never extends it: one line naming the precision of each
    (small / "coat").mkdir()
    shutil.copy(next((small / "bag").iterdir()), small / "coat" / "copy.png")
    res = cli("extract", small, "-o", ov, "--precision", "bf16", "--runtime", "torch", "-q")
    one_line_error(res, "bf16-openvino", str(ov))
    # auto keeps the store's runtime and precision
    ok("extract", small, "-o", ov, "-q", "--workers", "0")
    assert len(open_store(ov)) == 13 and read_identity(ov)["precision"] == "bf16-openvino"


@pytest.mark.slow  # ~31 s of OpenVINO compiles
def test_second_run_reads_the_cache_and_a_damaged_entry_is_rebuilt(small: Path,
                                                                     tmp_path: Path,
                                                                     cache: Path):
    args = ["--precision", "fp32", "--runtime", "openvino", "-q", "--workers", "0"]
    ok("extract", small, "-o", tmp_path / "a.h5", *args)
    assert last_runtime(tmp_path / "a.h5")["cache"] == "miss"
    entries = [p for p in cache.iterdir() if p.name.startswith("tf_efficientnet_lite0-")]
    assert len(entries) == 1 and (entries[0] / "model.xml").is_file()
    assert (entries[0] / "model.bin").stat().st_size > 1_000_000
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["key"]["model"] == "tf_efficientnet_lite0" and len(meta["key"]["weights_sha256"]) == 64
    ok("extract", small, "-o", tmp_path / "b.h5", *args)
    assert last_runtime(tmp_path / "b.h5")["cache"] == "hit"
    # flip bytes in the weights: the checksum catches it, the entry is converted again
    with open(entries[0] / "model.bin", "r+b") as f:
        f.seek(4096)
        f.write(b"\xff" * 64)
    res = ok("extract", small, "-o", tmp_path / "c.h5", *args)
    assert "damaged" in res.output and "converting again" in res.output
    assert last_runtime(tmp_path / "c.h5")["cache"] == "rebuilt"
    assert cosines(tmp_path / "a.h5", tmp_path / "c.h5").min() > 0.99999
    # a cut-off model.xml, and garbage compiled blobs: still never fatal
    (entries[0] / "model.xml").write_text("<net")
    for blob in (cache / "compiled").glob("*"):
        blob.write_bytes(b"garbage")
    ok("extract", small, "-o", tmp_path / "d.h5", *args)
    assert last_runtime(tmp_path / "d.h5")["cache"] == "rebuilt"
    ok("extract", small, "-o", tmp_path / "e.h5", *args)
    assert last_runtime(tmp_path / "e.h5")["cache"] == "hit"
    assert cosines(tmp_path / "a.h5", tmp_path / "e.h5").min() > 0.99999


BLOCK_OPENVINO = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from embedpipe.cli import main
sys.argv = ["embedpipe", *sys.argv[1:]]
main()
"""


def test_auto_falls_back_to_torch_in_one_line_without_openvino(small: Path, tmp_path: Path,
                                                                cache: Path):
    out = tmp_path / "s.h5"
    cmd = [sys.executable, "-c", BLOCK_OPENVINO, "extract", str(small), "-o", str(out),
           "--precision", "fp32", "-q", "--workers", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    notes = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(notes) == 1 and notes[0].startswith("note: --runtime auto uses torch"), notes
    assert "openvino is not installed" in notes[0] and "embedpipe[openvino]" in notes[0]
    assert last_runtime(out)["name"] == "torch" and len(open_store(out)) == 12
    cmd[cmd.index("-o") + 1] = str(tmp_path / "t.h5")
    res = subprocess.run(cmd + ["--runtime", "openvino"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --runtime openvino"), lines


def test_runtime_rules_on_cuda_and_bad_values(small: Path, tmp_path: Path):
    from embedpipe.extract import ExtractError
    from embedpipe.extract.runtime import choose_runtime

    # no GPU here: the rule itself. OpenVINO is never chosen on CUDA.
    assert choose_runtime("auto", "cuda", "bf16") == ("torch", None)
    assert choose_runtime("auto", "cuda", "fp32") == ("torch", None)
    with pytest.raises(ExtractError, match="CPU only"):
        choose_runtime("openvino", "cuda", "fp32")
    name, why = choose_runtime("auto", "cpu", "fp16")
    assert name == "torch" and "fp16" in why
    one_line_error(cli("extract", small, "-o", tmp_path / "x.h5", "--runtime", "tensorrt"),
                   "--runtime tensorrt", "auto, torch, openvino")
    one_line_error(cli("extract", small, "-o", tmp_path / "x.h5", "--runtime", "openvino",
                       "--precision", "fp16"), "--runtime openvino", "--runtime torch")


@pytest.mark.slow  # ~28 s; the torch runtime's resume is in test_extract's default tests
def test_interrupted_openvino_run_resumes_without_losing_a_batch(fmnist: Path, tmp_path: Path,
                                                                  cache: Path):
    store = tmp_path / "s.h5"
    cmd = [*EMBEDPIPE, "extract", str(fmnist), "-o", str(store), "--precision", "fp32",
           "--runtime", "openvino", "--batch-size", "4", "--workers", "0", "-q"]
    ok("extract", fmnist / "bag", "-o", tmp_path / "warm.h5", "--precision", "fp32",
       "--runtime", "openvino", "-q", "--workers", "0")  # fill the model cache first
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    rows = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if store.exists():
            try:
                rows = len(open_store(store, features=False))
            except Exception:  # noqa: BLE001 - busy or still being created
                continue
            if rows >= 8:
                break
    assert proc.poll() is None, f"finished before it could be interrupted: {proc.stderr.read()}"
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    kept = len(open_store(store, features=False))
    assert 8 <= kept < 60
    assert read_runs(store)[-1]["status"] == "interrupted"
    res = ok("extract", fmnist, "-o", store, "--precision", "fp32", "--runtime", "openvino",
             "--batch-size", "4", "--workers", "0")
    last = res.output.splitlines()[-1]
    assert f"{60 - kept} extracted" in last and f"{kept} already in store" in last, last
    # an incremental rerun after a change: only the changed file is extracted
    target = sorted((fmnist / "coat").iterdir())[0]
    shutil.copy(sorted((fmnist / "bag").iterdir())[0], target)
    res = ok("extract", fmnist, "-o", store, "--precision", "fp32", "--runtime", "openvino",
             "--workers", "0")
    assert "1 changed and re-extracted" in res.output.splitlines()[-1]
    ref = tmp_path / "ref.h5"
    ok("extract", fmnist, "-o", ref, "--precision", "fp32", "--runtime", "torch", "-q",
       "--workers", "0")
    assert cosines(store, ref).min() >= 0.999


@pytest.fixture(scope="module")
def head(fmnist_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rt-head") / "logreg.skops"
    ok("fit", fmnist_store, "--head", "logreg", "--param", "C=0.1", "-o", out, "-q")
    return out


def _test_images(fmnist_store: Path) -> list[Path]:
    root = Path(open_store(fmnist_store, features=False).runs[0]["source"])
    return sorted((root / "test").glob("*/*.png"))[::5]


def test_predict_and_serve_with_openvino_answer_as_torch(head: Path, fmnist_store: Path,
                                                         tmp_path: Path):
    from embedpipe.heads import artifacts

    # the head's manifest names the runtime(s) that made its store's features
    ran = artifacts.load(head).manifest["training"]["feature_runtimes"]
    assert ran and all(r.split()[0] in ("torch", "openvino") for r in ran), ran
    images = _test_images(fmnist_store)
    by = {}
    for rt in ("torch", "openvino"):
        out = tmp_path / f"{rt}.csv"
        ok("predict", head, *images, "--runtime", rt, "-o", out, "-q", "--workers", "0")
        by[rt] = {r["path"]: r for r in read_csv(out)}
    assert len(by["torch"]) == len(images) and by["torch"].keys() == by["openvino"].keys()
    for p, r in by["torch"].items():
        o = by["openvino"][p]
        assert o["predicted"] == r["predicted"] and o["top2"] == r["top2"]
        assert abs(float(o["confidence"]) - float(r["confidence"])) < 1e-3
    from embedpipe.serve import Model

    model = Model(head, runtime="openvino")
    assert model.info()["backbone"]["runtime"]["name"] == "openvino"
    answers = model.run([model.preprocess(p.read_bytes()) for p in images])
    for p, a in zip(images, answers):
        r = next(v for k, v in by["torch"].items() if k.endswith(p.name))
        assert a["class"] == r["predicted"]
        assert abs(a["confidence"] - float(r["confidence"])) < 1e-3


def test_openvino_takes_uint8_pixels_and_its_features_equal_a_plain_timm_forward(
        tmp_path: Path, cache: Path):
    """The loader hands uint8 pixels and OpenVINO normalises them inside its compiled graph
    (PrePostProcessor), its batches split over CPU streams: the stored fp32 features equal a
    forward pass built without embedpipe (timm's float transform + the bundled weights) on
    real photos of several sizes and a grayscale image; the run record names the streams."""
    from skimage import data as skdata
    from test_extract import reference_features

    photos = tmp_path / "photos"
    photos.mkdir()
    sk = Path(skdata.__file__).parent
    for name in ("coffee.png", "astronaut.png", "chelsea.png", "camera.png"):
        shutil.copy(sk / name, photos / name)
    out = tmp_path / "ov.h5"
    ok("extract", photos, "-o", out, "--precision", "fp32", "--runtime", "openvino", "-q",
       "--layout", "unlabeled", "--workers", "0")
    f = features(out)
    files = sorted(photos.iterdir())
    ref = reference_features(files)
    got = np.stack([f[p.name] for p in files])
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)
    rt = last_runtime(out)
    assert rt["streams"] >= 1 and rt["threads"] >= 1


def test_openvino_batches_in_flight_together_give_each_its_own_features(cache: Path):
    """Engine.submit with OpenVINO's streams runs a batch in the background in parts of
    OV_PART images: batches submitted back to back (their parts queued behind each other,
    sizes not multiples of the part, one image, flip TTA) return each its own features, equal
    to one synchronous infer request on the whole batch."""
    import torch

    from embedpipe.backbones import load_backbone
    from embedpipe.extract.runtime import OV_PART, build_engine

    engine = build_engine(load_backbone(), torch.device("cpu"), "fp32", "openvino")
    fwd = engine.forward
    if fwd.queue is None:
        pytest.skip("OpenVINO chose one stream on this machine: nothing runs in the background")
    assert engine.background
    rng = np.random.default_rng(0)
    sizes = [13, 1, OV_PART, 32]
    batches = [torch.from_numpy(rng.integers(0, 256, (n, 1, 224, 224, 3), dtype=np.uint8))
               for n in sizes]
    results = [engine.submit(b, flip=flip, chunk=32) for b in batches for flip in (False, True)]
    got = [r() for r in results]
    plain = fwd.compiled.create_infer_request()
    for k, b in enumerate(batches):
        x = b.flatten(0, 1).numpy()
        want = next(iter(plain.infer({0: x}).values())).copy()
        mirror = next(iter(plain.infer({0: np.ascontiguousarray(x[:, :, ::-1])}).values()))
        assert got[2 * k].shape == (len(b), 1280)  # Lite0's pooled features
        np.testing.assert_allclose(got[2 * k].numpy(), want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got[2 * k + 1].numpy(), (want + mirror) / 2, atol=1e-5, rtol=0)


def test_torch_ops_around_openvino_run_on_one_thread_and_the_count_is_restored(cache: Path):
    """With OpenVINO running the backbone, torch's own ops in the engine call (the flip TTA's
    cat, the mean over views) run on one intra-op thread: on two threads a parallel op waits
    for a core the loader worker holds (bench/results/contention.md). The caller's thread
    count is back afterwards, also when the forward raises; with TTA the features are the mean
    of the image and its mirror."""
    import torch

    from embedpipe.backbones import load_backbone
    from embedpipe.extract.runtime import build_engine, one_torch_thread

    engine = build_engine(load_backbone(), torch.device("cpu"), "fp32", "openvino")
    assert engine.runtime == "openvino"
    real = engine.forward
    seen: list[int] = []

    class Recorder:
        pixels = real.pixels

        def __call__(self, x):
            seen.append(torch.get_num_threads())
            return real(x)

    engine.forward = Recorder()
    views = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 1, 224, 224, 3),
                                                               dtype=np.uint8))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        both = engine(views, flip=True, chunk=32)
        assert seen == [1] and torch.get_num_threads() == 2
        plain = engine(views, flip=False, chunk=32)
        mirror = engine(views.flip(3), flip=False, chunk=32)
        np.testing.assert_allclose(both.numpy(), ((plain + mirror) / 2).numpy(), atol=1e-4)
        assert plain.shape == (3, 1280)  # Lite0's pooled features, one row per image
        with pytest.raises(RuntimeError), one_torch_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("the forward failed")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)



@pytest.mark.slow  # ~20 s
def test_the_openvino_runtime_reports_nothing_to_openvino_telemetry(fmnist: Path,
                                                                    tmp_path: Path):
    """OpenVINO's model conversion counted each call in ~/intel/stats and forked a process
    that posted a usage event to Google Analytics (on Ctrl-C that process printed its own
    traceback). embedpipe now imports OpenVINO with its telemetry stubbed out: an extraction
    with --runtime openvino (which converts the model, HOME empty so nothing is cached)
    leaves no ~/intel folder behind."""
    import os

    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("XDG_CACHE_HOME", None)
    res = subprocess.run([sys.executable, "-m", "embedpipe.cli", "extract", str(fmnist), "-o",
                          str(tmp_path / "s.h5"), "--runtime", "openvino", "-q"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0 and "60 extracted" in res.stdout, res.stdout + res.stderr
    assert not (home / "intel").exists(), sorted(p.name for p in (home / "intel").iterdir())
