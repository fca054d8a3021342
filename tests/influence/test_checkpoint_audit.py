"""``audit --checkpoint`` gives the candidates ``score --checkpoint`` gives (float64): each checkpoint's factors are
fitted as the audit's mapped stages and cached by its own fingerprint, each shard scored on every checkpoint."""

from __future__ import annotations

import polars as pl
import pytest
from reliability_support import build_model, corpus, queries, run_in_process, write_jsonl

from flows.audit import influence_audit
from influence_engine import UserError
from tasks.inputs.preflight import preflight
from tasks.options import AuditParams

pytestmark = pytest.mark.slow  # an audit through Prefect


def test_audit_over_checkpoints_matches_score_over_checkpoints(tmp_path):
    a, b = build_model(tmp_path / "a", seed=0), build_model(tmp_path / "b", seed=1)
    train = write_jsonl(tmp_path / "train.jsonl", corpus(10))
    qs = write_jsonl(tmp_path / "q.jsonl", queries(2))
    common = dict(precision="fp64", query_rank=0, top_k=3)
    params = AuditParams(model=str(a), checkpoint=[str(b)], train=[str(train)], queries=str(qs), shard_size=4,
                         output_dir=str(tmp_path / "home"), **common)
    result = influence_audit(params)
    got = pl.read_parquet(f"{result['audit_dir']}/candidates.parquet").sort("query_id", "rank")
    assert len(list((tmp_path / "home").rglob("factors.json"))) == 2  # one factor cache per checkpoint
    out = tmp_path / "score.parquet"
    proc = run_in_process(["score", "--model", str(a), "--checkpoint", str(b), "--train", str(train), "--queries",
                           str(qs), "--out", str(out), "--precision", "fp64", "--query-rank", "0", "--top-k", "3"])
    assert proc.returncode == 0, proc.stderr
    want = pl.read_parquet(out).sort("query_id", "rank")
    assert got["train_id"].to_list() == want["train_id"].to_list()
    assert got["score"].to_list() == pytest.approx(want["score"].to_list(), rel=1e-9)
    with pytest.raises(UserError, match="--checkpoint with --prefilter"):
        preflight(params.model_copy(update={"prefilter": "bm25:3"}))
