"""The audit flow with the gradient index and with the BM25 prefilter, on the demo data through real Prefect:
the index (sketch off, fp64) gives the same candidates as scoring by a pass with exact queries; a later audit of
the same model and data reuses it; the prefilter scores only its candidates."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from flows.audit import influence_audit
from tasks.options import AuditParams

pytestmark = pytest.mark.slow  # several demo audits through Prefect


def _params(model: Path, data: Path, home: Path, **kw) -> AuditParams:
    base = dict(model=str(model), train=[str(data / "corpus.jsonl")], queries=str(data / "queries.jsonl"), top_k=10,
                max_length=128, shard_size=150, batch_size=16, output_dir=str(home), n_queries=6,
                planted=str(data / "planted.json"), explain_top=1)
    return AuditParams(**(base | kw))


def test_index_audit_matches_exact_scoring_and_is_reused(demo_model, demo_data, tmp_path):
    home = tmp_path / "home"
    exact = influence_audit(_params(demo_model, demo_data, home, precision="fp64", query_rank=0))
    by_index = influence_audit(_params(demo_model, demo_data, home, precision="fp64", query_rank=0, use_index=True,
                                       sketch="off", refine=0))
    a = pl.read_parquet(exact["candidates"]).sort("query_id", "rank")
    b = pl.read_parquet(by_index["candidates"]).sort("query_id", "rank")
    assert a["train_id"].to_list() == b["train_id"].to_list()
    assert b["score"].to_numpy() == pytest.approx(a["score"].to_numpy(), rel=1e-9, abs=1e-12)
    manifest = json.loads((Path(by_index["candidates"]).parent / "manifest.json").read_text())
    parts = sorted(p for p in (Path(manifest["index"]) / "parts").glob("*.npy")
                   if not p.name.endswith((".norms.npy", ".probe.npy")))  # rows; beside them norms and probe scores
    assert len(parts) == 3 and manifest["stages"]["build_index"] == "done"
    assert manifest["index_probe_recall"]["recall_at_10"] == 1.0  # sketch off: the index finds its probes' top 10
    mtimes = [p.stat().st_mtime_ns for p in parts]

    again = influence_audit(_params(demo_model, demo_data, home, precision="fp64", query_rank=0, use_index=True,
                                    sketch="off", refine=20, top_k=5))  # a new audit: same model, data, factors
    assert [p.stat().st_mtime_ns for p in parts] == mtimes  # the index was reused, not rebuilt
    c = pl.read_parquet(again["candidates"]).sort("query_id", "rank")
    assert c["train_id"].to_list() == a.filter(pl.col("rank") <= 5)["train_id"].to_list()


def test_prefilter_scores_only_bm25_candidates(demo_model, demo_data, tmp_path):
    result = influence_audit(_params(demo_model, demo_data, tmp_path / "home", prefilter="bm25:20"))
    audit_dir = Path(result["candidates"]).parent
    cands = pl.read_parquet(result["candidates"])
    allowed = pl.read_parquet(audit_dir / "prefilter-candidates.parquet")
    assert cands.join(allowed, on=["query_id", "train_id"], how="anti").height == 0
    info = json.loads((audit_dir / "prefilter-candidates.json").read_text())
    assert 0 < info["fraction_scored"] < 1
    assert result["metrics"]["planted_recall_at_10"] >= 0.8
