"""What every command prints with: the consoles, progress for long stages (a bar on a terminal; elsewhere a plain
line every half minute once a stage has run that long, so logs and CI see long work progress and short commands
stay quiet) and the reporter the commands in ``tasks`` take."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tasks.reporting import PassRate

__all__ = ["REPORT", "Bar", "absolute", "err", "out"]

err = Console(stderr=True)
out = Console()
PLAIN_EVERY_S = 30.0


class Bar:
    """Progress of one stage fed by the engine's (documents, tokens) callback."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.terminal = err.is_terminal
        self.progress = Progress(TextColumn(f"[bold]{escape(label)}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=err,
                                 transient=True, disable=not self.terminal or total < 1)
        self.task = self.progress.add_task(label, total=total, rate="")
        self.t0 = self.last = time.perf_counter()
        self.rate = PassRate(self.t0)
        self.done = self.tokens = 0
        self.said = False

    def __enter__(self) -> Bar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)
        if self.said and exc[0] is None:
            err.print(f"{self.label}: done, {self.done:,} documents in {time.perf_counter() - self.t0:.0f} s",
                      highlight=False, soft_wrap=True)

    def __call__(self, docs: int, tokens: int) -> None:
        now = time.perf_counter()
        self.done, self.tokens = docs, tokens
        rate = self.rate(docs, tokens, now)
        self.progress.update(self.task, completed=docs, rate=rate)
        if not self.terminal and now - self.last >= PLAIN_EVERY_S and docs < self.total:
            self.last, self.said = now, True
            err.print(f"{self.label}: {docs:,} of {self.total:,} documents, {rate}, {now - self.t0:.0f} s",
                      highlight=False, soft_wrap=True)


class Reporter:
    """Progress bars and notices (on stderr): what the commands in ``tasks`` report while they work."""

    def stage(self, label: str, total: int) -> Bar:
        return Bar(label, total)

    def notice(self, text: str) -> None:
        err.print(escape(text), highlight=False, soft_wrap=True)


REPORT = Reporter()


def absolute(path: str | Path) -> str:
    """Paths as manifests record them: absolute, so an audit can be found and rerun from anywhere (a glob pattern
    keeps its pattern)."""
    return os.path.abspath(Path(path).expanduser())
