"""Atomic file writes: a result is either complete under its final name or absent.

Everything the project writes (factors, shard scores, candidate lists, manifests) goes through
:func:`atomic_path`: the caller writes to a temporary sibling, which is fsynced and renamed over the
target only when the block finishes without an exception. A crash or a full disk leaves no half-written
file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, umask_mode(0o666))
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if _disk_full(exc):
            raise UserError(f"{target}: disk full while writing; nothing was written",
                            hint="free space on that disk and rerun: finished stages are reused") from exc
        raise


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` can only be read by
    setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the umask: what ``open`` (0666) or ``mkdir`` (0777) would create."""
    return mode & ~current_umask()


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a library wraps it (polars raises ComputeError "... (os error 28)",
    safetensors SafetensorError "I/O error: No space left on device (os error 28)")."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return any(s in text for s in ("No space left on device", "Disk quota exceeded", "(os error 28)",
                                   "(os error 122)"))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
