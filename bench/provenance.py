"""Where a benchmark figure came from: the commit, the machine and the command, recorded in every result file.

The commit is ``$INFLUENCE_AUDIT_COMMIT`` when set: a tree copied without its git directory (the GPU machine)
records the commit given on the command line, e.g. ``INFLUENCE_AUDIT_COMMIT=$(git rev-parse --short HEAD)``
taken here; otherwise ``git rev-parse HEAD``, with ``-dirty`` when tracked files have uncommitted changes.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    env = os.environ.get("INFLUENCE_AUDIT_COMMIT")
    if env:  # given: the tree was copied (perhaps into another repository)
        return env
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """``commit``, ``command``, ``date`` (UTC) and the host's CPU count, load and platform."""
    args = sys.argv if argv is None else argv
    return {"commit": commit(), "command": " ".join(shlex.quote(a) for a in ["python", *args]),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "host": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                     "python": platform.python_version(),
                     "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}}
