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
