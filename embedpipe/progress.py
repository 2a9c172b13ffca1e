"""Progress for long operations: a live bar on a terminal, periodic plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Counts finished items against a total and shows rate and ETA.

    On a TTY this is a rich progress bar; otherwise (CI, pipes, logs) one line every
    ``every`` seconds, so a long run never looks hung and logs stay short.
    """

    def __init__(self, total: int, label: str, *, enabled: bool = True, every: float = 10.0,
                 stream: Any = None, unit: str = "img"):
        self.total, self.label, self.unit = total, label, unit
        self.done = 0
        self.detail = ""  # what is being done now (see note), shown after the label
        self.start = time.perf_counter()
        self._every = every
        self._last = self.start
        self._stream = stream or sys.stderr
        self._enabled = enabled and total > 0
        self._rich: Any = None
        if self._enabled and getattr(self._stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(file=self._stream), transient=False,
            )
            self._task = self._rich.add_task(label, total=total, rate="")
            self._rich.start()

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.start
        return self.done / dt if dt > 0 else 0.0

    def update(self, n: int) -> None:
        self.done += n
        if not self._enabled:
            return
        rate = self.rate
        if self._rich is not None:
            self._rich.update(self._task, advance=n, rate=f"{rate:.1f} {self.unit}/s")
            return
        now = time.perf_counter()
        if now - self._last >= self._every:
            self._last = now
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            what = f" [{self.detail}]" if self.detail else ""
            print(f"{self.label}: {self.done}/{self.total} {self.unit} "
                  f"({100 * self.done / self.total:.0f}%), {rate:.1f} {self.unit}/s, "
                  f"ETA {_fmt_eta(eta)}{what}", file=self._stream, flush=True)

    def note(self, detail: str) -> None:
        """Say what the current item is doing (e.g. the epoch of a long fit); shown after the
        label on a terminal, and in the periodic lines (one is printed now if one is due)."""
        self.detail = detail
        if not self._enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, description=f"{self.label} {detail}")
            return
        self.update(0)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def printer(enabled: bool, stream: Any = None) -> Callable[[str], None]:
    """A message sink for one-line notices (stderr), silenced when ``enabled`` is False."""
    def say(msg: str) -> None:
        if enabled:
            print(msg, file=stream or sys.stderr, flush=True)
    return say
