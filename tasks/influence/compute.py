"""The influence audit's engine work as plain functions: the CLI calls them directly, the flow's tasks wrap them.

Two shapes of the same work:

* whole: :func:`fit` (with the one-pass decision and its out-of-memory fallback) and :func:`score`, for
  ``influence-audit score`` / ``fit-factors``, where one process holds the documents;
* per shard: :func:`covariance_partial`, :func:`eigenbasis`, :func:`lambda_partial`, :func:`finalize_factors`,
  :func:`prepare_queries`, :func:`score_shard`, for the flow, whose mapped tasks may run in other processes
  (so it keeps separate passes: the one-pass mode would have to move every document's gradients between
  processes). Each reads and writes files named by what they depend on and skips work whose output exists,
  so a killed audit resumes where it stopped.

Which passes run is the strategy's to say (:attr:`influence_engine.Strategy.stages`), and what the factors
depend on is one :class:`~influence_engine.FactorSettings` (its key names the cache directory; reusing
factors checks it field by field).

Score frames (``query_id``, ``train_id``, ``score``, ``rank``) and their merge into a global top-k live here too.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from influence_engine import (
    CovariancePartial,
    Example,
    Factors,
    FactorSettings,
    GradientCache,
    InfluenceEngine,
    LambdaPartial,
    PreparedQueries,
    ScoreResult,
    eigendecompose,
    get_strategy,
    merge_groups,
    stable_key,
)
from influence_engine.atomic import write_json_atomic
from influence_engine.statistics import load_basis, save_basis
from tasks.engine import EngineSpec
from tasks.files import write_parquet_atomic
from tasks.inputs.rows import encode_frame
from tasks.inputs.shards import Shard, shard_docs

Progress = Callable[[int, int], None]


SCORE_SCHEMA = {"query_id": pl.String, "train_id": pl.String, "score": pl.Float64, "rank": pl.Int64}


def score_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=SCORE_SCHEMA)


def merge_top_k(frames: Sequence[pl.DataFrame], k: int) -> pl.DataFrame:
    """Global top-k per query from per-shard top-k lists (k = 0 keeps every pair); ties by train id."""
    df = pl.concat(list(frames)) if frames else score_frame([])
    df = df.sort(["query_id", "score", "train_id"], descending=[False, True, False])
    df = df.with_columns(pl.int_range(1, pl.len() + 1).over("query_id").cast(pl.Int64).alias("rank"))
    return df.filter(pl.col("rank") <= k) if k else df


Progress = Callable[[int, int], None]  # (documents done, tokens done)


Notice = Callable[[str], None]


# ------------------------------------------------------------------------------------------------ whole
@dataclass
class Fitted:
    """Factors, and (one-pass mode) the documents' gradients kept from the covariance pass."""

    factors: Factors
    cache: GradientCache | None = None


def load_factors(directory: str | Path | None, eng: InfluenceEngine, settings: FactorSettings) -> Factors | None:
    """Factors stored in ``directory`` for exactly these settings and layers; None when there are none.
    Factors made with any other setting are refused, naming the field."""
    if directory is None or not Factors.exists(directory):
        return None
    return Factors.load(directory, settings=settings, layers=list(eng.specs))


def one_pass(eng: InfluenceEngine, docs: Sequence[Example], settings: FactorSettings,
             cache_budget_bytes: float) -> bool:
    """Whether :func:`fit` fits in one pass, keeping the documents' gradients (or tokens, when smaller): the
    strategy has a covariance pass, the layers are fitted together (not in groups) and what is kept fits in
    ``cache_budget_bytes``."""
    return get_strategy(settings.strategy).covariance and len(eng.layer_groups()) == 1 and \
        eng.gradient_cache_bytes(len(docs), sum(len(e.input_ids) for e in docs)) <= cache_budget_bytes


def fit(eng: InfluenceEngine, docs: Sequence[Example], settings: FactorSettings, *,
        out_dir: str | Path | None = None, cache_budget_bytes: float = 0, progress: Progress | None = None,
        notice: Notice | None = None) -> Fitted:
    """Factors for ``docs``: loaded from ``out_dir`` when stored there with these settings, else fitted (and
    stored there). With a covariance pass and every document's gradients within ``cache_budget_bytes`` on the
    device, one pass fits everything and keeps the gradients for :func:`score`; if they do not fit beside the
    model after all (out of device memory), the separate passes run instead."""
    stored = load_factors(out_dir, eng, settings)
    if stored is not None:
        if notice:
            notice(f"reusing factors in {out_dir}")
        return Fitted(stored)
    fitted: Fitted | None = None
    if one_pass(eng, docs, settings, cache_budget_bytes):
        import torch

        try:
            factors, cache = eng.fit_factors(docs, settings, progress=progress, cache=True)
            fitted = Fitted(factors, cache)
        except torch.OutOfMemoryError:
            if notice:
                notice("the documents' gradients do not fit on the device: fitting in separate passes")
    if fitted is None:
        fitted = Fitted(eng.fit_factors(docs, settings, progress=progress))
    if out_dir is not None:
        fitted.factors.save(out_dir)
    return fitted


def score(eng: InfluenceEngine, docs: Sequence[Example], queries: Sequence[Example], fitted: Fitted, *,
          rank: int = 32, top_k: int = 50, progress: Progress | None = None) -> ScoreResult:
    """Prepare the queries against the fitted factors and score every document (from the kept gradients
    when the fit kept them)."""
    prepared = eng.prepare_queries(queries, fitted.factors, rank=rank)
    return eng.score(docs, prepared, top_k=top_k, progress=progress, cache=fitted.cache)


LayerGroup = tuple[str, ...] | None  # the layers of one group (None: every tracked layer, in as many passes as needed)


def layer_groups(spec: EngineSpec) -> list[tuple[str, ...]]:
    """The engine's groups of layers whose factors fit the device together (``--device-memory-gb``; on a GPU 80%
    of what is free). Decided once, where this runs, and handed to every mapped pass: workers never regroup."""
    return [tuple(g) for g in spec.engine().layer_groups()]


def _partial_path(factor_dir: str, kind: str, shard: Shard, layers: LayerGroup) -> Path:
    """A partial's file, named by its shard and (for one group of layers) the group's layer names: written
    atomically once, so a pass redone after a lost worker replaces nothing and is never counted twice."""
    group = "" if layers is None else "-g" + stable_key({"layers": list(layers)}, length=12)
    return Path(factor_dir) / "partials" / f"{kind}-{shard.key}{group}.safetensors"


def _made(shard: Shard, started: float) -> dict[str, Any]:
    """A partial's metadata: its shard, and which process made it when (to see where mapped passes ran)."""
    return {"shard": shard.key, "pid": os.getpid(), "host": socket.gethostname(), "started": started,
            "finished": time.time()}


def covariance_partial(spec: EngineSpec, shard: Shard, factor_dir: str, layers: LayerGroup = None) -> str:
    path = _partial_path(factor_dir, "cov", shard, layers)
    if not path.exists():
        eng, started = spec.engine(), time.time()
        eng.fit_covariance(shard_docs(eng, shard), layers=layers).save(path, _made(shard, started))
    return str(path)


def eigenbasis(partial_paths: Sequence[str], factor_dir: str) -> str:
    """The basis of the merged covariance partials: per group of layers (when the passes ran per group), summed
    in the order given (shard order), then the groups joined."""
    path = Path(factor_dir) / "eigenbasis.safetensors"
    if not path.exists():
        cov = merge_groups(CovariancePartial.load(p) for p in partial_paths)
        basis = eigendecompose(cov)
        # counts first: the basis is what marks this step done, so a kill in between redoes both
        write_json_atomic(Path(factor_dir) / "covariance-counts.json", {"n_tokens": cov.n_tokens,
                                                                         "n_docs": cov.n_docs})
        save_basis(basis, path)
    return str(path)


def lambda_partial(spec: EngineSpec, shard: Shard, factor_dir: str, basis_path: str | None,
                   layers: LayerGroup = None) -> str:
    path = _partial_path(factor_dir, "lambda", shard, layers)
    if not path.exists():
        eng, started = spec.engine(), time.time()
        basis = load_basis(basis_path, layers) if basis_path else None  # one group's: its layers' alone
        eng.fit_lambda(shard_docs(eng, shard), basis, layers=layers).save(path, _made(shard, started))
    return str(path)


def finalize_factors(spec: EngineSpec, settings: FactorSettings, factor_dir: str, basis_path: str | None,
                     lambda_paths: Sequence[str]) -> str:
    d = Path(factor_dir)
    eng = spec.engine()
    basis = load_basis(basis_path) if basis_path else None
    lambdas = merge_groups(LambdaPartial.load(x) for x in lambda_paths) if lambda_paths else None
    meta = {}
    if (d / "covariance-counts.json").exists():
        meta = {f"covariance_{k}": v for k, v in json.loads((d / "covariance-counts.json").read_text()).items()}
    eng.finalize(settings, basis=basis, lambdas=lambdas, extra_meta=meta).save(d)
    return str(d)


def prepare_queries(spec: EngineSpec, settings: FactorSettings, queries_path: str, factor_dir: str, rank: int,
                    out_path: str) -> str:
    if not Path(out_path).exists():
        eng = spec.engine()
        factors = Factors.load(factor_dir, settings=settings, layers=list(eng.specs))
        qs = encode_frame(eng, pl.read_parquet(queries_path), "queries")
        eng.prepare_queries(qs, factors, rank=rank).save(out_path)
    return out_path


def score_shard(spec: EngineSpec, shard: Shard, prepared_path: str, audit_dir: str, top_k: int,
                candidates_path: str | None = None, checkpoints: Sequence[tuple[EngineSpec, str]] = ()) -> str:
    """Top-k per query within one shard, written as soon as the shard is done; with ``candidates_path`` (a
    prefilter's), each query's top-k among its candidates, and only candidates are scored. With ``checkpoints``
    (each other checkpoint's engine and prepared queries), each document's score is the mean of its scores on the
    model and on every checkpoint, and the top-k is taken on the mean."""
    path = Path(audit_dir) / "scores" / f"shard-{shard.index:05d}-{shard.key}.parquet"
    if not path.exists():
        eng = spec.engine()
        t0 = time.perf_counter()
        if checkpoints:
            from influence_engine import CheckpointScores, checkpoint_weights

            combined = CheckpointScores(checkpoint_weights(1 + len(checkpoints)))
            for s, prepared in ((spec, prepared_path), *checkpoints):
                e = s.engine()
                combined.add(e.score(shard_docs(e, shard), PreparedQueries.load(prepared), top_k=0))
            result = combined.result(top_k)
            write_parquet_atomic(score_frame(result.top_rows()), path)
            info = {"seconds": time.perf_counter() - t0, "tokens": result.n_tokens, "checkpoints": 1 + len(checkpoints)}
            write_json_atomic(path.with_suffix(".json"), info)
            return str(path)
        if candidates_path is not None:
            from tasks.influence.prefilter import Candidates, score_candidates

            cands = Candidates.from_frame(pl.read_parquet(candidates_path), 0)
            rows = score_candidates(eng, shard_docs(eng, shard), PreparedQueries.load(prepared_path), cands, top_k)
            write_parquet_atomic(score_frame(rows), path)
            write_json_atomic(path.with_suffix(".json"), {"seconds": time.perf_counter() - t0})
            return str(path)
        result = eng.score(shard_docs(eng, shard), PreparedQueries.load(prepared_path), top_k=top_k)
        write_parquet_atomic(score_frame(result.top_rows()), path)
        write_json_atomic(path.with_suffix(".json"), {"seconds": time.perf_counter() - t0, "tokens": result.n_tokens,
                                                      "paths": result.paths})
    return str(path)
