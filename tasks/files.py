"""Atomic output files: what is written is complete or absent (crashes lose nothing, nothing half-written is read)."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from influence_engine.atomic import atomic_path, umask_mode

__all__ = ["atomic_path", "check_out_file", "umask_mode", "write_parquet_atomic"]


def write_parquet_atomic(df: pl.DataFrame, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)
    return path


def check_out_file(path: Path, suffix: str, flag: str = "--out") -> None:
    """An output file must be new or a file (not a directory) ending in ``suffix``, in a directory that can be
    written: checked before any work."""
    from influence_engine.errors import UserError
    from tasks.inputs.preflight import check_writable

    path = Path(path)
    if path.suffix.lower() != suffix:
        raise UserError(f"{flag} {path}: the output must be a {suffix} file")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory", hint=f"name a {suffix} file inside it")
    check_writable(path.parent, f"{flag} {path}")

