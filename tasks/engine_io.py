"""Plain functions between files and the engine: used by the CLI and wrapped by the flow's tasks.

Engines are cached per process (keyed by model and settings) so mapped tasks on one worker load a model
once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from influence_engine import Example, Factors, InfluenceEngine, UserError
from influence_engine.atomic import atomic_path
from influence_engine.errors import FactorMismatchError

Progress = Callable[[int, int], None]


@functools.lru_cache(maxsize=4)
def get_engine(model: str, layers: str = "auto", device: str = "auto", precision: str = "fp32", batch_size: int = 8,
               max_length: int = 512, seed: int = 0, on_long: str = "truncate",
               trust_remote_code: bool = False) -> InfluenceEngine:
    """A cached engine for a local model directory."""
    return InfluenceEngine.from_pretrained(model, layers=layers, device=device, precision=precision,
                                           batch_size=batch_size, max_length=max_length, seed=seed,
                                           on_long=on_long, trust_remote_code=trust_remote_code)


def rows_of(df: pl.DataFrame) -> list[dict[str, Any]]:
    cols = [c for c in ("id", "text", "prompt", "completion", "source") if c in df.columns]
    return df.select(cols).to_dicts()


def encode_frame(eng: InfluenceEngine, df: pl.DataFrame, where: str) -> list[Example]:
    return eng.encode(rows_of(df), where=where)


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def factor_settings(eng: InfluenceEngine, strategy: str, damping: str | float, data_fingerprint: str) -> dict:
    """Everything the factors depend on: a change in any of these means new factors."""
    return eng.settings() | {"strategy": strategy, "damping": damping, "data_fingerprint": data_fingerprint}


def load_factors_if_fresh(directory: Path, eng: InfluenceEngine, strategy: str,
                          expected: dict[str, Any] | None = None) -> Factors | None:
    """Stored factors for this model/layers/strategy, or None if there are none. Stale ones are refused."""
    if not (directory / "factors.json").exists():
        return None
    factors = Factors.load(directory, model_fingerprint=eng.fingerprint, layers=list(eng.specs), strategy=strategy)
    if expected is not None:
        stale = {k: (factors.meta.get(k), v) for k, v in expected.items() if factors.meta.get(k) != v}
        if stale:
            key, (had, want) = next(iter(stale.items()))
            raise FactorMismatchError(f"{directory}: factors were made with {key}={had!r}, not {want!r}",
                                      hint="use another --factors directory or delete this one to refit")
    return factors


def fit_factors_to(directory: Path | None, eng: InfluenceEngine, docs: Sequence[Example], strategy: str,
                   damping: str | float, extra_meta: dict[str, Any], progress: Progress | None = None,
                   cache: bool = False):
    """Fit factors (stored in ``directory`` when given); with ``cache``, ``(factors, gradient cache)``."""
    fitted = eng.fit_factors(docs, strategy, damping=parse_damping(damping), progress=progress, cache=cache)
    factors = fitted[0] if cache else fitted
    factors.meta |= extra_meta
    if directory is not None:
        factors.save(directory)
    return fitted


def parse_damping(damping: str | float) -> str | float:
    """`auto` or a number, from a flag or a flow parameter."""
    if isinstance(damping, str) and damping != "auto":
        try:
            return float(damping)
        except ValueError:
            raise UserError(f"--damping {damping!r}: give 'auto' or a number such as 1e-3") from None
    return damping


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
