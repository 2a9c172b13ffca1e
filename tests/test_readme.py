"""Every ```python block of README.md runs, in order and in one namespace, in a folder holding
the `photos/` the README describes (40 real Fashion-MNIST images: photos/train/<class>/ 3 per
class, photos/test/<class>/ 1 per class) after `embedpipe extract photos/ -o cache/photos.h5`,
as its "Python API" section says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
from clitools import ok

from embedpipe.datasets import write_fashion_mnist_folder

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of each ```python fenced block."""
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)]


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 4, "the README lost its Python examples"
    monkeypatch.chdir(tmp_path)
    write_fashion_mnist_folder(Path("photos"), splits={"train": 3, "test": 1})
    ok("extract", "photos", "-o", "cache/photos.h5", "-q")
    namespace: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    for line, code in blocks:
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102
    printed = out.getvalue()
    print(printed)
    # what the README's comments say the snippets print
    assert "(40, 1280) float32" in printed
    assert "['ankle_boot', 'bag'] test/ankle_boot/" in printed
    assert "(40, 10)" in printed
    assert "--head forest: unknown head" in printed
    assert Path("cache/logreg.skops").is_file() and Path("cache/embeddings.h5").is_file()
