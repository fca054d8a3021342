"""Mapped stages on a 2-worker local Dask cluster (prefect-dask) give the sequential result: the same candidates and
ranks, scores within tasks.influence.candidates.RUNNER_TOLERANCE."""

from __future__ import annotations

import time

import polars as pl
import pytest

from flows.runners import run_audit, task_runner_for
from influence_engine import UserError
from tasks.influence.candidates import compare_candidates
from tasks.options import AuditParams

pytestmark = pytest.mark.slow


def test_dask_local_cluster_matches_sequential_run(demo_model, demo_data, tmp_path):
    def params(home):
        return AuditParams(model=str(demo_model), train=[str(demo_data / "corpus.jsonl")],
                           queries=str(demo_data / "queries.jsonl"), n_queries=6, top_k=10, max_length=128,
                           shard_size=100, batch_size=16, output_dir=str(home), explain_top=2)

    t0 = time.perf_counter()
    sequential = run_audit(params(tmp_path / "seq"))
    t1 = time.perf_counter()
    distributed = run_audit(params(tmp_path / "dask"), dask="local:2")
    t2 = time.perf_counter()
    print(f"sequential {t1 - t0:.1f} s, dask local:2 {t2 - t1:.1f} s (whole flow)")
    assert sequential["audit_id"] == distributed["audit_id"]
    a = pl.read_parquet(sequential["candidates"])
    b = pl.read_parquet(distributed["candidates"])
    assert a.height == 6 * 10
    assert a.select("query_id", "train_id", "rank").equals(b.select("query_id", "train_id", "rank"))
    assert compare_candidates(a, b, "fp32") == []  # one thread per Dask worker, two in-process
    assert len(list((tmp_path / "dask" / "audits" / distributed["audit_id"] / "scores").glob("*.parquet"))) == 4


def test_dask_option_is_checked():
    assert task_runner_for(None) is None
    with pytest.raises(UserError, match="scheduler address"):
        task_runner_for("somewhere")
    with pytest.raises(UserError, match="local:N"):
        task_runner_for("local:two")
