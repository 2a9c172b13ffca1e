from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from clitools import ok

from embedpipe.datasets import write_fashion_mnist_folder

# OpenVINO runs in this long-lived test process too (`--runtime auto` picks it on this CPU):
# the process used to die of SIGSEGV later, while it waited on a subprocess, until the runtime
# kept one openvino.Core per process (extract/runtime.py: openvino_core).

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


@pytest.fixture
def store_copy(fmnist_store: Path, tmp_path: Path) -> Path:
    """A copy of the session's store that a test may change or destroy."""
    dst = tmp_path / "copy.h5"
    shutil.copyfile(fmnist_store, dst)
    return dst


@pytest.fixture(scope="session")
def lite0_head(fmnist_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("head") / "centroid.skops"
    ok("fit", fmnist_store, "--head", "centroid", "-o", out, "-q")
    return out
