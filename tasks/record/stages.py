"""The MLflow record and the review hand-off as Prefect tasks. Bodies call :mod:`tasks.record.run`. No Prefect
retries: MLflow calls have one retry policy, the tracker's (:class:`tasks.record.tracker.Tracker`)."""

from __future__ import annotations

from prefect import task

from tasks.inputs.shards import Inputs
from tasks.options import AuditParams
from tasks.record import run as record


@task(name="start-mlflow-run")
def start_run(p: AuditParams, ins: Inputs | None, audit_id: str) -> str:
    return record.start_run(p, ins, audit_id)


@task(name="record-in-mlflow")
def record_results(p: AuditParams, ins: Inputs, run_id: str, candidates_path: str, validation: dict[str, dict],
                   stage_seconds: dict[str, float], factors_cached: bool) -> dict[str, float]:
    return record.record_results(p, ins, run_id, candidates_path, validation, stage_seconds, factors_cached)


@task(name="finish-mlflow-run")
def finish_run(run_id: str, succeeded: bool, validation_passed: bool | None, error: str | None = None) -> None:
    record.finish_run(run_id, succeeded, validation_passed, error)


@task(name="open-review")
def open_review(p: AuditParams, ins: Inputs, run_id: str, candidates_path: str) -> str:
    return record.open_review(p, ins, run_id, candidates_path)
