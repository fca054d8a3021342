"""Candidates: the global top-k merged from the shards' lists, explained, validated, measured against planted
culprits. Plain functions (the flow's tasks wrap them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from influence_engine import PreparedQueries
from influence_engine.atomic import write_json_atomic

from .engine_io import merge_top_k, write_parquet_atomic
from .inputs import Inputs
from .params import AuditParams
from .pipeline import EngineSpec


def _snippet(row: dict[str, Any], n: int = 200) -> str:
    text = row.get("text") or f"{row.get('prompt', '')}{row.get('completion', '')}"
    return text if len(text) <= n else text[: n - 1] + "…"


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


def validate_outputs(p: AuditParams, inputs: Inputs, candidates_path: str, queries_path: str,
                     log: Any = None) -> dict:
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
    if not report.success and log is not None:
        log.error(report.summary())
    elif report.warnings() and log is not None:
        log.warning(report.summary())
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
