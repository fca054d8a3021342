"""The audit flow in quality mode end to end: real Prefect (temporary local server), real MLflow (sqlite), real
Great Expectations, then a review decision keyed by issue type and document reaching the flagged-documents
Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from mlflow import MlflowClient
from test_quality import COPY_ID, GIBBERISH_ID, _gibberish

from flows.audit import influence_audit
from tasks.options import AuditParams

pytestmark = pytest.mark.slow  # a temporary Prefect server and a model trained for the test: ~1 min on 2 cores


@pytest.fixture(scope="module")
def quality_run(demo_data, tmp_path_factory):
    from influence_audit.demo.model import read_jsonl, train_demo_model

    rows = read_jsonl(demo_data / "corpus.jsonl")[:40]
    rows += [{"id": COPY_ID, "text": rows[3]["text"]}, {"id": GIBBERISH_ID, "text": _gibberish()}]
    d = tmp_path_factory.mktemp("quality-flow")
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    model = train_demo_model(corpus, d / "model", epochs=3, log=None)
    home = d / "home"
    params = AuditParams(mode="quality", model=str(model), train=[str(corpus)], max_length=128, shard_size=20,
                         batch_size=16, output_dir=str(home), tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
                         hot_spots=3)
    return home, rows, params, influence_audit(params)


def test_quality_mode_is_recorded_in_mlflow_and_opens_review(quality_run):
    home, rows, params, result = quality_run
    assert result["mode"] == "quality"
    client = MlflowClient()
    run = client.get_run(result["run_id"])
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert (tags["audit.status"], tags["validation.status"], tags["review.status"]) == ("succeeded", "passed", "open")
    assert metrics["documents"] == len(rows) and metrics["flagged_near_duplicate"] == 1  # the copy; the first kept
    assert metrics["flagged_low_quality"] >= 1 and metrics["seconds_quality_signals"] > 0
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"candidates.json", "quality_report.json", "quality_report.parquet", "hot_spots.parquet", "report.html",
            "plots", "validation"} <= artifacts
    assert {a.path for a in client.list_artifacts(result["run_id"], "plots")} == {
        "plots/self_influence.png", "plots/loss_vs_self_influence.png"}
    assert {a.path for a in client.list_artifacts(result["run_id"], "validation")} >= {
        "validation/quality_report.json", "validation/training_input.json"}
    table = json.loads(Path(client.download_artifacts(result["run_id"], "quality_report.json",
                                                      str(home / "dl"))).read_text())
    assert len(table["data"]) == len(rows) and {"id", "near_duplicate", "reason"} <= set(table["columns"])
    report = pl.read_parquet(result["report"])
    assert set(report.filter(pl.col("near_duplicate"))["id"]) == {COPY_ID}  # a copy of a document in another shard
    assert set(report.filter(pl.col("duplicate_group") == rows[3]["id"])["id"]) == {COPY_ID, rows[3]["id"]}
    assert report.filter(pl.col("id") == GIBBERISH_ID)["low_quality"].item()
    html = (Path(result["audit_dir"]) / "report.html").read_text()
    assert "near_duplicate issues" in html and COPY_ID in html
    manifest = json.loads((Path(result["audit_dir"]) / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["mode"] == "quality"


def test_review_decisions_on_quality_flags_feed_the_flagged_documents(quality_run):
    from tasks.review.decisions import list_audits, submit_review

    home, rows, params, result = quality_run
    assert result["audit_id"] in {a["audit_id"] for a in list_audits(home, mlflow=False)}
    out = submit_review(home, result["audit_id"], "ann",
                        [{"query_id": "near_duplicate", "train_id": COPY_ID, "verdict": "culprit",
                          "comment": "drop the copy"}], tracking_uri=params.tracking_uri)
    assert out["submitted"] == 1
    flagged = pl.read_parquet(Path(home) / "flagged_documents.parquet")
    row = flagged.row(0, named=True)
    assert (row["train_id"], row["query_id"], row["verdict"]) == (COPY_ID, "near_duplicate", "culprit")
    assert MlflowClient().get_run(result["run_id"]).data.tags["review.culprit"] == "1"


def test_sync_records_a_quality_audit_in_another_store(quality_run):
    """`influence-audit sync` (here into a store that has never seen the audit) records it as a quality audit."""
    from tasks.record.sync import sync_one

    home, rows, params, result = quality_run
    uri = f"sqlite:///{Path(home) / 'other' / 'mlflow.db'}"
    outcome = sync_one(Path(result["audit_dir"]) / "manifest.json", tracking_uri=uri, home=Path(home))
    assert outcome.action == "recorded" and outcome.run_id != result["run_id"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(outcome.run_id)
    assert run.data.tags["audit.status"] == "succeeded" and run.data.metrics["flagged_near_duplicate"] == 1
    assert {"quality_report.json", "candidates.json", "report.html"} <= {a.path for a in
                                                                           client.list_artifacts(outcome.run_id)}


def test_quality_mode_streams_a_datasets_directory_with_mapped_fields(quality_run, tmp_path):
    """The quality audit reads its data as the influence audit does: a datasets DatasetDict directory, a split,
    mapped id and text columns, shards as row ranges (never copies), and the same report as from the JSONL file."""
    import datasets

    home, rows, params, result = quality_run
    frame = pl.DataFrame({"doc": [r["id"] for r in rows], "body": [r["text"] for r in rows]})
    datasets.DatasetDict({"train": datasets.Dataset.from_polars(frame)}).save_to_disk(str(tmp_path / "hf"))
    mapped = influence_audit(params.model_copy(update={
        "train": [str(tmp_path / "hf")], "split": "train", "id_field": "doc", "text_field": "body",
        "output_dir": str(tmp_path / "home"), "tracking_uri": f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"}))
    adir = Path(mapped["audit_dir"])
    assert not list(adir.glob("inputs/train-*")), "no copies of the training data"
    manifest = json.loads((adir / "shards.json").read_text())
    assert [s["n_docs"] for s in manifest["shards"]] == [20, 20, 2]
    assert {s["rows"]["form"] for s in manifest["shards"]} == {"arrow"}
    want = pl.read_parquet(result["report"]).sort("id")
    got = pl.read_parquet(mapped["report"]).sort("id")
    assert got["id"].to_list() == want["id"].to_list()
    for col in ("self_influence", "loss"):
        assert (got[col] - want[col]).abs().max() <= 1e-4 * max(want[col].abs().max(), 1e-12), col
    assert got.filter(pl.col("near_duplicate"))["id"].to_list() == want.filter(pl.col("near_duplicate"))["id"].to_list()
