"""Candidates: the global top-k merged from the shards' lists, explained, validated, measured against planted
culprits. Plain functions (the flow's tasks wrap them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from influence_engine import PreparedQueries
from influence_engine.atomic import write_json_atomic
from tasks.engine import EngineSpec
from tasks.files import write_parquet_atomic
from tasks.influence.compute import merge_top_k
from tasks.inputs.shards import Inputs
from tasks.options import AuditParams


def _snippet(row: dict[str, Any], n: int = 200) -> str:
    if row.get("text") is None and row.get("prompt") is None and row.get("messages") is not None:
        text = " | ".join(f"{m['role']}: {m['content']}" for m in row["messages"])
    else:
        text = row.get("text") or f"{row.get('prompt', '')}{row.get('completion', '')}"
    return text if len(text) <= n else text[: n - 1] + "…"


def _with_prompt_and_completion(queries: pl.DataFrame) -> pl.DataFrame:
    """Chat queries (``messages``) shown as a prompt (the turns before the last, ``role: content | ...``) and a
    completion (the last assistant message)."""
    if "prompt" in queries.columns or "messages" not in queries.columns:
        return queries
    return queries.with_columns(
        pl.col("messages").map_elements(lambda m: " | ".join(f"{t['role']}: {t['content']}" for t in m[:-1]),
                                        return_dtype=pl.String).alias("prompt"),
        pl.col("messages").list.last().struct.field("content").alias("completion"))


def documents_by_id(inputs: Inputs, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The rows of the ``wanted`` training documents (see :func:`tasks.inputs.shards.documents_by_id`)."""
    from tasks.inputs.shards import documents_by_id as read

    return read(inputs.shards, wanted)


def merge_candidates(spec: EngineSpec, p: AuditParams, inputs: Inputs, shard_paths: list[str], queries_path: str,
                     prepared_path: str) -> str:
    """Global top-k per query, with snippets and per-layer / per-token breakdowns of the top candidates."""
    path = Path(inputs.audit_dir) / "candidates.parquet"
    if path.exists():
        return str(path)
    top = merge_top_k([pl.read_parquet(x) for x in shard_paths], p.top_k)
    queries = _with_prompt_and_completion(pl.read_parquet(queries_path)).select(
        pl.col("id").alias("query_id"), pl.col("prompt").alias("query_prompt"),
        pl.col("completion").alias("query_completion"))
    docs_by_id = documents_by_id(inputs, set(top["train_id"].to_list()))
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
    from tasks.influence.checks import validate_candidates

    cands = pl.read_parquet(candidates_path)
    from tasks.inputs.shards import shard_ids

    train_ids = shard_ids(inputs).collect()["id"]
    query_ids = pl.read_parquet(queries_path, columns=["id"])["id"]
    from tasks.influence.verify import verification_metrics

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


# How far two runs of the same audit may differ when their runners differ (in-process with torch's default thread
# count, `local:N` Dask workers with one thread each, a scheduler elsewhere): the reductions are the same (partials
# add up in shard order, shard lists merge by score then id), but a matrix product split over 2 threads adds in
# another order than one over 1 thread, so the last bits differ (~1e-7 relative at fp32, measured on this 2-core
# machine). At fp64 two fits of the same factors differ by ~1e-11 of the largest score here (measured across MKL code
# paths and thread counts) but once by 1.3e-9 on a CI runner (two fits in one process; cause not found), hence 1e-8.
# Scores are compared relative to the query's largest |score|.
RUNNER_TOLERANCE = {"fp64": 1e-8, "fp32": 1e-4, "bf16": 5e-2}


def compare_candidates(a: pl.DataFrame, b: pl.DataFrame, precision: str = "fp32") -> list[str]:
    """What differs between two candidate tables of the same audit beyond what the runner explains (an empty
    list when they agree): the same (query, document, rank) rows, and scores, per-layer and per-token scores
    within :data:`RUNNER_TOLERANCE` of each query's largest |score|. Two documents may trade ranks only when
    their scores tie within that tolerance."""
    tol = RUNNER_TOLERANCE[precision]
    problems: list[str] = []
    if a.height != b.height:
        return [f"{a.height} candidates against {b.height}"]
    a, b = a.sort("query_id", "rank"), b.sort("query_id", "rank")
    scale = a.group_by("query_id").agg(pl.col("score").abs().max().alias("scale"))
    scale_of = {q: max(float(s), 1e-30) for q, s in scale.iter_rows()}
    for ra, rb in zip(a.iter_rows(named=True), b.iter_rows(named=True), strict=True):
        q, limit = ra["query_id"], tol * scale_of.get(ra["query_id"], 1.0)
        where = f"query {q} rank {ra['rank']}"
        if (ra["query_id"], ra["rank"]) != (rb["query_id"], rb["rank"]):
            return [f"{where}: the ranked lists differ in shape"]
        if abs(ra["score"] - rb["score"]) > limit:
            problems.append(f"{where}: score {ra['score']!r} against {rb['score']!r} (tolerance {limit:.3g})")
        if ra["train_id"] != rb["train_id"]:
            other = a.filter((pl.col("query_id") == q) & (pl.col("train_id") == rb["train_id"]))
            if other.is_empty() or abs(other["score"][0] - ra["score"]) > limit:
                problems.append(f"{where}: {ra['train_id']} against {rb['train_id']}, not a tie")
            continue
        for col in ("layer_scores", "token_scores"):
            if col not in a.columns or col not in b.columns:
                continue
            va, vb = ra[col], rb[col]
            if (va is None) != (vb is None):
                problems.append(f"{where}: {col} present in one table only")
                continue
            if va is None:
                continue
            xa = json.loads(va) if isinstance(va, str) else va
            xb = json.loads(vb) if isinstance(vb, str) else vb
            if isinstance(xa, dict):
                if xa.keys() != xb.keys():
                    problems.append(f"{where}: {col} name other layers")
                    continue
                xa, xb = [xa[k] for k in sorted(xa)], [xb[k] for k in sorted(xa)]
            if len(xa) != len(xb) or any(abs(u - v) > limit for u, v in zip(xa, xb, strict=True)):
                problems.append(f"{where}: {col} differ beyond {limit:.3g}")
    return problems
