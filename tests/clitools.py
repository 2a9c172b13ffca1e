"""What CLI tests share: run `embedpipe` in-process (typer's runner) and check its output."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
from typer.testing import CliRunner

from embedpipe.cli import app
from embedpipe.store import StoreWriter, open_store, read_identity

runner = CliRunner()


def cli(*args: object):
    """`embedpipe ARGS...` in-process; the result has exit_code and output (stdout + stderr)."""
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def ok(*args: object):
    """`embedpipe ARGS...`, which must succeed."""
    res = cli(*args)
    assert res.exit_code == 0, res.output
    return res


def one_line_error(res, *needles: str) -> str:
    """The one `error: ...` line of a failed command (exit 2, no traceback), holding needles."""
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def sha(path: Path) -> str:
    """The sha256 of a file's bytes: asserting a file is unchanged."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))

EMBEDPIPE = [sys.executable, "-m", "embedpipe.cli"]


def one_line(output: str, code: int, *needles: str, expect: int = 2) -> str:
    """The whole output is one `error: ...` line holding every needle; exit code ``expect``."""
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert code == expect, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def run(*args: object, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=timeout,
                          **kw)


_MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); "
            "sys.exit(rc)")


def run_measured(*args: object, timeout: float = 300) -> tuple[subprocess.CompletedProcess, int]:
    """``embedpipe ARGS`` as a subprocess of its own wrapper process: (its result, stdout without
    the wrapper's line; its peak resident memory in KiB, ru_maxrss of the wrapper's children,
    so no other process of the test run counts)."""
    res = run(sys.executable, "-c", _MEASURE, *EMBEDPIPE, *args, timeout=timeout)
    out, _, peak = res.stdout.rstrip("\n").rpartition("\n")
    res.stdout = out + "\n" if out else ""
    return res, int(peak)


def rows_now(store: Path) -> int | None:
    """Committed rows as a reader sees them now (None while the store cannot be read)."""
    try:
        return len(open_store(store, features=False))
    except Exception:  # noqa: BLE001 - not created yet, or being replaced by a recovery
        return None


def wait_rows(store: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the extraction ended too early"
        rows = rows_now(store)
        if rows is not None and rows >= n:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"{store}: {n} rows not committed in {timeout} s")


def copy_rows(src: Path, dst: Path, keep: list[int], features: Any = None) -> Path:
    """A new store (same identity) holding rows ``keep`` of ``src``, with ``features`` (rows
    of the whole store, e.g. edited ones) in place of its own when given."""
    s = open_store(src)
    with StoreWriter.open(dst, read_identity(src), versions={}) as w:
        ids = w.class_ids({s.classes[s.labels[i]] for i in keep})
        w.append((s.features if features is None else features)[keep], paths=[s.paths[i] for i in keep],
                 labels=[ids[s.classes[s.labels[i]]] for i in keep],
                 hashes=[s.hashes[i] for i in keep], splits=[s.splits[i] for i in keep],
                 mtime_ns=[0] * len(keep), size=[0] * len(keep))
    return dst


# ---------------------------------------------------------------------------------------------
# 1. kill storm


def peek_committed(store: Path) -> tuple[int, int]:
    """(run records, committed rows) of a store being written: a light SWMR read, so that
    polling does not take CPU from the run (-1, -1 while it cannot be read)."""
    try:
        with h5py.File(store, "r", libver="latest", swmr=True, locking=False) as f:
            return f["runs"].shape[0], int(f["committed"][0])
    except Exception:  # noqa: BLE001 - missing, or being replaced by a recovery
        return -1, -1


def copy_images(src: Path, dst: Path, n: int, start: int = 0) -> Path:
    files = sorted(src.rglob("*.png"))[start:start + n]
    for f in files:
        (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst / f.parent.name / f.name)
    return dst


def lite0_image_bytes(size: int) -> int:
    """Bytes one size x size image adds to an inference batch of the bundled EfficientNet-Lite0,
    as finetune.memory.check_inference_fits counts them (one view): the forward's peak on the
    meta device plus its uint8 and float32 pixels."""
    import timm

    from embedpipe.finetune.memory import inference_probe

    model = timm.create_model("tf_efficientnet_lite0", num_classes=0).eval()
    return inference_probe(model, (size, size))[1] + 3 * size * size * 5


def refused_for_memory(res: subprocess.CompletedProcess, peak_kib: int, start: str,
                       flag: str) -> tuple[str, float, int]:
    """The one line of a command refused, before any work, because its batch does not fit in
    memory (finetune.memory.check_inference_fits), checked: exit 2, nothing else said, the line
    begins with ``start``, the need it names exceeds what is available, and the process
    (run_measured) stayed under 2 GiB. Returns (the line, the bytes available as it says
    them, the largest value of ``flag`` it says fits)."""
    import re

    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stdout + res.stderr
    line = lines[0]
    assert line.startswith(start), line
    need, avail = (float(x) for x in re.findall(r"([0-9.]+) GiB", line)[:2])
    fits = int(re.search(rf"pass {flag} (\d+) or less at this size", line).group(1))
    assert need > avail and fits >= 1, line
    assert peak_kib < 2 * 2 ** 20, f"peak RSS {peak_kib / 2 ** 20:.2f} GiB"
    return line, avail * 2 ** 30, fits
