"""`extract --engine ray` on a local Ray cluster (started by the CLI on loopback, 2 CPUs), with
real Fashion-MNIST images, the bundled pretrained backbone and two undecodable files.

The tests that start Ray clusters are marked `ray` and `slow` (each starts a cluster and loads
the backbone in every actor: 2-5 minutes together on 2 busy cores); run them with
`python -m pytest -m ray tests/test_ray.py` after `pip install -e '.[dev,ray]'`. The checks
that need no cluster run in the default suite, with or without Ray installed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from embedpipe.cli import app
from embedpipe.datasets import write_fashion_mnist_folder
from embedpipe.store import open_store

EMBEDPIPE = [sys.executable, "-m", "embedpipe.cli"]
BAD = {"bag/bad.jpg": "not an image (cannot identify format)",
       "coat/empty.png": "empty file (0 bytes)"}


@pytest.fixture(scope="module")
def ray_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 real Fashion-MNIST images (4 per class) plus a junk .jpg and an empty .png."""
    root = write_fashion_mnist_folder(tmp_path_factory.mktemp("raydata") / "data", per_class=4)
    (root / "bag" / "bad.jpg").write_bytes(b"this is not a jpeg")
    (root / "coat" / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def reference(ray_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same images extracted by the default in-process engine (fp32)."""
    from embedpipe.extract import ExtractOptions, run

    out = tmp_path_factory.mktemp("rayref") / "inproc.h5"
    summary = run(ray_data, out, ExtractOptions(precision="fp32"), progress=False)
    assert summary.extracted == 40 and summary.failed == 2, summary.line()
    return out


def ray_extract(data: Path, out: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([*EMBEDPIPE, "extract", str(data), "-o", str(out), "--engine",
                             "ray", "--address", "local", "--precision", "fp32", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def assert_same_store(got: Path, want: Path) -> None:
    a, b = open_store(want), open_store(got)
    assert sorted(b.paths) == sorted(a.paths) and len(set(b.paths)) == len(b.paths) == 40
    fa, fb = dict(zip(a.paths, a.features)), dict(zip(b.paths, b.features))
    for p in a.paths:
        np.testing.assert_allclose(fb[p], fa[p], rtol=1e-4, atol=1e-4, err_msg=p)
    assert dict(zip(b.paths, b.label_names())) == dict(zip(a.paths, a.label_names()))
    assert dict(zip(b.paths, b.hashes)) == dict(zip(a.paths, a.hashes))
    assert sorted(b.errors) == sorted(a.errors) == sorted(BAD.items())
    assert b.identity == a.identity


def committed_rows(store: Path) -> int:
    try:
        return len(open_store(store, features=False))
    except Exception:  # noqa: BLE001 - not created yet, or being replaced
        return 0


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parent.items() if p in frontier} - found
        found |= frontier
    return found


def embed_actors(driver: int) -> list[int]:
    """The backbone actors (Ray process title ``ray::MapWorker(MapBatches(Embedder))...``)
    of the local cluster started by the ``driver`` process."""
    pids = []
    for pid in descendants(driver):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::MapWorker(MapBatches(Embedder"):
                    pids.append(pid)
        except OSError:
            pass
    return pids


@pytest.mark.ray
@pytest.mark.slow
def test_ray_engine_matches_the_in_process_engine(ray_data: Path, reference: Path,
                                                  tmp_path: Path):
    pytest.importorskip("ray")
    out = tmp_path / "ray.h5"
    code, stdout, stderr = finish(ray_extract(ray_data, out, "--workers", "2"))
    assert code == 0, stderr
    assert "40 extracted" in stdout and "2 failed" in stdout, stdout
    assert "Traceback" not in stderr
    for path, reason in BAD.items():
        assert f"skipped {path}: {reason}" in stderr
    assert "extract (ray)" in stderr  # progress
    assert_same_store(out, reference)
    shards = sorted((tmp_path / "ray.h5.shards").glob("shard-*.h5"))
    assert len(shards) == 2 and sum(len(open_store(s)) for s in shards) == 40
    # the merged store reads like any store
    res = CliRunner().invoke(app, ["info", str(out), "--json"])
    assert res.exit_code == 0 and '"rows": 40' in res.output
    # a rerun finds every shard finished: nothing extracted, Ray not even started, the
    # store not rewritten
    inode = out.stat().st_ino
    code, stdout, stderr = finish(ray_extract(ray_data, out, "--workers", "2"))
    assert code == 0, stderr
    assert "0 extracted, 40 already in store, 2 failed" in stdout, stdout
    assert "backbone actor" not in stderr and "merging" not in stderr
    assert out.stat().st_ino == inode
    assert_same_store(out, reference)


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_ray_actor_is_restarted_and_the_store_completes(ray_data: Path,
                                                                 reference: Path,
                                                                 tmp_path: Path):
    pytest.importorskip("ray")
    out = tmp_path / "killed.h5"
    proc = ray_extract(ray_data, out, "--workers", "2", "-b", "4")
    shards = [tmp_path / "killed.h5.shards" / f"shard-0000{k}-of-00002.h5" for k in (0, 1)]
    killed = None
    deadline = time.monotonic() + 300
    try:
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            actors = embed_actors(proc.pid)
            if actors and sum(committed_rows(s) for s in shards) >= 4:  # mid-run
                os.kill(actors[0], signal.SIGKILL)
                killed = actors[0]
            time.sleep(0.2)
        code, stdout, stderr = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "the run ended before an actor could be killed"
    assert code == 0, stderr
    assert "40 extracted" in stdout and "2 failed" in stdout, stdout
    assert_same_store(out, reference)


@pytest.mark.ray
@pytest.mark.slow
def test_an_interrupted_ray_run_resumes_from_its_shard_stores(ray_data: Path, reference: Path,
                                                              tmp_path: Path):
    pytest.importorskip("ray")
    out = tmp_path / "resumed.h5"
    proc = ray_extract(ray_data, out, "--workers", "1", "-b", "4")
    shards = [tmp_path / "resumed.h5.shards" / "shard-00000-of-00001.h5"]
    deadline = time.monotonic() + 300
    while proc.poll() is None and committed_rows(shards[0]) < 8 and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    code, stdout, stderr = finish(proc)
    assert code == 130, (stdout, stderr)
    assert "interrupted" in stdout and "Traceback" not in stderr, (stdout, stderr)
    kept = committed_rows(shards[0])
    assert 8 <= kept < 42
    assert not out.exists()  # the merge runs only after every shard finished
    code, stdout, stderr = finish(ray_extract(ray_data, out, "--workers", "1", "-b", "4"))
    assert code == 0, stderr
    assert f"{40 - kept} extracted, {kept} already in store" in stdout, stdout
    assert_same_store(out, reference)


def test_engine_ray_without_ray_installed_is_one_line(tmp_path: Path, ray_data: Path):
    code = ("import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
            "from embedpipe.cli import main\n"
            f"sys.argv = ['embedpipe', 'extract', {str(ray_data)!r}, '-o', "
            f"{str(tmp_path / 's.h5')!r}, '--engine', 'ray']\nmain()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr
    assert "pip install 'embedpipe[ray]'" in lines[0]
    assert not (tmp_path / "s.h5").exists()


def test_ray_options_without_engine_ray_are_refused(tmp_path: Path, ray_data: Path):
    res = CliRunner().invoke(app, ["extract", str(ray_data), "-o", str(tmp_path / "s.h5"),
                                   "--address", "auto"])
    assert res.exit_code == 2 and "--engine ray" in res.output
    res = CliRunner().invoke(app, ["extract", str(ray_data), "-o", str(tmp_path / "s.h5"),
                                   "--engine", "spark"])
    assert res.exit_code == 2 and "--engine spark" in res.output
    assert not (tmp_path / "s.h5").exists()


def test_a_batch_the_local_actors_cannot_hold_is_refused_before_ray_starts(tmp_path: Path,
                                                                         ray_data: Path):
    """The Ray engine's actors each run a --batch-size batch: a size no local cluster could
    hold went on to start Ray and its actors. Now, on a local cluster, the batch is measured
    as a local extract measures it (extract.runtime.check_batch_memory), times the actors
    (--workers 2), and refused in one line before Ray starts, naming the largest --batch-size
    that fits; no shard store or store is written and the process stays far below the need.
    The size is chosen so that one image needs under a quarter of the memory available here
    and the two actors' batches over twice it."""
    pytest.importorskip("ray")
    import torch
    from clitools import lite0_image_bytes, refused_for_memory, run_measured

    from embedpipe.finetune.memory import available_bytes

    have = available_bytes(torch.device("cpu"))
    assert have is not None
    for size in (512, 768, 1024, 1536, 2048, 3072):
        per = lite0_image_bytes(size)
        if 2 * 40 * per > 2 * have[0] and per < have[0] / 4:
            break
    else:
        pytest.skip(f"no size fits one image but not 2 x 40 in {have[0] / 2 ** 30:.1f} GiB")
    out = tmp_path / "s.h5"
    res, peak_kib = run_measured("extract", ray_data, "-o", out, "--engine", "ray",
                                 "--workers", "2", "--img-size", size, "--batch-size", "40",
                                 "-q")
    line, avail, fits = refused_for_memory(
        res, peak_kib, f"error: --batch-size 40 at {size}x{size} px, 2 backbone actors "
        "(--workers) at once: 2 forward passes need about ", "--batch-size")
    assert fits < 40 and abs(fits - avail / (2 * per)) <= max(1.0, 0.02 * fits), (line, per)
    assert not out.exists() and not (tmp_path / "s.h5.shards").exists()
