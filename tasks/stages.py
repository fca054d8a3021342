"""The audit's stages as Prefect tasks. Each reads and writes files named by what they depend on, so a
rerun with the same parameters skips what is already done (a killed audit resumes where it stopped)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from prefect import get_run_logger, task

from influence_engine import (
    CovariancePartial,
    Factors,
    InfluenceEngine,
    LambdaPartial,
    PreparedQueries,
    UserError,
    eigendecompose,
    merge,
)
from influence_engine.atomic import write_json_atomic
from influence_engine.factors import load_basis, save_basis

from .data import add_content_hashes, data_fingerprint, read_rows, sample_queries, shard_frame
from .engine_io import (
    encode_frame,
    get_engine,
    merge_top_k,
    parse_damping,
    score_frame,
    settings_key,
    write_parquet_atomic,
)
from .params import AuditParams


def home_dir(p: AuditParams) -> Path:
    return Path(p.output_dir or os.environ.get("INFLUENCE_AUDIT_HOME") or ".influence-audit").resolve()


def _logger():
    try:
        return get_run_logger()
    except Exception:  # called outside a run (tests call .fn)
        import logging

        return logging.getLogger("influence_audit")


@dataclass(frozen=True)
class EngineSpec:
    """How to build the (per-process cached) engine; small and picklable for remote workers."""

    model_dir: str
    layers: str
    device: str
    precision: str
    batch_size: int
    max_length: int
    seed: int
    on_long: str
    trust_remote_code: bool = False

    def engine(self) -> InfluenceEngine:
        return get_engine(self.model_dir, self.layers, self.device, self.precision, self.batch_size, self.max_length,
                          self.seed, self.on_long, self.trust_remote_code)

    @classmethod
    def of(cls, p: AuditParams, model_dir: str) -> EngineSpec:
        return cls(model_dir, p.layers, p.device, p.precision, p.batch_size, p.max_length, p.seed, p.on_long,
                   p.trust_remote_code)


@dataclass(frozen=True)
class Shard:
    index: int
    path: str
    key: str  # fingerprint of the shard's documents: names every file derived from it
    n_docs: int


@dataclass
class Inputs:
    audit_id: str
    audit_dir: str
    model_dir: str
    model_fingerprint: str
    data_fingerprint: str
    query_fingerprint: str
    shards: list[Shard]
    n_docs: int
    n_tokens: int
    n_truncated: int
    queries_path: str
    n_queries_available: int
    validation: dict[str, dict] = field(default_factory=dict)


class InputValidationError(UserError):
    """An input suite failed: the message is the readable summary."""

    def __init__(self, message: str, reports: dict[str, dict]):
        super().__init__(message)
        self.reports = reports


def resolve_model(model: str) -> str:
    """A local directory for the model (``models:/`` and ``runs:/`` URIs are fetched from MLflow)."""
    if model.startswith(("models:/", "runs:/")):
        from .model_uri import resolve_model_uri

        return resolve_model_uri(model)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise UserError(f"model {model!r}: no such directory", hint="give a local Hugging Face model directory")
    return str(path.resolve())


def _token_counts(eng: InfluenceEngine, df: pl.DataFrame, where: str) -> tuple[pl.DataFrame, int, int]:
    docs = encode_frame(eng, df, where)
    n_tok = [e.n_tokens_original for e in docs]
    return (df.with_columns(pl.Series("n_tokens", n_tok, dtype=pl.Int64)),
            sum(len(e.input_ids) for e in docs), sum(e.truncated for e in docs))


@task(name="load-and-validate-inputs")
def load_and_validate_inputs(p: AuditParams) -> Inputs:
    """Read training data and queries, tokenise, validate both with Great Expectations, write shards."""
    from .validation import validate_query_frame, validate_training_frame

    log = _logger()
    model_dir = resolve_model(p.model)
    eng = EngineSpec.of(p, model_dir).engine()
    train = read_rows(p.train, "train")
    queries = read_rows(p.queries, "queries")
    train, n_tokens, n_truncated = _token_counts(eng, train, "train")
    queries, _, _ = _token_counts(eng, queries, "queries")
    truncate = p.on_long == "truncate"
    reports = {"training_input": validate_training_frame(train, max_length=p.max_length, truncate=truncate),
               "query_input": validate_query_frame(queries, max_length=p.max_length, truncate=truncate)}
    as_json = {k: r.to_json() for k, r in reports.items()}
    failed = [r for r in reports.values() if not r.success]
    if failed:
        raise InputValidationError("input validation failed:\n" + "\n".join(r.summary() for r in failed), as_json)
    data_fp, query_fp = data_fingerprint(train), data_fingerprint(queries)
    identity = p.identity() | {"model_fingerprint": eng.fingerprint, "data": data_fp, "queries": query_fp}
    audit_id = settings_key(identity)[:12]
    audit_dir = home_dir(p) / "audits" / audit_id
    for name, rep in as_json.items():
        write_json_atomic(audit_dir / "validation" / f"{name}.json", rep)
    shards = []
    for i, shard in enumerate(shard_frame(add_content_hashes(train), p.shard_size)):
        key = data_fingerprint(shard)[:16]
        path = audit_dir / "inputs" / f"train-{i:05d}-{key}.parquet"
        if not path.exists():
            write_parquet_atomic(shard, path)
        shards.append(Shard(i, str(path), key, shard.height))
    queries_all = audit_dir / "inputs" / "queries-all.parquet"
    if not queries_all.exists():
        write_parquet_atomic(queries, queries_all)
    log.info(f"audit {audit_id}: {train.height} documents in {len(shards)} shards, {n_tokens} tokens "
             f"({n_truncated} truncated), {queries.height} queries available")
    return Inputs(audit_id, str(audit_dir), model_dir, eng.fingerprint, data_fp, query_fp, shards, train.height,
                  n_tokens, n_truncated, str(queries_all), queries.height, as_json)


@task(name="sample-queries")
def sample_query_set(p: AuditParams, inputs: Inputs) -> str:
    """Seeded random or stratified sample of the query source, written beside the audit."""
    path = Path(inputs.audit_dir) / "queries.parquet"
    if not path.exists():
        df = pl.read_parquet(inputs.queries_path)
        picked = sample_queries(df, p.n_queries, seed=p.seed,
                                stratify_by=p.stratify_by if p.sampling == "stratified" else None)
        write_parquet_atomic(picked, path)
    return str(path)


def factor_dir(p: AuditParams, inputs: Inputs) -> Path:
    """The factor cache: keyed by model fingerprint, data fingerprint and factor settings."""
    key = settings_key({"model": inputs.model_fingerprint, "data": inputs.data_fingerprint, "strategy": p.strategy,
                        "layers": p.layers, "damping": p.damping, "seed": p.seed, "max_length": p.max_length,
                        "precision": p.precision, "on_long": p.on_long})
    return home_dir(p) / "factors" / key


def _shard_docs(eng: InfluenceEngine, shard: Shard):
    return encode_frame(eng, pl.read_parquet(shard.path), "train")


@task(name="fit-covariance-partial")
def fit_covariance_partial(spec: EngineSpec, shard: Shard, out_dir: str) -> str:
    path = Path(out_dir) / "partials" / f"cov-{shard.key}.safetensors"
    if not path.exists():
        eng = spec.engine()
        eng.fit_covariance(_shard_docs(eng, shard)).save(path, {"shard": shard.key})
    return str(path)


@task(name="merge-and-eigendecompose")
def merge_and_eigendecompose(paths: list[str], out_dir: str) -> str:
    path = Path(out_dir) / "eigenbasis.safetensors"
    if not path.exists():
        cov = merge(CovariancePartial.load(p) for p in paths)
        basis = eigendecompose(cov)
        # counts first: the basis is what marks this step done, so a kill in between redoes both
        write_json_atomic(Path(out_dir) / "covariance-counts.json", {"n_tokens": cov.n_tokens, "n_docs": cov.n_docs})
        save_basis(basis, path)
    return str(path)


@task(name="fit-eigenvalue-correction-partial")
def fit_lambda_partial(spec: EngineSpec, shard: Shard, out_dir: str, basis_path: str | None) -> str:
    path = Path(out_dir) / "partials" / f"lambda-{shard.key}.safetensors"
    if not path.exists():
        eng = spec.engine()
        basis = load_basis(basis_path) if basis_path else None
        eng.fit_lambda(_shard_docs(eng, shard), basis).save(path, {"shard": shard.key})
    return str(path)


@task(name="finalize-factors")
def finalize_factors(spec: EngineSpec, p: AuditParams, inputs: Inputs, out_dir: str, basis_path: str | None,
                     lambda_paths: list[str]) -> str:
    d = Path(out_dir)
    eng = spec.engine()
    basis = load_basis(basis_path) if basis_path else None
    lambdas = merge(LambdaPartial.load(x) for x in lambda_paths) if lambda_paths else None
    meta = {"data_fingerprint": inputs.data_fingerprint, "damping_param": p.damping}
    if (d / "covariance-counts.json").exists():
        meta |= {f"covariance_{k}": v for k, v in json.loads((d / "covariance-counts.json").read_text()).items()}
    factors = eng.finalize(p.strategy, basis=basis, lambdas=lambdas, damping=parse_damping(p.damping), extra_meta=meta)
    factors.save(d)
    return str(d)


@task(name="prepare-query-gradients")
def prepare_query_gradients(spec: EngineSpec, p: AuditParams, inputs: Inputs, queries_path: str,
                            factors_dir: str) -> str:
    path = Path(inputs.audit_dir) / "prepared-queries.safetensors"
    if not path.exists():
        eng = spec.engine()
        factors = Factors.load(factors_dir, model_fingerprint=eng.fingerprint, layers=list(eng.specs),
                               strategy=p.strategy)
        qs = encode_frame(eng, pl.read_parquet(queries_path), "queries")
        eng.prepare_queries(qs, factors, rank=p.query_rank).save(path)
    return str(path)


@task(name="score-shard")
def score_shard(spec: EngineSpec, shard: Shard, prepared_path: str, audit_dir: str, top_k: int) -> str:
    """Top-k per query within one shard, written as soon as the shard is done."""
    path = Path(audit_dir) / "scores" / f"shard-{shard.index:05d}-{shard.key}.parquet"
    if not path.exists():
        eng = spec.engine()
        t0 = time.perf_counter()
        result = eng.score(_shard_docs(eng, shard), PreparedQueries.load(prepared_path), top_k=top_k)
        write_parquet_atomic(score_frame(result.top_rows()), path)
        write_json_atomic(path.with_suffix(".json"), {"seconds": time.perf_counter() - t0, "tokens": result.n_tokens,
                                                      "paths": result.paths})
    return str(path)


def _snippet(row: dict[str, Any], n: int = 200) -> str:
    text = row.get("text") or f"{row.get('prompt', '')}{row.get('completion', '')}"
    return text if len(text) <= n else text[: n - 1] + "…"


@task(name="merge-candidates")
def merge_candidates(spec: EngineSpec, p: AuditParams, inputs: Inputs, shard_paths: list[str], queries_path: str,
                     prepared_path: str) -> str:
    """Global top-k per query, with snippets and per-layer / per-token breakdowns of the top candidates."""
    path = Path(inputs.audit_dir) / "candidates.parquet"
    if path.exists():
        return str(path)
    top = merge_top_k([pl.read_parquet(x) for x in shard_paths], p.top_k)
    queries = pl.read_parquet(queries_path).select(
        pl.col("id").alias("query_id"), pl.col("prompt").alias("query_prompt"),
        pl.col("completion").alias("query_completion"))
    train = pl.concat([pl.read_parquet(s.path) for s in inputs.shards], how="vertical_relaxed")
    wanted = set(top["train_id"].to_list())
    docs_by_id = {r["id"]: r for r in train.filter(pl.col("id").is_in(list(wanted))).to_dicts()}
    top = top.with_columns(pl.col("train_id").map_elements(lambda i: _snippet(docs_by_id[i]), return_dtype=pl.String)
                           .alias("snippet"))
    explained = top.filter(pl.col("rank") <= p.explain_top)
    layer_json: dict[tuple[str, str], str] = {}
    tokens: dict[tuple[str, str], tuple[list[str], list[float]]] = {}
    if explained.height:
        eng = spec.engine()
        prepared = PreparedQueries.load(prepared_path)
        q_index = {q: i for i, q in enumerate(prepared.ids)}
        ids = sorted(set(explained["train_id"].to_list()))
        rows = [docs_by_id[i] for i in ids]
        exps = {e.doc_id: e for e in eng.explain(eng.encode(rows, where="train"), prepared)}
        for qid, tid in explained.select("query_id", "train_id").iter_rows():
            e, q = exps[tid], q_index[qid]
            layer_json[(qid, tid)] = json.dumps(e.per_layer(q))
            strs = [eng.tokenizer.decode([t]) for t in e.token_ids] if eng.tokenizer is not None else \
                [str(t) for t in e.token_ids]
            tokens[(qid, tid)] = (strs, [float(x) for x in e.per_token(q)])
    keys = list(zip(top["query_id"].to_list(), top["train_id"].to_list(), strict=True))
    top = top.with_columns(
        pl.Series("layer_scores", [layer_json.get(k) for k in keys], dtype=pl.String),
        pl.Series("token_strs", [tokens[k][0] if k in tokens else None for k in keys], dtype=pl.List(pl.String)),
        pl.Series("token_scores", [tokens[k][1] if k in tokens else None for k in keys], dtype=pl.List(pl.Float64)))
    cands = top.join(queries, on="query_id", how="left").select(
        "query_id", "query_prompt", "query_completion", "train_id", "score", "rank", "snippet", "layer_scores",
        "token_strs", "token_scores")
    write_parquet_atomic(cands, path)
    return str(path)


@task(name="validate-outputs")
def validate_outputs(p: AuditParams, inputs: Inputs, candidates_path: str, queries_path: str) -> dict:
    from .validation import validate_candidates

    cands = pl.read_parquet(candidates_path)
    train_ids = pl.concat([pl.read_parquet(s.path, columns=["id"]) for s in inputs.shards])["id"]
    query_ids = pl.read_parquet(queries_path, columns=["id"])["id"]
    from .verify import verification_metrics

    baseline = verification_metrics(inputs.audit_dir).get("verified_random_at_10")
    report = validate_candidates(cands, train_ids=train_ids, query_ids=query_ids, k=p.top_k,
                                 verified_baseline=baseline)
    out = report.to_json()
    write_json_atomic(Path(inputs.audit_dir) / "validation" / "candidates.json", out)
    if not report.success:
        _logger().error(report.summary())
    elif report.warnings():
        _logger().warning(report.summary())
    return out


def planted_metrics(cands: pl.DataFrame, planted_path: str | None) -> dict[str, float]:
    """Recall@10 of known culprits and the mean reciprocal rank of the first one, over queries scored."""
    if not planted_path:
        return {}
    planted = json.loads(Path(planted_path).read_text())
    hits = total = 0
    rr = []
    for qid, culprits in planted.items():
        ranked = cands.filter(pl.col("query_id") == qid).sort("rank")["train_id"].to_list()
        if not ranked:
            continue
        total += len(culprits)
        hits += len(set(ranked[:10]) & set(culprits))
        first = next((r for r, t in enumerate(ranked, 1) if t in set(culprits)), None)
        rr.append(1.0 / first if first else 0.0)
    if not total:
        return {}
    return {"planted_recall_at_10": hits / total, "planted_mrr": sum(rr) / len(rr)}


def inputs_json(inputs: Inputs) -> dict:
    return asdict(inputs)
