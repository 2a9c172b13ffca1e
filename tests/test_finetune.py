"""`embedpipe finetune`, end to end on real Fashion-MNIST images with the real bundled weights.

Kept small for 2 busy CPU cores: 60 images (6 per class), 64 px inputs, batch 16, 1-3 epochs,
one torch thread (two threads are many times slower when the other core is busy).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from embedpipe.backbones import file_sha256, load_backbone
from embedpipe.cli import app
from embedpipe.finetune.options import FinetuneError, FinetuneOptions
from embedpipe.finetune.stages import (
    WarmupCosine,
    build_model,
    feature_stages,
    unfrozen_at,
)
from embedpipe.store import open_store

runner = CliRunner()
MODEL = "tf_efficientnet_lite0"
FAST = ["--img-size", "64", "--batch-size", "16", "--workers", "0", "--threads", "1"]


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def finetune_ok(*args: object):
    res = cli("finetune", *args)
    assert res.exit_code == 0, res.output
    return res


def one_line_error(res, *needles: str, code: int = 2, start: str = "error: ") -> str:
    assert res.exit_code == code, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def interrupted_line(res, *needles: str) -> str:
    """The one line of a finetune that Ctrl-C stopped (exit 130)."""
    return one_line_error(res, *needles, code=130, start="interrupted")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """extract has no --threads option; keep every forward pass of this module on one core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def base_state(img_size: int = 64) -> dict[str, torch.Tensor]:
    return load_backbone(MODEL, img_size=img_size).model.state_dict()


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def two_epoch_run(fmnist_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-epoch run (1 head-only epoch, 1 with the default --unfreeze: the last
    two blocks), every checkpoint kept."""
    out = tmp_path_factory.mktemp("ft_a") / "tuned.pt"
    finetune_ok(fmnist_src, "-o", out, "--model", MODEL, "--epochs", "2", "--head-epochs", "1",
                "--keep-checkpoints", "0", "-q", *FAST)
    return out


def test_short_finetune_lowers_loss_and_stage1_keeps_backbone_bit_identical(fmnist_src: Path,
                                                                            tmp_path: Path):
    out = tmp_path / "tuned.pt"
    # the recipe before the natural-set study: one stage, the best epoch, no EMA, BatchNorm
    # statistics updated (what this test checks is the staging, not the defaults)
    res = finetune_ok(fmnist_src, "-o", out, "--epochs", "3", "--head-epochs", "2",
                      "--unfreeze", "1", "--keep", "best", "--ema", "0", "--bn-train",
                      "--keep-checkpoints", "0", *FAST)
    assert "epoch 1/3 stage 1" in res.stderr and "epoch 3/3 stage 2" in res.stderr
    history = json.loads((tmp_path / "tuned.history.json").read_text())["history"]
    losses = [h["train_loss"] for h in history]
    assert [h["stage"] for h in history] == [1, 1, 2]
    assert losses[1] < losses[0] and losses[2] < losses[0], losses

    base = base_state()
    initial = build_model(load_backbone(MODEL, img_size=64), 10, 0, 0.2).classifier.state_dict()
    after_stage1 = ckpt(tmp_path / "tuned.checkpoints" / "epoch-002.pt")["model"]
    # stage 1: every backbone tensor (weights and BatchNorm buffers) is bit-identical ...
    assert all(torch.equal(base[k], after_stage1[k]) for k in base)
    # ... while the new classifier moved away from its initialisation
    assert not torch.equal(initial["weight"], after_stage1["classifier.weight"])
    assert after_stage1["classifier.weight"].shape == (10, 1280)

    # stage 2 (--unfreeze 1): the last block and conv_head/bn2 trained, nothing shallower did
    after_stage2 = ckpt(tmp_path / "tuned.checkpoints" / "epoch-003.pt")["model"]
    trained = {k for k in base if not torch.equal(base[k], after_stage2[k])}
    assert any(k.startswith("blocks.6.") for k in trained)
    assert any(k.startswith("conv_head.") for k in trained)
    assert all(k.startswith(("blocks.6.", "conv_head.", "bn2.")) for k in trained), trained

    # the output: the backbone of the best epoch, keyed exactly like timm's num_classes=0 model
    tuned = torch.load(out, weights_only=True)
    assert list(tuned) == list(base)
    manifest = json.loads((tmp_path / "tuned.json").read_text())
    best = manifest["best_epoch"]
    best_state = ckpt(tmp_path / "tuned.checkpoints" / f"epoch-{best:03d}.pt")["model"]
    assert all(torch.equal(tuned[k], best_state[k]) for k in tuned)
    assert manifest["weights_sha256"] == file_sha256(out)
    assert manifest["model"] == MODEL and len(manifest["classes"]) == 10
    assert manifest["base_weights"]["source"].startswith("bundled:")
    assert manifest["data_config"]["input_size"] == [3, 64, 64]
    assert manifest["best_val_accuracy"] == max(h["val_accuracy"] for h in history)
    assert sum(manifest["data"]["val_per_class"].values()) == 10  # stratified 0.2 of 60
    assert set(manifest["versions"]) >= {"torch", "timm", "embedpipe"}
    assert (tmp_path / "tuned.curves.png").stat().st_size > 1000
    clf = torch.load(tmp_path / "tuned.classifier.pt", weights_only=True)
    assert torch.equal(clf["weight"], best_state["classifier.weight"])


def test_resume_from_epoch1_checkpoint_equals_uninterrupted_run(fmnist_src: Path,
                                                                two_epoch_run: Path,
                                                                tmp_path: Path):
    first = two_epoch_run.parent / "tuned.checkpoints" / "epoch-001.pt"
    out = tmp_path / "resumed.pt"
    res = finetune_ok(fmnist_src, "-o", out, "--model", MODEL, "--epochs", "2",
                      "--head-epochs", "1", "--keep-checkpoints", "0", "--resume", first, *FAST)
    assert "resuming from" in res.stderr and "epoch 1/2" not in res.stderr
    a = ckpt(two_epoch_run.parent / "tuned.checkpoints" / "epoch-002.pt")
    b = ckpt(tmp_path / "resumed.checkpoints" / "epoch-002.pt")
    # CPU, deterministic algorithms, one thread, workers 0, every RNG reseeded per epoch:
    # bit-exact (atol 0), for the model, the optimizer state and the history alike
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 2
    for i in sa:
        for name in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][name]), torch.as_tensor(sb[i][name]))
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")}  # noqa: E731
                       for r in h]
    assert strip(a["history"]) == strip(b["history"])
    ta, tb = torch.load(two_epoch_run, weights_only=True), torch.load(out, weights_only=True)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert file_sha256(two_epoch_run) == file_sha256(out)
    # the record of the training images: the same bytes, and the same in the epoch-2
    # checkpoints (which hold their epoch's record: the backbone trained in epoch 2)
    rec_a = two_epoch_run.with_name("tuned.train-hashes").read_bytes()
    assert tmp_path.joinpath("resumed.train-hashes").read_bytes() == rec_a
    ma, mb = (json.loads(p.with_suffix(".json").read_text()) for p in (two_epoch_run, out))
    assert ma["train_hashes_sha256"] == mb["train_hashes_sha256"]
    assert ma["train_hashes_images"] == mb["train_hashes_images"] == len(rec_a.split()) > 0
    assert mb["train_hashes_file"] == "resumed.train-hashes"
    assert torch.equal(a["train_hashes"], b["train_hashes"])
    assert [bytes(r).hex() for r in a["train_hashes"].numpy()] == rec_a.decode().split()
    assert ckpt(first)["train_hashes"].shape == (0, 32)  # head-only: the bundled base's, none


def test_resume_folder_skips_corrupt_newest_checkpoints(fmnist_src: Path, two_epoch_run: Path,
                                                        tmp_path: Path):
    """--resume FOLDER whose two newest checkpoints cannot be read (one cut off, one empty)
    goes back to the newest readable one, saying in one line (even with -q) which files it
    skipped and why, and the one it resumes from (it once said one note per skipped file);
    the continuation equals the uninterrupted run. With no readable checkpoint left: one error
    line naming the folder, nothing written."""
    folder = tmp_path / "copied.checkpoints"
    shutil.copytree(two_epoch_run.parent / "tuned.checkpoints", folder)
    second = folder / "epoch-002.pt"
    second.write_bytes(second.read_bytes()[:second.stat().st_size // 3])
    (folder / "epoch-003.pt").write_bytes(b"")  # e.g. a run killed as it began writing
    out = tmp_path / "resumed.pt"
    args = ["--model", MODEL, "--epochs", "2", "--head-epochs", "1", "--keep-checkpoints", "0",
            "-q", *FAST]
    res = finetune_ok(fmnist_src, "-o", out, "--resume", folder, *args)
    notes = [ln for ln in res.stderr.splitlines() if "skipped" in ln]
    assert notes == [(f"note: --resume {folder}: skipped epoch-003.pt (the file is empty (0 "
                      "bytes)) and epoch-002.pt (the file is cut off or corrupt: an incomplete "
                      "zip archive, e.g. an interrupted copy); resuming from epoch-001.pt, the "
                      "newest readable checkpoint")], res.stderr
    assert file_sha256(out) == file_sha256(two_epoch_run)

    (folder / "epoch-001.pt").write_bytes(b"")
    res = cli("finetune", fmnist_src, "-o", tmp_path / "again.pt", "--resume", folder, *args)
    one_line_error(res, f"--resume {folder}: none of its 3 checkpoint(s) can be read",
                   "the newest, epoch-003.pt: the file is empty", "leave out --resume")
    assert not (tmp_path / "again.pt").exists()


def test_reextraction_with_tuned_weights_is_a_new_store_with_other_features(
        fmnist_src: Path, two_epoch_run: Path, tmp_path: Path):
    common = ["--img-size", "64", "--precision", "fp32", "--workers", "0", "-q"]
    base_h5, tuned_h5 = tmp_path / "base.h5", tmp_path / "tuned.h5"
    assert cli("extract", fmnist_src, "-o", base_h5, *common).exit_code == 0
    res = cli("extract", fmnist_src, "-o", tuned_h5, "--model", MODEL, "--weights",
              two_epoch_run, *common)
    assert res.exit_code == 0, res.output
    base, tuned = open_store(base_h5), open_store(tuned_h5)
    sha = file_sha256(two_epoch_run)
    assert tuned.meta["weights_sha256"] == sha
    assert tuned.meta["weights_source"] == f"file:{two_epoch_run.resolve()}"
    assert json.loads((two_epoch_run.parent / "tuned.json").read_text())["weights_sha256"] == sha
    assert base.meta["weights_sha256"] != sha and base.meta["weights_source"].startswith("bundled:")
    assert tuned.meta["model"] == base.meta["model"] == MODEL
    fb, ft = dict(zip(base.paths, base.features)), dict(zip(tuned.paths, tuned.features))
    assert fb.keys() == ft.keys() and len(fb) == 60
    diff = np.array([np.abs(fb[p] - ft[p]).max() for p in fb])
    assert (diff > 1e-3).all(), diff.min()
    # the tuned weights never go into the base store
    res = cli("extract", fmnist_src, "-o", base_h5, "--weights", two_epoch_run, *common)
    one_line_error(res)
    # without --img-size, extraction uses the resolution recorded in the fine-tune manifest;
    # with another --model, the manifest names the right one
    plain = tmp_path / "plain.h5"
    res = cli("extract", fmnist_src, "-o", plain, "--weights", two_epoch_run, *common[2:])
    assert res.exit_code == 0, res.output
    cfg = open_store(plain).meta["data_config"]
    assert cfg["input_size"] == [3, 64, 64]
    np.testing.assert_allclose(open_store(plain).features, tuned.features, atol=1e-5)
    one_line_error(cli("extract", fmnist_src, "-o", tmp_path / "r.h5", "--model", "resnet18",
                       "--weights", two_epoch_run, *common), "--model " + MODEL)


def test_bad_files_are_skipped_and_options_run(fmnist_src: Path, tmp_path: Path):
    """A truncated and an empty image are skipped with their reasons; --gradual, --randaugment,
    --cutmix and --class-weight balanced run (on split folders with their own val/)."""
    data = tmp_path / "data"
    classes = sorted(p.name for p in fmnist_src.iterdir())
    for c in classes:
        files = sorted((fmnist_src / c).iterdir())
        for split, chunk in (("train", files[:4]), ("val", files[4:]), ("test", files[5:])):
            (data / split / c).mkdir(parents=True, exist_ok=True)
            for f in chunk:
                shutil.copy(f, data / split / c / f.name)
    good = sorted((data / "train" / classes[0]).iterdir())[0].read_bytes()
    (data / "train" / classes[1] / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "train" / classes[2] / "empty.png").write_bytes(b"")
    out = tmp_path / "tuned.pt"
    res = finetune_ok(data, "-o", out, "--epochs", "3", "--head-epochs", "1", "--unfreeze", "2",
                      "--gradual", "--randaugment", "--cutmix", "--class-weight", "balanced",
                      *FAST)
    assert f"skipped train/{classes[1]}/truncated.png: truncated or corrupt" in res.stderr
    assert f"skipped train/{classes[2]}/empty.png: empty file" in res.stderr
    assert "data's own val split (20 images)" in res.stderr
    assert "10 in split test" in res.stderr
    manifest = json.loads((tmp_path / "tuned.json").read_text())
    assert manifest["data"]["skipped"] == 2
    assert sum(manifest["data"]["train_per_class"].values()) == 40
    assert [h["unfrozen_stages"] for h in manifest_history(tmp_path)] == [0, 1, 2]


def manifest_history(folder: Path) -> list[dict]:
    return json.loads((folder / "tuned.history.json").read_text())["history"]


def test_bad_inputs_give_one_line_errors(fmnist_src: Path, two_epoch_run: Path,
                                         tmp_path: Path):
    out = tmp_path / "t.pt"
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(cli("finetune", empty, "-o", out, "-q"), str(empty), "no images found")

    one_class = tmp_path / "one"
    shutil.copytree(fmnist_src / "bag", one_class / "bag")
    one_line_error(cli("finetune", one_class, "-o", out, "-q", *FAST), "one class (bag)",
                   "at least two")

    few = tmp_path / "few"
    shutil.copytree(fmnist_src, few)
    for f in sorted((few / "sandal").iterdir())[1:]:
        f.unlink()
    one_line_error(cli("finetune", few, "-o", out, "-q", *FAST), "class 'sandal' has 1 usable",
                   "--val-fraction 0")

    broken = tmp_path / "broken"  # a class whose every image fails: refused, not dropped
    shutil.copytree(fmnist_src, broken)
    (broken / "zzz").mkdir()
    for name in ("a.png", "b.png"):
        (broken / "zzz" / name).write_bytes(next((broken / "bag").iterdir()).read_bytes()[:100])
    one_line_error(cli("finetune", broken, "-o", out, "-q", *FAST),
                   "class 'zzz' has no training image that decodes (e.g. zzz/a.png: truncated")

    one_line_error(cli("finetune", fmnist_src, "-o", out, "--model", "resnet_nope", "-q"),
                   "resnet_nope: not a timm model name")
    one_line_error(cli("finetune", fmnist_src, "-o", out, "--unfreeze", "9", "-q", *FAST),
                   "--unfreeze 9", "7 feature stages", "pass 0 to 7")
    one_line_error(cli("finetune", fmnist_src, "-o", out, "--epochs", "0", "-q"), "--epochs 0")
    one_line_error(cli("finetune", fmnist_src, "-o", out, "--keep", "worst", "-q"),
                   "--keep worst", "best or last")
    one_line_error(cli("finetune", fmnist_src, "-o", out, "--ema", "1.5", "-q"), "--ema 1.5")
    one_line_error(cli("finetune", fmnist_src, "-o", out, "--val-fraction", "1.5", "-q"),
                   "--val-fraction 1.5")
    one_line_error(cli("finetune", fmnist_src, "-o", tmp_path / "t.txt", "-q"), ".pt or .pth")
    one_line_error(cli("finetune", fmnist_src, "-o", out, "--resume", tmp_path / "nope.pt",
                       "-q"), "nope.pt", "no such checkpoint")
    one_line_error(cli("finetune", fmnist_src, "-o", out, "--resume", two_epoch_run, "-q"),
                   "a bare state dict", "--weights PATH instead of --resume")
    first = two_epoch_run.parent / "tuned.checkpoints" / "epoch-001.pt"
    one_line_error(cli("finetune", fmnist_src, "-o", out, "--model", MODEL, "--epochs", "2",
                       "--head-epochs", "1", "--seed", "1", "--resume", first, "-q", *FAST),
                   "from another run", "seed 0 vs 1")
    one_line_error(cli("finetune", fmnist_src, "-o", two_epoch_run, "-q"), "exists",
                   "--resume", "--overwrite")


def test_stage_split_and_schedules():
    class Flat(torch.nn.Module):  # no stage container, no feature_info: cannot be split
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 2)

        def get_classifier(self):
            return self.fc

    with pytest.raises(FinetuneError, match="--unfreeze 0"):
        feature_stages(Flat(), "flat")
    import timm

    resnet = timm.create_model("resnet18", num_classes=3)
    split = feature_stages(resnet, "resnet18")
    assert split.names == ["layer1", "layer2", "layer3", "layer4"]
    assert split.head == ["fc.weight", "fc.bias"]
    assert all(n.startswith("layer4.") for n in split.trainable(1) - set(split.head))

    o = FinetuneOptions(epochs=8, head_epochs=2, unfreeze=3, gradual=True, stage_epochs=2)
    assert [unfrozen_at(e, o) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    f = WarmupCosine([10, 30], warmup=4)
    lr = [f(s) for s in range(30)]
    assert lr[0] < lr[3] < lr[4] == 1.0 and lr[9] < 0.1  # warmup, peak, cosine (stage 1)
    assert lr[10] < lr[14] == 1.0 and lr[29] == pytest.approx(0.01)  # again in stage 2


def test_outputs_never_overwrite_an_input(fmnist_src: Path, tmp_path: Path):
    """-o naming the base weights (or a link to them): one line before any work, the weights
    unchanged (the same check covers DATA and the resumed checkpoint, and each file written
    beside the weights: manifest, history, classifier, curves)."""
    import os

    weights = tmp_path / "base.pt"
    weights.write_bytes(b"not really weights")
    os.symlink(weights, tmp_path / "link.pt")
    for out in (weights, tmp_path / "link.pt"):
        one_line_error(cli("finetune", fmnist_src, "--weights", weights, "-o", out, "-q"),
                       "-o", "input")
    assert weights.read_bytes() == b"not really weights"


def test_budget_stops_at_an_epoch_boundary_with_valid_outputs_and_resume_finishes_exactly(
        fmnist_src: Path, two_epoch_run: Path, tmp_path: Path):
    """--budget far below one epoch's CPU time: the first epoch still runs (one per call at
    least), the run stops at the next boundary, the outputs are the best epoch so far with the
    manifest saying the budget stopped it; --resume without a budget then finishes the run with
    the same tensors as an uninterrupted one (the budget is not part of the fingerprint)."""
    out = tmp_path / "tuned.pt"
    args = ["-o", out, "--model", MODEL, "--epochs", "2", "--head-epochs", "1",
            "--keep-checkpoints", "0", *FAST]
    res = finetune_ok(fmnist_src, *args, "--budget", "0.001")
    assert "stopped by --budget" in res.stdout and "--budget 0.001:" in res.stderr
    manifest = json.loads((tmp_path / "tuned.json").read_text())
    assert manifest["stopped_by_budget"] is True and manifest["stopped_early"] is False
    assert manifest["epochs_run"] == 1 and manifest["best_epoch"] == 1
    assert manifest["budget"]["cpu_seconds"] == 0.001 and manifest["budget"]["stopped"] is True
    assert manifest["weights_sha256"] == file_sha256(out)
    history = manifest_history(tmp_path)
    assert len(history) == 1 and history[0]["cpu_seconds"] > 0
    assert manifest["budget"]["used"] >= history[0]["cpu_seconds"]
    assert sorted(p.name for p in (tmp_path / "tuned.checkpoints").iterdir()) == ["epoch-001.pt"]
    tuned = torch.load(out, weights_only=True)
    assert list(tuned) == list(base_state())  # a valid headless state dict

    res = finetune_ok(fmnist_src, *args, "--resume", tmp_path / "tuned.checkpoints")
    assert "resuming from" in res.stderr and "epoch 2/2" in res.stderr
    manifest = json.loads((tmp_path / "tuned.json").read_text())
    assert manifest["stopped_by_budget"] is False and manifest["budget"] is None
    assert manifest["epochs_run"] == 2
    a = ckpt(two_epoch_run.parent / "tuned.checkpoints" / "epoch-002.pt")["model"]
    b = ckpt(tmp_path / "tuned.checkpoints" / "epoch-002.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert file_sha256(two_epoch_run) == file_sha256(out)
    one_line_error(cli("finetune", fmnist_src, "-o", tmp_path / "x.pt", "--budget", "-5", "-q"),
                   "--budget -5", "> 0")
    one_line_error(cli("finetune", fmnist_src, "-o", tmp_path / "x.pt", "--budget", "soon",
                       "-q"), "--budget")


def test_ema_of_the_weights_is_validated_saved_and_resumed_exactly(fmnist_src: Path,
                                                                   tmp_path: Path):
    from embedpipe.finetune.loop import EMA

    # the update rule, by hand: d = min(decay, (1 + n) / (10 + n)); integer buffers copied
    lin = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(lin, 0.5)
    start = {k: v.clone() for k, v in lin.state_dict().items()}
    with torch.no_grad():
        lin[0].weight.add_(1.0)
        lin[1].num_batches_tracked.fill_(7)
    ema.update(lin)  # n = 0: d = min(0.5, 0.1) = 0.1
    assert torch.allclose(ema.state["0.weight"], start["0.weight"] + 0.9)
    assert int(ema.state["1.num_batches_tracked"]) == 7
    ema.update(lin)  # n = 1: d = min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.state["0.weight"],
                          d * (start["0.weight"] + 0.9) + (1 - d) * (start["0.weight"] + 1))

    a, b = tmp_path / "a" / "tuned.pt", tmp_path / "b" / "tuned.pt"
    args = ["--model", MODEL, "--epochs", "2", "--head-epochs", "1", "--ema", "0.9",
            "--keep-checkpoints", "0", *FAST]
    finetune_ok(fmnist_src, "-o", a, *args, "-q")
    history = manifest_history(a.parent)
    assert all(r["val_accuracy_ema"] is not None and r["kept"] in ("ema", "trained")
               for r in history)
    manifest = json.loads((a.parent / "tuned.json").read_text())
    best = manifest["best_epoch"]
    c = ckpt(a.parent / "tuned.checkpoints" / f"epoch-{best:03d}.pt")
    assert c["ema"]["updates"] > 0
    # stage 2 moved the trained weights away from their average
    last = ckpt(a.parent / "tuned.checkpoints" / "epoch-002.pt")
    assert not torch.equal(last["ema"]["state"]["blocks.6.0.conv_pw.weight"],
                           last["model"]["blocks.6.0.conv_pw.weight"])
    kept = history[best - 1]["kept"]
    assert manifest["best_weights"] == kept
    source = c["ema"]["state"] if kept == "ema" else c["model"]
    tuned = torch.load(a, weights_only=True)
    assert all(torch.equal(tuned[k], source[k]) for k in tuned)
    clf = torch.load(a.parent / "tuned.classifier.pt", weights_only=True)
    assert torch.equal(clf["weight"], source["classifier.weight"])
    expected_acc = history[best - 1]["val_accuracy_ema" if kept == "ema" else "val_accuracy"]
    assert manifest["best_val_accuracy"] == expected_acc

    # stopped by the budget after epoch 1, resumed: the EMA continues exactly
    finetune_ok(fmnist_src, "-o", b, *args, "--budget", "0.001", "-q")
    finetune_ok(fmnist_src, "-o", b, *args, "--resume", b.parent / "tuned.checkpoints", "-q")
    ea = ckpt(a.parent / "tuned.checkpoints" / "epoch-002.pt")["ema"]
    eb = ckpt(b.parent / "tuned.checkpoints" / "epoch-002.pt")["ema"]
    assert ea["updates"] == eb["updates"]
    assert all(torch.equal(ea["state"][k], eb["state"][k]) for k in ea["state"])
    assert file_sha256(a) == file_sha256(b)


def test_default_recipe_trains_two_stages_with_batchnorm_statistics_frozen(two_epoch_run: Path):
    """The defaults (--unfreeze 2, --bn-frozen): blocks 5 and 6 train, every BatchNorm keeps
    the pretrained running statistics while its scale and shift train; the output is the last
    epoch (--keep last) and the manifest says which weights (EMA or trained) it holds."""
    base = base_state()
    after = ckpt(two_epoch_run.parent / "tuned.checkpoints" / "epoch-002.pt")["model"]
    trained = {k for k in base if not torch.equal(base[k], after[k])}
    assert any(k.startswith("blocks.5.") for k in trained)
    assert any(k.startswith("blocks.6.") for k in trained)
    assert all(k.startswith(("blocks.5.", "blocks.6.", "conv_head.", "bn2.")) for k in trained)
    assert "blocks.5.0.bn1.weight" in trained and "bn2.weight" in trained
    assert not {k for k in trained if k.endswith(("running_mean", "running_var",
                                                    "num_batches_tracked"))}
    manifest = json.loads((two_epoch_run.parent / "tuned.json").read_text())
    assert manifest["best_epoch"] == manifest["epochs_run"] == 2
    assert manifest["best_weights"] in ("ema", "trained")
    assert manifest["options"]["keep"] == "last" and manifest["options"]["bn_frozen"] is True


def test_a_checkpoint_from_before_ema_bn_frozen_and_keep_resumes_with_their_old_values(
        fmnist_src: Path, two_epoch_run: Path, tmp_path: Path):
    old = ckpt(two_epoch_run.parent / "tuned.checkpoints" / "epoch-001.pt")
    for k in ("ema", "bn_frozen", "keep"):
        del old["fingerprint"][k]
    old["ema"] = None
    path = tmp_path / "old.pt"
    torch.save(old, path)
    args = [fmnist_src, "-o", tmp_path / "t.pt", "--model", MODEL, "--epochs", "2",
            "--head-epochs", "1", "--resume", path, *FAST]
    one_line_error(cli("finetune", *args, "-q"), "from another run", "bn_frozen False vs True")
    res = finetune_ok(*args, "--ema", "0", "--bn-train", "--keep", "best")
    assert "resuming from" in res.stderr and "epoch 2/2" in res.stderr


# slow: ~21 s; test_ctrl_c_in_epoch_1_leaves_nothing_behind_and_in_epoch_2_names_the_checkpoint
# stays in the default job
@pytest.mark.slow
def test_ctrl_c_names_only_a_checkpoint_on_disk_and_overwrite_keeps_the_old_run_until_the_new_one_has_one(
        fmnist_src: Path, two_epoch_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Ctrl-C (KeyboardInterrupt) at the start of an --overwrite run leaves the earlier run's
    checkpoints resumable (they were deleted at start-up before); Ctrl-C while a checkpoint is
    being written names the one before it, which exists (the hint used to name the one being
    written, sometimes never written). The new run's first checkpoint replaces the old ones."""
    import embedpipe.finetune.loop as loop

    run = tmp_path / "run"
    shutil.copytree(two_epoch_run.parent, run)
    out, ckdir = run / "tuned.pt", run / "tuned.checkpoints"
    old = sorted(p.name for p in ckdir.glob("epoch-*.pt"))
    assert old == ["epoch-001.pt", "epoch-002.pt"]
    args = [fmnist_src, "-o", out, "--model", MODEL, "--epochs", "3", "--head-epochs", "1",
            "--keep-checkpoints", "0", "--overwrite", "-q", *FAST]

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loop, "_train_epoch", interrupt)
        line = interrupted_line(cli("finetune", *args), "nothing to resume")
    assert "--resume" not in line
    assert sorted(p.name for p in ckdir.glob("epoch-*.pt")) == old  # still the earlier run's
    # Ctrl-C while the new run's epoch-001.pt is written: the earlier run's file of that name
    # is not this run's checkpoint, so it is not named either
    from embedpipe.finetune import checkpoint

    def interrupt_checkpoints(obj, path):
        if path.parent == ckdir:
            raise KeyboardInterrupt
        return real_atomic_save(obj, path)

    real_atomic_save = checkpoint._atomic_save
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_atomic_save", interrupt_checkpoints)
        interrupted_line(cli("finetune", *args), "nothing to resume")
    assert sorted(p.name for p in ckdir.glob("epoch-*.pt")) == old
    finetune_ok(fmnist_src, "-o", tmp_path / "check.pt", "--model", MODEL, "--epochs", "2",
                "--head-epochs", "1", "--resume", ckdir / "epoch-001.pt", *FAST)

    real_save = loop._save_checkpoint

    def save_then_interrupt_at_epoch_2(path, *a, **k):
        if path.name == "epoch-002.pt":
            raise KeyboardInterrupt  # before the file exists
        return real_save(path, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(loop, "_save_checkpoint", save_then_interrupt_at_epoch_2)
        line = interrupted_line(cli("finetune", *args), "--resume")
    named = Path(line.rsplit("--resume ", 1)[1])
    assert named.name == "epoch-001.pt" and named.exists()
    # the new run's epoch 1 replaced the earlier run's checkpoints
    assert sorted(p.name for p in ckdir.glob("epoch-*.pt")) == ["epoch-001.pt"]
    assert torch.load(named, weights_only=False)["fingerprint"]["epochs"] == 3
    resumed = [*args[:-len(FAST) - 2], "-q", "--resume", named, *FAST]
    with monkeypatch.context() as m:  # Ctrl-C before the resumed run's first new checkpoint
        m.setattr(loop, "_train_epoch", interrupt)
        assert interrupted_line(cli("finetune", *resumed)) == (
            "interrupted before a new checkpoint was written; rerun the same command (it "
            f"resumes from {named} again)")
    finetune_ok(*resumed)
    manifest = json.loads((run / "tuned.json").read_text())
    history = json.loads((run / "tuned.history.json").read_text())
    rows = history["history"]
    assert len(rows) == 3  # epoch 1 from the interrupted call, 2-3 from the resumed one
    assert manifest["epochs_cpu_seconds"] == pytest.approx(
        sum(r["cpu_seconds"] for r in rows), abs=0.11)
    assert manifest["epochs_cpu_seconds"] > manifest["cpu_seconds"] - 60


def test_head_epochs_covering_the_run_says_the_backbone_will_not_change(fmnist_src: Path,
                                                                         tmp_path: Path):
    res = finetune_ok(fmnist_src, "-o", tmp_path / "t.pt", "--epochs", "1", "--head-epochs",
                      "1", "-q", *FAST)
    notes = [ln for ln in res.stderr.splitlines() if ln.startswith("note: --head-epochs 1")]
    assert len(notes) == 1 and "backbone" in notes[0]
    base = load_backbone().model.state_dict()
    tuned = torch.load(tmp_path / "t.pt", weights_only=True)
    assert all(torch.equal(base[k], tuned[k]) for k in base)  # what the note says


# `embedpipe finetune` held inside epoch $EMBEDPIPE_TEST_HOLD_EPOCH, after its first batch,
# until Ctrl-C; "held" on stderr says when (the loader workers are running then).
_HELD_IN_EPOCH = r"""
import os, sys, time
import embedpipe.finetune.loop as loop
label = "epoch " + os.environ["EMBEDPIPE_TEST_HOLD_EPOCH"] + "/"
class Held(loop.Progress):
    def update(self, n):
        super().update(n)
        if self.label.startswith(label):
            print("held", file=sys.stderr, flush=True)
            while True:
                time.sleep(0.05)
loop.Progress = Held
from embedpipe.cli import main
main()
"""


def ctrl_c_in_epoch(epoch: int, *args: object) -> str:
    """`embedpipe finetune ARGS` in its own process group, sent SIGINT inside ``epoch`` as a
    terminal's Ctrl-C is (to the main process and its loader workers); its stderr after the
    hold, once it exited 130 with nothing on stdout."""
    proc = subprocess.Popen([sys.executable, "-c", _HELD_IN_EPOCH, "finetune", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            env={**os.environ, "EMBEDPIPE_TEST_HOLD_EPOCH": str(epoch)})
    try:
        before = []
        for line in proc.stderr:
            if line == "held\n":
                break
            before.append(line)
        else:
            pytest.fail(f"never reached epoch {epoch}: {''.join(before)}")
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and stdout == "", (proc.returncode, stdout, stderr)
    return stderr


def test_ctrl_c_in_epoch_1_leaves_nothing_behind_and_in_epoch_2_names_the_checkpoint(
        fmnist_src: Path, tmp_path: Path):
    """Ctrl-C before the first checkpoint: one line, exit 130, the folders this run made are
    gone (the user's own empty folder stays) and the same command then runs from the start;
    Ctrl-C after it: the checkpoint stays and the line says how to --resume, which finishes."""
    mine = tmp_path / "mine"  # the user's, empty: never removed
    mine.mkdir()
    out = mine / "runs" / "a" / "tuned.pt"
    args = [fmnist_src, "-o", out, "--model", MODEL, "--epochs", "2", "--head-epochs", "1",
            "--keep-checkpoints", "0", "-q", *FAST, "--workers", "1"]
    assert ctrl_c_in_epoch(1, *args) == ("interrupted before the first checkpoint of this run "
                                         "was written; nothing to resume: rerun the same "
                                         "command\n")
    assert mine.is_dir() and list(mine.iterdir()) == []

    first = out.parent / "tuned.checkpoints" / "epoch-001.pt"
    assert ctrl_c_in_epoch(2, *args) == ("interrupted; the last checkpoint is epoch-001.pt: "
                                         "continue with the same command plus --resume "
                                         f"{first}\n")
    assert sorted(p.name for p in first.parent.iterdir()) == ["epoch-001.pt"]
    assert not out.exists()
    finetune_ok(*args, "--resume", first)
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["epochs_run"] == 2 and len(manifest_history(out.parent)) == 2
    assert manifest["weights_sha256"] == file_sha256(out)


RESUME_FIX = ("pass a file from <output>.checkpoints/ (epoch-NNN.pt) written by `embedpipe "
              "finetune`, or leave out --resume to start afresh")
PICKLED = ("a torch file of pickled Python objects besides tensors, such as a whole saved model "
           "or a checkpoint holding objects other than its settings, which is not loaded for "
           "safety")
WEIGHTS_NOT_RESUME = "start a new run from its weights with --weights PATH instead of --resume"


def _timm_train_checkpoint(path: Path) -> None:
    """What timm's train.py (its CheckpointSaver) writes: the arguments are a Namespace."""
    import argparse

    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": {"fc.bias": torch.zeros(2)},
                "optimizer": {}, "version": 2, "args": argparse.Namespace(lr=0.1),
                "metric": 0.5}, path)


def _not_torch_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")


def _newer_format(path: Path, real: Path) -> None:
    saved = ckpt(real)
    saved["format"] = "embedpipe-finetune-checkpoint/2"
    torch.save(saved, path)


@pytest.mark.parametrize("make, what, fix", [
    (lambda p, real, tuned: p.write_bytes(real.read_bytes()[:real.stat().st_size // 2]),
     "the file is cut off or corrupt: an incomplete zip archive, e.g. an interrupted copy",
     RESUME_FIX),
    (lambda p, real, tuned: p.write_bytes(b""), "the file is empty (0 bytes)", RESUME_FIX),
    (lambda p, real, tuned: p.write_bytes(np.random.default_rng(0).bytes(4096)),
     "not a torch file but text or other data", RESUME_FIX),
    (lambda p, real, tuned: _not_torch_zip(p), "a zip archive that torch.save did not write",
     RESUME_FIX),
    (lambda p, real, tuned: p.write_bytes(pickle.dumps({"epoch": 3})),
     "not a torch file but a Python pickle", RESUME_FIX),
    (lambda p, real, tuned: torch.save(torch.nn.Linear(2, 2), p), PICKLED, RESUME_FIX),
    (lambda p, real, tuned: _timm_train_checkpoint(p),
     ("another tool's checkpoint holding model weights (keys: arch, args, epoch, metric, "
      "optimizer, …; e.g. timm's train.py), not an `embedpipe finetune` checkpoint"),
     WEIGHTS_NOT_RESUME),
    (lambda p, real, tuned: torch.save({"epoch": 3, "arch": "resnet18", "state_dict": {}}, p),
     ("another tool's file (keys: arch, epoch, state_dict), not an `embedpipe finetune` "
      "checkpoint"), RESUME_FIX),
    (lambda p, real, tuned: torch.save([1, 2], p),
     "it holds a list, not an `embedpipe finetune` checkpoint", RESUME_FIX),
    (lambda p, real, tuned: shutil.copy(tuned, p),
     ("a bare state dict (model weights only, such as a `finetune -o` output), not a "
      "training checkpoint"),
     ("pass a file from <output>.checkpoints/, or start a new run from these weights with "
      "--weights PATH instead of --resume")),
    (lambda p, real, tuned: _newer_format(p, real),
     ("a checkpoint of format embedpipe-finetune-checkpoint/2, which this embedpipe does not "
      "read (it reads embedpipe-finetune-checkpoint/1)"),
     ("resume it with the embedpipe version that wrote it, or leave out --resume to start "
      "afresh")),
], ids=["truncated", "empty", "random-bytes", "zip-not-torch", "python-pickle", "whole-model",
        "timm-train-checkpoint", "timm-weights-dict", "list", "bare-state-dict",
        "newer-format"])
def test_a_bad_resume_file_is_one_plain_line(make, what: str, fix: str, fmnist_src: Path,
                                             two_epoch_run: Path, tmp_path: Path):
    bad = tmp_path / "epoch-001.pt"
    make(bad, two_epoch_run.parent / "tuned.checkpoints" / "epoch-001.pt", two_epoch_run)
    res = cli("finetune", fmnist_src, "-o", tmp_path / "new" / "t.pt", "--resume", bad,
              "--model", MODEL, "--epochs", "2", "--head-epochs", "1", *FAST)
    assert res.exit_code == 2 and res.stdout == "", res.output
    assert res.stderr == f"error: --resume {bad}: {what}; {fix}\n"
    assert not (tmp_path / "new").exists()  # the folder made for -o went again


def test_bad_weights_outputs_and_options_are_refused_before_any_epoch(
        fmnist_src: Path, two_epoch_run: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch):
    """Each in one line, exit 2, before an epoch runs, with no folder left behind for -o."""
    out = tmp_path / "new" / "deeper" / "t.pt"

    def refused(*args: object, to: Path = out) -> str:
        line = one_line_error(cli("finetune", fmnist_src, "-o", to, "-q", *FAST, *args))
        assert "Traceback" not in line and not (tmp_path / "new").exists()
        return line

    cut = tmp_path / "cut.pt"
    cut.write_bytes(two_epoch_run.read_bytes()[:1000])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    store = tmp_path / "store.h5"  # a store passed as weights (an attack's finding 17)
    import h5py
    with h5py.File(store, "w") as f:
        f["features"] = np.zeros((2, 3), np.float32)
    fix = "pass a state dict saved with torch.save(model.state_dict()) or a .safetensors file"
    for weights, what in ((cut, ("the file is cut off or corrupt: an incomplete zip archive, "
                                 "e.g. an interrupted copy")),
                          (empty, "the file is empty (0 bytes)"),
                          (store, "an HDF5 file (an embedpipe feature store?), not weights"),
                          (noise, "not a torch file but text or other data")):
        assert refused("--weights", weights) == (f"error: {weights}: cannot read weights: "
                                                 f"{what}; {fix}")
    assert refused("--weights", tmp_path) == (f"error: {tmp_path} is a folder, not a weights "
                                              "file; pass --weights with an existing "
                                              ".pth/.pt/.safetensors file")

    assert "--img-size 0 is too small" in refused("--img-size", "0")
    assert "--img-size 1000000: one 1000000x1000000 image does not fit in memory" in refused(
        "--img-size", "1000000")
    assert "--batch-size 1: pass 2 or more" in refused("--batch-size", "1")
    assert "--warmup-epochs inf: pass 0 or more" in refused("--warmup-epochs", "inf")
    assert "--max-pixels 0: pass a positive number" in refused("--max-pixels", "0")

    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    assert refused(to=blocker / "t.pt") == (f"error: -o {blocker / 't.pt'}: {blocker} is a "
                                            "file, not a folder; pass a path in a folder")
    (tmp_path / "x.checkpoints").write_text("mine")
    assert "x.checkpoints (its checkpoint folder) is a file" in refused(to=tmp_path / "x.pt")
    (tmp_path / "y.json").mkdir()
    assert "y.json (written beside it) is a folder" in refused(to=tmp_path / "y.pt")
    if Path("/sys").is_dir():  # sysfs: nobody creates files there, root included
        assert "-o /sys/t.pt: cannot write" in refused(to=Path("/sys/t.pt"))

    from embedpipe.finetune import loop

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 9663676416 bytes.")

    monkeypatch.setattr(loop, "_train_epoch", no_memory)
    assert refused() == ("error: out of memory while training with --batch-size 16; pass a "
                         "smaller --batch-size or --img-size")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_timm_train_checkpoints_load_as_weights(fmnist_src: Path, tmp_path: Path):
    """A checkpoint as timm's train.py saves it (CheckpointSaver: ``state_dict`` keyed with
    DDP's ``module.`` prefix, ``args`` an argparse.Namespace, ``optimizer``, ``epoch``...) was
    refused as "pickled Python objects"; it loads as --weights, with weights_only=True and
    Namespace allowed (as timm's own loader does), taking the entry timm's load_state_dict
    takes: ``state_dict_ema`` when present, else ``state_dict``. A Namespace carrying code is
    still refused. Stage 1 only (head epochs), so the tuned backbone is the loaded one."""
    import argparse
    from collections import OrderedDict

    base = load_backbone(MODEL, with_classifier=True).model.state_dict()
    args = argparse.Namespace(model=MODEL, lr=0.1, epochs=3, aa="rand-m9-mstd0.5", smoothing=0.1,
                              betas=(0.9, 0.999), img_size=None, model_ema=True,
                              data_dir="/data/imagenet")
    trained = OrderedDict((f"module.{k}", v) for k, v in base.items())
    ck = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": MODEL, "state_dict": trained, "version": 2,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
                "args": args, "metric": 61.2}, ck)
    with pytest.raises(pickle.UnpicklingError):  # what a plain weights_only load says
        torch.load(ck, weights_only=True)
    common = ["--model", MODEL, "--epochs", "1", "--head-epochs", "1", "-q", *FAST]
    out = tmp_path / "a.pt"
    finetune_ok(fmnist_src, "-o", out, "--weights", ck, *common)
    tuned = torch.load(out, weights_only=True)
    assert tuned and all(torch.equal(v, base[k]) for k, v in tuned.items())
    manifest = json.loads((tmp_path / "a.json").read_text())
    assert manifest["base_weights"]["sha256"] == file_sha256(ck)

    ema = {k: v * 0.5 if k == "conv_stem.weight" else v for k, v in base.items()}
    with_ema = tmp_path / "last.pth.tar"
    torch.save({"epoch": 3, "state_dict": trained, "state_dict_ema": ema, "args": args},
               with_ema)
    finetune_ok(fmnist_src, "-o", tmp_path / "b.pt", "--weights", with_ema, *common)
    tuned = torch.load(tmp_path / "b.pt", weights_only=True)
    assert torch.equal(tuned["conv_stem.weight"], base["conv_stem.weight"] * 0.5)

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": base, "args": argparse.Namespace(hook=_Payload(marker))}, evil)
    one_line_error(cli("finetune", fmnist_src, "-o", tmp_path / "c.pt", "--weights", evil,
                       "--model", MODEL, "-q", *FAST), str(evil), "not loaded for safety")
    assert not marker.exists()


def test_a_batch_too_big_for_memory_is_refused_before_any_epoch(fmnist_src: Path,
                                                                tmp_path: Path):
    """--img-size 2048 passes the one-image probe (inference, ~1.5 GiB) but a training batch of
    50 such images needs far more memory than any machine here has (~120 GiB: measured on
    the model's shapes, nothing allocated): refused in one line before any epoch, with the
    largest batch size and input size that fit. It used to start and be OOM-killed."""
    from clitools import EMBEDPIPE, run

    out = tmp_path / "big.pt"
    res = run(*EMBEDPIPE, "finetune", fmnist_src, "-o", out, "--img-size", "2048",
              "--batch-size", "64", "--workers", "0", "-q")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and res.stdout == "", res.stderr
    line = lines[0]
    assert line.startswith("error: --img-size 2048 with --batch-size 64 (batches of 50, all "
                           "the training images): a training step needs about "), line
    need, avail = (float(x) for x in re.findall(r"([0-9.]+) GiB", line)[:2])
    assert need > avail and "is available (" in line
    sizes = [int(x) for x in re.findall(r"--img-size (\d+) or less", line)]
    batches = [int(x) for x in re.findall(r"--batch-size (\d+) or less", line)]
    assert sizes or batches, line
    assert all(s < 2048 and s % 32 == 0 for s in sizes), line
    assert all(2 <= b < 50 for b in batches), line
    assert not out.exists() and not (tmp_path / "big.checkpoints").exists()


@pytest.mark.parametrize("size", [4096, 8192])
def test_an_absurd_img_size_is_refused_without_a_real_forward(fmnist_src: Path, tmp_path: Path,
                                                              size: int):
    """The memory checks (the one-image probe, backbones.feature_dim, and finetune's
    check_fits) run on the meta device, before any real forward at the asked size: one real
    4096 px image used to take ~7 GB (and could be OOM-killed on a small machine) before the
    refusal. The CLI process's peak RSS (ru_maxrss of the children) stays far below that."""
    from clitools import run_measured

    out = tmp_path / "big.pt"
    res, peak_kib = run_measured("finetune", fmnist_src, "-o", out, "--epochs", "2",
                                 "--head-epochs", "1", "--threads", "1", "--workers", "0",
                                 "--img-size", str(size), "-q")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: --img-size {size}"), lines[0]
    need, avail = (float(x) for x in re.findall(r"([0-9.]+) GiB", lines[0])[:2])
    assert need > avail, lines[0]
    assert peak_kib < 2 * 2 ** 20, f"peak RSS {peak_kib / 2 ** 20:.2f} GiB"
    assert not out.exists() and not (tmp_path / "big.checkpoints").exists()


def test_a_checkpoint_extracts_at_its_trained_size_from_the_entry_it_kept(
        fmnist_src: Path, two_epoch_run: Path, tmp_path: Path):
    """`predict CHECKPOINT` suggests `extract DATA --weights CHECKPOINT`; that extract takes the
    run's input size (64 px, from the checkpoint's fingerprint, as a final .pt takes it from its
    manifest), says in one line which entry (model or EMA) it used, and its features are those
    of that entry's weights."""
    from clitools import EMBEDPIPE, run

    ckpt_path = two_epoch_run.parent / "tuned.checkpoints" / "epoch-002.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    kept = ckpt["history"][-1].get("kept", "trained")
    entry = "EMA" if kept == "ema" else "model"
    state = ckpt["ema"]["state"] if kept == "ema" else ckpt["model"]

    store = tmp_path / "some.h5"
    ok = run(*EMBEDPIPE, "extract", fmnist_src, "-o", store, "--img-size", "64", "-q")
    assert ok.returncode == 0, ok.stderr
    res = run(*EMBEDPIPE, "predict", ckpt_path, "--store", store)
    assert res.returncode == 2, res.stderr
    m = re.search(r"`(embedpipe extract DATA [^`]*)`", res.stderr)
    assert m, res.stderr
    suggested = m.group(1).split()
    assert suggested[suggested.index("--weights") + 1] == str(ckpt_path), res.stderr
    assert "--img-size" not in suggested

    out = tmp_path / "ckpt.h5"
    args = [fmnist_src if a == "DATA" else out if a == "STORE.h5" else a for a in suggested[2:]]
    res = run(*EMBEDPIPE, "extract", *args, "--runtime", "torch", "--precision", "fp32")
    assert res.returncode == 0, res.stderr
    said = [ln for ln in res.stderr.splitlines() if ln.startswith("weights: ")]
    assert len(said) == 1 and f"epoch-002.pt's {entry} entry" in said[0], res.stderr
    got = open_store(out)
    assert got.meta["data_config"]["input_size"] == [3, 64, 64]
    # the same images through that entry's weights saved alone (headless) at 64 px
    alone, ref_h5 = tmp_path / "entry.pt", tmp_path / "entry.h5"
    torch.save({k: v for k, v in state.items() if not k.startswith("classifier.")}, alone)
    res = run(*EMBEDPIPE, "extract", fmnist_src, "-o", ref_h5, "--weights", alone,
              "--img-size", "64", "--runtime", "torch", "--precision", "fp32", "-q")
    assert res.returncode == 0, res.stderr
    ref = open_store(ref_h5)
    fg, fr = dict(zip(got.paths, got.features)), dict(zip(ref.paths, ref.features))
    assert fg.keys() == fr.keys() and len(fg) == 60
    np.testing.assert_allclose(np.stack([fg[k] for k in fr]), np.stack(list(fr.values())),
                               atol=1e-5)


def test_the_files_beside_a_run_passed_as_weights_name_the_runs_weights_file(
        fmnist_src: Path, two_epoch_run: Path, tmp_path: Path):
    """`extract --weights RUN.classifier.pt` got "weights do not fit ... (294 of 294 tensors
    missing)"; the classifier, the manifest, the history, the curves and the checkpoint folder
    of a finetune run now each say what they are and the run's weights file to pass. A
    classifier file copied away from its run (no manifest to name it) is told from its two
    tensors. Nothing is written."""
    run_dir = two_epoch_run.parent
    lone = tmp_path / "lone.pt"
    lone.write_bytes((run_dir / "tuned.classifier.pt").read_bytes())
    out = tmp_path / "x.h5"
    cases = [
        ("tuned.classifier.pt", ("is the new classifier (the weight and bias of its 10-class "
                                 "layer) that `embedpipe finetune` saved beside its tuned "
                                 "backbone")),
        ("tuned.json", "is the manifest of an `embedpipe finetune` run"),
        ("tuned.history.json", "is the training history of an `embedpipe finetune` run"),
        ("tuned.checkpoints", "is the checkpoint folder of an `embedpipe finetune` run"),
        ("tuned.train-hashes", "is the record of the images an `embedpipe finetune` run "
                               "trained on"),
    ]
    for name, what in cases:
        res = cli("extract", fmnist_src, "--weights", run_dir / name, "-o", out, "-q")
        one_line_error(res, f"{run_dir / name} {what}, not backbone weights",
                       f"pass --weights {two_epoch_run}")
        assert not out.exists()
    res = cli("extract", fmnist_src, "--weights", lone, "-o", out, "-q")
    one_line_error(res, f"{lone} holds only one layer's weight and bias",
                   "<run>.classifier.pt", "not backbone weights")
    assert not out.exists()


@pytest.mark.slow  # ~20 s of fine-tuning
def test_a_library_caller_is_told_the_checkpoint_entry_in_notes_and_the_cli_says_it(
        fmnist_src: Path, two_epoch_run: Path, tmp_path: Path):
    """The "weights: epoch-002.pt's ... entry" line was printed from inside
    backbones.load_backbone, so a script using embedpipe's API got it on stderr. The library
    now prints nothing (the fact is in Backbone.notes and the store records the entry); the
    CLI says it once, as before, -q or not."""
    from clitools import EMBEDPIPE, run

    ckpt = two_epoch_run.parent / "tuned.checkpoints" / "epoch-002.pt"
    script = ("import sys, embedpipe\n"
              "from embedpipe.backbones import load_backbone\n"
              "bb = load_backbone(sys.argv[4], weights=sys.argv[3])\n"
              "print(repr(bb.notes))\n"
              "embedpipe.extract(sys.argv[1], sys.argv[2], model=sys.argv[4], weights=sys.argv[3],"
              " runtime='torch', precision='fp32', workers=0)\n")
    lib = tmp_path / "lib.h5"
    res = run(sys.executable, "-c", script, fmnist_src, lib, ckpt, MODEL)
    assert res.returncode == 0, res.stderr
    assert "weights: " not in res.stderr, res.stderr
    notes = ast.literal_eval(res.stdout.strip().splitlines()[-1])
    assert len(notes) == 1 and notes[0].startswith("weights: epoch-002.pt's "), notes
    assert len(open_store(lib)) == 60

    res = run(*EMBEDPIPE, "extract", fmnist_src, "-o", tmp_path / "cli.h5", "--model", MODEL,
              "--weights", ckpt, "--runtime", "torch", "--precision", "fp32", "--workers", "0",
              "-q")
    assert res.returncode == 0, res.stderr
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("weights: ")] == notes


# -- the record of what a run trained on, and the accuracies over those images ---------------

SEEN = "are images the backbone of"


def seen_notes(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if SEEN in ln]


@pytest.fixture(scope="module")
def split_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data with train/ (4 per class) and test/ (2 per class) folders, a 2-epoch finetune on
    it (the backbone trains in the second), the store of the whole folder extracted with the
    tuned weights)."""
    from embedpipe.datasets import write_fashion_mnist_folder

    root = tmp_path_factory.mktemp("ft_seen")
    data = write_fashion_mnist_folder(root / "data", splits={"train": 4, "test": 2})
    out = root / "run" / "tuned.pt"
    finetune_ok(data, "-o", out, "--model", MODEL, "--epochs", "2", "--head-epochs", "1",
                "--keep-checkpoints", "0", "-q", *FAST)
    store = root / "tuned.h5"
    res = cli("extract", data, "-o", store, "--weights", out, "--precision", "fp32",
              "--workers", "0", "-q")
    assert res.exit_code == 0, res.output
    return data, out, store


def test_finetune_records_its_training_images_and_cv_fit_predict_say_when_they_are_scored(
        split_run: tuple[Path, Path, Path], tmp_path: Path):
    """finetune writes RUN.train-hashes (sha256 of each training image, validation images
    excluded), extract copies it into the store, and cv (text and --json), fit and
    predict --store count the scored rows the backbone was trained on, exactly; a split it did
    not train on (test) and a store of the base weights get no note."""
    import hashlib

    data, out, store = split_run
    manifest = json.loads(out.with_suffix(".json").read_text())
    side = out.parent / manifest["train_hashes_file"]
    assert side.name == "tuned.train-hashes"
    record = side.read_text().split()
    n_train = sum(manifest["data"]["train_per_class"].values())
    n_val = sum(manifest["data"]["val_per_class"].values())
    assert n_train == 30 and n_val == 10  # 4 per class, a stratified fifth (1 each) validates
    assert record == sorted(set(record)) and len(record) == n_train
    assert manifest["train_hashes_images"] == n_train
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.rglob("*.png")}
    train = {h for p, h in digest.items() if "train" in p.relative_to(data).parts}
    test = {h for p, h in digest.items() if "test" in p.relative_to(data).parts}
    assert set(record) < train and not set(record) & test

    s = open_store(store)
    assert s.finetune_hashes is not None and sorted(s.finetune_hashes.astype(str)) == record
    assert int(s.finetuned_rows(np.arange(len(s))).sum()) == 30
    # info shows the record and how many rows of each split it covers (helper-38's F5)
    res = cli("info", store)
    assert res.exit_code == 0, res.output
    assert ("tuned on   30 images (the run's record); rows among them: test=0 of 20, "
            "train=30 of 40 (accuracies over those overrate the model)") in res.output, res.output
    res = cli("info", store, "--json")
    assert json.loads(res.stdout)["finetuned_on"] == {"images": 30,
                                                      "rows": {"test": 0, "train": 30}}

    js = tmp_path / "cv.json"
    res = cli("cv", store, "--head", "logreg", "--folds", "2", "--json", js, "-q")
    assert res.exit_code == 0, res.output
    said = seen_notes(res.stderr)
    assert len(said) == 1 and said[0].startswith(f"note: 30 of the 40 cross-validated rows "
                                                 f"{SEEN} {store} was fine-tuned on"), res.stderr
    assert "'test' split instead" in said[0] and "--split test" in said[0]
    assert json.loads(js.read_text())["finetuned_rows"] == {"cross_validated": 30,
                                                           "heldout": {"test": 0}}

    head = tmp_path / "h.skops"
    res = cli("fit", store, "--head", "logreg", "-o", head, "-q")  # said even with -q
    assert res.exit_code == 0, res.output
    said = seen_notes(res.stderr)
    assert len(said) == 1 and said[0].startswith("note: 30 of the 40 training rows"), res.stderr

    # the library: the cv report counts them, fit warns
    import embedpipe

    assert embedpipe.cv(store, "logreg", folds=2).finetuned_rows == {
        "cross_validated": 30, "heldout": {"test": 0}}
    with pytest.warns(UserWarning, match="^note: 30 of the 40 training rows"):
        embedpipe.fit(store, "logreg")

    res = cli("predict", head, "--store", store, "-q")
    assert res.exit_code == 0, res.output
    said = seen_notes(res.stderr)
    assert len(said) == 1 and said[0].startswith("note: 30 of the 60 labeled rows scored"), \
        res.stderr
    res = cli("predict", head, "--store", store, "--split", "test", "-q")
    assert res.exit_code == 0, res.output
    assert seen_notes(res.stderr) == [] and "accuracy" in res.output, res.output
    # from images: the line names the head (its store is a temporary file) and images
    res = cli("predict", head, data / "train", "-q")
    assert res.exit_code == 0, res.output
    said = seen_notes(res.stderr)
    assert said == [f"note: 30 of the 40 labeled images scored are images the backbone of "
                    f"{head} was fine-tuned on (`embedpipe finetune`), so the accuracy over them "
                    "overrates the model; predict images finetune did not see"], res.stderr

    # the base weights' store of the same images: nothing recorded, nothing said
    base = tmp_path / "base.h5"
    res = cli("extract", data, "-o", base, "--img-size", "64", "--precision", "fp32",
              "--workers", "0", "-q")
    assert res.exit_code == 0, res.output
    assert open_store(base).finetune_hashes is None
    js = tmp_path / "base.json"
    res = cli("cv", base, "--head", "logreg", "--folds", "2", "--json", js, "-q")
    assert res.exit_code == 0, res.output
    assert seen_notes(res.stderr) == [] and seen_notes(res.output) == []
    assert json.loads(js.read_text())["finetuned_rows"]["cross_validated"] == 0

    # compare: per store
    js = tmp_path / "cmp.json"
    res = cli("compare", base, store, "--head", "logreg", "--folds", "2", "--json", js, "-q")
    assert res.exit_code == 0, res.output
    said = seen_notes(res.stderr)
    assert len(said) == 1 and said[0].startswith("note: 30 of the 40 common cross-validated "
                                                 f"rows {SEEN} {store}"), res.stderr
    assert [x["finetuned_rows"] for x in json.loads(js.read_text())["stores"]] == [0, 30]


def test_the_record_survives_shards_merge_prune_and_a_moved_run(
        split_run: tuple[Path, Path, Path], tmp_path: Path):
    """Shard stores of the tuned weights each carry the record, their merge keeps it (cv says
    30 again), a store rewritten by --prune keeps it, a checkpoint's store has it; weights whose
    record is gone extract with one note saying so, and their store has none."""
    data, out, store = split_run
    want = sorted(out.with_name("tuned.train-hashes").read_text().split())
    common = ["--weights", out, "--precision", "fp32", "--workers", "0", "-q"]
    shards = [tmp_path / f"s{k}.h5" for k in range(2)]
    for k, sh in enumerate(shards):
        res = cli("extract", data, "-o", sh, "--shard", f"{k}/2", *common)
        assert res.exit_code == 0, res.output
        assert sorted(open_store(sh).finetune_hashes.astype(str)) == want
    merged = tmp_path / "merged.h5"
    res = cli("merge", *shards, "-o", merged)
    assert res.exit_code == 0, res.output
    m = open_store(merged)
    assert len(m) == 60 and sorted(m.finetune_hashes.astype(str)) == want
    res = cli("cv", merged, "--head", "logreg", "--folds", "2", "-q")
    assert res.exit_code == 0, res.output
    assert [ln.split(" of the")[0] for ln in seen_notes(res.stderr)] == ["note: 30"]

    # an incremental re-extraction that prunes a vanished file rewrites the store: kept
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    pruned = tmp_path / "pruned.h5"
    assert cli("extract", copy, "-o", pruned, *common).exit_code == 0
    next(iter(sorted((copy / "test").rglob("*.png")))).unlink()
    res = cli("extract", copy, "-o", pruned, "--prune", *common)
    assert res.exit_code == 0, res.output
    p = open_store(pruned)
    assert len(p) == 59 and sorted(p.finetune_hashes.astype(str)) == want
    # a store written before stores kept the record gets it at its next extract (no new file)
    import h5py

    with h5py.File(pruned, "r+") as f:
        del f["finetune_train_hash"]
    assert open_store(pruned).finetune_hashes is None
    assert cli("extract", copy, "-o", pruned, *common).exit_code == 0
    p = open_store(pruned)
    assert len(p) == 59 and sorted(p.finetune_hashes.astype(str)) == want

    # a checkpoint holds its epoch's record: epoch 2 trained the backbone (the run's record),
    # epoch 1 only the classifier (the base's: bundled weights, none), even moved away
    ckdir = tmp_path / "checkpoints"
    shutil.copytree(out.parent / "tuned.checkpoints", ckdir)
    for name, record in (("epoch-002.pt", want), ("epoch-001.pt", [])):
        ck = tmp_path / f"{name}.h5"
        res = cli("extract", data, "-o", ck, "--weights", ckdir / name, *common[2:])
        assert res.exit_code == 0, res.output
        assert "tuned.train-hashes" not in res.stderr, res.stderr
        assert sorted(open_store(ck).finetune_hashes.astype(str)) == record

    # the run's weights moved without their record: one note, no record in the store
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("tuned.pt", "tuned.json"):
        shutil.copy(out.parent / name, moved / name)
    lone = tmp_path / "lone.h5"
    res = cli("extract", data, "-o", lone, "--weights", moved / "tuned.pt", *common[2:])
    assert res.exit_code == 0, res.output
    notes = [ln for ln in res.stderr.splitlines() if "tuned.train-hashes" in ln]
    assert len(notes) == 1 and notes[0].startswith("note: tuned.train-hashes, the record of "
                                                   "the images tuned.pt was fine-tuned on"), \
        res.stderr
    assert open_store(lone).finetune_hashes is None


def _record_of(path: Path) -> list[str]:
    return path.with_name(path.stem + ".train-hashes").read_text().split()


def test_a_run_keeping_its_best_epoch_records_the_images_of_that_epochs_backbone(
        split_run, tmp_path, monkeypatch):
    """--keep best that keeps the head-only epoch 1 (validation forced to favour it: 1.0 while
    the backbone is frozen, 0.0 once it trains): the kept backbone is the base's, so the run
    records none of its images, says so in one note, and the store's cv and info say nothing
    is tuned. Epoch 2's checkpoint, whose backbone trained, still records the 30 images, and
    cv over its store says so."""
    from embedpipe.finetune import loop

    data, _, _ = split_run
    real = loop._evaluate

    def favour_the_frozen_backbone(model, *args):
        real(model, *args)
        frozen = not any(p.requires_grad for n, p in model.named_parameters()
                         if not n.startswith("classifier."))
        return {"accuracy": 1.0, "loss": 0.5} if frozen else {"accuracy": 0.0, "loss": 9.0}

    monkeypatch.setattr(loop, "_evaluate", favour_the_frozen_backbone)
    out = tmp_path / "best.pt"
    res = finetune_ok(data, "-o", out, "--model", MODEL, "--epochs", "2", "--head-epochs",
                      "1", "--keep", "best", "--keep-checkpoints", "0", "-q", *FAST)
    monkeypatch.undo()
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["best_epoch"] == 1 and manifest["epochs_run"] == 2
    assert _record_of(out) == [] and manifest["train_hashes_images"] == 0
    assert [ln for ln in res.stderr.splitlines() if "kept weights" in ln] == [
        "note: the kept weights are epoch 1's (--keep best chose it over the later epochs), "
        "from before the backbone is unfrozen at epoch 2: the backbone is the base model's, "
        "byte for byte, so best.train-hashes records none of this run's images"]
    base = load_backbone(MODEL).model.state_dict()
    tuned = torch.load(out, weights_only=True)
    assert tuned.keys() == base.keys() and all(torch.equal(tuned[k], base[k]) for k in base)

    own = sorted(_record_of(split_run[1]))  # the same 30 training images as split_run's
    common = ["--precision", "fp32", "--workers", "0", "-q"]
    for weights, record in ((out, []), (out.parent / "best.checkpoints" / "epoch-001.pt", []),
                            (out.parent / "best.checkpoints" / "epoch-002.pt", own)):
        store = tmp_path / f"{weights.name}.h5"
        res = cli("extract", data, "-o", store, "--weights", weights, *common)
        assert res.exit_code == 0, res.output
        assert sorted(open_store(store).finetune_hashes.astype(str)) == record
        js = tmp_path / f"{weights.name}.json"
        res = cli("cv", store, "--head", "logreg", "--folds", "2", "--json", js, "-q")
        assert res.exit_code == 0, res.output
        seen = json.loads(js.read_text())["finetuned_rows"]["cross_validated"]
        assert seen == (30 if record else 0), (weights, res.stderr)
        assert len(seen_notes(res.stderr)) == (1 if record else 0), res.stderr
    info = cli("info", tmp_path / "best.pt.h5")
    assert ("tuned on   0 images (the run's record: its backbone did not train, so no row's "
            "accuracy is overrated)") in info.output, info.output


def test_a_run_stopped_by_its_budget_before_the_backbone_trained_keeps_the_bases_record(
        split_run, tmp_path):
    """--budget that stops a chained run (base: split_run's tuned weights) after its head-only
    first epoch: the output is the base backbone byte for byte, its record and its checkpoint's
    are the base's (not this run's images), a note says why and how to go on, and cv over a
    store of this run's images says nothing is tuned."""
    from embedpipe.datasets import write_fashion_mnist_folder

    _, base_run, _ = split_run
    other = write_fashion_mnist_folder(tmp_path / "other", per_class=4, split="train")
    out = tmp_path / "stopped.pt"
    res = finetune_ok(other, "-o", out, "--model", MODEL, "--weights", base_run, "--epochs",
                      "2", "--head-epochs", "1", "--budget", "0.001", "-q", *FAST)
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["stopped_by_budget"] and manifest["epochs_run"] == 1
    assert out.read_bytes() == base_run.read_bytes()  # the backbone did not move
    base = _record_of(base_run)
    assert len(base) == 30 and _record_of(out) == base
    ckpt = out.parent / "stopped.checkpoints" / "epoch-001.pt"
    assert [ln for ln in res.stderr.splitlines() if "kept weights" in ln] == [
        "note: the kept weights are epoch 1's (the run stopped before the backbone trained), "
        "from before the backbone is unfrozen at epoch 2: the backbone is the base model's, "
        "byte for byte, so stopped.train-hashes records none of this run's images; continue "
        f"with --resume {ckpt} to fine-tune it"]
    for weights in (out, ckpt):
        store = tmp_path / f"{weights.name}.h5"
        res = cli("extract", other, "-o", store, "--weights", weights, "--precision", "fp32",
                  "--workers", "0", "-q")
        assert res.exit_code == 0, res.output
        assert sorted(open_store(store).finetune_hashes.astype(str)) == base
        res = cli("cv", store, "--head", "logreg", "--folds", "2")
        assert res.exit_code == 0, res.output
        assert seen_notes(res.output) == []  # other/'s images: no backbone trained on them


def _parquet_or_skip(fmt: str) -> None:
    if fmt == "parquet":
        pytest.importorskip("pyarrow")


@pytest.mark.parametrize("fmt", ["npz", "parquet"])
def test_the_record_survives_export_and_import_of_the_features(split_run, tmp_path, fmt):
    """export-features → import-features keeps the record and each row's image hash (F6: the
    imported store lost /finetune_train_hash, and cv no longer said 30 of its rows were seen
    by the backbone): cv's finetuned_rows and info's finetuned_on equal the original's."""
    _parquet_or_skip(fmt)
    _, out, store = split_run
    f = tmp_path / f"feats.{fmt}"
    res = cli("export-features", store, "-o", f, "-q")
    assert res.exit_code == 0, res.output
    assert res.stderr == ""  # nothing lost, nothing to say
    imported = tmp_path / "imported.h5"
    res = cli("import-features", f, "-o", imported)
    assert res.exit_code == 0, res.output
    assert "fine-tuning record: 30 images" in res.stderr, res.stderr
    want = sorted(out.with_name("tuned.train-hashes").read_text().split())
    assert sorted(open_store(imported).finetune_hashes.astype(str)) == want
    assert open_store(imported).hashes == open_store(store).hashes

    def finetuned(path: Path) -> tuple[dict, dict]:
        js = tmp_path / f"{path.stem}.cv.json"
        res = cli("cv", path, "--head", "logreg", "--folds", "2", "--json", js, "-q")
        assert res.exit_code == 0, res.output
        info = cli("info", path, "--json")
        assert info.exit_code == 0, info.output
        return (json.loads(js.read_text())["finetuned_rows"],
                json.loads(info.stdout)["finetuned_on"])

    rows, tuned_on = finetuned(imported)
    assert (rows, tuned_on) == finetuned(store)
    assert rows == {"cross_validated": 30, "heldout": {"test": 0}}
    assert tuned_on == {"images": 30, "rows": {"test": 0, "train": 30}}
    res = cli("cv", imported, "--head", "logreg", "--folds", "2", "-q")
    said = seen_notes(res.stderr)
    assert len(said) == 1 and said[0].startswith(
        f"note: 30 of the 40 cross-validated rows {SEEN} {imported}"), res.stderr


def test_an_npy_export_says_it_loses_the_record_and_its_import_has_none(split_run, tmp_path):
    """.npy (one structured array) cannot hold the record: export says so in one line, even
    with -q, naming the formats that can; the imported store has no record (none invented),
    and its cv and info say nothing about fine-tuned rows."""
    _, _, store = split_run
    f = tmp_path / "feats.npy"
    res = cli("export-features", store, "-o", f, "-q")
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == [
        f"note: feats.npy cannot hold the record of the 30 images the backbone of {store} was "
        "fine-tuned on, so a store imported from it will not say which rows an accuracy "
        "overrates; export to .npz or .parquet to keep it"]
    imported = tmp_path / "imported.h5"
    res = cli("import-features", f, "-o", imported, "-q")
    assert res.exit_code == 0, res.output
    s = open_store(imported)
    assert s.finetune_hashes is None and s.hashes == open_store(store).hashes
    assert json.loads(cli("info", imported, "--json").stdout)["finetuned_on"] is None
    js = tmp_path / "cv.json"
    res = cli("cv", imported, "--head", "logreg", "--folds", "2", "--json", js, "-q")
    assert res.exit_code == 0, res.output
    assert seen_notes(res.stderr) == []
    assert json.loads(js.read_text())["finetuned_rows"]["cross_validated"] == 0


def test_a_run_that_trains_only_the_classifier_records_none_of_its_images(split_run, tmp_path):
    """--head-epochs >= --epochs trains only the new classifier: the backbone's weights stay
    the base's, byte for byte, so its features are the base's and its images are not in the
    record (helper-38's F9: the same weights carried two records, and cv said the rows
    overrated the model). A chained run on top of a fine-tuned base keeps the base's record."""
    from embedpipe.datasets import write_fashion_mnist_folder

    _, base_run, _ = split_run
    other = write_fashion_mnist_folder(tmp_path / "other", per_class=4, split="train")
    out = tmp_path / "head-only.pt"
    finetune_ok(other, "-o", out, "--model", MODEL, "--weights", base_run, "--epochs", "1",
                "--head-epochs", "1", "--keep-checkpoints", "0", "-q", *FAST)
    assert out.read_bytes() == base_run.read_bytes()  # the backbone did not move
    base = base_run.with_name(base_run.stem + ".train-hashes").read_text().split()
    assert out.with_name(out.stem + ".train-hashes").read_text().split() == base
    store = tmp_path / "head-only.h5"
    res = cli("extract", other, "-o", store, "--weights", out, "--precision", "fp32",
              "--workers", "0", "-q")
    assert res.exit_code == 0, res.output
    res = cli("cv", store, "--head", "logreg", "--folds", "2")
    assert res.exit_code == 0, res.output
    assert seen_notes(res.output) == []  # other/'s images: the backbone never trained on them
