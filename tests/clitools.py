"""What CLI tests share: run `embedpipe` in-process (typer's runner) and check its output."""

from __future__ import annotations

import csv
from pathlib import Path

from typer.testing import CliRunner

from embedpipe.cli import app

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


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
