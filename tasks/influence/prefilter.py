"""A lexical prefilter (``--prefilter bm25:K``): per query, only the K training documents most similar to its
prompt + completion by BM25 (the ``bm25s`` library) are scored, as the EK-FAC paper prefilters candidates with
TF-IDF before computing influences.

Factors are still fitted on every document (they describe the training distribution); only scoring is
restricted. The documents scored are the union of the queries' candidates, in one pass; each query's top-k is
then taken among its own K candidates.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from influence_engine.errors import UserError

if TYPE_CHECKING:  # the flag is parsed by the flow's parameters, which must not import torch
    from influence_engine import Example, InfluenceEngine, PreparedQueries

CANDIDATE_SCHEMA = {"query_id": pl.String, "train_id": pl.String, "bm25": pl.Float64}


def _texts(df: pl.DataFrame) -> list[str]:
    if "text" in df.columns:
        return df["text"].cast(pl.String).to_list()
    return [f"{p} {c}" for p, c in zip(df["prompt"].to_list(), df["completion"].to_list(), strict=True)]


@dataclass
class Candidates:
    """Per query, its K candidate documents (BM25 order), with the library's timings."""

    by_query: dict[str, list[str]]
    n_docs: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def union(self) -> set[str]:
        return {d for ids in self.by_query.values() for d in ids}

    @property
    def fraction_scored(self) -> float:
        """Documents passed through the model, as a fraction of the corpus."""
        return len(self.union) / max(self.n_docs, 1)

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame([{"query_id": q, "train_id": d, "bm25": float(-r)} for q, ids in self.by_query.items()
                             for r, d in enumerate(ids)], schema=CANDIDATE_SCHEMA)

    @classmethod
    def from_frame(cls, df: pl.DataFrame, n_docs: int) -> Candidates:
        by: dict[str, list[str]] = {}
        for q, d in df.select("query_id", "train_id").iter_rows():
            by.setdefault(q, []).append(d)
        return cls(by, n_docs)


def bm25_candidates(train: pl.DataFrame, queries: pl.DataFrame, k: int) -> Candidates:
    """The ``k`` training documents with the highest BM25 score against each query's prompt + completion."""
    try:
        import bm25s
    except ImportError:
        raise UserError("--prefilter bm25:K needs the bm25s library",
                        hint="pip install 'influence-audit[prefilter]'") from None

    t0 = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(_texts(train), stopwords="en", show_progress=False), show_progress=False)
    t1 = time.perf_counter()
    q_tokens = bm25s.tokenize(_texts(queries), stopwords="en", return_ids=False, show_progress=False)
    k = min(k, train.height)
    index, _ = retriever.retrieve(q_tokens, k=k, show_progress=False, n_threads=1)
    t2 = time.perf_counter()
    ids = train["id"].cast(pl.String).to_list()
    by_query = {q: [ids[j] for j in row] for q, row in zip(queries["id"].to_list(), np.asarray(index), strict=True)}
    return Candidates(by_query, train.height, {"bm25_index_s": t1 - t0, "bm25_query_s": t2 - t1})


def write_candidates(cands: Candidates, path: str | Path) -> str:
    from tasks.files import write_parquet_atomic

    write_parquet_atomic(cands.frame(), path)
    return str(path)


def score_candidates(eng: InfluenceEngine, docs: Sequence[Example], prepared: PreparedQueries, cands: Candidates,
                     top_k: int) -> list[dict]:
    """``query_id, train_id, score, rank`` rows: each query's top ``top_k`` among its own candidates in
    ``docs`` (documents that are no query's candidate are not scored: one pass over the rest)."""
    union = cands.union
    picked = [e for e in docs if e.id in union]
    if not picked:
        return []
    scores = eng.score(picked, prepared, top_k=0).all_scores  # (Q, len(picked))
    column = {e.id: j for j, e in enumerate(picked)}
    rows = []
    for q, qid in enumerate(prepared.ids):
        mine = [(float(scores[q, column[d]]), d) for d in cands.by_query.get(qid, []) if d in column]
        mine.sort(key=lambda p: (-p[0], p[1]))
        keep = mine if top_k == 0 else mine[:top_k]
        rows += [{"query_id": qid, "train_id": d, "score": s, "rank": r} for r, (s, d) in enumerate(keep, 1)]
    return rows


def audit_candidates(p: Any, ins: Any, queries_path: str) -> str:
    """The flow's prefilter stage: candidates for the sampled queries (``p.prefilter``), written once beside the
    audit with the fraction of the corpus they leave to score."""
    from influence_engine.atomic import write_json_atomic
    from tasks.inputs.sources import read_rows
    from tasks.options import fields_of, parse_prefilter

    path = Path(ins.audit_dir) / "prefilter-candidates.parquet"
    if not path.exists():
        k = parse_prefilter(p.prefilter)
        train = read_rows(p.train, "train", fields=fields_of(p), split=p.split)
        cands = bm25_candidates(train, pl.read_parquet(queries_path), k or 1)
        write_json_atomic(path.with_suffix(".json"), {"prefilter": p.prefilter, "documents_scored": len(cands.union),
                                                      "fraction_scored": cands.fraction_scored, **cands.seconds})
        write_candidates(cands, path)
    return str(path)
