"""Output files follow the umask (0644 with the usual 022), not mkstemp's private 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import polars as pl
import pytest

from influence_engine.atomic import atomic_path, current_umask, umask_mode, write_json_atomic


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        write_json_atomic(tmp_path / "manifest.json", {"a": 1})
        with atomic_path(tmp_path / "c.parquet") as tmp:
            pl.DataFrame({"x": [1]}).write_parquet(tmp)
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what open() gives: the reference
    finally:
        os.umask(old)
    assert _mode(tmp_path / "manifest.json") == _mode(plain) == 0o666 & ~mask
    assert _mode(tmp_path / "c.parquet") == 0o666 & ~mask
    assert umask_mode(0o777) == 0o777 & ~current_umask()


def test_usual_umask_gives_0644(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "m.json", {})
    finally:
        os.umask(old)
    assert oct(_mode(tmp_path / "m.json")) == oct(0o644)
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"
