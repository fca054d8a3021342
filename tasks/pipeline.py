"""The audit's engine work as plain functions: the CLI calls them directly, the flow's tasks wrap them.

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
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
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
    merge,
)
from influence_engine.atomic import write_json_atomic
from influence_engine.errors import DataError
from influence_engine.factors import load_basis, save_basis

from .data import Fields, data_fingerprint
from .engine_io import encode_frame, score_frame, write_parquet_atomic
from .sources import RowRange, read_range

Progress = Callable[[int, int], None]  # (documents done, tokens done)
Notice = Callable[[str], None]


@dataclass(frozen=True)
class EngineSpec:
    """How to build an engine; small and picklable for remote workers. :meth:`engine` caches one per process,
    so mapped tasks on one worker load the model once."""

    model_dir: str
    layers: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    on_long: str = "truncate"
    trust_remote_code: bool = False
    device_memory_gb: float | None = None  # for factors on the device (None: 80% of a GPU's free memory)

    def engine(self) -> InfluenceEngine:
        return _engine(self)

    def tokenizer(self):  # noqa: ANN201 (a transformers tokenizer)
        """The model's tokenizer alone (no weights), cached per process: what the per-shard input stage needs."""
        return _tokenizer(self.model_dir, self.trust_remote_code)


@functools.lru_cache(maxsize=4)
def _engine(spec: EngineSpec) -> InfluenceEngine:
    budget = None if spec.device_memory_gb is None else int(spec.device_memory_gb * 2**30)
    return InfluenceEngine.from_pretrained(spec.model_dir, layers=spec.layers, device=spec.device,
                                           precision=spec.precision, batch_size=spec.batch_size,
                                           max_length=spec.max_length, seed=spec.seed, on_long=spec.on_long,
                                           trust_remote_code=spec.trust_remote_code, device_memory_budget=budget)


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str, trust_remote_code: bool):  # noqa: ANN202
    from transformers import AutoTokenizer

    from influence_engine.errors import ModelError

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"--model {model_dir}: the tokenizer could not be loaded: {first[:300]}",
                         hint="save the tokenizer into the model directory") from None


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


def one_pass(eng: InfluenceEngine, n_docs: int, settings: FactorSettings, cache_budget_bytes: float) -> bool:
    """Whether :func:`fit` fits in one pass, keeping the documents' gradients: the strategy has a covariance pass,
    the layers are fitted together (not in groups) and the gradients fit in ``cache_budget_bytes``."""
    return get_strategy(settings.strategy).covariance and len(eng.layer_groups()) == 1 and \
        eng.gradient_cache_bytes(n_docs) <= cache_budget_bytes


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
    if one_pass(eng, len(docs), settings, cache_budget_bytes):
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


# -------------------------------------------------------------------------------------------- per shard
@dataclass(frozen=True)
class Shard:
    """A unit of mapping and resume: a range of rows of a training source (read in place, never copied).
    ``key`` (the fingerprint of its documents' ids and contents) names every file derived from it and is checked
    on every read, so a source changed under a running audit is refused. ``ids_path``: its ids and content hashes
    (Parquet ``id``, ``content_hash``, ``line``), written by the input stage."""

    index: int
    rows: RowRange
    key: str
    n_docs: int
    fields: Fields = Fields()
    ids_path: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of_file(cls, index: int, path: str, key: str, n_docs: int) -> Shard:
        """A shard that is a whole Parquet file of its own (the quality audit's copied shards, older audits')."""
        return cls(index, RowRange(path, "copied", Path(path).stem, 0, n_docs), key, n_docs)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Shard:
        if "path" in raw:  # an audit made before sources were read in place: a copied Parquet shard
            return cls.of_file(raw["index"], raw["path"], raw["key"], raw["n_docs"])
        return cls(raw["index"], RowRange(**(raw["rows"] | {"stamp": tuple(raw["rows"].get("stamp", (-1, -1)))})),
                   raw["key"], raw["n_docs"], Fields(**raw.get("fields", {})),
                   raw.get("ids_path", ""))


def read_shard(shard: Shard) -> pl.DataFrame:
    """The shard's rows, read from its source; raises a one-line :class:`DataError` when they are not the rows the
    audit read first (the source changed)."""
    hint = "rerun the audit once the data stops changing: it is then read as a new audit"
    try:
        df, _ = read_range(shard.rows, "train", shard.fields)
    except DataError as exc:
        if shard.rows.changed():
            raise DataError(f"{shard.rows.label}: the source changed during the audit (size or modification time "
                            f"differ, and its rows no longer read: {str(exc).split(': ', 1)[-1][:120]})",
                            hint=hint) from None
        raise
    key = data_fingerprint(df)[:16] if df.height else ""
    if key != shard.key:
        raise DataError(f"{shard.rows.label}: the source changed during the audit (content hash {key or 'empty'}, "
                        f"was {shard.key})", hint=hint)
    return df


def shard_docs(eng: InfluenceEngine, shard: Shard) -> list[Example]:
    return encode_frame(eng, read_shard(shard), "train")


def covariance_partial(spec: EngineSpec, shard: Shard, factor_dir: str) -> str:
    path = Path(factor_dir) / "partials" / f"cov-{shard.key}.safetensors"
    if not path.exists():
        eng = spec.engine()
        eng.fit_covariance(shard_docs(eng, shard)).save(path, {"shard": shard.key})
    return str(path)


def eigenbasis(partial_paths: Sequence[str], factor_dir: str) -> str:
    path = Path(factor_dir) / "eigenbasis.safetensors"
    if not path.exists():
        cov = merge(CovariancePartial.load(p) for p in partial_paths)
        basis = eigendecompose(cov)
        # counts first: the basis is what marks this step done, so a kill in between redoes both
        write_json_atomic(Path(factor_dir) / "covariance-counts.json", {"n_tokens": cov.n_tokens,
                                                                         "n_docs": cov.n_docs})
        save_basis(basis, path)
    return str(path)


def lambda_partial(spec: EngineSpec, shard: Shard, factor_dir: str, basis_path: str | None) -> str:
    path = Path(factor_dir) / "partials" / f"lambda-{shard.key}.safetensors"
    if not path.exists():
        eng = spec.engine()
        basis = load_basis(basis_path) if basis_path else None
        eng.fit_lambda(shard_docs(eng, shard), basis).save(path, {"shard": shard.key})
    return str(path)


def finalize_factors(spec: EngineSpec, settings: FactorSettings, factor_dir: str, basis_path: str | None,
                     lambda_paths: Sequence[str]) -> str:
    d = Path(factor_dir)
    eng = spec.engine()
    basis = load_basis(basis_path) if basis_path else None
    lambdas = merge(LambdaPartial.load(x) for x in lambda_paths) if lambda_paths else None
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
                candidates_path: str | None = None) -> str:
    """Top-k per query within one shard, written as soon as the shard is done; with ``candidates_path`` (a
    prefilter's), each query's top-k among its candidates, and only candidates are scored."""
    path = Path(audit_dir) / "scores" / f"shard-{shard.index:05d}-{shard.key}.parquet"
    if not path.exists():
        eng = spec.engine()
        t0 = time.perf_counter()
        if candidates_path is not None:
            from .prefilter import Candidates, score_candidates

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
