"""How a command tells its caller what it is doing: progress of long stages and one-line notices.

Commands (``tasks.*.commands``) take a :class:`Reporter`; the CLI passes one that draws progress bars on a terminal
and prints notices on stderr, library callers pass nothing (:class:`Silent`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

Progress = Callable[[int, int], None]  # (documents done, tokens done)


class Reporter(Protocol):
    def stage(self, label: str, total: int) -> contextlib.AbstractContextManager[Progress]:
        """A long stage over ``total`` documents; the context gives the (documents, tokens) callback."""
        ...

    def notice(self, text: str) -> None:
        """One line the user should read (a reused cache, a fallback, a warning)."""
        ...


class Silent:
    """A reporter that says nothing."""

    @contextlib.contextmanager
    def stage(self, label: str, total: int) -> Iterator[Progress]:
        yield lambda docs, tokens: None

    def notice(self, text: str) -> None:
        pass


class Every:
    """A (documents, tokens) callback that hands ``say`` a plain progress line every ``every_s`` seconds once a stage
    has run that long (a flow's logger, a bench's stderr): long work shows progress, short work stays quiet."""

    def __init__(self, say: Callable[[str], None], label: str, total: int, every_s: float = 30.0):
        import time

        self._clock = time.perf_counter
        self.say, self.label, self.total, self.every_s = say, label, total, every_s
        self.t0 = self.last = self._clock()

    def __call__(self, docs: int, tokens: int) -> None:
        now = self._clock()
        if now - self.last >= self.every_s and docs < self.total:
            self.last = now
            rate = tokens / max(now - self.t0, 1e-9)
            self.say(f"{self.label}: {docs:,} of {self.total:,} documents, {rate:,.0f} tokens/s, {now - self.t0:.0f} s")
