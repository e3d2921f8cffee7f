"""Download progress on a terminal: one line per layer with bytes, rate and time left (rich).
Nothing at all when stderr is not a terminal."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["terminal_progress"]


class _RichProgress:  # the Progress of backends/images.py
    def __init__(self, stream: Any):
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress as Bars, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.bars = Bars(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                         TimeRemainingColumn(), console=Console(file=stream), transient=False)
        self.tasks: dict[str, Any] = {}
        self.started = False

    def start(self, key: str, label: str, total: int) -> None:
        if not self.started:
            self.bars.start()
            self.started = True
        self.tasks[key] = self.bars.add_task(label, total=total)

    def advance(self, key: str, amount: int) -> None:
        if key in self.tasks:
            self.bars.advance(self.tasks[key], amount)

    def finish(self, key: str) -> None:
        if key in self.tasks:
            task = self.tasks[key]
            self.bars.update(task, completed=self.bars.tasks[task].total)

    def close(self) -> None:
        if self.started:
            self.bars.stop()
            self.started = False


def terminal_progress(stream: Any = None) -> Any:
    """A progress display on stderr when it is a terminal, else None (cheap: rich is imported only then)."""
    stream = stream or sys.stderr
    try:
        if stream is None or not stream.isatty():
            return None
    except (OSError, ValueError):
        return None
    return _RichProgress(stream)
