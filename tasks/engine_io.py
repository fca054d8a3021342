"""Small I/O helpers between files and the engine: rows to examples, score frames, atomic Parquet writes."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from influence_engine import Example, InfluenceEngine
from influence_engine.atomic import atomic_path

Progress = Callable[[int, int], None]


def rows_of(df: pl.DataFrame) -> list[dict[str, Any]]:
    cols = [c for c in ("id", "text", "prompt", "completion", "source") if c in df.columns]
    return df.select(cols).to_dicts()


def encode_frame(eng: InfluenceEngine, df: pl.DataFrame, where: str) -> list[Example]:
    return eng.encode(rows_of(df), where=where)


def write_parquet_atomic(df: pl.DataFrame, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)
    return path


SCORE_SCHEMA = {"query_id": pl.String, "train_id": pl.String, "score": pl.Float64, "rank": pl.Int64}


def score_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=SCORE_SCHEMA)


def merge_top_k(frames: Sequence[pl.DataFrame], k: int) -> pl.DataFrame:
    """Global top-k per query from per-shard top-k lists (k = 0 keeps every pair); ties by train id."""
    df = pl.concat(list(frames)) if frames else score_frame([])
    df = df.sort(["query_id", "score", "train_id"], descending=[False, True, False])
    df = df.with_columns(pl.int_range(1, pl.len() + 1).over("query_id").cast(pl.Int64).alias("rank"))
    return df.filter(pl.col("rank") <= k) if k else df
