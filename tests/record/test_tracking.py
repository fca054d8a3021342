"""tasks.record.tracker against a real MLflow sqlite store under a temporary directory (no mocks)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import polars as pl
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.telemetry import get_telemetry_client
from test_report import make_candidates

from influence_engine.errors import UserError
from tasks.influence.report import plot_layer_share, plot_score_distribution, render_html_report
from tasks.record import tracker as tracking
from tasks.record.tracker import (
    TABLE_COLUMNS,
    TrackingUnavailable,
    configure_tracking,
    find_audit_run,
    finish_audit_run,
    record_audit_results,
    start_audit_run,
)

_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One sqlite store for the module (creating one runs MLflow's migrations: ~2 s)."""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        for name in _ENV:
            mp.delenv(name, raising=False)
        uri = configure_tracking(None, root)
        assert uri == f"sqlite:///{root.resolve()}/mlflow.db"
        yield root
        mlflow.set_tracking_uri(None)


@pytest.fixture
def experiment(store: Path) -> str:
    return f"audit-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def outputs(tmp_path: Path) -> dict[str, object]:
    """Files an audit leaves on disk: Parquet, plots, HTML page, one extra artifact."""
    cands = make_candidates()
    parquet = tmp_path / "out" / "candidates.parquet"
    parquet.parent.mkdir()
    cands.write_parquet(parquet)
    plots = [plot_score_distribution(cands, tmp_path / "out" / "scores.png"),
             plot_layer_share(cands, tmp_path / "out" / "layers.png")]
    page = render_html_report(cands, tmp_path / "out" / "audit.html", title="audit", meta={"model": "m"})
    extra = tmp_path / "out" / "manifest.json"
    extra.write_text('{"ok": true}\n')
    return {"candidates": cands, "candidates_parquet": parquet, "plots": plots, "html_report": page,
            "extra_artifacts": [extra]}


def record(run_id: str, outputs: dict[str, object]) -> None:
    record_audit_results(
        run_id,
        metrics={"n_candidates": 6.0, "score_max": 1.5},
        validation_reports={"candidates": {"success": True, "results": []},
                            "scores sanity": {"success": False}},
        **outputs,  # type: ignore[arg-type]
    )


def all_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for f in client.list_artifacts(run_id, path):
        out |= all_artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_configure_tracking(tmp_path: Path, store: Path) -> None:
    assert get_telemetry_client() is None
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert mlflow.get_tracking_uri() == f"sqlite:///{store.resolve()}/mlflow.db"
    assert (store / "mlartifacts").is_dir()
    artifacts_uri = (store / "mlartifacts").resolve().as_uri()
    assert tracking._artifact_location(mlflow.get_tracking_uri()) == artifacts_uri
    assert tracking._artifact_location("http://127.0.0.1:5000") is None
    # precedence: explicit URI, then $MLFLOW_TRACKING_URI, then the default store (checked by `store`)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
        assert configure_tracking(None, tmp_path) == "http://127.0.0.1:5999"
        assert configure_tracking("http://127.0.0.1:6001", tmp_path) == "http://127.0.0.1:6001"
        assert mlflow.get_tracking_uri() == "http://127.0.0.1:6001"
    mlflow.set_tracking_uri(f"sqlite:///{store.resolve()}/mlflow.db")
    assert not (tmp_path / "mlflow.db").exists()


def test_audit_run_round_trip(experiment: str, outputs: dict[str, object], store: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient()
    run_id = start_audit_run(experiment, run_name="audit-1", params={"model": "tiny-gpt", "top_k": 3},
                             tags={"audit.id": "a1", "team": "ml"})
    run = client.get_run(run_id)
    assert run.info.run_name == "audit-1"
    assert run.info.status == "RUNNING"
    assert run.data.params == {"model": "tiny-gpt", "top_k": "3"}
    assert {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")} == {
        "audit.id": "a1", "team": "ml", "audit.status": "running", "validation.status": "pending",
        "review.status": "none"}
    # artifacts land beside the database, not in ./mlruns
    assert run.info.artifact_uri.startswith((store / "mlartifacts").resolve().as_uri())

    record(run_id, outputs)
    run = client.get_run(run_id)
    assert run.data.metrics == {"n_candidates": 6.0, "score_max": 1.5}
    assert all_artifacts(client, run_id) == {
        "candidates.json", "candidates/candidates.parquet", "report.html", "manifest.json",
        "plots/scores.png", "plots/layers.png", "validation/candidates.json", "validation/scores_sanity.json"}
    report = mlflow.artifacts.load_dict(f"runs:/{run_id}/validation/scores_sanity.json")
    assert report == {"success": False}
    html = mlflow.artifacts.load_text(f"runs:/{run_id}/report.html")
    assert "<title>audit</title>" in html

    # candidates.json: fluent load_table searches the *current* experiment only (even with run_ids), and another
    # test may have set an active experiment: name ours explicitly
    table = client.load_table(run.info.experiment_id, "candidates.json", run_ids=[run_id])
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert len(table) == 6
    expected = make_candidates().select(TABLE_COLUMNS).sort(["query_id", "rank"])
    assert table["train_id"].tolist() == expected["train_id"].to_list()
    assert table["score"].tolist() == pytest.approx(expected["score"].to_list())
    assert table["rank"].tolist() == expected["rank"].to_list()
    assert table["query_completion"].tolist() == expected["query_completion"].to_list()
    assert "<script>alert(1)</script> harmless text" in table["snippet"].tolist()
    parquet = pl.read_parquet(mlflow.artifacts.download_artifacts(
        f"runs:/{run_id}/candidates/candidates.parquet"))
    assert parquet.equals(make_candidates())

    # recording again (rerun, sync) replaces the table instead of appending to it
    record(run_id, outputs)
    assert len(client.load_table(run.info.experiment_id, "candidates.json", run_ids=[run_id])) == 6
    tags = client.get_run(run_id).data.tags
    assert tags["mlflow.loggedArtifacts"].count("candidates.json") == 1

    finish_audit_run(run_id, succeeded=True, validation_passed=True)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.end_time is not None
    assert run.data.tags["audit.status"] == "succeeded"
    assert run.data.tags["validation.status"] == "passed"
    assert run.data.tags["review.status"] == "open"
    assert "audit.error" not in run.data.tags


def test_failed_run(experiment: str) -> None:
    run_id = start_audit_run(experiment, run_name="bad", params={}, tags={"audit.id": "f1"})
    finish_audit_run(run_id, succeeded=False, validation_passed=False, error="boom " * 300)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["audit.status"] == "failed"
    assert run.data.tags["validation.status"] == "failed"
    assert run.data.tags["review.status"] == "none"
    assert len(run.data.tags["audit.error"]) == 500
    assert run.data.tags["audit.error"].startswith("boom boom")

    run_id = start_audit_run(experiment, run_name="crash", params={}, tags={"audit.id": "f2"})
    finish_audit_run(run_id, succeeded=False, validation_passed=None, error="OOM")
    tags = MlflowClient().get_run(run_id).data.tags
    got = (tags["audit.status"], tags["validation.status"], tags["audit.error"])
    assert got == ("failed", "pending", "OOM")


def test_rerun_reuses_the_audit_run(experiment: str) -> None:
    client = MlflowClient()
    assert find_audit_run(experiment, "r1") is None  # no experiment yet
    first = start_audit_run(experiment, run_name="r", params={"model": "m"}, tags={"audit.id": "r1"})
    assert find_audit_run(experiment, "r1") == first
    assert find_audit_run(experiment, "other") is None
    finish_audit_run(first, succeeded=False, validation_passed=None, error="killed")

    again = start_audit_run(experiment, run_name="r", params={"model": "m", "seed": 1},
                            tags={"audit.id": "r1"})
    assert again == first
    run = client.get_run(first)
    assert run.info.status == "RUNNING"
    assert run.data.tags["audit.status"] == "running"
    assert "audit.error" not in run.data.tags
    assert run.data.params == {"model": "m", "seed": "1"}
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    assert len(client.search_runs([exp_id])) == 1

    with pytest.raises(UserError, match="param model"):
        start_audit_run(experiment, run_name="r", params={"model": "other"}, tags={"audit.id": "r1"})


def test_other_errors_are_not_retried(experiment: str, outputs: dict[str, object]) -> None:
    with pytest.raises(MlflowException) as info:
        record("0" * 32, outputs)
    assert not isinstance(info.value, TrackingUnavailable)


def test_unreachable_server(tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(tracking, "_BACKOFF_S", (0.0, 0.0))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    configure_tracking(f"http://127.0.0.1:{port}", tmp_path)
    try:
        with pytest.raises(TrackingUnavailable) as info:
            start_audit_run("x", run_name="x", params={}, tags={"audit.id": "u1"})
        assert isinstance(info.value, UserError)
        assert "3 tries" in str(info.value)
        assert "influence-audit sync" in str(info.value)
        with pytest.raises(TrackingUnavailable):
            finish_audit_run("0" * 32, succeeded=True, validation_passed=True)
    finally:
        mlflow.set_tracking_uri(f"sqlite:///{store.resolve()}/mlflow.db")


def test_rerun_keeps_the_review_status(experiment: str) -> None:
    """A weekly rerun of the same audit (same id) must not reopen a review that has started or finished."""
    client = MlflowClient()
    first = start_audit_run(experiment, run_name="w", params={"model": "m"}, tags={"audit.id": "w1"})
    finish_audit_run(first, succeeded=True, validation_passed=True)
    assert client.get_run(first).data.tags["review.status"] == "open"
    for status in ("in-progress", "done"):
        client.set_tag(first, "review.status", status)
        again = start_audit_run(experiment, run_name="w", params={"model": "m"}, tags={"audit.id": "w1"})
        assert again == first and client.get_run(first).data.tags["review.status"] == status
        finish_audit_run(first, succeeded=True, validation_passed=True)
        assert client.get_run(first).data.tags["review.status"] == status
