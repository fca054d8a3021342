"""Errors a user can act on.

Every error raised because of the user's input (a file, a flag, a model directory, stale factors) is a
:class:`UserError`: its message is one line naming the file, line or field and what to do. The CLI prints it
without a traceback and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message says where (file, line, field) and what to do."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} ({hint})")


class DataError(UserError):
    """A training or query file is malformed."""


class ModelError(UserError):
    """A model directory is missing, corrupt, or does not fit its tokenizer."""


class FactorMismatchError(UserError):
    """Stored factors were made for another model, other layers or other settings."""


class NumericalError(UserError):
    """NaN or Inf appeared in factors, gradients or scores; the message names the layer."""

    exit_code = 3


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, cut to ``limit`` characters (its type's name when it has
    no message): what one-line errors quote of a library's exception."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0].strip() if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
