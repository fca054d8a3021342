"""Verification and evaluation in the real audit flow on the demo (Prefect, MLflow, GE): the verification stage's
columns, metrics and validation entry; `influence-audit verify` and `influence-audit evaluate` on kronfluence-format
retraining files whose outputs are exactly linear in the audit's scores (LDS 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from mlflow import MlflowClient

from flows.audit import influence_audit
from tasks.options import AuditParams

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-c", "from influence_audit.cli import main; main()"]  # this checkout's CLI


@pytest.fixture(scope="module")
def verified_audit(demo_model, demo_data, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    p = AuditParams(model=str(demo_model), train=[str(demo_data / "corpus.jsonl")],
                    queries=str(demo_data / "queries.jsonl"), n_queries=6, top_k=0, max_length=128, shard_size=200,
                    batch_size=16, output_dir=str(home), planted=str(demo_data / "planted.json"), verify_k=3)
    return home, influence_audit(p)


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([*CLI, *args, "--home", str(home)],
                          capture_output=True, text=True, env=env, timeout=600)


def test_the_flow_verifies_and_records_the_checks(verified_audit):
    home, result = verified_audit
    assert "verify_candidates" in result["seconds"]
    cands = pl.read_parquet(result["candidates"])
    top = cands.filter(pl.col("rank") <= 3)
    assert top["verified"].null_count() == 0 and top["counterfactual_delta"].null_count() == 0
    metrics = MlflowClient().get_run(result["run_id"]).data.metrics
    for key in ("verified_at_10", "verified_random_at_10", "verify_spearman", "verify_seconds"):
        assert key in metrics, key
    summary = json.loads((Path(result["audit_dir"]) / "verification.json").read_text())
    assert metrics["verified_at_10"] == pytest.approx(top["verified"].mean())
    assert summary["settings"]["lr_chosen"] and summary["settings"]["params"] == "all"
    report = json.loads((Path(result["audit_dir"]) / "validation" / "candidates.json").read_text())
    entry = next(r for r in report["results"] if r["check"] == "verified_above_random")
    assert entry["severity"] == "warning" and report["success"]
    client = MlflowClient()
    table = json.loads(Path(client.download_artifacts(result["run_id"], "candidates.json",
                                                      str(home / "dl"))).read_text())
    assert {"counterfactual_delta", "counterfactual_delta_down", "verified"} <= set(table["columns"])
    # the review's traces carry the check on each verified candidate's span
    from tasks.record.traces import audit_traces

    exp = client.get_run(result["run_id"]).info.experiment_id
    spans = [sp for t in audit_traces(exp, result["audit_id"], include_spans=True) for sp in t.data.spans]
    checked = [sp.attributes for sp in spans if "influence_audit.verified" in (sp.attributes or {})]
    assert len(checked) == top.height
    assert all("influence_audit.counterfactual_delta_down" in a for a in checked)


def test_evaluate_reads_kronfluence_files_and_logs_lds(verified_audit, demo_data, tmp_path):
    home, result = verified_audit
    audit_dir = Path(result["audit_dir"])
    cands = pl.read_parquet(result["candidates"])
    queries = pl.read_parquet(audit_dir / "queries.parquet")["id"].to_list()
    docs = pl.read_ndjson(demo_data / "corpus.jsonl")["id"].to_list()
    scores = cands.pivot(on="train_id", index="query_id", values="score").join(
        pl.DataFrame({"query_id": queries}), on="query_id", how="right").select(docs).to_numpy()
    masks = np.random.default_rng(0).random((12, len(docs))) < 0.5
    torch.save(masks, tmp_path / "masks.pt")
    torch.save(-(masks @ scores.T), tmp_path / "losses.pt")  # losses: lower when the kept documents help
    r = _cli("evaluate", "--audit", result["audit_id"], "--kronfluence", str(tmp_path), "--planted",
             str(demo_data / "planted.json"), home=home)
    assert r.returncode == 0, r.stderr
    metrics = MlflowClient().get_run(result["run_id"]).data.metrics
    assert metrics["lds"] == pytest.approx(1.0) and metrics["lds_ci_low"] == pytest.approx(1.0)
    assert metrics["planted_mrr"] > 0 and "planted_recall_at_10" in metrics
    assert "plots/lds.png" in {a.path for a in MlflowClient().list_artifacts(result["run_id"], "plots")}
    # the settings the scores were computed with, beside the metrics (JSON and MLflow params)
    settings = json.loads((audit_dir / "evaluation.json").read_text())["settings"]
    from tasks.options import DEFAULT_DAMPING, DEFAULT_FISHER

    assert settings["fisher"] == DEFAULT_FISHER and settings["damping"] == DEFAULT_DAMPING
    assert settings["checkpoints"] == 1
    params = MlflowClient().get_run(result["run_id"]).data.params
    assert params["evaluation.fisher"] == DEFAULT_FISHER and params["evaluation.strategy"] == settings["strategy"]
    assert params["fisher"] == DEFAULT_FISHER
    bad = _cli("evaluate", "--audit", result["audit_id"], "--masks", str(tmp_path / "masks.pt"), "--outputs",
               str(tmp_path / "masks.pt"), home=home)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "columns but" in bad.stderr


def test_verify_command_rechecks_an_audit(verified_audit):
    home, result = verified_audit
    r = _cli("verify", "--audit", result["audit_id"], "--verify", "2", "--verify-optimizer", "sgd", home=home)
    assert r.returncode == 0, r.stderr
    assert "verified_at_10" in r.stdout
    summary = json.loads((Path(result["audit_dir"]) / "verification.json").read_text())
    assert summary["k"] == 2 and summary["settings"]["optimizer"] == "sgd"
    unknown = _cli("verify", "--audit", "nope", home=home)
    assert unknown.returncode != 0 and "no audit 'nope'" in unknown.stderr and "Traceback" not in unknown.stderr


def test_score_verify_adds_the_columns_to_its_output(demo_model, demo_data, tmp_path):
    out = tmp_path / "scores.parquet"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([*CLI, "score", "--model", str(demo_model), "--train",
                        str(demo_data / "corpus.jsonl"), "--queries", str(demo_data / "queries.jsonl"), "--out",
                        str(out), "--top-k", "3", "--verify", "2", "--max-length", "128", "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    df = pl.read_parquet(out)
    assert df.filter(pl.col("rank") <= 2)["verified"].null_count() == 0
    assert df.filter(pl.col("rank") == 3)["verified"].null_count() == df.filter(pl.col("rank") == 3).height
    assert (tmp_path / "scores.verification" / "verification.json").exists() and "verified_at_10" in r.stdout
