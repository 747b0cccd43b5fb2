"""A progress bar for large outputs on a terminal (Rich, imported only when a bar is shown)."""

from __future__ import annotations

from typing import Any

#: Outputs smaller than this are written in well under a second here: no bar.
LARGE_OUTPUT = 256 << 20


class WriteProgress:
    """A `progress(done, total)` callback (see `convert`) that draws the bytes written on stderr
    once it hears of an output of `threshold` bytes or more; `close` removes the bar."""

    def __init__(self, threshold: int | None = None, console: Any = None) -> None:
        self.threshold = LARGE_OUTPUT if threshold is None else threshold
        self.console = console
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            if total < self.threshold:
                return
            self._start(total)
        self._bar.update(self._task, completed=done, total=total, refresh=True)

    def _start(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(
            TextColumn("writing"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console or Console(stderr=True),
            transient=True,
            auto_refresh=False,  # redrawn on each update: no refresh thread beside the copy
        )
        self._bar.start()
        self._task = self._bar.add_task("write", total=total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
