from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from clitools import ok

from embedpipe.datasets import write_fashion_mnist_folder

# Many tests start `embedpipe` subprocesses from a test process that has also loaded torch and
# OpenVINO in-process (other tests extract). CPython 3.11 starts subprocesses with vfork, and
# after that mix of native runtimes the vfork child segfaulted in pthread_sigmask (seen with
# gdb, in _posixsubprocess.subprocess_fork_exec): fork + exec instead, for the tests only
# (CPython's documented switch; the product starts no subprocess on these paths).
if hasattr(subprocess, "_USE_VFORK"):
    subprocess._USE_VFORK = False

# `--runtime auto` picks OpenVINO on this CPU. With OpenVINO loaded in the long-lived pytest
# process, that process later died of SIGSEGV while it waited on a subprocess (reproducible:
# test_api + test_artifacts + test_audit; gone with openvino blocked; cause not found). So in
# this process `auto` means torch, unless a store already holds OpenVINO's bf16 features;
# subprocess runs of `embedpipe` keep the real `auto`, and tests/test_runtime.py (run in a
# pytest process of its own, see the README's test command) tests OpenVINO explicitly.
def _torch_in_this_process() -> None:
    from embedpipe.extract import runtime
    from embedpipe.provenance import OV_BF16

    real = runtime.choose_runtime

    def choose(name: str, device_type: str, precision: str, *, stored: str | None = None,
               **kw):
        if name == "auto" and stored != OV_BF16:
            name = "torch"
        return real(name, device_type, precision, stored=stored, **kw)

    runtime.choose_runtime = choose


if os.environ.get("EMBEDPIPE_TEST_OPENVINO_IN_PROCESS") != "1":
    _torch_in_this_process()

# Keep the suite honest about the offline promise: nothing may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A shell without job control starts a background command (`bash .ci/run &`, nohup) with
# SIGINT ignored, and the CLI processes the tests start inherit that, so the tests that press
# Ctrl-C would see it ignored (as such a user asked). They test what a terminal user gets.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def fmnist_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 real Fashion-MNIST test images (6 per class) in class folders; copy before changing."""
    return write_fashion_mnist_folder(tmp_path_factory.mktemp("fmnist") / "data", per_class=6)


@pytest.fixture
def fmnist(fmnist_src: Path, tmp_path: Path) -> Path:
    """A private, writable copy of ``fmnist_src``."""
    dst = tmp_path / "data"
    shutil.copytree(fmnist_src, dst)
    return dst


@pytest.fixture(scope="session")
def fmnist_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real feature store (read-only: copy it before changing it): 250 Fashion-MNIST test
    images in split folders, 20 per class in ``train`` and 5 per class in ``test``, extracted
    in fp32 with the bundled pretrained EfficientNet-Lite0."""
    from embedpipe.extract import ExtractOptions, run

    root = tmp_path_factory.mktemp("fmnist_store")
    src = write_fashion_mnist_folder(root / "data", splits={"train": 20, "test": 5})
    out = root / "fmnist.h5"
    summary = run(src, out, ExtractOptions(precision="fp32"), progress=False)
    assert summary.extracted == 250 and not summary.failed, summary.line()
    os.chmod(out, 0o444)
    return out


@pytest.fixture(scope="session")
def lite0_head(fmnist_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("head") / "centroid.skops"
    ok("fit", fmnist_store, "--head", "centroid", "-o", out, "-q")
    return out
