"""Progress reporting: JSON lines for the Slicer panel, a tqdm bar for a terminal, plain
lines for a log, or nothing.

The JSON protocol (one object per line on stdout) is what the panel parses:
``{"stage": str, "done": int, "total": int, "message": str, ...extra}``. The last line of a successful
run has ``"stage": "done"``; a failed run prints ``"stage": "error"`` with the one-line message.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any, Optional, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm


class Progress:
    """Silent reporter; the base of the others."""

    def update(self, stage: str, done: int, total: int, message: str = "", **extra: Any) -> None:
        pass

    def note(self, message: str) -> None:
        """A remark that is not a step (a fallback taken, a warning about the input)."""

    def close(self) -> None:
        pass


class JsonProgress(Progress):
    def __init__(self, stream: Optional[TextIO] = None):
        self.stream = stream or sys.stdout
        self.stage = "start"

    def _emit(self, record: dict) -> None:
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()  # the panel reads line by line from a pipe

    def update(self, stage: str, done: int, total: int, message: str = "", **extra: Any) -> None:
        self.stage = stage
        self._emit({"stage": stage, "done": int(done), "total": int(total), "message": message, **extra})

    def note(self, message: str) -> None:
        self._emit({"stage": self.stage, "done": -1, "total": -1, "message": message, "note": True})


class TqdmProgress(Progress):
    """One bar per stage on stderr; notes are printed above the bar."""

    def __init__(self) -> None:
        self.bar: Optional[tqdm] = None
        self.stage: Optional[str] = None

    def update(self, stage: str, done: int, total: int, message: str = "", **extra: Any) -> None:
        from tqdm import tqdm

        bar = self.bar
        if stage != self.stage or bar is None:  # a new stage, or the same one after close()
            self.close()
            self.stage = stage
            bar = self.bar = tqdm(
                total=max(total, 1), desc=f"{stage:>11}", unit="step", leave=stage == "done", file=sys.stderr
            )
        bar.total = max(total, 1)
        bar.n = min(done, bar.total)
        postfix = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in extra.items() if k in ("loss", "dice")}
        if postfix:
            bar.set_postfix(postfix, refresh=False)
        bar.refresh()

    def note(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LineProgress(Progress):
    """Plain lines on stdout for logs (batch jobs, ``nohup``): each new stage, its end, and at most one
    line per ``interval`` seconds in between (a bar's carriage returns make a log unreadable). Stdout,
    so that stderr keeps only the one-line error of a failed run."""

    def __init__(self, interval: float = 30.0) -> None:
        self.interval = interval
        self.stage: Optional[str] = None
        self.last = 0.0

    def update(self, stage: str, done: int, total: int, message: str = "", **extra: Any) -> None:
        now = time.monotonic()
        if stage == self.stage and done < total and now - self.last < self.interval:
            return
        self.stage, self.last = stage, now
        print(f"{time.strftime('%H:%M:%S')} {stage} {done}/{total} {message}".rstrip(), flush=True)

    def note(self, message: str) -> None:
        print(message, flush=True)


def make_progress(kind: str) -> Progress:
    """``json``, ``bar``, ``lines`` or ``none``; ``auto`` is a bar in a terminal, lines otherwise."""
    if kind == "json":
        return JsonProgress()
    if kind == "bar" or (kind == "auto" and sys.stderr.isatty()):
        return TqdmProgress()
    if kind in ("lines", "auto"):
        return LineProgress()
    return Progress()
