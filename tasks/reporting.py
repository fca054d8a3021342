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


class PassRate:
    """Tokens per second of the current pass over a stage's documents. A stage can run several passes (the factor
    fit: covariance, then eigenvalue correction) and the engine's count starts again at each: a count that goes
    down starts a new pass, whose rate counts from its first report, not from the stage's start (which would
    count the eigendecomposition between the passes as slow tokens)."""

    def __init__(self, t0: float):
        self.t0, self.tokens0, self.docs = t0, 0, 0

    def __call__(self, docs: int, tokens: int, now: float) -> str:
        if docs < self.docs:
            self.t0, self.tokens0 = now, tokens
        self.docs = docs
        if tokens <= self.tokens0 or now <= self.t0:
            return "a new pass"
        return f"{(tokens - self.tokens0) / (now - self.t0):,.0f} tokens/s"


class Every:
    """A (documents, tokens) callback that hands ``say`` a plain progress line every ``every_s`` seconds once a stage
    has run that long (a flow's logger, a bench's stderr): long work shows progress, short work stays quiet."""

    def __init__(self, say: Callable[[str], None], label: str, total: int, every_s: float = 30.0):
        import time

        self._clock = time.perf_counter
        self.say, self.label, self.total, self.every_s = say, label, total, every_s
        self.t0 = self.last = self._clock()
        self.rate = PassRate(self.t0)

    def __call__(self, docs: int, tokens: int) -> None:
        now = self._clock()
        rate = self.rate(docs, tokens, now)
        if now - self.last >= self.every_s and docs < self.total:
            self.last = now
            self.say(f"{self.label}: {docs:,} of {self.total:,} documents, {rate}, {now - self.t0:.0f} s")
