"""The audit's inputs as plain functions: a preflight that checks them in seconds, the first stage (read,
tokenise, validate with Great Expectations, shard), and the query sample.

The audit id is the hash of what defines the result: the parameters that differ from their defaults (so a
parameter added later, left at its default, keeps every existing audit's id), the model's weight
fingerprint and the data and query fingerprints.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from influence_engine import FactorSettings, InfluenceEngine, UserError, stable_key
from influence_engine.atomic import write_json_atomic
from influence_engine.lora import is_adapter_dir, layers_for

from .data import add_content_hashes, data_fingerprint, read_rows, sample_queries, shard_frame
from .engine_io import encode_frame, write_parquet_atomic
from .params import AuditParams
from .paths import audit_dir, resolve_home
from .pipeline import EngineSpec, Shard


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
    n_unknown_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Inputs:
        raw = dict(raw)
        raw["shards"] = [Shard(**s) for s in raw["shards"]]
        raw.setdefault("validation", {})
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


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
        raise UserError(f"--model {model}: no such directory", hint="give a local Hugging Face model directory")
    if not (path / "config.json").exists() and not is_adapter_dir(path):
        raise UserError(f"--model {model}: no config.json", hint="save the model with save_pretrained()")
    return str(path.resolve())


def engine_spec(p: AuditParams, model_dir: str) -> EngineSpec:
    return EngineSpec(model_dir, layers_for(model_dir, p.layers), p.device, p.precision, p.batch_size,
                      p.max_length, p.seed, p.on_long, p.trust_remote_code, p.device_memory_gb)


def factor_settings(p: AuditParams, inputs: Inputs) -> FactorSettings:
    return FactorSettings(inputs.model_fingerprint, inputs.data_fingerprint, p.strategy,
                          layers_for(inputs.model_dir, p.layers), p.damping, seed=p.seed, max_length=p.max_length,
                          precision=p.precision, on_long=p.on_long)


def check_writable(directory: Path, what: str) -> None:
    """Refuse a directory that cannot be created or written, before any work; ``what`` names the flag and the
    path the user gave (e.g. ``--out x/y.parquet``)."""
    probe = Path(directory)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what}: {probe} is a file, not a directory", hint="choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what}: {probe} is not writable", hint="choose a directory you can write")


def preflight(p: AuditParams) -> None:
    """Check the audit's inputs in seconds, before Prefect or MLflow start: the model directory, that the
    training and query files exist and have the columns they need, the planted file, the output directory."""
    if not p.model.startswith(("models:/", "runs:/")):
        resolve_model(p.model)
    from .data import check_columns

    check_columns(p.train, "train")
    if p.queries:  # none in quality mode
        read_rows(p.queries, "queries")
    if p.device_memory_gb is not None and not p.model.startswith(("models:/", "runs:/")):
        from influence_engine.plan import plan_for  # from the config alone: refuse a layer that cannot fit, now

        plan_for(resolve_model(p.model), p.layers, trust_remote_code=p.trust_remote_code, precision=p.precision,
                 device_budget=int(p.device_memory_gb * 2**30)).check()
    if p.planted and not Path(p.planted).is_file():
        raise UserError(f"--planted {p.planted}: no such file", hint="give a JSON file {query_id: [train ids]}")
    check_writable(resolve_home(p.output_dir), f"--output-dir {resolve_home(p.output_dir)}")


def _token_counts(eng: InfluenceEngine, df: pl.DataFrame, where: str) -> tuple[pl.DataFrame, int, int, int]:
    docs = encode_frame(eng, df, where)
    unk = eng.tokenizer.unk_token_id if eng.tokenizer is not None else None
    n_unk = sum(e.input_ids.count(unk) for e in docs) if unk is not None else 0
    n_tok = [e.n_tokens_original for e in docs]
    return (df.with_columns(pl.Series("n_tokens", n_tok, dtype=pl.Int64)),
            sum(len(e.input_ids) for e in docs), sum(e.truncated for e in docs), n_unk)


def load_inputs(p: AuditParams, log: Any = None) -> Inputs:
    """Read training data and queries, tokenise, validate both with Great Expectations, write shards."""
    from .validation import validate_query_frame, validate_training_frame

    model_dir = resolve_model(p.model)
    eng = engine_spec(p, model_dir).engine()
    train = read_rows(p.train, "train")
    queries = read_rows(p.queries, "queries")
    train, n_tokens, n_truncated, n_unk = _token_counts(eng, train, "train")
    queries, q_tokens, _, q_unk = _token_counts(eng, queries, "queries")
    truncate = p.on_long == "truncate"
    reports = {"training_input": validate_training_frame(train, max_length=p.max_length, truncate=truncate),
               "query_input": validate_query_frame(queries, max_length=p.max_length, truncate=truncate)}
    as_json = {k: r.to_json() for k, r in reports.items()}
    failed = [r for r in reports.values() if not r.success]
    if failed:
        raise InputValidationError("input validation failed:\n" + "\n".join(r.summary() for r in failed), as_json)
    data_fp, query_fp = data_fingerprint(train), data_fingerprint(queries)
    audit_id = stable_key(p.identity() | {"model_fingerprint": eng.fingerprint, "data": data_fp,
                                          "queries": query_fp}, length=12)
    adir = audit_dir(resolve_home(p.output_dir), audit_id)
    for name, rep in as_json.items():
        write_json_atomic(adir / "validation" / f"{name}.json", rep)
    shards = []
    for i, shard in enumerate(shard_frame(add_content_hashes(train), p.shard_size)):
        key = data_fingerprint(shard)[:16]
        path = adir / "inputs" / f"train-{i:05d}-{key}.parquet"
        if not path.exists():
            write_parquet_atomic(shard, path)
        shards.append(Shard(i, str(path), key, shard.height))
    queries_all = adir / "inputs" / "queries-all.parquet"
    if not queries_all.exists():
        write_parquet_atomic(queries, queries_all)
    if log is not None:
        log.info(f"audit {audit_id}: {train.height} documents in {len(shards)} shards, {n_tokens} tokens "
                 f"({n_truncated} truncated), {queries.height} queries available")
        for what, unk, total in (("training", n_unk, n_tokens), ("query", q_unk, q_tokens)):
            if unk:
                log.warning(f"{unk} of {total} {what} tokens ({unk / max(total, 1):.1%}) are the tokenizer's "
                            f"unknown token {eng.tokenizer.unk_token!r}: its vocabulary does not cover this text")
    return Inputs(audit_id, str(adir), model_dir, eng.fingerprint, data_fp, query_fp, shards, train.height,
                  n_tokens, n_truncated, str(queries_all), queries.height, as_json, n_unk)


def sample_query_file(p: AuditParams, inputs: Inputs) -> str:
    """Seeded random or stratified sample of the query source, written beside the audit."""
    path = Path(inputs.audit_dir) / "queries.parquet"
    if not path.exists():
        df = pl.read_parquet(inputs.queries_path)
        picked = sample_queries(df, p.n_queries, seed=p.seed,
                                stratify_by=p.stratify_by if p.sampling == "stratified" else None)
        write_parquet_atomic(picked, path)
    return str(path)
