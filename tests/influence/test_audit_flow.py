"""The audit flow end to end on the demo data: real Prefect (temporary local server), real MLflow (sqlite),
real Great Expectations. Checks the record through MlflowClient, planted recall, and factor caching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file

from flows.audit import influence_audit
from tasks.options import AuditParams

pytestmark = pytest.mark.slow  # a whole demo audit through Prefect (about a minute)


def _params(model: Path, data: Path, home: Path, **kw) -> AuditParams:
    base = dict(model=str(model), train=[str(data / "corpus.jsonl")], queries=str(data / "queries.jsonl"), top_k=10,
                max_length=128, shard_size=150, batch_size=16, output_dir=str(home),
                planted=str(data / "planted.json"))
    return AuditParams(**(base | kw))


@pytest.fixture(scope="module")
def audit(demo_model, demo_data, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    result = influence_audit(_params(demo_model, demo_data, home))
    return home, result


def test_demo_audit_is_recorded_in_mlflow(audit, demo_data):
    home, result = audit
    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["audit.status"] == "succeeded"
    assert tags["validation.status"] == "passed"
    assert tags["review.status"] == "open"
    assert tags["audit.id"] == result["audit_id"]
    assert client.get_experiment(run.info.experiment_id).name == "influence-audit"
    for key in ("model", "model_fingerprint", "data_fingerprint", "strategy", "layers", "damping", "query_rank",
                "seed", "shard_count"):
        assert key in params, key
    assert params["strategy"] == "ekfac" and params["shard_count"] == "3"
    n_queries = pl.read_ndjson(demo_data / "queries.jsonl").height
    assert metrics["documents"] == pl.read_ndjson(demo_data / "corpus.jsonl").height
    assert metrics["queries"] == n_queries
    assert metrics["tokens"] > 0 and metrics["scoring_tokens_per_s"] > 0
    for stage in ("load_inputs", "fit_factors", "score_shards", "merge_candidates", "validate_outputs"):
        assert metrics[f"seconds_{stage}"] >= 0
    assert metrics["planted_recall_at_10"] >= 0.6
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"candidates.json", "report.html", "plots", "validation", "candidates"} <= artifacts
    assert {a.path for a in client.list_artifacts(result["run_id"], "plots")} == {
        "plots/layer_share.png", "plots/score_distribution.png"}
    table_path = client.download_artifacts(result["run_id"], "candidates.json", str(home / "dl"))
    table = json.loads(Path(table_path).read_text())
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    assert len(rows) == n_queries * 10
    assert {"query_id", "query_prompt", "train_id", "snippet", "score", "rank"} <= set(table["columns"])
    cands = pl.read_parquet(result["candidates"])
    assert cands.height == n_queries * 10
    explained = cands.filter(pl.col("rank") <= 5)
    assert explained["layer_scores"].null_count() == 0
    for r in explained.head(5).iter_rows(named=True):
        assert sum(r["token_scores"]) == pytest.approx(r["score"], rel=1e-4, abs=1e-6)
        assert sum(json.loads(r["layer_scores"]).values()) == pytest.approx(r["score"], rel=1e-4, abs=1e-6)
    manifest = json.loads((Path(result["audit_dir"]) / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["mlflow_run_id"] == result["run_id"]


def test_factors_are_reused_by_a_later_audit_and_refit_after_the_model_changes(audit, demo_model, demo_data,
                                                                               tmp_path):
    home, first = audit
    assert not first["factors_cached"]
    again = influence_audit(_params(demo_model, demo_data, home, top_k=3, n_queries=4))
    assert again["factors_cached"] and again["audit_id"] != first["audit_id"]
    changed = tmp_path / "changed-model"
    shutil.copytree(demo_model, changed)
    weights = load_file(changed / "model.safetensors")
    name = next(k for k in weights if k.endswith("mlp.c_fc.weight"))
    weights[name] = weights[name] + 1e-3 * torch.randn_like(weights[name])
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    refit = influence_audit(_params(changed, demo_data, home, top_k=3, n_queries=4))
    assert not refit["factors_cached"]
    assert MlflowClient().get_run(refit["run_id"]).data.params["model_fingerprint"] != \
        MlflowClient().get_run(again["run_id"]).data.params["model_fingerprint"]


def test_every_query_is_a_trace_and_a_rerun_keeps_the_review(audit, demo_model, demo_data):
    """One trace per audited query; a reviewer's mark made before a rerun of the same audit (a weekly schedule
    does this) is pulled at the rerun's end, its review stays in progress and no trace is written twice."""
    import mlflow
    from mlflow.entities import AssessmentSource

    from tasks.record.traces import QUERY_TAG, audit_traces
    from tasks.review.decisions import load_decisions

    home, result = audit
    client = MlflowClient()
    exp = client.get_run(result["run_id"]).info.experiment_id
    traces = audit_traces(exp, result["audit_id"], include_spans=True)
    cands = pl.read_parquet(result["candidates"])
    assert sorted(t.info.tags[QUERY_TAG] for t in traces) == sorted(cands["query_id"].unique())
    trace = traces[0]
    top = next(s for s in trace.data.spans if s.attributes.get("influence_audit.rank") == 1)
    mlflow.log_feedback(trace_id=trace.info.trace_id, name="culprit", value=True, span_id=top.span_id,
                        source=AssessmentSource("HUMAN", "ann"))
    again = influence_audit(_params(demo_model, demo_data, home))
    assert again["audit_id"] == result["audit_id"] and again["run_id"] == result["run_id"]
    assert client.get_run(result["run_id"]).data.tags["review.status"] == "in-progress"
    decisions = load_decisions(home, result["audit_id"])
    assert decisions.select("query_id", "train_id", "verdict", "reviewer").rows() == [
        (trace.info.tags[QUERY_TAG], top.attributes["influence_audit.train_id"], "culprit", "ann")]
    assert len(audit_traces(exp, result["audit_id"])) == len(traces)
